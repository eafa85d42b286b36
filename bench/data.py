"""Benchmark: what a TEAL stage's data costs Ray Data each epoch, cached in the object store or streamed.

    python bench/data.py [--rows 200 60 300] [--context 1024] [--epochs 3]

Writes packed shards of three modalities (rows of `context` ids each, as `anytoken prepare` packs them), then
builds the training dataset of a stage that mixes them as the demo's joint stage once did (weights 1, 6 and 0.5;
it now weighs video 2) twice: with the default cache (read once into the object store, shuffled by row) and
with `cache_max_mb=0` (read from the files every epoch). Two threads iterate the two workers' `streaming_split`
halves as Ray Train's workers do, in micro-batches of 4, with no training in between. Prints one JSON line: per
variant, the seconds to build the dataset and each epoch's seconds.
"""
from __future__ import annotations

import os
import sys

if sys.path and os.path.basename(os.path.abspath(sys.path[0])) == "bench":
    sys.path.pop(0)

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from actors.train_data import DataConfig, sequence_dataset

MODALITIES = ("image", "audio", "video")
MIX = {"image": 1.0, "audio": 6.0, "video": 0.5}


def write_shards(folder: Path, rows: list[int], context: int) -> None:
    generator = np.random.default_rng(0)
    (folder / "train").mkdir(parents=True)
    for part, (modality, n) in enumerate(zip(MODALITIES, rows)):
        ids = generator.integers(0, 1000, (n, context))
        table = pa.table({"input_ids": list(ids), "loss_mask": [np.ones(context, np.int8)] * n,
                          "doc_ids": [np.zeros(context, np.int32)] * n,
                          "position_ids": [np.arange(context, dtype=np.int32)] * n})
        pq.write_table(table, folder / "train" / f"part-{part:05d}-{modality}-0000.parquet")


def epochs(ds: ray.data.Dataset, count: int) -> list[float]:
    """Seconds per epoch, the slower worker's, reading both halves of a 2-way split at once."""
    splits = ds.streaming_split(2, equal=True)
    seconds: list[list[float]] = [[], []]

    def read(rank: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            for _ in splits[rank].iter_batches(batch_size=4, batch_format="numpy", drop_last=True):
                pass
            seconds[rank].append(time.perf_counter() - started)

    threads = [threading.Thread(target=read, args=(rank,)) for rank in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [round(max(a, b), 3) for a, b in zip(*seconds)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs=3, default=[200, 60, 300], help="rows of each modality")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True        # as the training loop sets it
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_shards(Path(tmp), args.rows, args.context)
        megabytes = sum(f.stat().st_size for f in (Path(tmp) / "train").iterdir()) / 2 ** 20
        for name, cache in (("cached", DataConfig.cache_max_mb), ("streamed", 0.0)):
            started = time.perf_counter()
            ds = sequence_dataset(DataConfig(path=tmp, mix=MIX, cache_max_mb=cache), "train")
            built = time.perf_counter() - started
            results[name] = {"build_seconds": round(built, 3), "epoch_seconds": epochs(ds, args.epochs)}
    ray.shutdown()
    print(json.dumps({"rows": dict(zip(MODALITIES, args.rows)), "mix": MIX, "shard_mb": round(megabytes, 2),
                      **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
