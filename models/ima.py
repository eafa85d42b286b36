"""IMA (implicit multimodal alignment, Shukor & Cord 2024): how close perceptual and textual hidden states are,
layer by layer, inside the frozen LLM; and skipping the FFN (optionally attention) of perceptual tokens at inference.

Perceptual tokens are the media code ids (every codebook range of the JointVocabulary); textual tokens are the text
ids (bos/eos included). The boundary specials ([IMG], [FRAME], ...) belong to neither: they carry no content of
their own. Padding (doc id -1) is neither. An "example" is one document of a packed row.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import Cache

from models.vocabulary import SPECIAL_TOKENS, JointVocabulary

if TYPE_CHECKING:
    from models.multimodal_lm import MultimodalLM

logger = logging.getLogger(__name__)

FFN_NAMES = ("mlp", "feed_forward")
ATTENTION_NAMES = ("self_attn", "attn", "self_attention", "attention")
SUPPORTED = ("decoder layers whose FFN (a child named one of {names}) only adds its output to the residual stream: "
             "Llama, Qwen2, Mistral, Gemma (mlp + post_attention_layernorm), GPT-2 (mlp + ln_2), GPT-NeoX")


# --- the LLM's structure -----------------------------------------------------------------------------------------
def decoder_layers(llm: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The module that runs the decoder layers (LlamaModel, GPT2Model, ...) and the list of layers it runs."""
    config = llm.config.get_text_config()
    count = config.num_hidden_layers
    found = [(name, m) for name, m in llm.named_modules() if isinstance(m, nn.ModuleList) and len(m) == count]
    if len(found) != 1:
        raise ValueError(f"{type(llm).__name__}: expected one list of {count} decoder layers, found "
                         f"{[name for name, _ in found]}")
    name, layers = found[0]
    return llm.get_submodule(name.rpartition(".")[0]), layers


def block_part(layer: nn.Module, names: tuple[str, ...], what: str) -> nn.Module:
    """The layer's FFN or attention submodule, or an error naming what this module supports."""
    for name in names:
        if isinstance(getattr(layer, name, None), nn.Module):
            return getattr(layer, name)
    children = [n for n, _ in layer.named_children()]
    raise ValueError(f"{type(layer).__name__} has no {what} submodule named one of {list(names)} (it has "
                     f"{children}); IMA supports " + SUPPORTED.format(names=list(FFN_NAMES)))


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


# --- which tokens ------------------------------------------------------------------------------------------------
def perceptual_mask(ids: torch.Tensor, vocab: JointVocabulary) -> torch.Tensor:
    """(B, T) global ids -> (B, T) bool: media code ids (every codebook range); specials and text are not."""
    return ids >= vocab.text_size + len(SPECIAL_TOKENS)


def textual_mask(ids: torch.Tensor, vocab: JointVocabulary) -> torch.Tensor:
    """(B, T) global ids -> (B, T) bool: text ids."""
    return (ids >= 0) & (ids < vocab.text_size)


# --- capturing hidden states -------------------------------------------------------------------------------------
@dataclass
class HiddenStates:
    residual: torch.Tensor     # (L+1, B, T, D): 0 = the embeddings, l = the output of decoder layer l-1
    attention: torch.Tensor | None   # (L, B, T, D): what each layer's attention adds (with sublayers=True)
    ffn: torch.Tensor | None         # (L, B, T, D): what each layer's FFN adds, 0 where skipped (sublayers=True)
    perceptual: torch.Tensor   # (B, T) bool, padding excluded
    textual: torch.Tensor      # (B, T) bool, padding excluded
    doc_ids: torch.Tensor      # (B, T): which example each position belongs to (-1 = padding)


@torch.no_grad()
def capture_hidden_states(model: "MultimodalLM", ids: torch.Tensor, doc_ids: torch.Tensor | None = None,
                          position_ids: torch.Tensor | None = None, sublayers: bool = False) -> HiddenStates:
    """Runs the model once on (B, T) ids and records the residual stream (and each sub-block's output)."""
    doc_ids = torch.zeros_like(ids) if doc_ids is None else doc_ids
    _, layers = decoder_layers(model.llm)
    records: dict[str, list[torch.Tensor]] = {"embeddings": [], "residual": [], "attention": [], "ffn": []}

    def keep(key: str):
        return lambda module, args, output: records[key].append(_first(output).detach())

    def keep_embeddings(module: nn.Module, args: tuple, kwargs: dict) -> None:   # the first layer's input
        records["embeddings"].append((args[0] if args else kwargs["hidden_states"]).detach())

    handles = [layers[0].register_forward_pre_hook(keep_embeddings, with_kwargs=True)]
    for layer in layers:
        handles.append(layer.register_forward_hook(keep("residual")))
        if sublayers:
            handles += [block_part(layer, ATTENTION_NAMES, "attention").register_forward_hook(keep("attention")),
                        block_part(layer, FFN_NAMES, "FFN").register_forward_hook(keep("ffn"))]
    try:
        model.hidden_and_logits(ids, doc_ids, position_ids)
    finally:
        for handle in handles:
            handle.remove()
    inside = doc_ids >= 0
    return HiddenStates(residual=torch.stack(records["embeddings"] + records["residual"]),
                        attention=torch.stack(records["attention"]) if sublayers else None,
                        ffn=torch.stack(records["ffn"]) if sublayers else None,
                        perceptual=perceptual_mask(ids, model.vocab) & inside,
                        textual=textual_mask(ids, model.vocab) & inside, doc_ids=doc_ids)


