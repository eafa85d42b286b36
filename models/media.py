"""Media files <-> tensors: PNG images, WAV audio and MP4 video, the formats anytoken reads and writes."""
from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np
import soundfile
import torch
from PIL import Image


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """A PIL image of any mode -> (3, H, W) float in [0, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def tensor_to_image(image: torch.Tensor) -> Image.Image:
    """(3, H, W) float in [0, 1] -> an RGB PIL image."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"expected an image tensor of shape (3, H, W), got {tuple(image.shape)}")
    array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def read_image(source: str | Path | bytes) -> torch.Tensor:
    """An image file (path or bytes) -> (3, H, W) float in [0, 1]."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        return image_to_tensor(image)


def encode_png(image: torch.Tensor) -> bytes:
    """(3, H, W) float in [0, 1] -> PNG file bytes."""
    buffer = io.BytesIO()
    tensor_to_image(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_png(image: torch.Tensor, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(encode_png(image))
    return path


def image_grid(images: torch.Tensor, columns: int, padding: int = 2) -> torch.Tensor:
    """(B, 3, H, W) -> one (3, H', W') image of the batch laid out in rows of `columns`, on white."""
    b, c, h, w = images.shape
    rows = -(-b // columns)
    grid = torch.ones(c, rows * (h + padding) + padding, columns * (w + padding) + padding)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top:top + h, left:left + w] = image.detach().float().cpu().clamp(0, 1)
    return grid


def write_grid(images: torch.Tensor, path: str | Path, columns: int, scale: int = 4) -> Path:
    """image_grid enlarged `scale` times (nearest, so pixels stay visible) and written as a PNG."""
    grid = image_grid(images, columns)
    return write_png(torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0], path)


def write_pairs(original: torch.Tensor, rebuilt: torch.Tensor, path: str | Path, columns: int = 8,
                scale: int = 4) -> Path:
    """Originals on odd rows with what was rebuilt (or generated) beneath them, enlarged `scale` times."""
    rows = []
    for start in range(0, len(original), columns):
        rows += [original[start:start + columns], rebuilt[start:start + columns]]
    return write_grid(torch.cat(rows), path, columns, scale)


def read_wav(source: str | Path | bytes) -> tuple[torch.Tensor, int]:
    """An audio file (path or bytes) -> ((channels, samples) float in [-1, 1], sample_rate)."""
    data, sample_rate = soundfile.read(io.BytesIO(source) if isinstance(source, bytes) else str(source),
                                       dtype="float32", always_2d=True)
    return torch.from_numpy(np.ascontiguousarray(data.T)), int(sample_rate)


def encode_wav(waveform: torch.Tensor, sample_rate: int) -> bytes:
    """(samples,) or (channels, samples) float in [-1, 1] -> 16-bit PCM WAV file bytes."""
    if waveform.ndim not in (1, 2):
        raise ValueError(f"expected a waveform of shape (samples,) or (channels, samples), got {tuple(waveform.shape)}")
    data = waveform.detach().float().clamp(-1, 1).cpu().numpy()
    buffer = io.BytesIO()
    soundfile.write(buffer, data.T if data.ndim == 2 else data, sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def write_wav(waveform: torch.Tensor, path: str | Path, sample_rate: int) -> Path:
    path = Path(path)
    path.write_bytes(encode_wav(waveform, sample_rate))
    return path


def read_mp4(source: str | Path | bytes, max_frames: int | None = None) -> tuple[torch.Tensor, float]:
    """A video file (path or bytes) -> ((F, 3, H, W) float in [0, 1], frames per second)."""
    import av

    frames = []
    with av.open(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 1.0
        for frame in container.decode(stream):
            frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
            if max_frames is not None and len(frames) >= max_frames:
                break
    if not frames:
        raise ValueError(f"no video frames in {source if not isinstance(source, bytes) else 'the given bytes'}")
    return torch.stack(frames).permute(0, 3, 1, 2).float() / 255.0, fps


def rgb_to_yuv420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H * 3 // 2, W) uint8 planar YUV 4:2:0, BT.601 limited range.

    Done here rather than by swscale, whose SIMD paths round differently from run to run.
    """
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = 16 + 0.257 * r + 0.504 * g + 0.098 * b
    u = 128 - 0.148 * r - 0.291 * g + 0.439 * b
    v = 128 + 0.439 * r - 0.368 * g - 0.071 * b
    h, w = y.shape

    def half(plane: np.ndarray) -> np.ndarray:   # average each 2x2 block
        return plane.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))

    planes = [y.ravel(), half(u).ravel(), half(v).ravel()]
    return np.clip(np.round(np.concatenate(planes)), 0, 255).astype(np.uint8).reshape(h * 3 // 2, w)


def write_mp4(frames: torch.Tensor, path: str | Path, fps: int) -> Path:
    """(F, 3, H, W) float in [0, 1] -> H.264 MP4 (high quality, single-threaded so the bytes are reproducible)."""
    path = Path(path)
    path.write_bytes(encode_mp4(frames, fps))
    return path


def encode_mp4(frames: torch.Tensor, fps: int) -> bytes:
    """(F, 3, H, W) float in [0, 1] -> H.264 MP4 file bytes."""
    import av

    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"expected frames of shape (F, 3, H, W) with F >= 1, got {tuple(frames.shape)}")
    if frames.shape[2] % 2 or frames.shape[3] % 2:
        raise ValueError(f"H.264 needs even frame sizes, got {frames.shape[2]}x{frames.shape[3]}")
    pixels = (frames.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = pixels.shape[2], pixels.shape[1]
        stream.pix_fmt = "yuv420p"   # what browsers and players accept
        stream.codec_context.thread_count = 1
        # macroblock-tree rate control reads uninitialised padding on tiny frames: the bytes would vary run to run
        stream.options = {"crf": "12", "preset": "medium", "x264-params": "no-mbtree=1:rc-lookahead=0"}
        for array in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420(array), format="yuv420p")))
        container.mux(stream.encode())
    return buffer.getvalue()
