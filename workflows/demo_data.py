"""Build the offline demo dataset: real handwritten digits, spoken digit words, moving-digit clips, one manifest."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from models.media import read_wav, write_mp4, write_png, write_wav
from workflows.config import dump_config, parse_args

logger = logging.getLogger(__name__)

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
IMAGE_CAPTIONS = ["a handwritten {d}", "the digit {w}", "a picture of the number {w}", "handwritten digit {d}",
                  "an image of a {d}"]
VIDEO_CAPTIONS = ["a {d} moving {dir}", "the digit {w} moving {dir}", "a handwritten {d} sliding {dir}"]
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-gb-x-gbclan"]
VARIANTS = ["", "+m1", "+m3", "+m5", "+f1", "+f2", "+f4", "+klatt"]
ESPEAK_HELP = ("espeak-ng is needed to speak the digit words. On Debian or Ubuntu: `sudo apt-get install espeak-ng` "
               "(`make demo` does this itself when run as root); on macOS: `brew install espeak-ng`. "
               "Or build the data without audio: `anytoken demo-data audio_per_digit=0`.")
MANIFEST_SCHEMA = pa.schema([("id", pa.string()), ("modality", pa.string()), ("path", pa.string()),
                             ("text", pa.string()), ("label", pa.int64()), ("split", pa.string())])


@dataclass
class SplitConfig:
    val: float = 0.1
    test: float = 0.1


@dataclass
class DemoDataConfig:
    out: str = "runs/demo/data"
    seed: int = 0
    image_size: int = 32
    images: int = -1                  # how many of the 1,797 digit images; -1 = all
    # extra copies of each training-split image, each turned, scaled and shifted at random (val and test keep
    # their originals alone): the TEAL model reads the training digits at 97 % and the held-out ones at 72 %
    image_augment: int = 0
    augment_degrees: float = 12.0     # turned by up to this many degrees either way
    augment_scale: float = 0.1        # scaled by up to this share either way
    augment_shift: float = 0.1        # moved by up to this share of the side either way
    audio_per_digit: int = 60         # spoken clips of each digit word (voices, pitches, speeds vary)
    sample_rate: int = 16000
    videos: int = 400
    video_frames: list[int] = field(default_factory=lambda: [8, 16])   # min and max frames per clip
    video_fps: int = 8
    # A clip's first frame shows the digit at the middle of the canvas; it then moves video_travel pixels its
    # way, partly out of the frame. At full size the first frame is the image itself: the demo's tokenizer
    # (4-px tokens) keeps little of a small digit (a linear probe on the codes of 16-px digits at random places
    # reads 26 % of them, of full-size ones 94 %), so the 16-px digits crossing the canvas of earlier versions
    # could not be read for their digit. The demo model reads these clips' direction (100 %) and their digit at
    # 40.0 % (25.0 % while its video stage read clips at 4 fps in both orders: fewer clips per step). Clips ending
    # on the image (moving in) did no better under an earlier recipe (digit 7.5 %, direction 72.5 %).
    video_digit_size: int = 32        # side of the moving digit inside the image_size canvas
    video_travel: int = 16            # pixels it moves over the clip
    split: SplitConfig = field(default_factory=SplitConfig)


def digit_images(image_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """scikit-learn's 1,797 real 8x8 handwritten digits as (N, 3, size, size) dark ink on white, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    ink = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(1.0 - ink, size=(image_size, image_size), mode="bicubic", align_corners=False)
    return images.clamp(0, 1).repeat(1, 3, 1, 1), digits.target.astype(np.int64)


def assign_splits(n: int, rng: np.random.Generator, split: SplitConfig) -> list[str]:
    order = rng.permutation(n)
    n_test, n_val = round(n * split.test), round(n * split.val)
    names = np.array(["train"] * n, dtype=object)
    names[order[:n_test]] = "test"
    names[order[n_test:n_test + n_val]] = "val"
    return names.tolist()


def build_images(cfg: DemoDataConfig, out: Path, rng: np.random.Generator) -> tuple[list[dict], torch.Tensor]:
    images, labels = digit_images(cfg.image_size)
    if cfg.images >= 0:
        images, labels = images[: cfg.images], labels[: cfg.images]
    splits = assign_splits(len(images), rng, cfg.split)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (image, label, split) in enumerate(zip(images, labels, splits)):
        path = f"images/img-{i:05d}.png"
        write_png(image, out / path)
        text = IMAGE_CAPTIONS[rng.integers(len(IMAGE_CAPTIONS))].format(d=int(label), w=WORDS[label])
        rows.append({"id": f"img-{i:05d}", "modality": "image", "path": path, "text": text, "label": int(label),
                     "split": split})
    return rows, images


