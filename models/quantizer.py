"""Vector quantizer with an L2-normalised codebook, EMA updates and restart of dead codes (shared by every tokenizer)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


@dataclass
class QuantizerConfig:
    codebook_size: int = 512
    code_dim: int = 32
    decay: float = 0.99            # EMA decay of code usage and code sums
    commitment: float = 0.25       # weight of ||z - sg(q)||^2
    dead_code_threshold: float = 0.1  # EMA uses per step below which a code is restarted from the data
    epsilon: float = 1e-5


@dataclass
class Quantized:
    vectors: torch.Tensor   # (..., D) straight-through quantized vectors
    codes: torch.Tensor     # (...) long, in [0, codebook_size)
    loss: torch.Tensor      # scalar commitment loss
    usage: torch.Tensor     # scalar: fraction of the codebook used by this batch
    perplexity: torch.Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup by cosine similarity; the codebook learns by EMA, not by gradient.

    Under torch.distributed the EMA statistics are summed over ranks and restarts are broadcast
    from rank 0, so every data-parallel replica keeps the same codebook.
    """

    def __init__(self, config: QuantizerConfig):
        super().__init__()
        if config.codebook_size < 2 or config.code_dim < 1:
            raise ValueError(f"codebook_size must be >= 2 and code_dim >= 1, got {config.codebook_size}, {config.code_dim}")
        self.config = config
        codebook = F.normalize(torch.randn(config.codebook_size, config.code_dim), dim=-1)
        self.register_buffer("codebook", codebook)                     # (K, D), unit rows
        self.register_buffer("cluster_size", torch.zeros(config.codebook_size))
        self.register_buffer("code_sum", codebook.clone())

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def _apply(self, fn, recurse: bool = True):
        """Moves between devices as asked, but keeps the EMA statistics in float32 under bf16/fp16 training."""
        super()._apply(fn, recurse)
        for name in ("codebook", "cluster_size", "code_sum"):
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = self._buffers[name].float()
        return self

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """Code vectors for ids (...) -> (..., D)."""
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise ValueError(f"code ids must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]")
        return F.embedding(codes, self.codebook)

    def forward(self, z: torch.Tensor) -> Quantized:
        """Quantize z (..., D); in training mode also update the codebook."""
        flat = F.normalize(z.reshape(-1, z.shape[-1]).float(), dim=-1)   # (N, D)
        codes = (flat @ self.codebook.t()).argmax(dim=-1)                 # max cosine = min L2 on the sphere
        quantized = self.codebook[codes]
        if self.training and torch.is_grad_enabled():
            self._ema_update(flat.detach(), codes)
        loss = self.config.commitment * F.mse_loss(flat, quantized.detach())
        straight_through = flat + (quantized - flat).detach()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        probs = counts / counts.sum().clamp(min=1)
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        return Quantized(
            vectors=straight_through.reshape(z.shape).to(z.dtype),
            codes=codes.reshape(z.shape[:-1]),
            loss=loss,
            usage=(counts > 0).float().mean(),
            perplexity=perplexity,
        )

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.Tensor) -> None:
        cfg = self.config
        counts = torch.bincount(codes, minlength=cfg.codebook_size).float()
        sums = torch.zeros_like(self.code_sum).index_add_(0, codes, flat)
        if _distributed():
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(cfg.decay).add_(counts, alpha=1 - cfg.decay)
        self.code_sum.mul_(cfg.decay).add_(sums, alpha=1 - cfg.decay)
        self.codebook.copy_(F.normalize(self.code_sum, dim=-1, eps=cfg.epsilon))
        self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        dead = self.cluster_size < self.config.dead_code_threshold
        n_dead = int(dead.sum())  # the same on every rank: the statistics were all-reduced
        if n_dead == 0:
            return
        # replacements drawn from this batch's encoder outputs, with a little noise against duplicates
        source = flat if flat.shape[0] else torch.randn(1, flat.shape[-1], device=flat.device)
        picks = torch.randint(0, source.shape[0], (n_dead,), device=flat.device)
        fresh = F.normalize(source[picks] + 0.01 * torch.randn_like(source[picks]), dim=-1)
        if _distributed():
            dist.broadcast(fresh, src=0)
        self.codebook[dead] = fresh
        self.code_sum[dead] = fresh
        self.cluster_size[dead] = 2 * self.config.dead_code_threshold  # a grace period of ~ln(2)/(1-decay) steps