def pool_examples(states: torch.Tensor, mask: torch.Tensor, doc_ids: torch.Tensor) -> torch.Tensor:
    """(L+1, B, T, D) states -> (L+1, N, D) float64: the mean over the masked tokens of each example (row, document)
    that has any, ordered by row then document id."""
    rows, cols = mask.nonzero(as_tuple=True)
    if rows.numel() == 0:
        return states.new_zeros((states.shape[0], 0, states.shape[-1]), dtype=torch.float64)
    keys = torch.stack([rows, doc_ids[rows, cols].to(rows.device)], dim=1)
    _, example = torch.unique(keys, dim=0, return_inverse=True)
    n = int(example.max()) + 1
    sums = torch.zeros(states.shape[0], n, states.shape[-1], dtype=torch.float64, device=states.device)
    sums.index_add_(1, example, states[:, rows, cols].double())
    return sums / torch.bincount(example, minlength=n).double()[None, :, None]


# --- the alignment score -----------------------------------------------------------------------------------------
@dataclass
class AlignmentScores:
    """Per-layer curves over the residual stream (index 0 = embeddings, L+1 entries) and their scalars."""
    same_layer: list[float]          # mean over all P x T example pairs of cos(P at l, T at l)
    ima: list[float]                 # mean over all pairs of cos(P at 0, T at l): the paper code's "IMA" mode
    global_same_layer: list[float]   # cos(dataset-mean P at l, dataset-mean T at l)
    global_ima: list[float]          # cos(dataset-mean P at 0, dataset-mean T at l)
    ima_score: float                 # mean of ima over layers 0..L-1 (DESIGN, see alignment_scores)
    same_layer_score: float          # mean of same_layer over the same layers
    perceptual_examples: int
    textual_examples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_pair_cosine(p: torch.Tensor, t: torch.Tensor) -> float:
    """(Np, D), (Nt, D) -> the mean of the full Np x Nt cosine matrix (every cross-example pair, not matched pairs)."""
    return float((F.normalize(p, dim=-1) @ F.normalize(t, dim=-1).T).mean())


def _global_cosine(p: torch.Tensor, t: torch.Tensor) -> float:
    return float(F.cosine_similarity(p.mean(0), t.mean(0), dim=0))


def alignment_scores(perceptual: torch.Tensor, textual: torch.Tensor) -> AlignmentScores:
    """(L+1, Np, D) and (L+1, Nt, D) token-mean pooled states -> the IMA curves and scores.

    The paper publishes no formula for its scalar score; we take (DESIGN, as PAPERS.md suggests) the mean over
    layers 0..L-1 of the "IMA" curve (perceptual tokens at the LLM input vs textual tokens at layer l); the last
    layer's output is left out, all curves keep every entry for other choices.
    """
    if perceptual.ndim != 3 or textual.ndim != 3 or perceptual.shape[0] != textual.shape[0] \
            or perceptual.shape[2] != textual.shape[2]:
        raise ValueError(f"expected (layers, examples, dim) for both, got {tuple(perceptual.shape)} and "
                         f"{tuple(textual.shape)}")
    if perceptual.shape[1] == 0 or textual.shape[1] == 0:
        raise ValueError(f"need at least one example with perceptual tokens and one with text, got "
                         f"{perceptual.shape[1]} and {textual.shape[1]}")
    p, t = perceptual.double(), textual.double()
    layers = range(p.shape[0])
    ima = [_mean_pair_cosine(p[0], t[l]) for l in layers]
    same = [_mean_pair_cosine(p[l], t[l]) for l in layers]
    scored = slice(0, max(len(ima) - 1, 1))
    return AlignmentScores(
        same_layer=same, ima=ima,
        global_same_layer=[_global_cosine(p[l], t[l]) for l in layers],
        global_ima=[_global_cosine(p[0], t[l]) for l in layers],
        ima_score=sum(ima[scored]) / len(ima[scored]), same_layer_score=sum(same[scored]) / len(same[scored]),
        perceptual_examples=p.shape[1], textual_examples=t.shape[1])


