"""A small CLIP (image encoder + text encoder, trained contrastively) and one scorer for it or a Hugging Face CLIP.

SEA asks a CLIP which words describe an image; at demo scale `anytoken train-clip` trains TinyCLIP on the
demo's image captions, at real scale any CLIPModel folder serves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.conv import ConvEncoder
from models.pretrained import Pretrained
from models.tokenizer import StepOutput, check_images

TEXT_TOKENIZER_DIR = "text_tokenizer"


@dataclass
class ClipConfig:
    image_size: int = 32
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    embed_dim: int = 64
    text_vocab_size: int = 512        # ids of the text tokenizer it reads
    text_width: int = 64
    text_layers: int = 1
    max_text_tokens: int = 24
    init_temperature: float = 0.07


class TinyCLIP(Pretrained):
    """Images (B, 3, H, W) and tokenized texts -> unit vectors in one space; trained with symmetric InfoNCE."""

    kind = "clip"
    config_class = ClipConfig

    def __init__(self, config: ClipConfig):
        super().__init__()
        self.config = config
        self.image_encoder = ConvEncoder(3, config.embed_dim, config.channels, config.channel_mult, 1, dims=2)
        self.token_embedding = nn.Embedding(config.text_vocab_size, config.text_width)
        self.position = nn.Parameter(torch.randn(config.max_text_tokens, config.text_width) * 0.02)
        layer = nn.TransformerEncoderLayer(config.text_width, nhead=4, dim_feedforward=4 * config.text_width,
                                           batch_first=True, norm_first=True)
        self.text_encoder = nn.TransformerEncoder(layer, config.text_layers, enable_nested_tensor=False)
        self.text_projection = nn.Linear(config.text_width, config.embed_dim)
        # shape (1,), not a scalar: DeepSpeed broadcasts parameters as bytes, which a 0-dim tensor cannot be viewed as
        self.logit_scale = nn.Parameter(torch.tensor([math.log(1 / config.init_temperature)]))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images, self.config.image_size)
        return F.normalize(self.image_encoder(images * 2 - 1).mean(dim=(2, 3)), dim=-1)     # (B, E)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids[:, : self.config.max_text_tokens], mask[:, : self.config.max_text_tokens].bool()
        if int(ids.max()) >= self.config.text_vocab_size:
            raise ValueError(f"text ids must lie below text_vocab_size {self.config.text_vocab_size}")
        x = self.token_embedding(ids) + self.position[: ids.shape[1]]
        x = self.text_encoder(x, src_key_padding_mask=~mask)
        pooled = (x * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return F.normalize(self.text_projection(pooled), dim=-1)                           # (B, E)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        image = self.encode_image(batch["media"])
        text = self.encode_text(batch["text_ids"], batch["text_mask"])
        logits = self.logit_scale.exp().clamp(max=100) * image @ text.t()
        # pairs with the same caption are not negatives of each other
        same = (batch["text_ids"][:, None, :] == batch["text_ids"][None, :, :]).all(-1)
        logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool, device=same.device), -1e4)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        accuracy = float((logits.argmax(dim=1) == target).float().mean())
        return StepOutput(loss, {"loss": float(loss.detach()), "accuracy": accuracy})

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.training_step(batch)


class ClipScorer(Protocol):
    def score(self, images: torch.Tensor, words: list[str]) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] and W words -> (B, W) cosine similarities."""


class _TinyClipScorer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer

        self.model = TinyCLIP.from_pretrained(path)
        self.text = AutoTokenizer.from_pretrained(path / TEXT_TOKENIZER_DIR)
        self._cache: dict[tuple[str, ...], torch.Tensor] = {}

    @torch.no_grad()
    def score(self, images: torch.Tensor, words: list[str]) -> torch.Tensor:
        key = tuple(words)
        if key not in self._cache:
            batch = self.text([f"a {w}" for w in words], padding=True, return_tensors="pt", add_special_tokens=False)
            self._cache[key] = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        size = self.model.config.image_size
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        return self.model.encode_image(images) @ self._cache[key].t()


class _HuggingFaceClipScorer:
    def __init__(self, path: Path):
        from transformers import AutoTokenizer, CLIPModel

        self.model = CLIPModel.from_pretrained(path).eval()
        self.text = AutoTokenizer.from_pretrained(path)
        vision = self.model.config.vision_config
        self.size = vision.image_size
        self.mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
        self.std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)

    @torch.no_grad()
    def score(self, images: torch.Tensor, words: list[str]) -> torch.Tensor:
        pixels = F.interpolate(images.float(), size=(self.size, self.size), mode="bicubic", align_corners=False)
        image = self.model.get_image_features(pixel_values=(pixels - self.mean) / self.std)
        batch = self.text([f"a photo of {w}" for w in words], padding=True, return_tensors="pt")
        text = self.model.get_text_features(**batch)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        return F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).t()


def load_clip_scorer(path: str | Path) -> ClipScorer:
    """A TinyCLIP folder (kind "clip", with its text_tokenizer/) or a Hugging Face CLIPModel folder."""
    import json

    path = Path(path)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    if config.get("kind") == TinyCLIP.kind:
        return _TinyClipScorer(path)
    if config.get("model_type") == "clip":
        return _HuggingFaceClipScorer(path)
    raise ValueError(f"{path}: neither an anytoken CLIP (kind 'clip') nor a Hugging Face CLIPModel folder")
