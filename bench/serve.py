"""Benchmark: the Serve app end to end over HTTP — requests/s and p50/p99 latency at several concurrencies, with
dynamic batching on and off (max_batch_size 1) and the KV cache on and off.

    python bench/serve.py [--model DIR] [--requests 96] [--max-tokens 64] [--concurrency 1,8,32] [--rounds 3]

Without --model it builds an untrained model of the given size (--hidden, --layers) in the exported layout.
The variants run side by side as three Serve apps and are measured in interleaved rounds (the best kept), so
a busy shared machine disturbs them alike. Every request is a text->text chat at temperature 0 with a distinct
prompt, the same set in every variant, so each decodes the same tokens. `decode_only` times the generator alone
in this process (no HTTP): one request at a time against all in one batch, on --device (cpu or cuda);
--decode-only measures that alone and starts no Ray. Prints one JSON line.
"""
from __future__ import annotations

import os
import sys

# `python bench/X.py` puts bench/ first on the path, where bench/tokenizers.py would hide the tokenizers package
if sys.path and os.path.basename(os.path.abspath(sys.path[0])) == "bench":
    sys.path.pop(0)

import argparse
import asyncio
import json
import socket
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from models import AudioVQConfig, AudioVQTokenizer, ImageVQConfig, ImageVQTokenizer
from models.exported import random_exported_model
from models.text_tokenizer import byte_level_tokenizer

VARIANTS = {   # name -> (max_batch_size, use_cache)
    "batched": (32, True),
    "unbatched": (1, True),
    "batched_no_cache": (32, False),
}