def measure_alignment(model: "MultimodalLM", batches: Iterable[dict[str, torch.Tensor]]) -> AlignmentScores:
    """The IMA scores over a dataset: batches of input_ids (B, T) with optional doc_ids and position_ids."""
    pooled_p, pooled_t = [], []
    for batch in batches:
        states = capture_hidden_states(model, batch["input_ids"], batch.get("doc_ids"), batch.get("position_ids"))
        pooled_p.append(pool_examples(states.residual, states.perceptual, states.doc_ids).cpu())
        pooled_t.append(pool_examples(states.residual, states.textual, states.doc_ids).cpu())
    if not pooled_p:
        raise ValueError("measure_alignment got no batches")
    return alignment_scores(torch.cat(pooled_p, dim=1), torch.cat(pooled_t, dim=1))


# --- skipping computation for perceptual tokens ------------------------------------------------------------------
@dataclass
class SkipConfig:
    start_layer: int = 0
    interval: int = 1                  # every k-th layer from start_layer
    end_layer: int | None = None       # exclusive; None = through the last layer
    ffn: bool = True                   # perceptual tokens skip the FFN: h_out = h + SA(LN1 h)
    attention: bool = False            # perceptual tokens skip attention too (their K/V still enter the cache)
    phase: Literal["prefill", "decode", "both"] = "both"


def skipped_layers(num_layers: int, config: SkipConfig) -> list[int]:
    """Layers idx with start <= idx < end and (idx - start) % interval == 0, so start itself always skips.
    (The paper's code uses start < idx < end and idx % k == 0: for that set pass its first multiple of k > start.)"""
    end = num_layers if config.end_layer is None else config.end_layer
    if config.interval < 1:
        raise ValueError(f"skip interval must be >= 1, got {config.interval}")
    if not 0 <= config.start_layer < end <= num_layers:
        raise ValueError(f"need 0 <= start_layer < end_layer <= {num_layers} layers, got start_layer="
                         f"{config.start_layer}, end_layer={config.end_layer}")
    if config.phase not in ("prefill", "decode", "both"):
        raise ValueError(f"phase must be 'prefill', 'decode' or 'both', got {config.phase!r}")
    if not (config.ffn or config.attention):
        raise ValueError("SkipConfig skips nothing: set ffn and/or attention")
    return list(range(config.start_layer, end, config.interval))


