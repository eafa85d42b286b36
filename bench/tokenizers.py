"""Benchmark: train each tokenizer briefly on the demo train split, evaluate on val, print one JSON line.

    python bench/tokenizers.py --data runs/demo/data [--out runs/demo/bench] [--steps-scale 1.0]

Also saves the trained tokenizers and reconstruction figures under --out.
"""
from __future__ import annotations

import os
import sys

# `python bench/X.py` puts bench/ first on the path, where bench/tokenizers.py would hide the tokenizers package
if sys.path and os.path.basename(os.path.abspath(sys.path[0])) == "bench":
    sys.path.pop(0)

import argparse
import json
import logging
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from models import (AudioVQConfig, AudioVQTokenizer, DynamicVisualConfig, DynamicVisualTokenizer, ImageVQConfig,
                    ImageVQTokenizer, VideoConfig, VideoTokenizer)
from models.local_training import sample_batches, train_locally
from models.evaluation import psnr
from models.media import read_image, read_mp4, read_wav, write_pairs, write_wav
from workflows.config import CONFIG_DIR, load_config

logger = logging.getLogger("bench.tokenizers")
STEPS = {"image_vq": 400, "dynamic_visual": 900, "audio_vq": 400}
AUDIO_SECONDS = 1.5


def manifest_rows(data: Path, modality: str, split: str) -> list[dict]:
    rows = pq.read_table(data / "manifest.parquet").to_pylist()
    return [r for r in rows if r["modality"] == modality and r["split"] == split]


def load_images(data: Path, split: str) -> torch.Tensor:
    return torch.stack([read_image(data / r["path"]) for r in manifest_rows(data, "image", split)])


def load_audio(data: Path, split: str, sample_rate: int) -> tuple[torch.Tensor, list[int]]:
    """Waveforms trimmed or padded to AUDIO_SECONDS, and their true lengths in samples."""
    length = int(AUDIO_SECONDS * sample_rate)
    waves, lengths = [], []
    for row in manifest_rows(data, "audio", split):
        wave, rate = read_wav(data / row["path"])
        if rate != sample_rate:
            raise ValueError(f"{row['path']}: expected {sample_rate} Hz, got {rate}")
        wave = wave.mean(dim=0)[:length]
        lengths.append(len(wave))
        waves.append(F.pad(wave, (0, length - len(wave))))
    return torch.stack(waves), lengths


def load_clips(data: Path, split: str, video: VideoTokenizer) -> list[torch.Tensor]:
    """Each clip's frames, sampled at the video tokenizer's rate."""
    clips = []
    for row in manifest_rows(data, "video", split):
        frames, fps = read_mp4(data / row["path"])
        clips.append(video.sample(frames, fps))
    return clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="runs/demo/data")
    parser.add_argument("--out", default="runs/demo/bench")
    parser.add_argument("--steps-scale", type=float, default=1.0, help="multiplies every tokenizer's step count")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    torch.manual_seed(args.seed)
    data, out = Path(args.data), Path(args.out)
    (out / "tokenizers").mkdir(parents=True, exist_ok=True)
    steps = {k: max(1, round(v * args.steps_scale)) for k, v in STEPS.items()}
    configs = CONFIG_DIR / "tokenizers"
    started = time.perf_counter()
    result: dict[str, float | int] = {}

    train_images, val_images = load_images(data, "train"), load_images(data, "val")
    image_vq = ImageVQTokenizer(load_config(ImageVQConfig, configs / "image_vq_demo.yaml"))
    video = VideoTokenizer(load_config(VideoConfig, configs / "video_demo.yaml"), image_tokenizer=image_vq)
    # one set of weights serves images and video frames, so it learns from both
    frames = torch.cat([train_images, *load_clips(data, "train", video)])
    train_locally(image_vq, sample_batches(frames, 64, args.seed), steps["image_vq"], lr=2e-3, log_every=100)
    codes = image_vq.encode(val_images)
    rebuilt = image_vq.decode(codes)
    result["image_vq_psnr_db"] = round(psnr(rebuilt, val_images), 2)
    result["image_vq_codebook_usage"] = round(codes.unique().numel() / image_vq.codebook_size, 3)
    result["image_vq_tokens_per_image"] = image_vq.tokens_per_image
    image_vq.save_pretrained(out / "tokenizers" / "image")
    write_pairs(val_images[:16], rebuilt[:16], out / "image_vq_reconstructions.png")

    dynamic = DynamicVisualTokenizer(load_config(DynamicVisualConfig, configs / "dynamic_visual_demo.yaml"))
    train_locally(dynamic, sample_batches(train_images, 64, args.seed), steps["dynamic_visual"], lr=1e-3, log_every=100)
    dyn_codes = dynamic.encode(val_images)
    counts = torch.tensor([len(c) for c in dyn_codes], dtype=torch.float32)
    dyn_rebuilt = dynamic.decode(dyn_codes)
    result["dynamic_tokens_per_image_mean"] = round(float(counts.mean()), 2)
    result["dynamic_tokens_per_image_std"] = round(float(counts.std()), 2)
    result["dynamic_tokens_per_image_max"] = dynamic.max_tokens_per_image
    result["dynamic_psnr_db"] = round(psnr(dyn_rebuilt, val_images), 2)
    dynamic.save_pretrained(out / "tokenizers" / "image_dynamic")
    write_pairs(val_images[:16], dyn_rebuilt[:16], out / "dynamic_reconstructions.png")

    audio = AudioVQTokenizer(load_config(AudioVQConfig, configs / "audio_vq_demo.yaml"))
    train_waves, _ = load_audio(data, "train", audio.config.sample_rate)
    val_waves, val_lengths = load_audio(data, "val", audio.config.sample_rate)
    train_locally(audio, sample_batches(train_waves, 32, args.seed), steps["audio_vq"], lr=2e-3, log_every=100)
    audio_codes = audio.encode(val_waves)
    result["audio_mel_l1"] = round(float((audio.decode_mel(audio_codes) - audio.log_mel(val_waves)).abs().mean()), 4)
    result["audio_tokens_per_second"] = round(audio_codes.shape[1] / AUDIO_SECONDS, 2)
    audio.save_pretrained(out / "tokenizers" / "audio")
    sample = audio.decode(audio_codes[:1])[0][: val_lengths[0]]
    write_wav(val_waves[0][: val_lengths[0]], out / "audio_original.wav", audio.config.sample_rate)
    write_wav(sample, out / "audio_reconstruction.wav", audio.config.sample_rate)

    clips = load_clips(data, "val", video)
    video_rebuilt = video.decode(video.encode(clips))
    result["video_psnr_db"] = round(psnr(torch.cat(video_rebuilt), torch.cat(clips)), 2)
    result["video_frames_per_clip_mean"] = round(sum(len(c) for c in clips) / len(clips), 2)
    video.save_pretrained(out / "tokenizers" / "video")
    write_pairs(clips[0], video_rebuilt[0], out / "video_reconstructions.png", columns=len(clips[0]))

    result["seconds"] = round(time.perf_counter() - started, 1)
    result["steps"] = steps
    print(json.dumps(result))


if __name__ == "__main__":
    main()
