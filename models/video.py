"""Video tokenizer: frames sampled at a fixed rate, each frame tokenized by the image tokenizer (shared weights)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from models.image_vq import ImageVQConfig, ImageVQTokenizer
from models.pretrained import Pretrained
from models.tokenizer import MediaTokenizer, StepOutput, check_codes, check_images


@dataclass
class VideoConfig:
    fps: float = 4.0          # frames kept per second of video
    max_frames: int = 16
    image: ImageVQConfig = field(default_factory=ImageVQConfig)


def sample_frame_indices(num_frames: int, source_fps: float, fps: float, max_frames: int) -> list[int]:
    """Indices of the frames to keep: one every 1/fps seconds from the start, at most max_frames."""
    if num_frames < 1:
        raise ValueError(f"a video needs at least one frame, got {num_frames}")
    if source_fps <= 0 or fps <= 0:
        raise ValueError(f"frame rates must be positive, got source {source_fps}, target {fps}")
    step = max(source_fps / fps, 1.0)
    indices, position = [], 0.0
    while round(position) < num_frames and len(indices) < max_frames:
        indices.append(int(round(position)))
        position += step
    return indices


class VideoTokenizer(MediaTokenizer):
    """encode: clips of frames (F, 3, H, W) -> per clip (F, tokens_per_frame) codes of the image codebook.

    The frame separator between frames is placed by the JointVocabulary, which owns every special id.
    """

    kind = "video"
    modality = "video"
    config_class = VideoConfig

    def __init__(self, config: VideoConfig, image_tokenizer: ImageVQTokenizer | None = None):
        super().__init__()
        if image_tokenizer is not None:
            config = VideoConfig(fps=config.fps, max_frames=config.max_frames, image=image_tokenizer.config)
        self.config = config
        self.image = image_tokenizer if image_tokenizer is not None else ImageVQTokenizer(config.image)

    def start_from(self, other: Pretrained) -> None:
        """Share an image tokenizer's weights: the video's frame codes are then that tokenizer's image codes."""
        if not isinstance(other, ImageVQTokenizer):
            super().start_from(other)
        self.image = other
        self.config = VideoConfig(fps=self.config.fps, max_frames=self.config.max_frames, image=other.config)

    @property
    def codebook_size(self) -> int:
        return self.image.codebook_size

    @property
    def tokens_per_frame(self) -> int:
        return self.image.tokens_per_image

    def sample(self, frames: torch.Tensor, source_fps: float) -> torch.Tensor:
        """Keep the frames at this tokenizer's rate: (F, 3, H, W) -> (F', 3, H, W)."""
        return frames[sample_frame_indices(frames.shape[0], source_fps, self.config.fps, self.config.max_frames)]

    def _frames(self, clip: torch.Tensor, index: int) -> torch.Tensor:
        if not isinstance(clip, torch.Tensor) or clip.ndim != 4:
            shape = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            raise ValueError(f"clips[{index}]: expected frames of shape (F, 3, H, W), got {shape}")
        if clip.shape[0] > self.config.max_frames:
            raise ValueError(f"clips[{index}]: at most {self.config.max_frames} frames, got {clip.shape[0]}")
        return check_images(clip, self.config.image.image_size, name=f"clips[{index}]")

    @torch.no_grad()
    def encode(self, clips: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(clips, torch.Tensor) and clips.ndim != 5:
            raise ValueError(f"clips: expected (B, F, 3, H, W) or a list of (F, 3, H, W), got shape {tuple(clips.shape)}")
        if len(clips) == 0:
            raise ValueError("clips: expected at least one clip, got none")
        frames = [self._frames(c, i) for i, c in enumerate(clips)]
        codes = self.image.encode(torch.cat(frames))          # every frame of every clip in one batch
        return list(codes.split([f.shape[0] for f in frames]))

    @torch.no_grad()
    def decode(self, codes: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if len(codes) == 0:
            raise ValueError("codes: expected at least one clip, got none")
        checked = [check_codes(c, self.codebook_size, name=f"codes[{i}]", ndim=2) for i, c in enumerate(codes)]
        frames = self.image.decode(torch.cat(checked))
        return list(frames.split([c.shape[0] for c in checked]))

    def training_step(self, frames: torch.Tensor) -> StepOutput:
        """Frames (B*F, 3, H, W) from clips train the shared image tokenizer."""
        return self.image.training_step(frames)