def augment_images(images: torch.Tensor, copies: int, cfg: DemoDataConfig, rng: np.random.Generator) -> torch.Tensor:
    """(N * copies, 3, H, W): every image `copies` times, each copy turned, scaled and shifted at random (what the
    transform brings in from outside the image is paper)."""
    source = images.repeat_interleave(copies, dim=0)
    n = len(source)
    angle = np.deg2rad(rng.uniform(-cfg.augment_degrees, cfg.augment_degrees, n))
    scale = rng.uniform(1 - cfg.augment_scale, 1 + cfg.augment_scale, n)
    shift = rng.uniform(-cfg.augment_shift, cfg.augment_shift, (n, 2)) * 2    # affine_grid spans [-1, 1]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale                   # output -> input coordinates
    theta = torch.tensor(np.stack([np.stack([cos, -sin, shift[:, 0]], 1), np.stack([sin, cos, shift[:, 1]], 1)], 1),
                         dtype=torch.float32)
    grid = F.affine_grid(theta, list(source.shape), align_corners=False)
    ink = F.grid_sample(1.0 - source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return (1.0 - ink).clamp(0, 1)


def build_augmented(cfg: DemoDataConfig, out: Path, image_rows: list[dict], images: torch.Tensor) -> list[dict]:
    """cfg.image_augment transformed copies of each training image, as more training rows (ids img-NNNNN-aM)."""
    train = [i for i, r in enumerate(image_rows) if r["split"] == "train"]
    if cfg.image_augment <= 0 or not train:
        return []
    rng = np.random.default_rng([cfg.seed, 1])     # its own stream: the other rows are the same bytes either way
    copies = augment_images(images[train], cfg.image_augment, cfg, rng)
    rows = []
    for k, image in enumerate(copies):
        source = image_rows[train[k // cfg.image_augment]]
        label = source["label"]
        ident = f"{source['id']}-a{k % cfg.image_augment + 1}"
        path = f"images/{ident}.png"
        write_png(image, out / path)
        text = IMAGE_CAPTIONS[rng.integers(len(IMAGE_CAPTIONS))].format(d=label, w=WORDS[label])
        rows.append({"id": ident, "modality": "image", "path": path, "text": text, "label": label, "split": "train"})
    return rows


def speak(word: str, voice: str, pitch: int, speed: int, sample_rate: int) -> torch.Tensor:
    """espeak-ng's rendering of a word, mono, resampled to sample_rate."""
    import torchaudio

    cmd = ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "--stdout", word]
    wav = subprocess.run(cmd, check=True, capture_output=True).stdout
    waveform, rate = read_wav(wav)
    return torchaudio.functional.resample(waveform.mean(dim=0), rate, sample_rate)


def build_audio(cfg: DemoDataConfig, out: Path, rng: np.random.Generator) -> list[dict]:
    if cfg.audio_per_digit <= 0:
        return []
    if shutil.which("espeak-ng") is None:
        raise RuntimeError(ESPEAK_HELP)
    jobs = []
    for i in range(cfg.audio_per_digit * 10):
        label = i % 10
        voice = VOICES[rng.integers(len(VOICES))] + VARIANTS[rng.integers(len(VARIANTS))]
        jobs.append((i, label, voice, int(rng.integers(25, 76)), int(rng.integers(120, 200))))
    splits = assign_splits(len(jobs), rng, cfg.split)
    (out / "audio").mkdir(parents=True, exist_ok=True)

    def render(job: tuple[int, int, str, int, int]) -> dict:
        i, label, voice, pitch, speed = job
        path = f"audio/aud-{i:05d}.wav"
        write_wav(speak(WORDS[label], voice, pitch, speed, cfg.sample_rate), out / path, cfg.sample_rate)
        return {"id": f"aud-{i:05d}", "modality": "audio", "path": path, "text": WORDS[label], "label": label,
                "split": splits[i]}

    with ThreadPoolExecutor(max_workers=4) as pool:     # espeak-ng runs as a subprocess: threads suffice
        return list(pool.map(render, jobs))


def moving_digit(image: torch.Tensor, direction: str, frames: int, canvas: int, size: int, travel: int,
                 offset: int) -> torch.Tensor:
    """(frames, 3, canvas, canvas): the digit, shrunk to `size`, starting at the middle of a white canvas along
    `direction` (at `offset` across it) and moving `travel` pixels that way; what leaves the canvas is cut off."""
    digit = F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    dx, dy = DIRECTIONS[direction]
    start = (canvas - size) // 2
    clip = torch.ones(frames, 3, canvas, canvas)
    for t in range(frames):
        along = round(travel * t / (frames - 1))
        x = start + dx * along if dx else offset
        y = start + dy * along if dy else offset
        top, left = max(y, 0), max(x, 0)
        bottom, right = min(y + size, canvas), min(x + size, canvas)
        if bottom > top and right > left:
            clip[t, :, top:bottom, left:right] = digit[:, top - y:bottom - y, left - x:right - x]
    return clip


def build_video(cfg: DemoDataConfig, out: Path, rng: np.random.Generator, image_rows: list[dict],
                images: torch.Tensor) -> list[dict]:
    if cfg.videos <= 0:
        return []
    if not image_rows:
        raise ValueError("videos are made from the digit images: set images to more than 0")
    splits = assign_splits(cfg.videos, rng, cfg.split)
    by_split = {s: [i for i, r in enumerate(image_rows) if r["split"] == s] for s in ("train", "val", "test")}
    (out / "video").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, split in enumerate(splits):
        pool = by_split[split] or list(range(len(image_rows)))   # a clip shows a digit from its own split
        source = pool[rng.integers(len(pool))]
        label = image_rows[source]["label"]
        direction = list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
        frames = int(rng.integers(cfg.video_frames[0], cfg.video_frames[1] + 1))
        offset = int(rng.integers(0, cfg.image_size - cfg.video_digit_size + 1))
        clip = moving_digit(images[source], direction, frames, cfg.image_size, cfg.video_digit_size,
                            cfg.video_travel, offset)
        path = f"video/vid-{i:05d}.mp4"
        write_mp4(clip, out / path, fps=cfg.video_fps)
        text = VIDEO_CAPTIONS[rng.integers(len(VIDEO_CAPTIONS))].format(d=label, w=WORDS[label], dir=direction)
        rows.append({"id": f"vid-{i:05d}", "modality": "video", "path": path, "text": text, "label": label,
                     "split": split})
    return rows


def write_manifest(rows: list[dict], out: Path) -> None:
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    pq.write_table(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA), out / "manifest.parquet")


def read_manifest(data: Path) -> list[dict]:
    """The rows write_manifest wrote under `data`, in order."""
    path = data / "manifest.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: build the data with `anytoken demo-data --out {data}`")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def select_rows(rows: list[dict], modality: str, split: str) -> list[dict]:
    """The manifest rows of one modality and split, in order."""
    return [r for r in rows if r["modality"] == modality and r["split"] == split]


