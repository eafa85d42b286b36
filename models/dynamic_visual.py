"""LaVIT's dynamic visual tokenizer: a token selector keeps the informative patches, a token merger folds the
dropped ones into them, a codebook quantizes, and a decoder rebuilds patch features and pixels from the codes."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import CrossBlock
from models.conv import ConvDecoder
from models.quantizer import QuantizerConfig, VectorQuantizer
from models.tokenizer import MediaTokenizer, StepOutput, check_images, pad_code_sequences, psnr_db

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
VISION_ENCODER_DIR = "vision_encoder"


@dataclass
class DynamicVisualConfig:
    image_size: int = 32
    patch_size: int = 4               # own patch encoder: 32px -> 8x8 = 64 patches
    feature_dim: int = 64             # width of patch features, selector, merger and decoder
    vision_encoder: str | None = None  # path to a Hugging Face vision model; sets image_size, patch_size, feature_dim
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    heads: int = 4
    merger_layers: int = 2
    decoder_layers: int = 2
    mlp_ratio: float = 4.0
    keep_ratio: float = 1 / 3         # rho: the target mean fraction of patches kept
    ratio_weight: float = 2.0         # lambda of the keep-ratio loss
    keep_threshold: float = 0.5       # inference: keep a patch when P(keep) exceeds this
    decisiveness_weight: float = 0.1  # pushes P(keep) towards 0 or 1 so the inference threshold matches training
    gumbel_tau: float = 1.0
    pixel_weight: float = 1.0
    pixel_channels: int = 32
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(codebook_size=1024, code_dim=32))

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


class PatchEncoder(nn.Module):
    """The demo-scale stand-in for a pretrained ViT: fixed random patch features, never trained."""

    def __init__(self, patch_size: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch_size, stride=patch_size)
        self.mix = nn.Linear(dim, dim)
        self.requires_grad_(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.mix(F.gelu(self.proj(pixels).flatten(2).transpose(1, 2)))   # (B, N, D)


class TokenSelector(nn.Module):
    """LaVIT's selector: per-patch local features plus an image-wide summary -> log P(keep), log P(drop)."""

    def __init__(self, dim: int):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Sequential(
            nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(), nn.Linear(dim // 4, 2))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.inp(features)                                   # (B, N, D)
        half = x.shape[-1] // 2
        summary = x[..., half:].mean(dim=1, keepdim=True).expand(-1, x.shape[1], -1)
        return F.log_softmax(self.head(torch.cat([x[..., :half], summary], dim=-1)), dim=-1)   # (B, N, 2)


@dataclass
class _Encoded:
    features: torch.Tensor   # (B, N, D) patch features, the reconstruction target
    keep_prob: torch.Tensor  # (B, N) P(keep) from the selector
    keep: torch.Tensor       # (B, N) 0/1 decisions (straight-through gradients while training)
    quantized: object        # models.quantizer.Quantized over the kept tokens only


class DynamicVisualTokenizer(MediaTokenizer):
    """encode: (B, 3, H, W) in [0, 1] -> a list of B code sequences, one per image, of varying length."""

    kind = "dynamic_visual"
    modality = "image"
    config_class = DynamicVisualConfig

    def __init__(self, config: DynamicVisualConfig, vision_encoder: nn.Module | None = None):
        super().__init__()
        if config.vision_encoder and vision_encoder is None:
            vision_encoder = load_vision_encoder(config.vision_encoder)
        if vision_encoder is not None:
            vc = vision_encoder.config
            config = dataclasses.replace(config, image_size=vc.image_size, patch_size=vc.patch_size,
                                         feature_dim=vc.hidden_size)
            vision_encoder.requires_grad_(False).eval()
        if config.image_size % config.patch_size:
            raise ValueError(f"image_size {config.image_size} is not divisible by patch_size {config.patch_size}")
        self.config = config
        d, n = config.feature_dim, config.num_patches
        self.vision_encoder = vision_encoder if vision_encoder is not None else PatchEncoder(config.patch_size, d)
        self.register_buffer("mean", torch.tensor(config.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(config.image_std).view(1, 3, 1, 1), persistent=False)
        self.selector = TokenSelector(d)
        self.origin_norm = nn.LayerNorm(d)
        # positions start as 2-D sine-cosine tables so that patches are told apart from the first step
        self.patch_position = nn.Parameter(sincos_2d(config.grid_size, d))   # where each patch lies, for the merger
        self.merger = nn.ModuleList(CrossBlock(d, config.heads, config.mlp_ratio) for _ in range(config.merger_layers))
        self.merger_norm = nn.LayerNorm(d)
        self.to_code = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, config.quantizer.code_dim))
        self.quantizer = VectorQuantizer(config.quantizer)
        self.from_code = nn.Linear(config.quantizer.code_dim, d)
        self.code_position = nn.Parameter(sincos_2d(config.grid_size, d))   # order of a code in its sequence
        self.queries = nn.Parameter(sincos_2d(config.grid_size, d))         # one per patch to rebuild
        self.decoder = nn.ModuleList(CrossBlock(d, config.heads, config.mlp_ratio) for _ in range(config.decoder_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.to_feature = nn.Sequential(nn.Linear(d, d), nn.Tanh(), nn.Linear(d, d))
        upsamples = math.ceil(math.log2(config.patch_size)) if config.patch_size > 1 else 0
        self.pixel_decoder = ConvDecoder(d, 3, config.pixel_channels, [1] * upsamples, 1, dims=2)

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def max_tokens_per_image(self) -> int:
        return self.config.num_patches

    def train(self, mode: bool = True) -> "DynamicVisualTokenizer":
        super().train(mode)
        self.vision_encoder.eval()   # frozen: no dropout, no batch statistics
        return self

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, N, D) frozen patch features (the CLS token of a ViT dropped)."""
        with torch.no_grad():
            pixels = (images - self.mean) / self.std
            if isinstance(self.vision_encoder, PatchEncoder):
                return self.vision_encoder(pixels)
            hidden = self.vision_encoder(pixel_values=pixels).last_hidden_state
            return hidden[:, -self.config.num_patches:]

    def _select(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = self.selector(features)                      # (B, N, 2): column 0 = keep
        keep_prob = log_probs[..., 0].exp()
        if self.training:
            return keep_prob, F.gumbel_softmax(log_probs, tau=self.config.gumbel_tau, hard=True)[..., 0]
        keep = (keep_prob > self.config.keep_threshold).float()
        keep[torch.arange(keep.shape[0]), keep_prob.argmax(dim=1)] = 1.0   # every image keeps at least one token
        return keep_prob, keep

    def _merge(self, features: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, n, _ = features.shape
        origin = self.origin_norm(features) + self.patch_position
        causal = torch.tril(torch.ones(n, n, device=features.device))
        # self-attention: causal, to kept tokens and to itself; cross-attention: to dropped tokens only
        self_weights = causal * torch.maximum(keep[:, None, :], torch.eye(n, device=features.device))
        cross_weights = (1 - keep)[:, None, :].expand(b, n, n)
        x = origin
        for block in self.merger:
            x = block(x, origin, self_weights, cross_weights)
        return self.merger_norm(x)                               # (B, N, D); only kept rows are used

    def _encode(self, images: torch.Tensor) -> _Encoded:
        features = self.patch_features(images)
        keep_prob, keep = self._select(features)
        merged = self.to_code(self._merge(features, keep))       # (B, N, code_dim)
        quantized = self.quantizer(merged[keep.bool()])          # (T_total, code_dim)
        return _Encoded(features, keep_prob, keep, quantized)

    def _decode_vectors(self, vectors: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code vectors (B, T, code_dim) with mask (B, T) -> features (B, N, D), pixels (B, 3, H, W)."""
        b, t, _ = vectors.shape
        n = self.config.num_patches
        codes = self.from_code(vectors) + self.code_position[:t]
        x = self.queries.expand(b, -1, -1)
        full = torch.ones(b, n, n, device=vectors.device)
        key_weights = mask[:, None, :].to(vectors.dtype).expand(b, n, t)
        for block in self.decoder:
            x = block(x, codes, full, key_weights)
        features = self.to_feature(self.decoder_norm(x))
        g = self.config.grid_size
        pixels = self.pixel_decoder(features.transpose(1, 2).reshape(b, -1, g, g))
        if pixels.shape[-1] != self.config.image_size:
            pixels = F.interpolate(pixels, size=self.config.image_size, mode="bilinear", align_corners=False)
        return features, (pixels + 1) / 2

    def _scatter_kept(self, keep: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Values of the kept tokens, in raster order, -> padded (B, T_max, ...) and a (B, T_max) mask."""
        counts = keep.sum(dim=1).long()
        mask = torch.arange(int(counts.max()), device=keep.device)[None] < counts[:, None]
        padded = values.new_zeros(keep.shape[0], mask.shape[1], *values.shape[1:])
        padded[mask] = values
        return padded, mask

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        images = check_images(images, self.config.image_size)
        enc = self._encode(images)
        counts = enc.keep.sum(dim=1).long().tolist()
        return list(enc.quantized.codes.split(counts))

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        ids, mask = pad_code_sequences(codes, self.codebook_size, self.max_tokens_per_image)
        ids, mask = ids.to(self.queries.device), mask.to(self.queries.device)
        _, pixels = self._decode_vectors(self.quantizer.lookup(ids), mask)
        return pixels.clamp(0, 1)

    def training_step(self, images: torch.Tensor) -> StepOutput:
        images = check_images(images, self.config.image_size)
        enc = self._encode(images)
        vectors, mask = self._scatter_kept(enc.keep, enc.quantized.vectors)
        features, pixels = self._decode_vectors(vectors, mask)
        feature_loss = (1 - F.cosine_similarity(features, enc.features, dim=-1)).mean()
        keep_ratio = enc.keep.mean()
        ratio_loss = self.config.ratio_weight * (self.config.keep_ratio - keep_ratio) ** 2
        p = enc.keep_prob.clamp(1e-6, 1 - 1e-6)
        indecision = -(p * p.log() + (1 - p) * (1 - p).log()).mean()    # binary entropy of P(keep)
        pixel_mse = F.mse_loss(pixels, images)
        loss = (feature_loss + ratio_loss + self.config.decisiveness_weight * indecision
                + self.config.pixel_weight * pixel_mse + enc.quantized.loss)
        return StepOutput(loss, {
            "loss": float(loss.detach()), "feature_cosine_loss": float(feature_loss.detach()),
            "ratio_loss": float(ratio_loss.detach()), "keep_ratio": float(keep_ratio.detach()),
            "keep_entropy": float(indecision.detach()),
            "threshold_keep_ratio": float((enc.keep_prob.detach() > self.config.keep_threshold).float().mean()),
            "tokens_per_image": float(enc.keep.detach().sum(dim=1).mean()), "pixel_mse": float(pixel_mse.detach()),
            "psnr_db": psnr_db(pixel_mse), "commitment": float(enc.quantized.loss.detach()),
            "codebook_usage": float(enc.quantized.usage),
        })

    def _save_extra(self, path: Path) -> None:
        if self.config.vision_encoder:
            self.vision_encoder.config.save_pretrained(path / VISION_ENCODER_DIR)

    @classmethod
    def _build_for_loading(cls, config: DynamicVisualConfig, path: Path) -> "DynamicVisualTokenizer":
        if not config.vision_encoder:
            return cls(config)
        from transformers import AutoConfig, AutoModel

        folder = path / VISION_ENCODER_DIR
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"missing file: {folder / 'config.json'}")
        return cls(config, AutoModel.from_config(AutoConfig.from_pretrained(folder)))


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """(grid*grid, dim) sine-cosine embedding of raster positions (row frequencies, then column frequencies)."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32),
                                indexing="ij")
    quarter = max(dim // 4, 1)
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None] * freqs[None]
        parts += [angles.sin(), angles.cos()]
    table = torch.cat(parts, dim=1)
    return F.pad(table, (0, dim - table.shape[1]))


def load_vision_encoder(path: str) -> nn.Module:
    """A frozen Hugging Face vision model (CLIPVisionModel, ViTModel, SiglipVisionModel, ...) from a local path."""
    from transformers import AutoModel

    if not Path(path).is_dir():
        raise FileNotFoundError(f"missing vision encoder folder: {path}")
    model = AutoModel.from_pretrained(path)
    config = model.config
    if not all(hasattr(config, key) for key in ("image_size", "patch_size", "hidden_size")):
        raise ValueError(f"{path}: expected a vision model whose config has image_size, patch_size and hidden_size "
                         f"(such as CLIPVisionModel or ViTModel), got {type(model).__name__}")
    return model
