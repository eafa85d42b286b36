"""Convolutional encoder and decoder stacks shared by the image (2-D) and audio (1-D) tokenizers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _conv(dims: int) -> type[nn.Module]:
    if dims not in (1, 2):
        raise ValueError(f"dims must be 1 or 2, got {dims}")
    return nn.Conv1d if dims == 1 else nn.Conv2d


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4) or 1, num_channels=channels)


class ResBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        self.body = nn.Sequential(
            _norm(channels_in), nn.SiLU(), conv(channels_in, channels_out, 3, padding=1),
            _norm(channels_out), nn.SiLU(), conv(channels_out, channels_out, 3, padding=1),
        )
        self.skip = conv(channels_in, channels_out, 1) if channels_in != channels_out else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class ConvEncoder(nn.Module):
    """(B, C_in, *spatial) -> (B, out_dim, *spatial / 2**len(channel_mult))."""

    def __init__(self, in_channels: int, out_dim: int, channels: int, channel_mult: list[int], res_blocks: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        widths = [channels * m for m in channel_mult]
        layers: list[nn.Module] = [conv(in_channels, channels, 3, padding=1)]
        width = channels
        for w in widths:
            for _ in range(res_blocks):
                layers.append(ResBlock(width, w, dims))
                width = w
            layers.append(conv(width, width, 4, stride=2, padding=1))  # halve every spatial axis
        layers += [ResBlock(width, width, dims), _norm(width), nn.SiLU(), conv(width, out_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ConvDecoder(nn.Module):
    """(B, in_dim, *spatial) -> (B, out_channels, *spatial * 2**num_upsamples), mirror of ConvEncoder."""

    def __init__(self, in_dim: int, out_channels: int, channels: int, channel_mult: list[int], res_blocks: int, dims: int):
        super().__init__()
        conv = _conv(dims)
        widths = [channels * m for m in reversed(channel_mult)]
        width = widths[0]
        layers: list[nn.Module] = [conv(in_dim, width, 3, padding=1), ResBlock(width, width, dims)]
        for w in widths:
            layers.append(_Upsample(width, dims))
            for _ in range(res_blocks):
                layers.append(ResBlock(width, w, dims))
                width = w
        layers += [_norm(width), nn.SiLU(), conv(width, out_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Upsample(nn.Module):
    def __init__(self, channels: int, dims: int):
        super().__init__()
        self.conv = _conv(dims)(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
