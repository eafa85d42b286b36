"""Train a small base LLM on a manifest's texts, for when there is no pretrained one (the demo's case).

    anytoken train-llm [--config workflows/configs/train/llm_demo.yaml] [key.sub=value ...]

The result is an ordinary Hugging Face causal-LM folder (config, safetensors, tokenizer) that `anytoken train`
then freezes as its base LLM. With a real LLM, skip this and point `base_llm` at its folder.
"""
from __future__ import annotations

import sys

from workflows.train_tokenizer import run


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, "anytoken train-llm", default_config="train/llm_demo.yaml")


if __name__ == "__main__":
    sys.exit(main())