def make_model(folder: Path, hidden: int, layers: int) -> str:
    torch.manual_seed(0)
    tokenizers = {"image": ImageVQTokenizer(ImageVQConfig()), "audio": AudioVQTokenizer(AudioVQConfig())}
    return str(random_exported_model(folder / "model", tokenizers, byte_level_tokenizer(), hidden_size=hidden,
                                     layers=layers, heads=max(2, hidden // 32), context_length=1024))


async def load(url: str, total: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    """`total` chats at `concurrency` in flight; client-side latency of each."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    errors = 0

    async def one(client: httpx.AsyncClient, i: int) -> None:
        nonlocal errors
        body = {"messages": [{"role": "user", "content": f"request number {i} please"}], "max_tokens": max_tokens,
                "temperature": 0}
        async with gate:
            start = time.perf_counter()
            reply = await client.post("/v1/chat/completions", json=body)
            latencies.append(time.perf_counter() - start)
            errors += reply.status_code != 200

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*[one(client, i) for i in range(total)])
        wall = time.perf_counter() - start
    ms = np.array(latencies) * 1000
    return {"requests_per_s": round(total / wall, 2), "p50_ms": round(float(np.percentile(ms, 50)), 1),
            "p99_ms": round(float(np.percentile(ms, 99)), 1), "errors": errors, "requests": total}


def decode_only(model: str, requests: int, max_tokens: int, threads: int, device: str = "cpu",
                dtype: torch.dtype | None = None) -> dict:
    """The generator alone, in this process, no HTTP: requests/s and new tokens/s decoding one at a time and all
    in one batch."""
    from models.generation import SamplingParams
    from models.exported import ExportedModel
    from models.multimodal_generator import PromptEncoder, TokenGenerator

    torch.set_num_threads(threads)
    exported = ExportedModel(model)
    prompts = [PromptEncoder(exported, media=False).build([f"request number {i} please"]).ids for i in range(requests)]
    params = [SamplingParams(max_tokens, temperature=0) for _ in prompts]
    figures = {}
    for use_cache in (True, False):
        generator = TokenGenerator(exported, device=device, use_cache=use_cache, dtype=dtype)
        generator.generate(prompts[:2], params[:2])   # warm-up
        for batch in (1, requests):
            start = time.perf_counter()
            new_tokens = sum(len(g.ids) for i in range(0, requests, batch)
                             for g in generator.generate(prompts[i:i + batch], params[i:i + batch]))
            seconds = time.perf_counter() - start
            name = f"{'cache' if use_cache else 'no_cache'}_batch{batch}"
            figures[f"{name}_requests_per_s"] = round(requests / seconds, 2)
            figures[f"{name}_tokens_per_s"] = round(new_tokens / seconds, 1)
    return figures


def deploy(name: str, model: str, max_batch_size: int, use_cache: bool, threads: int) -> None:
    from ray import serve

    from actors.serve import build_app

    config = {"model": model, "app_name": name,
              "ingress": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
              "tokenizer": {"num_cpus": 0.5}, "detokenizer": {"num_cpus": 0.5},
              "generator": {"num_cpus": 1, "threads": threads, "use_cache": use_cache, "max_ongoing_requests": 64,
                            "batching": {"max_batch_size": max_batch_size}}}   # the default wait (0.03 s)
    serve.run(build_app(config), name=name, route_prefix=f"/{name}", blocking=False,
              logging_config={"enable_access_log": False, "log_level": "WARNING"})


def measure(base: str, variants: list[str], args) -> dict:
    """Every variant at every concurrency, `rounds` times interleaved, so all see the same background load; the
    best round of each (the least disturbed) is kept."""
    from ray import serve

    best: dict[str, dict[str, dict]] = {v: {} for v in variants}
    for v in variants:
        asyncio.run(load(f"{base}/{v}", 8, 4, args.max_tokens))   # warm-up: first calls, connections, allocator
    for _ in range(args.rounds):
        for c in args.concurrency:
            for v in variants:
                figures = asyncio.run(load(f"{base}/{v}", max(args.requests, 2 * c), c, args.max_tokens))
                kept = best[v].get(f"c{c}")
                if kept is None or figures["requests_per_s"] > kept["requests_per_s"]:
                    best[v][f"c{c}"] = figures
    for v in variants:
        best[v]["batch_sizes"] = serve.get_deployment_handle("Generator", v).stats.remote().result()["batch_sizes"]
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an exported model folder (default: an untrained one of --hidden/--layers)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--requests", type=int, default=96, help="requests per concurrency (at least 2x it)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the generator replica")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats; the best of each is kept")
    parser.add_argument("--device", default="cpu", help="where decode_only runs the generator: cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="decode_only's weights")
    parser.add_argument("--decode-only", action="store_true", help="only the in-process decode figures; no Ray")
    args = parser.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    load_before = os.getloadavg()[0]
    described = {"model": args.model or f"untrained llama hidden={args.hidden} layers={args.layers}",
                 "decode_device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                 else f"cpu ({os.cpu_count()} cores, {args.threads} threads)", "dtype": args.dtype,
                 "max_tokens": args.max_tokens}
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_model(Path(tmp), args.hidden, args.layers)
        n = max(args.concurrency)
        decode = decode_only(model, n, args.max_tokens, args.threads, args.device, getattr(torch, args.dtype))   # before Ray starts
        decode_ratios = {"decode_only_batching": round(decode[f"cache_batch{n}_requests_per_s"] /
                                                       decode["cache_batch1_requests_per_s"], 2),
                         "decode_only_kv_cache": round(decode[f"cache_batch{n}_requests_per_s"] /
                                                       decode[f"no_cache_batch{n}_requests_per_s"], 2)}
        if args.decode_only:
            print(json.dumps({**described, "decode_only": decode, "ratios": decode_ratios}))
            return
        import ray
        from ray import serve

        ray.init(address="local", num_cpus=8, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
        variants = args.variants.split(",")
        for name in variants:
            deploy(name, model, *VARIANTS[name], args.threads)
        results = {**measure(f"http://127.0.0.1:{port}", variants, args), "decode_only": decode}
        serve.shutdown()
        ray.shutdown()

    def ratio(a: str, b: str, c: str) -> float | None:
        if a in results and b in results:
            return round(results[a][c]["requests_per_s"] / results[b][c]["requests_per_s"], 2)
        return None

    levels = [f"c{c}" for c in args.concurrency]
    ratios = {**{f"batching_rps_{c}": ratio("batched", "unbatched", c) for c in levels},
              **{f"kv_cache_rps_{c}": ratio("batched", "batched_no_cache", c) for c in levels}, **decode_ratios}
    print(json.dumps({**described, "results": results, "ratios": ratios,
                      "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)]}))


if __name__ == "__main__":
    main()
