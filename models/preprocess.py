"""Decode media bytes and bring them to a tokenizer's input: images, audio and video, with errors a user can act on."""
from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from models.video import sample_frame_indices


class MediaError(ValueError):
    """Input that cannot become a tokenizer input: `reason` is a short code for counting, the message says why."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):   # pickles whole (the default would call MediaError(message) and fail)
        return MediaError, (self.reason, str(self))


@dataclass
class ImagePreprocessConfig:
    size: int = 32                     # output side: resize the shorter side to this, then centre-crop
    max_pixels: int = 50_000_000       # refuse larger images before decoding them (decompression bombs)


@dataclass
class AudioPreprocessConfig:
    sample_rate: int = 16000
    max_seconds: float = 10.0          # longer audio is trimmed
    pad_to_max: bool = False           # pad shorter audio with silence to max_seconds


@dataclass
class VideoPreprocessConfig:
    size: int = 32
    fps: float = 4.0                   # frames kept per second of video
    max_frames: int = 16
    max_pixels: int = 10_000_000       # per frame


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency over white, 16-bit and float scaled to the 8-bit range."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def _resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    scale = size / min(width, height)
    resized = image.resize((max(size, round(width * scale)), max(size, round(height * scale))),
                           Image.Resampling.BICUBIC)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def preprocess_image(data: bytes, cfg: ImagePreprocessConfig) -> np.ndarray:
    """Image file bytes -> (size, size, 3) uint8: EXIF-oriented, RGB, shorter side resized, centre-cropped."""
    if not data:
        raise MediaError("empty_file", "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            pixels = image.width * image.height
            if pixels > cfg.max_pixels:   # checked on the header, before anything is decoded
                raise MediaError("too_many_pixels", f"image of {image.width}x{image.height} = {pixels} pixels exceeds "
                                 f"max_pixels {cfg.max_pixels}")
            image.load()
            image = ImageOps.exif_transpose(image)
            return np.asarray(_resize_center_crop(_to_rgb(image), cfg.size), dtype=np.uint8)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise MediaError("decompression_bomb", f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise MediaError("not_an_image", "not an image file PIL can identify") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError("corrupt_image", f"corrupt or truncated image: {err}") from None


def preprocess_audio(data: bytes, cfg: AudioPreprocessConfig) -> np.ndarray:
    """Audio file bytes -> (samples,) float32 mono at cfg.sample_rate, trimmed (or padded) to max_seconds."""
    import soundfile
    import torchaudio

    if not data:
        raise MediaError("empty_file", "empty file (0 bytes)")
    try:
        wave, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError) as err:
        raise MediaError("not_audio", f"not a readable audio file: {err}") from None
    if wave.shape[0] == 0:
        raise MediaError("no_samples", "audio has 0 samples")
    mono = torch.from_numpy(np.ascontiguousarray(wave.mean(axis=1)))
    if rate != cfg.sample_rate:
        keep = math.ceil(cfg.max_seconds * rate) + 1          # resample no more than is kept
        mono = torchaudio.functional.resample(mono[:keep], rate, cfg.sample_rate)
    limit = int(cfg.max_seconds * cfg.sample_rate)
    mono = mono[:limit]
    if cfg.pad_to_max and len(mono) < limit:
        mono = torch.nn.functional.pad(mono, (0, limit - len(mono)))
    if not torch.isfinite(mono).all():
        raise MediaError("not_finite", "audio holds NaN or infinite samples")
    return mono.clamp(-1, 1).numpy().astype(np.float32)


def preprocess_video(data: bytes, cfg: VideoPreprocessConfig) -> np.ndarray:
    """Video file bytes -> (frames, size, size, 3) uint8: frames at cfg.fps, at most max_frames, resized and cropped."""
    import av

    if not data:
        raise MediaError("empty_file", "empty file (0 bytes)")
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise MediaError("no_video_stream", "no video stream in the file")
            stream = container.streams.video[0]
            if stream.width * stream.height > cfg.max_pixels:
                raise MediaError("too_many_pixels", f"video frames of {stream.width}x{stream.height} exceed max_pixels {cfg.max_pixels}")
            source_fps = float(stream.average_rate or stream.guessed_rate or cfg.fps)
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_image())
                # enough decoded to cover max_frames at the target rate
                if len(frames) >= cfg.max_frames * max(source_fps / cfg.fps, 1.0):
                    break
    except MediaError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, IndexError) as err:
        raise MediaError("corrupt_video", f"corrupt or unreadable video: {err}") from None
    if not frames:
        raise MediaError("no_frames", "video has no frames")
    chosen = sample_frame_indices(len(frames), source_fps, cfg.fps, cfg.max_frames)
    return np.stack([np.asarray(_resize_center_crop(frames[i].convert("RGB"), cfg.size)) for i in chosen])


def encode_array(array: np.ndarray) -> bytes:
    """An array as .npy bytes, the form media take between pipeline stages."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
