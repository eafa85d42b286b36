"""X-LLM's X2L interface: a Q-Former-like adapter from a frozen encoder's continuous features to N soft tokens
that a frozen LLM reads in place of discrete media tokens.

Sequence: <bos> [start] q_1 .. q_N [end] caption <eos>; the loss is the LLM's on the caption.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import CrossBlock
from models.dynamic_visual import CLIP_MEAN, CLIP_STD, PatchEncoder, load_vision_encoder
from models.multimodal_lm import load_base_llm
from models.pretrained import Pretrained
from models.tokenizer import StepOutput


@dataclass
class X2LConfig:
    base_llm: str = ""
    modality: Literal["image", "audio"] = "image"
    encoder: str | None = None        # a Hugging Face vision model folder; none: a fixed patch encoder / log-mel
    image_size: int = 32
    patch_size: int = 4
    feature_dim: int = 64             # of the fixed patch encoder
    sample_rate: int = 16000
    n_mels: int = 64
    frames_per_feature: int = 4       # audio: log-mel frames stacked into one feature vector
    num_queries: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    text_special_ids: list[int] = field(default_factory=list)   # bos, eos (first two), pad


class QFormerAdapter(nn.Module):
    """Learned queries that attend to the encoder features (B, S, F) -> (B, N, llm_dim)."""

    def __init__(self, feature_dim: int, llm_dim: int, num_queries: int, width: int, layers: int, heads: int):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(feature_dim), nn.Linear(feature_dim, width))
        self.queries = nn.Parameter(torch.randn(num_queries, width) * 0.02)
        self.blocks = nn.ModuleList(CrossBlock(width, heads, 4.0) for _ in range(layers))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, llm_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        b, s, _ = features.shape
        context = self.inp(features)
        x = self.queries.expand(b, -1, -1)
        n = x.shape[1]
        full_self = torch.ones(b, n, n, device=x.device)
        full_cross = torch.ones(b, n, s, device=x.device)
        for block in self.blocks:
            x = block(x, context, full_self, full_cross)
        return self.out(x)


class X2LModel(Pretrained):
    kind = "x2l"
    config_class = X2LConfig

    def __init__(self, config: X2LConfig, llm: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.llm = llm if llm is not None else load_base_llm(config.base_llm)
        self.llm.requires_grad_(False)
        d = self.llm.get_input_embeddings().embedding_dim
        if config.modality == "image":
            if config.encoder:
                self.encoder = load_vision_encoder(config.encoder)
                feature_dim = self.encoder.config.hidden_size
            else:
                self.encoder = PatchEncoder(config.patch_size, config.feature_dim)
                feature_dim = config.feature_dim
            self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        else:
            import torchaudio

            self.encoder = torchaudio.transforms.MelSpectrogram(config.sample_rate, n_fft=400, hop_length=160,
                                                                n_mels=config.n_mels)
            feature_dim = config.n_mels * config.frames_per_feature
        self.encoder.requires_grad_(False)
        self.adapter = QFormerAdapter(feature_dim, d, config.num_queries, config.width, config.layers, config.heads)
        self.boundaries = nn.Parameter(torch.randn(2, d) * float(self.llm.get_input_embeddings().weight.std()))

    def features(self, media: torch.Tensor) -> torch.Tensor:
        """Frozen encoder: images (B, 3, H, W) or waveforms (B, samples) -> (B, S, F)."""
        with torch.no_grad():
            if self.config.modality == "image":
                pixels = (media.float() - self.mean) / self.std
                if isinstance(self.encoder, PatchEncoder):
                    return self.encoder(pixels)
                return self.encoder(pixel_values=pixels).last_hidden_state
            mel = torch.log(self.encoder(media.float()) + 1e-5)                    # (B, n_mels, frames)
            k = self.config.frames_per_feature
            frames = mel.shape[-1] // k * k
            return mel[..., :frames].transpose(1, 2).reshape(mel.shape[0], frames // k, -1)

    def soft_tokens(self, media: torch.Tensor) -> torch.Tensor:
        """(B, num_queries + 2, llm_dim): start, the adapter's soft tokens, end."""
        soft = self.adapter(self.features(media))
        start, end = self.boundaries[0].expand(len(soft), 1, -1), self.boundaries[1].expand(len(soft), 1, -1)
        return torch.cat([start, soft.to(start.dtype), end], dim=1)

    def training_step(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        bos, eos = self.config.text_special_ids[:2]
        text, mask = batch["text_ids"].long(), batch["text_mask"].bool()
        b = len(text)
        embed = self.llm.get_input_embeddings()
        prefix = torch.cat([embed(torch.full((b, 1), bos, device=text.device)), self.soft_tokens(batch["media"])], 1)
        # caption then <eos> right after its last real token; padding after that is masked out
        lengths = mask.sum(1)
        ids = torch.cat([text, torch.full((b, 1), eos, device=text.device)], dim=1)
        ids[torch.arange(b), lengths] = eos
        real = torch.arange(ids.shape[1], device=text.device)[None] <= lengths[:, None]
        inputs = torch.cat([prefix, embed(torch.where(real, ids, torch.zeros_like(ids))).to(prefix.dtype)], dim=1)
        attention = torch.cat([torch.ones(b, prefix.shape[1], dtype=torch.long, device=text.device), real.long()], 1)
        logits = self.llm(inputs_embeds=inputs, attention_mask=attention, use_cache=False).logits
        predicted = logits[:, prefix.shape[1] - 1:-1]                                # predicts ids[0..]
        loss = F.cross_entropy(predicted[real].float(), ids[real])
        return StepOutput(loss, {"loss": float(loss.detach()), "tokens": float(real.sum())})

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        return self.training_step(batch)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The adapter and boundaries, and the encoder unless it is a Hugging Face model with its own folder."""
        keep = ("adapter.", "boundaries") + (() if self.config.encoder else ("encoder.",))
        return {k: v for k, v in self.state_dict().items() if k.startswith(keep)}
