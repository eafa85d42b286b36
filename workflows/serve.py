"""Serve an exported model on Ray Serve: OpenAI-style HTTP (chat with image/audio/video in and out, images, models).

    anytoken serve --model runs/demo/model [--host 0.0.0.0] [--port 8000] [generator.batching.max_batch_size=32 ...]
    serve run cluster/serve_config.yaml      # the same application through Ray's own CLI

`try_requests` (the demo's last step) starts the app, sends one request of each kind over HTTP, writes what
came back, and shuts the app down.
"""
from __future__ import annotations

import base64
import json
import logging
import socket
import sys
import time
from pathlib import Path
from typing import Any

from actors.serve import app_from_config
from actors.serve_config import ServeConfig
from models.exported import ExportedModel
from workflows.config import parse_args
from workflows.demo_data import read_manifest, select_rows

logger = logging.getLogger(__name__)


def _start(cfg: ServeConfig, app) -> str:
    from ray import serve

    serve.start(http_options={"host": cfg.host, "port": cfg.port, "request_timeout_s": cfg.request_timeout_s})
    serve.run(app, name=cfg.app_name, route_prefix=cfg.route_prefix, blocking=False,
              logging_config={"enable_access_log": cfg.access_log})
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_requests(data: Path) -> dict[str, dict[str, Any]]:
    """One chat request of each kind from the demo's test split: image->text, text->image, audio->text,
    video->text (bodies of POST /v1/chat/completions)."""
    rows = read_manifest(data)

    def first(modality: str) -> dict[str, Any]:
        return select_rows(rows, modality, "test")[0]

    def b64(row: dict[str, Any]) -> str:
        return base64.b64encode((data / row["path"]).read_bytes()).decode("ascii")

    image, audio, video = first("image"), first("audio"), first("video")
    return {
        "image_to_text": {"truth": image["text"], "body": {"max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "data:image/png;base64," + b64(image)}}]}]}},
        "text_to_image": {"truth": "a handwritten 7", "body": {
            "modalities": ["image"], "seed": 7, "best_of": 16, "temperature": 0.3,      # as the evaluation draws
            "messages": [{"role": "user", "content": "a handwritten 7"}]}},
        "audio_to_text": {"truth": audio["text"], "body": {"max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": b64(audio),
                                                                                "format": "wav"}}]}]}},
        "video_to_text": {"truth": video["text"], "body": {"max_tokens": 16, "temperature": 0, "messages": [
            {"role": "user", "content": [{"type": "input_video", "input_video": {"data": b64(video),
                                                                                "format": "mp4"}}]}]}},
    }


def try_requests(model: str, data: str, out: str, port: int | None = None) -> dict[str, Any]:
    """Serve `model`, send demo_requests over HTTP, write each reply (JSON, and media files) under `out`."""
    import httpx
    from ray import serve

    from actors.cluster import connect

    connect()
    cfg = parse_args(ServeConfig, [f"model={model}", f"port={port or _free_port()}", "access_log=false",
                                   "ingress.autoscaling.max_replicas=1", "tokenizer.autoscaling.max_replicas=1",
                                   "detokenizer.autoscaling.max_replicas=1", "tokenizer.num_cpus=0.5",
                                   "detokenizer.num_cpus=0.5"], description=__doc__, prog="anytoken serve",
                     default_config="serve.yaml")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    url = _start(cfg, app_from_config(cfg))
    results = {}
    try:
        with httpx.Client(base_url=url, timeout=300) as client:
            for name, request in demo_requests(Path(data)).items():
                started = time.perf_counter()
                reply = client.post("/v1/chat/completions", json={"model": cfg.model_name or Path(model).name,
                                                                   **request["body"]})
                seconds = time.perf_counter() - started
                if reply.status_code != 200:
                    raise RuntimeError(f"{name}: HTTP {reply.status_code}: {reply.text[:500]}")
                message = reply.json()["choices"][0]["message"]
                files = []
                for i, item in enumerate(message.get("media") or []):
                    suffix = {"image/png": "png", "audio/wav": "wav", "video/mp4": "mp4"}[item["mime_type"]]
                    path = folder / f"{name}_{i}.{suffix}"
                    path.write_bytes(base64.b64decode(item["data"]))
                    files.append(str(path))
                results[name] = {"truth": request["truth"], "reply": message.get("content"), "files": files,
                                 "seconds": round(seconds, 2)}
                (folder / f"{name}.json").write_text(json.dumps(reply.json(), indent=1))
                logger.info("%-13s truth %-28r reply %r %s(%.1f s) -> %s", name, request["truth"],
                            message.get("content") or "", f"files {files} " if files else "", seconds,
                            folder / f"{name}.json")
    finally:
        serve.delete(cfg.app_name)
        serve.shutdown()
    (folder / "results.json").write_text(json.dumps(results, indent=1))
    return results


def requests_main(argv: list[str] | None = None) -> int:
    """The demo's step: --model DIR --data DIR --out DIR."""
    import argparse

    parser = argparse.ArgumentParser(prog="anytoken demo (serve step)")
    for flag in ("--model", "--data", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args(argv)
    try:
        try_requests(args.model, args.data, args.out)
    except (RuntimeError, ValueError, FileNotFoundError) as err:
        logger.error("%s", err)
        return 1
    return 0


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
    url = _start(cfg, app)
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
