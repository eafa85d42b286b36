"""Train a byte-level BPE text tokenizer on a manifest's texts (for a base LLM trained from scratch).

    anytoken text-tokenizer --manifest runs/demo/data/manifest.jsonl --out runs/demo/text_tokenizer
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass

from actors.sources import manifest_rows
from models.text_tokenizer import train_text_tokenizer
from workflows.config import parse_args

logger = logging.getLogger(__name__)


@dataclass
class TextTokenizerConfig:
    manifest: str = "runs/demo/data/manifest.jsonl"
    out: str = "runs/demo/text_tokenizer"
    vocab_size: int = 512
    split: str = "train"     # learn from this split's texts only


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(TextTokenizerConfig, argv, description=__doc__, prog="anytoken text-tokenizer")
    texts = [r["text"] for r in manifest_rows(cfg.manifest, None, "train")
             if r["error_stage"] is None and r["split"] == cfg.split and r["text"]]
    if not texts:
        logger.error("no %s texts in %s", cfg.split, cfg.manifest)
        return 1
    tokenizer = train_text_tokenizer(texts, cfg.vocab_size)
    tokenizer.save_pretrained(cfg.out)
    logger.info("trained on %d texts: %d ids, saved to %s", len(texts), len(tokenizer), cfg.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
