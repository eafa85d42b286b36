"""ImageVQ: a convolutional VQ tokenizer that turns an image into a fixed grid of codes and back."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models.conv import ConvDecoder, ConvEncoder
from models.quantizer import QuantizerConfig, VectorQuantizer
from models.tokenizer import MediaTokenizer, StepOutput, check_codes, check_images, psnr_db


@dataclass
class ImageVQConfig:
    image_size: int = 32
    channels: int = 32
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])  # one halving per entry: 32px -> 8x8 codes
    res_blocks: int = 1
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(codebook_size=512, code_dim=32))

    @property
    def grid_size(self) -> int:
        return self.image_size // 2 ** len(self.channel_mult)

    @property
    def tokens_per_image(self) -> int:
        return self.grid_size ** 2


class ImageVQTokenizer(MediaTokenizer):
    """encode: (B, 3, H, W) floats in [0, 1] -> (B, grid*grid) codes in raster order; decode inverts."""

    kind = "image_vq"
    modality = "image"
    config_class = ImageVQConfig

    def __init__(self, config: ImageVQConfig):
        super().__init__()
        if config.image_size % 2 ** len(config.channel_mult):
            raise ValueError(f"image_size {config.image_size} is not divisible by 2**{len(config.channel_mult)}")
        self.config = config
        q = config.quantizer
        self.encoder = ConvEncoder(3, q.code_dim, config.channels, config.channel_mult, config.res_blocks, dims=2)
        self.quantizer = VectorQuantizer(q)
        self.decoder = ConvDecoder(q.code_dim, 3, config.channels, config.channel_mult, config.res_blocks, dims=2)

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.tokens_per_image

    def _quantize(self, images: torch.Tensor):
        z = self.encoder(images * 2 - 1)                 # (B, D, g, g)
        return self.quantizer(z.permute(0, 2, 3, 1))     # vectors (B, g, g, D), codes (B, g, g)

    def _decode_vectors(self, vectors: torch.Tensor) -> torch.Tensor:
        return (self.decoder(vectors.permute(0, 3, 1, 2)) + 1) / 2   # (B, 3, H, W), unclamped

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = check_images(images, self.config.image_size)
        return self._quantize(images).codes.flatten(1)   # (B, T)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self.codebook_size, ndim=2)
        if codes.shape[1] != self.tokens_per_image:
            raise ValueError(f"codes: expected {self.tokens_per_image} ids per image, got {codes.shape[1]}")
        g = self.config.grid_size
        vectors = self.quantizer.lookup(codes.to(self.quantizer.codebook.device)).view(-1, g, g, self.config.quantizer.code_dim)
        return self._decode_vectors(vectors).clamp(0, 1)

    def training_step(self, images: torch.Tensor) -> StepOutput:
        images = check_images(images, self.config.image_size)
        q = self._quantize(images)
        recon = self._decode_vectors(q.vectors)
        mse = F.mse_loss(recon, images)
        loss = mse + q.loss
        return StepOutput(loss, {
            "loss": float(loss.detach()), "recon_mse": float(mse.detach()), "psnr_db": psnr_db(mse),
            "commitment": float(q.loss.detach()), "codebook_usage": float(q.usage), "perplexity": float(q.perplexity),
        })
