"""Transformer blocks whose attention takes multiplicative, differentiable key weights (LaVIT's masked softmax)."""
from __future__ import annotations

import torch
from torch import nn


class WeightedAttention(nn.Module):
    """Multi-head attention where weights (B, Nq, Nk) in [0, 1] scale each key's share before normalising.

    A weight of 0 removes a key exactly; a query whose keys all have weight 0 receives nothing (not a
    uniform average). Gradients flow into the weights, which is how LaVIT's token selector learns.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        b, nq, d = x.shape                         # x (B, Nq, D), context (B, Nk, D)
        nk, h = context.shape[1], self.heads
        q = self.q(x).view(b, nq, h, d // h).transpose(1, 2)                           # (B, h, Nq, d/h)
        k, v = self.kv(context).view(b, nk, 2, h, d // h).permute(2, 0, 3, 1, 4)      # each (B, h, Nk, d/h)
        scores = (q @ k.transpose(-2, -1)) * (d // h) ** -0.5                        # (B, h, Nq, Nk)
        weights = weights[:, None].to(scores.dtype)
        # shift by the largest score among the keys that count, so that removed keys cannot swamp the others;
        # a removed key above that peak is clamped, which only bounds its (weight-)gradient
        peak = scores.detach().masked_fill(weights <= 0, float("-inf")).amax(dim=-1, keepdim=True)
        peak = torch.nan_to_num(peak, neginf=0.0)
        w = (scores - peak).clamp(max=0).exp() * weights
        total = w.sum(dim=-1, keepdim=True)
        attn = w / torch.where(total > 0, total, torch.ones_like(total))
        return self.out((attn @ v).transpose(1, 2).reshape(b, nq, d))


class CrossBlock(nn.Module):
    """Pre-norm block: weighted self-attention, weighted cross-attention to a context, then an MLP."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = WeightedAttention(dim, heads)
        self.norm_cross = nn.LayerNorm(dim)
        self.cross_attn = WeightedAttention(dim, heads)
        self.norm_mlp = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, self_weights: torch.Tensor,
                cross_weights: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, self_weights)
        x = x + self.cross_attn(self.norm_cross(x), context, cross_weights)
        return x + self.mlp(self.norm_mlp(x))
