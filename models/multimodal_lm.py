"""The TEAL model: a frozen Hugging Face causal LM with a learnable joint embedding and output head for every
non-text range of the JointVocabulary, trained with the next-token loss over packed documents.

The LLM's own embedding and head serve the text ids and stay untouched; each other range (the special
tokens, each codebook) has its own embedding table and head, so stages can train them one by one and the
base checkpoint stays shareable. Optional: SEA alignment (models/sea.py), LoRA, unfreezing the LLM.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.document_attention import DOCUMENT_ATTENTION, documents
from models.lora import LoRALinear, LoraRoute, apply_lora
from models.pretrained import Pretrained
from models.sea import SeaConfig, SeaLabeler, sea_contrastive_loss
from models.tokenizer import StepOutput
from models.vocabulary import BOUNDARIES, SPECIAL_TOKENS, JointVocabulary

logger = logging.getLogger(__name__)

TABLES_BEFORE_CODEBOOKS = ("special",)


@dataclass
class LoraConfig:
    rank: int = 0                      # 0: no LoRA
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # "per_modality": one adapter per modality (X-LLM's per-modality interfaces): a token goes through the adapter
    # of the modality whose block it is in or follows within its document, text before any block through none,
    # so a stage on one modality cannot change the model on another. "shared": every token through one adapter.
    adapters: Literal["per_modality", "shared"] = "per_modality"
    # LoRA+ (Hayou et al., 2024): the B matrices learn at this multiple of the learning rate. B starts at zero and
    # A at random; at one rate for both, the update B A grows slowly. 1: plain LoRA.
    b_lr_ratio: float = 1.0
    # per_modality: the adapter the tokens inside a modality's blocks go through, where not the modality's own; its
    # closing boundary and the text after it still go through its own. {video: image}: a clip's frames, which are
    # image codes, are read as images are (X-LLM's video interface is its image one over each frame), and the video
    # adapter learns only what reading a clip adds (which way it moves)
    inside: dict[str, str] = field(default_factory=dict)


@dataclass
class RoutedCache:
    """Generation's KV cache and, per row, the LoRA adapter its last token went through (the route of the next
    tokens until a block opens)."""
    kv: Any
    last_route: torch.Tensor | None

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.kv.batch_repeat_interleave(repeats)
        if self.last_route is not None:
            self.last_route = self.last_route.repeat_interleave(repeats)


@dataclass
class MultimodalLMConfig:
    base_llm: str = ""                 # a Hugging Face causal LM folder; loaded frozen
    vocabulary: dict[str, Any] = field(default_factory=dict)   # JointVocabulary.to_dict()
    text_special_ids: list[int] = field(default_factory=list)  # bos/eos/pad: never SEA labels
    embedding_init: Literal["text_scale", "codebook"] = "text_scale"
    tokenizers: str | None = None      # folder of tokenizer folders: codebook init and SEA with a CLIP
    text_tokenizer: str | None = None  # needed by SEA with a CLIP (to spell its words)
    lora: LoraConfig = field(default_factory=LoraConfig)
    unfreeze_llm: Literal["none", "norms", "all"] = "none"
    sea: SeaConfig = field(default_factory=SeaConfig)
    # "grammar": each target's softmax runs over its own group (text and specials, or its codebook), as decoding
    # under the modality grammar chooses; the new media heads then cannot crowd out the frozen text head.
    # "joint": one softmax over the whole vocabulary.
    loss: Literal["grammar", "joint"] = "grammar"
    media_loss_weight: float = 1.0     # weight of media-code targets against text targets (an image has 64+)


def load_base_llm(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if not path or not Path(path).is_dir():
        raise FileNotFoundError(f"missing base LLM folder: {path!r}")
    return AutoModelForCausalLM.from_pretrained(path)


class MultimodalLM(Pretrained):
    kind = "multimodal_lm"
    config_class = MultimodalLMConfig

    def __init__(self, config: MultimodalLMConfig, llm: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.vocab = JointVocabulary.from_dict(config.vocabulary)
        self.llm = llm if llm is not None else load_base_llm(config.base_llm)
        llm_vocab = self.llm.get_input_embeddings().num_embeddings
        if self.vocab.text_size > llm_vocab:
            raise ValueError(f"the vocabulary's text range ({self.vocab.text_size}) exceeds the LLM's {llm_vocab} ids: "
                             "prepare the data with this LLM's tokenizer")
        self.llm.requires_grad_(False)
        # packed rows attend within each document (models/document_attention.py); elsewhere it is SDPA
        self.llm.set_attn_implementation(DOCUMENT_ATTENTION)
        d = self.llm.get_input_embeddings().embedding_dim
        sizes = {"special": len(SPECIAL_TOKENS), **self.vocab.codebooks}
        self.table_names = list(sizes)
        self.embeddings = nn.ModuleDict({n: nn.Embedding(s, d) for n, s in sizes.items()})
        self.heads = nn.ModuleDict({n: nn.Linear(d, s, bias=False) for n, s in sizes.items()})
        self._init_tables()
        self.lora_route = LoraRoute()
        self.lora_adapters: list[str] = []
        if config.lora.rank > 0:
            if config.lora.adapters not in ("per_modality", "shared"):
                raise ValueError(f"lora.adapters must be 'per_modality' or 'shared', not {config.lora.adapters!r}")
            self.lora_adapters = (self.vocab.grammar_modalities() if config.lora.adapters == "per_modality"
                                  else ["shared"])
            apply_lora(self.llm, config.lora.targets, config.lora.rank, config.lora.alpha, self.lora_adapters,
                       self.lora_route)
        self.routed = config.lora.rank > 0 and config.lora.adapters == "per_modality"
        unknown = sorted({*config.lora.inside, *config.lora.inside.values()} - set(self.lora_adapters))
        if config.lora.inside and (not self.routed or unknown):
            raise ValueError(f"lora.inside {config.lora.inside} names adapters this model lacks (its per-modality "
                             f"adapters: {self.lora_adapters if self.routed else []})")
        self.sea_labeler = SeaLabeler(config, self.vocab) if config.sea.weight > 0 else None
        self.set_trainable(["all"])

    # --- structure ---------------------------------------------------------------------------------
    def _range(self, name: str) -> range:
        if name == "special":
            start = self.vocab.text_size
            return range(start, start + len(SPECIAL_TOKENS))
        return range(self.vocab.offsets[name], self.vocab.offsets[name] + self.vocab.codebooks[name])

    @torch.no_grad()
    def _init_tables(self) -> None:
        text_embedding = self.llm.get_input_embeddings().weight
        emb_std = float(text_embedding.float().std())
        head = self.llm.get_output_embeddings()
        head_std = float(head.weight.float().std()) if head is not None else emb_std
        for name in self.table_names:
            nn.init.normal_(self.embeddings[name].weight, std=emb_std)
            nn.init.normal_(self.heads[name].weight, std=head_std)
        if self.config.embedding_init == "codebook":
            self._init_from_codebooks(float(text_embedding.float().norm(dim=-1).mean()))

    def _init_from_codebooks(self, target_norm: float) -> None:
        """Rows start as the tokenizer's code vectors through a fixed random projection, at the text rows' norm."""
        from models.pretrained import load_pretrained

        if not self.config.tokenizers:
            raise ValueError("embedding_init: codebook needs the tokenizers folder (model.tokenizers)")
        for name in self.vocab.codebooks:
            tokenizer = load_pretrained(Path(self.config.tokenizers) / name)
            quantizer = getattr(tokenizer, "quantizer", None) or tokenizer.image.quantizer
            codes = quantizer.codebook.float()                               # (K, code_dim)
            generator = torch.Generator().manual_seed(len(name))
            projection = torch.randn(codes.shape[1], self.embeddings[name].embedding_dim, generator=generator)
            rows = codes @ projection
            self.embeddings[name].weight.copy_(rows / rows.norm(dim=-1, keepdim=True) * target_norm)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Names a stage can train: 'special', each codebook, 'lora' (every adapter), 'lora.<adapter>' (one
        modality's), 'llm' (what unfreeze_llm allows)."""
        groups = {n: [*self.embeddings[n].parameters(), *self.heads[n].parameters()] for n in self.table_names}
        groups["lora"] = [p for n, p in self.llm.named_parameters() if "lora_" in n]
        if self.routed:
            for adapter in self.lora_adapters:
                groups[f"lora.{adapter}"] = [p for n, p in self.llm.named_parameters()
                                             if "lora_" in n and n.endswith(f"_{adapter}")]
        unfreeze = self.config.unfreeze_llm
        groups["llm"] = [p for n, p in self.llm.named_parameters() if "lora_" not in n and
                         (unfreeze == "all" or (unfreeze == "norms" and "norm" in n.lower()))]
        return groups

    def set_trainable(self, groups: list[str]) -> list[str]:
        """Train exactly these groups ('all' = every group); everything else is frozen. Returns the names."""
        available = self.parameter_groups()
        chosen = [g for g in available if available[g]] if "all" in groups else list(groups)
        unknown = [g for g in chosen if g not in available]
        if unknown:
            raise ValueError(f"unknown parameter group {unknown[0]!r} (known: {sorted(available)})")
        self.requires_grad_(False)
        for g in chosen:
            if not available[g]:
                raise ValueError(f"parameter group {g!r} is empty in this model (set lora.rank or unfreeze_llm)")
            for p in available[g]:
                p.requires_grad_(True)
        return chosen

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable parameters at the base rate, and LoRA's B matrices at lora.b_lr_ratio times it."""
        trainable = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        faster = [p for n, p in trainable if ".lora_b_" in n] if self.config.lora.b_lr_ratio != 1 else []
        chosen = {id(p) for p in faster}
        groups = [([p for _, p in trainable if id(p) not in chosen], 1.0), (faster, self.config.lora.b_lr_ratio)]
        return [(params, scale) for params, scale in groups if params]

    @torch.no_grad()
    def copy_interface(self, source: str, target: str) -> None:
        """Modality `target`'s interface to the LLM becomes a copy of `source`'s (its own tensors: training one
        leaves the other): its LoRA adapter, and the embedding and head rows of its block's start and end tokens,
        so that a target block reads, to the LLM, as a source block does (a one-frame clip as an image)."""
        for name in (source, target):
            if name not in self.lora_adapters or not self.routed:
                raise ValueError(f"no LoRA adapter {name!r} to copy (this model's per-modality adapters: "
                                 f"{self.lora_adapters if self.routed else []})")
        for module in self.llm.modules():
            if isinstance(module, LoRALinear):
                for part in ("a", "b"):
                    getattr(module, f"lora_{part}_{target}").copy_(getattr(module, f"lora_{part}_{source}"))
        for from_token, to_token in zip(BOUNDARIES[source], BOUNDARIES[target]):
            a, b = (self.vocab.special_id(t) - self.vocab.text_size for t in (from_token, to_token))
            for table in (self.embeddings["special"], self.heads["special"]):
                table.weight[b] = table.weight[a]

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen base LLM, which is loaded from its own folder."""
        trainable_llm = {id(p) for p in self.parameter_groups()["llm"] + self.parameter_groups()["lora"]}
        llm_names = {f"llm.{n}" for n, p in self.llm.named_parameters() if id(p) in trainable_llm}
        return {k: v for k, v in self.state_dict().items() if not k.startswith("llm.") or k in llm_names}

    def frozen_digest(self) -> str:
        """SHA-256 of the frozen LLM weights, to prove training left them alone."""
        trainable = {id(p) for p in self.parameters() if p.requires_grad}
        h = hashlib.sha256()
        for name, p in self.llm.named_parameters():
            if id(p) not in trainable:
                h.update(name.encode())
                h.update(p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    # --- computation ---------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) global ids -> (B, T, D): the LLM's rows for text, the joint tables for everything else."""
        text = ids < self.vocab.text_size
        out = self.llm.get_input_embeddings()(torch.where(text, ids, torch.zeros_like(ids)))
        out = out * text[..., None]
        for name in self.table_names:
            r = self._range(name)
            inside = (ids >= r.start) & (ids < r.stop)
            local = torch.where(inside, ids - r.start, torch.zeros_like(ids))
            out = out + self.embeddings[name](local).to(out.dtype) * inside[..., None]
        return out

    def lora_routes(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                    carried: torch.Tensor | None = None) -> torch.Tensor | None:
        """(B, T) ids -> (B, T) the per-modality adapter of each token: that of the last block opened at or before
        it within its document (the boundary and the text after the block included; lora.inside: the block's
        inside through another's), -1 before any; `carried` (B,): the route of the tokens before these
        (generation). None: no routing (no or one shared adapter)."""
        if not self.routed:
            return None
        index = {m: i for i, m in enumerate(self.lora_adapters)}
        marks = torch.full_like(ids, -1)         # where the route changes, to which adapter
        for modality, i in index.items():
            start, end = (self.vocab.special_id(t) for t in BOUNDARIES[modality])
            marks = torch.where(ids == start, index[self.config.lora.inside.get(modality, modality)], marks)
            if modality in self.config.lora.inside:
                marks = torch.where(ids == end, i, marks)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        last = torch.where(marks >= 0, positions, -1).cummax(dim=1).values
        if doc_ids is None:
            doc_start = torch.zeros_like(ids)
        else:
            starts = torch.ones_like(ids, dtype=torch.bool)
            starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            doc_start = torch.where(starts, positions, 0).cummax(dim=1).values
        routes = torch.where(last >= doc_start, marks.gather(1, last.clamp(min=0)), -1)
        if carried is not None:
            routes = torch.where((last < 0) & (doc_start == 0), carried.to(ids.device)[:, None], routes)
        return routes

    def hidden_and_logits(self, ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None,
                          embeds: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last hidden states (B, T, D) and logits over the whole joint vocabulary (B, T, V)."""
        if doc_ids is None:
            doc_ids = torch.zeros_like(ids)
        if position_ids is None:
            position_ids = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        embeds = self.embed(ids) if embeds is None else embeds
        with self.lora_route.using(self.lora_routes(ids, doc_ids)), documents(doc_ids):
            out = self.llm(inputs_embeds=embeds, position_ids=position_ids, output_hidden_states=True,
                           use_cache=False)
        hidden = out.hidden_states[-1]
        return hidden, self.joint_logits(hidden, out.logits)

    def joint_logits(self, hidden: torch.Tensor, text_logits: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last hidden states and the LLM's (B, T, V_llm) logits -> (B, T, V) over the joint vocabulary."""
        return torch.cat([text_logits[..., : self.vocab.text_size]] +
                         [self.heads[n](hidden).to(text_logits.dtype) for n in self.table_names], dim=-1)

    def next_token_logits(self, ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                          past_key_values: RoutedCache | None = None, use_cache: bool = True,
                          keep: int = 1) -> tuple[torch.Tensor, RoutedCache | None]:
        """Generation's step: (B, T) new ids, (B, T_past + T) padding mask, (B, T) positions -> (B, V) logits of
        the token after each row's last one, and the cache to pass back (None without use_cache).
        keep > 1: (B, keep, V), the logits after each of the last `keep` new tokens (scoring answers)."""
        kv, carried = (past_key_values.kv, past_key_values.last_route) if past_key_values is not None else (None, None)
        routes = self.lora_routes(ids, carried=carried)
        with self.lora_route.using(routes):
            out = self.llm(inputs_embeds=self.embed(ids), attention_mask=attention_mask, position_ids=position_ids,
                           past_key_values=kv, use_cache=use_cache, output_hidden_states=True,
                           logits_to_keep=keep)
        logits = self.joint_logits(out.hidden_states[-1][:, -keep:], out.logits[:, -keep:])
        cache = RoutedCache(out.past_key_values, None if routes is None else routes[:, -1]) if use_cache else None
        return (logits[:, 0] if keep == 1 else logits), cache

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ids, docs = batch["input_ids"].long(), batch["doc_ids"].long()
        embeds = self.embed(ids)
        _, logits = self.hidden_and_logits(ids, docs, batch["position_ids"].long(), embeds=embeds)
        targets = ids[:, 1:]
        valid = (batch["loss_mask"][:, 1:] > 0) & (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)
        picked, wanted = logits[:, :-1][valid].float(), targets[valid]                 # (N, V), (N,)
        if picked.shape[0] == 0:
            raise ValueError("a batch without any target token: check loss_mask and doc_ids")
        group = self.vocab.block_state(ids)[:, :-1][valid]          # where the sequence stands before each target
        if self.config.loss == "grammar":
            # a softmax over what the grammar allows there: text and specials outside blocks, a block's codes and
            # its end inside it; the new media heads never compete with the frozen text head
            allowed = torch.full_like(picked, float("-inf"))
            for i, columns in enumerate(self.vocab.grammar_groups()):
                rows = (group == i).nonzero()[:, 0]
                if len(rows):
                    columns = columns.to(picked.device)
                    allowed[rows[:, None], columns[None]] = picked[rows[:, None], columns[None]]
            per_token = F.cross_entropy(allowed, wanted, reduction="none")
            if not torch.isfinite(per_token).all():
                raise ValueError("a target the modality grammar does not allow where it stands (a media block "
                                 "that is not closed, or text inside a block): check how the data was made")
            predicted = allowed.argmax(-1)
        else:
            per_token = F.cross_entropy(picked, wanted, reduction="none")
            predicted = picked.argmax(-1)
        media = group > 0
        weights = torch.where(media, self.config.media_loss_weight, 1.0)
        lm_loss = (per_token * weights).sum() / weights.sum()
        loss = lm_loss
        correct = (predicted == wanted).float()
        metrics = {"lm_loss": float(lm_loss.detach()), "tokens": float(valid.sum()),
                   "accuracy": float(correct.mean())}
        for name, where in (("text", ~media), ("media", media)):
            if where.any():
                metrics[f"{name}_loss"] = float(per_token[where].mean().detach())
                metrics[f"{name}_accuracy"] = float(correct[where].mean())
        if self.sea_labeler is not None:
            pairs = self.sea_labeler.pairs(ids, docs, embeds, self.llm.get_input_embeddings())
            if pairs is not None:
                sea = sea_contrastive_loss(*pairs, temperature=self.config.sea.temperature)
                loss = loss + self.config.sea.weight * sea
                metrics["sea_loss"] = float(sea.detach())
        metrics["loss"] = float(loss.detach())
        return StepOutput(loss, metrics)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.training_step(batch)

    # --- saving --------------------------------------------------------------------------------------
    def _save_extra(self, path: Path) -> None:
        self.vocab.save_pretrained(path)
