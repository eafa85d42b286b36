"""The folder `anytoken train` exports, as inference reads it: config.json + model.safetensors (the joint tables),
vocabulary.json, tokenizers/{image,audio,video}/, text_tokenizer/; the frozen base LLM stays in its own folder."""
from __future__ import annotations

import logging
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, read_json, write_json
from models.vocabulary import JointVocabulary

logger = logging.getLogger(__name__)

MEDIA = ("image", "audio", "video")


class ExportedModel:
    """An exported model folder: checks its layout on opening, loads each part on demand."""

    def __init__(self, root: str | Path, base_llm: str | None = None):
        self.root = Path(root)
        for name in (CONFIG_FILE, WEIGHTS_FILE, "vocabulary.json"):
            if not (self.root / name).exists():
                raise FileNotFoundError(f"{self.root} is not an exported model folder: it has no {name}")
        meta = read_json(self.root / CONFIG_FILE)
        if meta.get("kind") != "multimodal_lm":
            raise ValueError(f"{self.root / CONFIG_FILE} holds a {meta.get('kind')!r}, not a 'multimodal_lm'")
        self.config = meta["config"]
        self._base_llm = base_llm or self.config["base_llm"]
        self.vocab = JointVocabulary.from_pretrained(self.root)

    @property
    def base_llm(self) -> str:
        """The frozen base LLM's folder, checked when something needs it (a tokenizer replica does not)."""
        if not Path(self._base_llm).is_dir():
            raise FileNotFoundError(f"the base LLM folder {self._base_llm!r} of {self.root} is missing "
                                    "(point base_llm at where it is on this machine)")
        return self._base_llm

    @property
    def name(self) -> str:
        return self.root.name

    def tokenizer_modalities(self) -> list[str]:
        return [m for m in MEDIA if (self.root / "tokenizers" / m / CONFIG_FILE).is_file()]

    def media_tokenizers(self) -> dict[str, Any]:
        """Every media tokenizer the folder holds whose codes the vocabulary knows."""
        loaded = {}
        for modality in self.tokenizer_modalities():
            try:
                codes = self.vocab.codebook_range(modality)
            except ValueError:
                logger.warning("%s: tokenizers/%s is there but the vocabulary has no codebook for it", self.root, modality)
                continue
            tokenizer = load_pretrained(self.root / "tokenizers" / modality)
            if tokenizer.codebook_size != len(codes):
                raise ValueError(f"{self.root}: the {modality} tokenizer has {tokenizer.codebook_size} codes, the "
                                 f"vocabulary {len(codes)}")
            loaded[modality] = tokenizer
        return loaded

    def text_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        if not (self.root / "text_tokenizer").is_dir():
            raise FileNotFoundError(f"{self.root} has no text_tokenizer/: a training stage's folder, not an exported "
                                    "model (the model folder `anytoken train` finishes with has it)")
        tokenizer = AutoTokenizer.from_pretrained(self.root / "text_tokenizer")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{self.root / 'text_tokenizer'} has no end-of-sequence token")
        return tokenizer

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """The MultimodalLM: the base LLM from `base_llm`, the joint tables from this folder."""
        from models.configuration import config_from_dict
        from models.multimodal_lm import MultimodalLM, MultimodalLMConfig
        from models.pretrained import load_weights_into

        config = config_from_dict(MultimodalLMConfig, {**self.config, "base_llm": self.base_llm})
        # SEA is a training loss: no labeler here, so the CLIP and data folders training read need not exist
        config = replace(config, sea=replace(config.sea, weight=0.0))
        model = MultimodalLM(config)
        load_weights_into(model, self.root / WEIGHTS_FILE)
        model = model.to(device).eval()
        return model.to(dtype) if dtype is not None else model

    def context_length(self) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.base_llm)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"{self.base_llm}: its config names no context length (max_position_embeddings)")

    @staticmethod
    def write(out: str | Path, model, tokenizers: dict[str, Any], text_tokenizer: Any,
              training: dict[str, Any] | None = None) -> Path:
        """Save a MultimodalLM with its tokenizers in the exported layout (the inverse of loading)."""
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        for modality, tokenizer in tokenizers.items():
            tokenizer.save_pretrained(out / "tokenizers" / modality)
        text_tokenizer.save_pretrained(out / "text_tokenizer")
        base = str(Path(model.config.base_llm).resolve())
        write_json(out / "training.json", {"base_llm": base, **(training or {})})
        (out / "base_llm.txt").write_text(base + "\n")
        (out / "metrics.jsonl").write_text("")
        return out


def random_exported_model(out: str | Path, tokenizers: dict[str, Any], text_tokenizer: Any, hidden_size: int = 32,
                          layers: int = 2, heads: int = 4, context_length: int = 512, seed: int = 0,
                          lora_rank: int = 4) -> Path:
    """An untrained model in the exported layout over a random Llama saved beside it (`OUT-llm/`): what tests,
    benchmarks and server smoke runs load when no trained model is at hand. Its per-modality LoRA adapters
    (lora_rank > 0) are random too, so that they change what the model does."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.multimodal_lm import LoraConfig, MultimodalLM, MultimodalLMConfig

    out = Path(out)
    torch.manual_seed(seed)
    llm_dir = out.with_name(out.name + "-llm")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(text_tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=context_length, bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id, pad_token_id=text_tokenizer.pad_token_id,
        initializer_range=0.2)).save_pretrained(llm_dir)
    codebooks = {m: t.codebook_size for m, t in tokenizers.items() if m != "video"}
    if "video" in tokenizers and "image" not in tokenizers:
        codebooks["video"] = tokenizers["video"].codebook_size
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer, codebooks)
    special = sorted({i for i in (text_tokenizer.bos_token_id, text_tokenizer.eos_token_id,
                                  text_tokenizer.pad_token_id, text_tokenizer.unk_token_id) if i is not None})
    model = MultimodalLM(MultimodalLMConfig(base_llm=str(llm_dir.resolve()), vocabulary=vocab.to_dict(),
                                            text_special_ids=special, lora=LoraConfig(rank=lora_rank,
                                                                                      alpha=lora_rank)))
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_b_" in name:
                p.normal_(std=0.5)
    return ExportedModel.write(out, model, tokenizers, text_tokenizer, {"note": "random weights, untrained"})
