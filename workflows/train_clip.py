"""Train the small CLIP that labels media tokens with words for SEA (at demo scale; any Hugging Face CLIPModel
folder serves instead at real scale).

    anytoken train-clip [--config workflows/configs/train/clip_demo.yaml] [key.sub=value ...]

The folder holds the CLIP, its text tokenizer and `words.txt` (the candidate words: the captions' words).
"""
from __future__ import annotations

import sys

from workflows.train_tokenizer import run


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, "anytoken train-clip", default_config="train/clip_demo.yaml")


if __name__ == "__main__":
    sys.exit(main())
