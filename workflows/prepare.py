"""Prepare media and text into packed training shards with Ray Data (CPU pools), losing nothing.

    anytoken prepare --manifest runs/demo/data/manifest.jsonl --out runs/demo/prepared [--tokenizers DIR]
    ray job submit --working-dir . -- python -m workflows.prepare --config workflows/configs/prepare_demo.yaml
"""
from __future__ import annotations

import logging
import sys

from actors.prepare import PrepareConfig, run_prepare, summary_table
from workflows.config import parse_args

logger = logging.getLogger(__name__)
ALIASES = {"manifest": "source.manifest", "root": "source.root", "folder": "source.folder",
           "webdataset": "source.webdataset", "parquet": "source.parquet"}


def main(argv: list[str] | None = None) -> int:
    from actors.cluster import connect
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(PrepareConfig, argv, description=__doc__, prog="anytoken prepare", aliases=ALIASES)
    connect()
    try:
        stats = run_prepare(cfg)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 1
    print(summary_table(stats))
    logger.info("shards, errors/ and stats.json are in %s", cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
