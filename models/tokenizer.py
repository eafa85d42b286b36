"""What every modality tokenizer offers (encode, decode, training_step) and the checks on what it is given."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch

from models.pretrained import Pretrained


@dataclass
class StepOutput:
    """One training step: the loss to back-propagate and plain-float metrics to report."""

    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)


class MediaTokenizer(Pretrained):
    """A tokenizer of one modality: media tensors <-> local code ids in [0, codebook_size).

    The global position of those ids in a model's vocabulary is the JointVocabulary's business.
    """

    modality: ClassVar[str] = ""
    config: Any

    @property
    def codebook_size(self) -> int:
        raise NotImplementedError

    def encode(self, media: Any) -> Any:
        raise NotImplementedError

    def decode(self, codes: Any) -> Any:
        raise NotImplementedError

    def training_step(self, batch: torch.Tensor) -> StepOutput:
        raise NotImplementedError

    def forward(self, batch: torch.Tensor) -> StepOutput:
        """Training goes through forward, so that engines which hook forward (DeepSpeed ZeRO-3) see every use."""
        return self.training_step(batch)


def psnr_db(mse: torch.Tensor) -> float:
    """Peak signal-to-noise ratio of signals in [0, 1]."""
    return float(10.0 * torch.log10(1.0 / mse.detach().clamp(min=1e-10)))


def check_images(images: Any, size: int, name: str = "images") -> torch.Tensor:
    """Images must be a float tensor (B, 3, size, size) with B >= 1, values in [0, 1]."""
    expected = f"a float tensor of shape (B, 3, {size}, {size}) with values in [0, 1]"
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{name}: expected {expected}, got {type(images).__name__}")
    if not images.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != size or images.shape[3] != size:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"{name}: expected {expected}, got an empty batch")
    return images


def check_waveforms(waveforms: Any, name: str = "waveforms") -> torch.Tensor:
    """Waveforms must be a float tensor (B, samples) with B >= 1 and samples >= 1."""
    expected = "a float tensor of shape (B, samples), mono, values in [-1, 1]"
    if not isinstance(waveforms, torch.Tensor):
        raise ValueError(f"{name}: expected {expected}, got {type(waveforms).__name__}")
    if not waveforms.is_floating_point():
        raise ValueError(f"{name}: expected {expected}, got dtype {waveforms.dtype}")
    if waveforms.ndim != 2:
        raise ValueError(f"{name}: expected {expected}, got shape {tuple(waveforms.shape)}")
    if waveforms.shape[0] == 0 or waveforms.shape[1] == 0:
        raise ValueError(f"{name}: expected {expected}, got an empty tensor of shape {tuple(waveforms.shape)}")
    return waveforms


def check_codes(codes: Any, codebook_size: int, name: str = "codes", ndim: int | None = None) -> torch.Tensor:
    """Code ids must be an integer tensor with every id in [0, codebook_size)."""
    if isinstance(codes, (list, tuple)):
        codes = torch.as_tensor(codes)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"{name}: expected an integer tensor of code ids, got {type(codes).__name__}")
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of code ids, got dtype {codes.dtype}")
    if ndim is not None and codes.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(codes.shape)}")
    if codes.numel() == 0:
        raise ValueError(f"{name}: expected at least one code id, got an empty tensor")
    low, high = int(codes.min()), int(codes.max())
    if low < 0 or high >= codebook_size:
        raise ValueError(f"{name}: ids must lie in [0, {codebook_size}), got values in [{low}, {high}]")
    return codes.long()


def pad_code_sequences(sequences: Sequence[torch.Tensor] | torch.Tensor, codebook_size: int,
                       max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged code sequences -> (B, T) ids padded with 0 and a (B, T) bool mask of real positions."""
    if isinstance(sequences, torch.Tensor):
        if sequences.ndim == 1:
            sequences = sequences[None]
        sequences = list(check_codes(sequences, codebook_size, ndim=2))
    if len(sequences) == 0:
        raise ValueError("codes: expected at least one sequence, got none")
    checked = [check_codes(s, codebook_size, name=f"codes[{i}]", ndim=1) for i, s in enumerate(sequences)]
    longest = max(len(s) for s in checked)
    if longest > max_length:
        raise ValueError(f"codes: at most {max_length} ids per sequence, got {longest}")
    ids = torch.zeros(len(checked), longest, dtype=torch.long)
    mask = torch.zeros(len(checked), longest, dtype=torch.bool)
    for i, s in enumerate(checked):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = True
    return ids, mask