def build_demo_data(cfg: DemoDataConfig) -> dict:
    """Write the dataset under cfg.out and return its summary (also written to demo_data.json)."""
    if len(cfg.video_frames) != 2 or not 2 <= cfg.video_frames[0] <= cfg.video_frames[1]:
        raise ValueError(f"video_frames must be [min, max] with 2 <= min <= max, got {cfg.video_frames}")
    if not 0 < cfg.video_digit_size <= cfg.image_size:
        raise ValueError(f"video_digit_size must lie in (0, image_size], got {cfg.video_digit_size}")
    if not 0 < cfg.video_travel <= cfg.image_size:
        raise ValueError(f"video_travel must lie in (0, image_size], got {cfg.video_travel}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)    # one stream, consumed in a fixed order: same seed, same bytes
    image_rows, images = build_images(cfg, out, rng)
    logger.info("images: %d PNGs of %dpx", len(image_rows), cfg.image_size)
    audio_rows = build_audio(cfg, out, rng)
    logger.info("audio: %d spoken digits at %d Hz", len(audio_rows), cfg.sample_rate)
    video_rows = build_video(cfg, out, rng, image_rows, images)
    logger.info("video: %d clips", len(video_rows))
    augmented_rows = build_augmented(cfg, out, image_rows, images)
    logger.info("augmented images: %d", len(augmented_rows))
    rows = image_rows + augmented_rows + audio_rows + video_rows
    write_manifest(rows, out)
    counts: dict[str, dict[str, int]] = {}
    for row in rows:
        per = counts.setdefault(row["modality"], {})
        per[row["split"]] = per.get(row["split"], 0) + 1
    settings = {k: v for k, v in yaml_safe(cfg).items() if k != "out"}   # the same data wherever it is written
    summary = {"rows": len(rows), "counts": counts, "seed": cfg.seed, "config": settings}
    (out / "demo_data.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def yaml_safe(cfg: DemoDataConfig) -> dict:
    import yaml

    return yaml.safe_load(dump_config(cfg))


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(DemoDataConfig, argv, description=__doc__, prog="anytoken demo-data",
                     default_config="demo_data.yaml")
    try:
        summary = build_demo_data(cfg)
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    logger.info("wrote %d rows to %s/manifest.{jsonl,parquet}: %s", summary["rows"], cfg.out, summary["counts"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
