"""A Hugging Face causal LM trained on plain text with the same training loop as everything else.

The demo has no pretrained LLM to download, so it trains a tiny Llama on its own captions and then freezes it
as the base of the TEAL model. A user with a real LLM never needs this; `init_from_hf` also allows a short
continued pre-training of an existing folder. The result is exported as an ordinary Hugging Face folder
(`hf/`: config, safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models.pretrained import Pretrained
from models.tokenizer import StepOutput

HF_DIR = "hf"


@dataclass
class TextLMConfig:
    text_tokenizer: str = ""           # a Hugging Face tokenizer folder: sets the vocabulary
    init_from_hf: str | None = None    # an existing causal LM folder to continue from; None: a fresh Llama
    hidden_size: int = 128             # the fresh Llama's shape
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 1024


class TextLM(Pretrained):
    """Next-token loss over padded text batches {"input_ids", "attention_mask"} (B, T)."""

    kind = "text_lm"
    config_class = TextLMConfig

    def __init__(self, config: TextLMConfig):
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        if not config.text_tokenizer or not Path(config.text_tokenizer).is_dir():
            raise FileNotFoundError(f"missing text tokenizer folder: {config.text_tokenizer!r}")
        self.config = config
        self.tokenizer = AutoTokenizer.from_pretrained(config.text_tokenizer)
        if config.init_from_hf:
            self.llm = AutoModelForCausalLM.from_pretrained(config.init_from_hf)
        else:
            self.llm = LlamaForCausalLM(LlamaConfig(
                vocab_size=len(self.tokenizer), hidden_size=config.hidden_size,
                intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
                max_position_embeddings=config.max_position_embeddings, tie_word_embeddings=False,
                bos_token_id=self.tokenizer.bos_token_id, eos_token_id=self.tokenizer.eos_token_id,
                pad_token_id=self.tokenizer.pad_token_id))
        if self.llm.get_input_embeddings().num_embeddings < len(self.tokenizer):
            raise ValueError(f"{config.init_from_hf}: its {self.llm.get_input_embeddings().num_embeddings} ids do "
                             f"not cover the text tokenizer's {len(self.tokenizer)}")

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        ids, mask = batch["input_ids"].long(), batch["attention_mask"].long()   # (B, T)
        labels = ids.masked_fill(mask == 0, -100)
        out = self.llm(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
        targets = mask[:, 1:].bool()
        accuracy = (out.logits[:, :-1].argmax(-1) == ids[:, 1:])[targets].float().mean()
        return StepOutput(out.loss, {"loss": float(out.loss.detach()), "accuracy": float(accuracy),
                                     "tokens": float(targets.sum())})

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.training_step(batch)

    def _save_extra(self, path: Path) -> None:
        self.llm.save_pretrained(path / HF_DIR)
        self.tokenizer.save_pretrained(path / HF_DIR)


def packed_text_batch(tokenizer: Any, texts: list[str], context: int) -> dict[str, torch.Tensor]:
    """Texts -> {"input_ids", "attention_mask"} (B, context): <s> text </s> <s> text </s> ... packed into rows of
    `context` tokens (the last row padded), so that the LLM learns every position up to the context it will
    later read media blocks and captions at, not only the length of one caption."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
    stream: list[int] = []
    for text in texts:
        ids = tokenizer(str(text), add_special_tokens=False)["input_ids"]
        stream += ([bos] if bos is not None else []) + ids + ([eos] if eos is not None else [])
    if not stream:
        raise ValueError("no text to pack: every text of the batch is empty")
    rows = [stream[i:i + context] for i in range(0, len(stream), context)]
    input_ids = torch.full((len(rows), context), pad, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}
