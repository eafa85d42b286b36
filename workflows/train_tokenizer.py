"""Train a tokenizer (or any model with a training step: CLIP, X2L, a base LLM) on Ray Train + DeepSpeed.

    anytoken train-tokenizer --config workflows/configs/train/image_vq_demo.yaml
    anytoken train-tokenizer --config workflows/configs/train/audio_vq_demo.yaml loop.num_workers=4
    ray job submit --working-dir . -- python -m workflows.train_tokenizer --config workflows/configs/train/...

The exported folder loads with `models.load_pretrained`; `anytoken prepare --tokenizers` reads a folder of
them (image/, audio/, video/). Same `loop.name` and `loop.storage_path` again: the run resumes.
"""
from __future__ import annotations

import logging
import sys

from actors.train_jobs import ModelTrainConfig, train_model
from workflows.config import CONFIG_DIR, parse_args, read_yaml

logger = logging.getLogger(__name__)


def run(argv: list[str] | None, doc: str, prog: str, default_config: str | None = None) -> int:
    """The recipe every model-training command shares: config, Ray, the loop, a summary."""
    from actors.cluster import connect
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(ModelTrainConfig, argv, description=doc, prog=prog, default_config=default_config)
    if cfg.config_file:     # a named model config (relative to workflows/configs/ or a path), then `config` on top
        path = CONFIG_DIR / cfg.config_file if (CONFIG_DIR / cfg.config_file).is_file() else cfg.config_file
        cfg.config = {**read_yaml(path), **cfg.config}
    if cfg.loop.steps > 0:
        connect()
    try:
        result = train_model(cfg)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 1
    if result.history:
        last = result.history[-1]
        shown = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        logger.info("step %d: %s", last["step"], shown)
    if result.val:
        logger.info("held-out loss: %s", " -> ".join(f"{v['val_loss']:.4f}" for v in result.val))
    print(f"exported {cfg.kind} to {result.export}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(argv, __doc__, "anytoken train-tokenizer")


if __name__ == "__main__":
    sys.exit(main())
