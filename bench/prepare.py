"""Benchmark: items/s of the prepare work on 256-pixel images, one process against Ray Data with 1 and 2 workers.

    python bench/prepare.py [--images 64] [--tokenizer image_vq_256] [--out runs/bench/prepare]

(a) a plain loop in one process over the very stage functions the pipeline runs (read, preprocess,
tokenize), with torch on 1 thread and on all cores; (b) `run_prepare` on a fresh local Ray whose
tokenizer pool has 1 and then 2 one-thread workers, and one worker with every core, end to end (start-up
and shard writing included). Prints one JSON line: items/s of each and the ratios.
"""
from __future__ import annotations

import os
import sys

# `python bench/X.py` puts bench/ first on the path, where bench/tokenizers.py would hide the tokenizers package
if sys.path and os.path.basename(os.path.abspath(sys.path[0])) == "bench":
    sys.path.pop(0)

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
import torch
import torch.nn.functional as F
from PIL import Image

from actors.prepare import PrepareConfig, TokenizeConfig, run_prepare
from actors.prepare_setup import MediaLimits, setup_tokens
from actors.sources import ROW_SCHEMA, SourceConfig, enumerate_parts
from actors.tokenize import SequenceConfig, TokenizeActor, preprocess_media, read_media
from models import ImageVQConfig, ImageVQTokenizer
from models.text_tokenizer import byte_level_tokenizer
from workflows.config import CONFIG_DIR, load_config
from workflows.demo_data import digit_images


def make_inputs(folder: Path, count: int, tokenizer_config: str) -> Path:
    """`count` 320x320 JPEG photos of digits, a manifest, a tokenizer folder and a text tokenizer."""
    (folder / "images").mkdir(parents=True)
    digits, labels = digit_images(64)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(count):
        big = F.interpolate(digits[i][None], size=320, mode="bilinear", align_corners=False)[0]
        noisy = (big.permute(1, 2, 0).numpy() * 200 + rng.normal(0, 20, (320, 320, 3))).clip(0, 255)
        Image.fromarray(noisy.astype(np.uint8)).save(folder / "images" / f"{i}.jpg", quality=90)
        lines.append(json.dumps({"id": f"img-{i}", "modality": "image", "path": f"images/{i}.jpg",
                                 "text": f"a handwritten {labels[i]}", "split": "train"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    ImageVQTokenizer(load_config(ImageVQConfig, CONFIG_DIR / "tokenizers" / f"{tokenizer_config}.yaml")) \
        .save_pretrained(folder / "tokenizers" / "image")
    byte_level_tokenizer().save_pretrained(folder / "text")
    return folder / "manifest.jsonl"


def plain_loop(folder: Path, manifest: Path, threads: int, batch_size: int) -> float:
    """Items/s of the same stage functions called one after another in this process."""
    torch.set_num_threads(threads)
    setup = setup_tokens(str(folder / "tokenizers"), str(folder / "text"), str(folder / "loop-out"), MediaLimits(), 0)
    actor = TokenizeActor(setup.tokenizer_paths, setup.text_tokenizer_path, setup.vocabulary.to_dict(),
                          SequenceConfig(context_length=1024), threads=threads)
    torch.set_num_threads(threads)   # preprocess_media sets 1 for Ray's workers; the loop decides its own
    rows = enumerate_parts(SourceConfig(manifest=str(manifest)), rows_per_part=10 ** 9)[0].rows

    started = time.perf_counter()
    done = 0
    for start in range(0, len(rows), batch_size):
        batch = pa.Table.from_pylist(rows[start:start + batch_size], schema=ROW_SCHEMA)
        batch = read_media(batch)
        batch = preprocess_media(batch, setup.preprocess)
        torch.set_num_threads(threads)      # preprocess_media pins Ray workers to one thread
        out = actor(batch)
        done += sum(e is None for e in out.column("error_stage").to_pylist())
    seconds = time.perf_counter() - started
    assert done == len(rows), f"{len(rows) - done} rows failed"
    return len(rows) / seconds


def ray_pipeline(folder: Path, manifest: Path, workers: int, threads: int, batch_size: int) -> float:
    """Items/s of run_prepare on a fresh local Ray with a tokenizer pool of `workers` actors of `threads` CPUs."""
    out = folder / f"ray-out-{workers}x{threads}"
    shutil.rmtree(out, ignore_errors=True)
    ray.init(address="local", num_cpus=workers * threads + 1, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        cfg = PrepareConfig(source=SourceConfig(manifest=str(manifest)), out=str(out),
                            tokenizers=str(folder / "tokenizers"), text_tokenizer=str(folder / "text"),
                            tokenize=TokenizeConfig(concurrency=workers, num_cpus=threads, batch_size=batch_size),
                            sequences=SequenceConfig(context_length=1024))
        started = time.perf_counter()
        stats = run_prepare(cfg)
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    assert stats["ok_rows"] == stats["input_rows"], stats
    return stats["input_rows"] / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--tokenizer", default="image_vq_256", help="a config in workflows/configs/tokenizers/")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default="runs/bench/prepare")
    args = parser.parse_args()
    folder = Path(args.out)
    shutil.rmtree(folder, ignore_errors=True)
    manifest = make_inputs(folder, args.images, args.tokenizer)
    cores = torch.get_num_threads()
    result = {"images": args.images, "image_size": 256, "tokenizer": args.tokenizer, "cores": cores}
    result["loop_1_thread_items_per_s"] = round(plain_loop(folder, manifest, 1, args.batch_size), 3)
    result[f"loop_{cores}_threads_items_per_s"] = round(plain_loop(folder, manifest, cores, args.batch_size), 3)
    pools = {"ray_1_workers": (1, 1), "ray_2_workers": (2, 1), f"ray_1_worker_{cores}_threads": (1, cores)}
    for name, (workers, threads) in pools.items():
        result[f"{name}_items_per_s"] = round(ray_pipeline(folder, manifest, workers, threads, args.batch_size), 3)
    for name in pools:
        for loop in ("loop_1_thread", f"loop_{cores}_threads"):
            result[f"{name}_vs_{loop}"] = round(result[f"{name}_items_per_s"] / result[f"{loop}_items_per_s"], 2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
