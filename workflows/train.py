"""Train the TEAL model: joint embeddings over a frozen LLM, in X-LLM-style stages, with SEA alignment.

    anytoken train --config workflows/configs/train/teal_demo.yaml [key.sub=value ...]
    ray job submit --working-dir . -- python -m workflows.train --config workflows/configs/train/teal_demo.yaml

Each stage names what trains, the data mix and its steps, and starts from the previous stage's export; the run
ends in one model folder (config.json, the trained tables, vocabulary, tokenizers, text tokenizer, metrics).
"""
from __future__ import annotations

import json
import logging
import sys

from actors.train_jobs import TealConfig, train_teal
from workflows.config import parse_args

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from actors.cluster import connect
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(TealConfig, argv, description=__doc__, prog="anytoken train",
                     default_config="train/teal_demo.yaml")
    connect()
    try:
        summary = train_teal(cfg)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 1
    for stage in summary["stages"]:
        val = stage["val"][-1]["val_loss"] if stage["val"] else float("nan")
        logger.info("stage %-8s trained %-22s final loss %.4f  held-out %.4f  LLM untouched: %s", stage["stage"],
                    ",".join(stage["train"]), stage["final_loss"] or float("nan"), val, stage["frozen_llm_unchanged"])
    print(json.dumps({"model": summary["out"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
