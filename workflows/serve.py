"""Serve an exported model on Ray Serve: OpenAI-style HTTP (chat with image/audio/video in and out, images, models).

    anytoken serve --model runs/demo/model [--host 0.0.0.0] [--port 8000] [generator.batching.max_batch_size=32 ...]
    serve run cluster/serve_config.yaml      # the same application through Ray's own CLI
"""
from __future__ import annotations

import logging
import sys
import time

from actors.serve import app_from_config
from actors.serve_config import ServeConfig
from models.exported import ExportedModel
from workflows.config import parse_args

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from ray import serve

    from actors.cluster import connect
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(ServeConfig, argv, description=__doc__, prog="anytoken serve", default_config="serve.yaml")
    try:
        ExportedModel(cfg.model, cfg.base_llm).base_llm   # a wrong folder fails here, before Ray starts
        connect()
        app = app_from_config(cfg)
    except (ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 1
    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False,
              logging_config={"enable_access_log": cfg.access_log})
    url = f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"
    logger.info("serving %s at %s/v1 (chat/completions, images/generations, models) and %s/healthz; Ctrl-C stops",
                cfg.model, url, url)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        logger.info("stopping")
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