class PerceptualSkipping:
    """Patches the LLM so perceptual tokens skip the FFN (and optionally attention) in the chosen layers.

    Before every forward call, name the tokens that call processes: set_tokens(ids) (or set_mask(mask)); a call
    without them is an error, so a stale mask is never applied. The phase of a call is read from its KV cache:
    decode when the cache already holds tokens, prefill otherwise. Text tokens are computed as usual (they still
    see the changed perceptual states through attention). The FFN is run only on the kept tokens, so its compute
    is really saved; skipped attention is zeroed after being computed (keys and values are needed for the cache
    and HF attention cannot drop query rows), so only the analytic FLOP count (token_layer_flops) shows its saving.

        with PerceptualSkipping(model, SkipConfig(start_layer=8, interval=2)) as skipping:
            skipping.set_tokens(ids)
            model.hidden_and_logits(ids)
    """

    def __init__(self, model: nn.Module, config: SkipConfig, vocab: JointVocabulary | None = None):
        llm = getattr(model, "llm", model)
        self.vocab = vocab if vocab is not None else getattr(model, "vocab", None)
        self.config = config
        owner, layers = decoder_layers(llm)
        self.layers = skipped_layers(len(layers), config)
        self.counts = {"ffn": 0, "attention": 0}    # token-layers skipped so far
        self._flops_model = llm
        self._lora_route = getattr(model, "lora_route", None)   # per-modality LoRA: the FFN runs on fewer tokens
        self._pending: torch.Tensor | None = None
        self._active: torch.Tensor | None = None
        parts = [(block_part(layers[i], FFN_NAMES, "FFN"), self._ffn) for i in self.layers if config.ffn]
        parts += [(block_part(layers[i], ATTENTION_NAMES, "attention"), self._attention)
                  for i in self.layers if config.attention]
        if getattr(owner, "_ima_skipping", False):
            raise ValueError("this LLM is already patched by another PerceptualSkipping: remove() it first")
        self._owner, owner._ima_skipping = owner, True
        self._patched = []    # (module, the instance forward it had before, if any)
        for module, wrapper in parts:
            self._patched.append((module, vars(module).get("forward")))
            module.forward = functools.partial(wrapper, module.forward)   # shadows the class's forward
        self._hooks = [owner.register_forward_pre_hook(self._begin, with_kwargs=True),
                       owner.register_forward_hook(self._end, always_call=True)]

    # --- the tokens of the next call ---
    def set_tokens(self, ids: torch.Tensor) -> None:
        """(B, T) global ids of the tokens the next forward call processes (the new ones only, under a cache)."""
        if self.vocab is None:
            raise ValueError("set_tokens needs a JointVocabulary: pass vocab= or a MultimodalLM, or use set_mask")
        self.set_mask(perceptual_mask(ids, self.vocab))

    def set_mask(self, mask: torch.Tensor) -> None:
        """(B, T) bool: which tokens of the next forward call are perceptual."""
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(f"expected a (batch, tokens) bool mask, got {mask.dtype} of shape {tuple(mask.shape)}")
        self._pending = mask

    def _begin(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask, self._pending = self._pending, None
        if mask is None:
            raise ValueError("PerceptualSkipping: no tokens named for this forward call; call set_tokens(ids) "
                             "or set_mask(mask) before each call of the model")
        cache = next((a for a in (*args, *kwargs.values()) if isinstance(a, Cache)), None)
        phase = "decode" if cache is not None and cache.get_seq_length() > 0 else "prefill"
        skipping = self.config.phase in (phase, "both") and bool(mask.any())
        self._active = mask if skipping else None
        if skipping:
            n = int(mask.sum()) * len(self.layers)
            self.counts["ffn"] += n if self.config.ffn else 0
            self.counts["attention"] += n if self.config.attention else 0

    def _end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._active = None

    def _skip_mask(self, hidden: torch.Tensor) -> torch.Tensor | None:
        if self._active is None:
            return None
        if self._active.shape != hidden.shape[:2]:
            raise ValueError(f"the perceptual mask has shape {tuple(self._active.shape)} but this call processes "
                             f"{tuple(hidden.shape[:2])} tokens: name the tokens of this very call")
        return self._active.to(hidden.device)

    # --- the patched forwards ---
    def _ffn(self, original, hidden: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        skip = self._skip_mask(hidden)                                      # (B, T) or None
        if skip is None:
            return original(hidden, *args, **kwargs)
        keep = ~skip
        out = torch.zeros_like(hidden)                                      # (B, T, D): skipped tokens add 0
        if keep.any():
            routed = self._lora_route.tokens if self._lora_route is not None else None
            with contextlib.nullcontext() if routed is None else self._lora_route.using(routed[keep][None]):
                kept = original(hidden[keep][None], *args, **kwargs)         # (1, N_kept, D)
            if not isinstance(kept, torch.Tensor):
                raise ValueError(f"IMA skipping needs an FFN that returns a tensor, got {type(kept).__name__}")
            out[keep] = kept[0].to(out.dtype)
        return out

    def _attention(self, original, *args, **kwargs) -> Any:
        output = original(*args, **kwargs)
        skip = self._skip_mask(_first(output))
        if skip is None:
            return output
        zeroed = _first(output).masked_fill(skip[..., None], 0)            # (B, T, D): skipped tokens add 0
        return (zeroed, *output[1:]) if isinstance(output, tuple) else zeroed

    # --- FLOPs and undo ---
    def saved_flops(self, context_length: int) -> int:
        """Analytic FLOPs saved so far, with every skipped token attending over context_length keys."""
        flops = token_layer_flops(self._flops_model, context_length)
        return self.counts["ffn"] * flops.ffn + self.counts["attention"] * flops.attention

    def remove(self) -> None:
        """Restores the original forwards exactly; safe to call twice."""
        for module, previous in self._patched:
            del module.forward
            if previous is not None:
                module.forward = previous
        for hook in self._hooks:
            hook.remove()
        if self._hooks:
            del self._owner._ima_skipping
        self._patched, self._hooks = [], []

    def __enter__(self) -> "PerceptualSkipping":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


# --- FLOPs -------------------------------------------------------------------------------------------------------
@dataclass
class TokenLayerFlops:
    ffn: int         # one token through one FFN: 2 FLOPs per weight of its matrices (exact for any dense FFN)
    attention: int   # one query token in one attention block, beyond its K/V: q and o projections, QK^T and AV
    key_value: int   # the K and V projections of one token, still computed when it skips attention (the cache)


def token_layer_flops(model: nn.Module, context_length: int) -> TokenLayerFlops:
    """Per token and layer FLOPs (multiply-add = 2) of the model's decoder layers, from its config and FFN weights."""
    llm = getattr(model, "llm", model)
    config = llm.config.get_text_config()
    d, heads = config.hidden_size, config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    ffn = block_part(decoder_layers(llm)[1][0], FFN_NAMES, "FFN")
    return TokenLayerFlops(
        ffn=2 * sum(p.numel() for p in ffn.parameters() if p.ndim == 2),
        attention=2 * d * heads * head_dim * 2 + 2 * 2 * heads * head_dim * context_length,
        key_value=2 * 2 * d * kv_heads * head_dim)
