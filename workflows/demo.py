"""The whole mission on one machine: demo data, tokenizers, CLIP and base LLM, prepare, the TEAL stages,
evaluation, and the model served over HTTP with one request of each kind.

    anytoken demo [--out runs/demo] [--size full|smoke] [--fresh]

Every step is the real workflow (`anytoken NAME`) with its shipped config, run in this process on one local
Ray. A step whose output is there is skipped, so a second run picks up where the first stopped; when a step
runs, the steps that read what it made run again (remove `model/` and TEAL, the dynamic-token model that repeats
its recipe, evaluation and serving run again; the data, tokenizers, CLIP, LLM and shards stay). `--size smoke`
runs every step at its smallest (the CI test); `--fresh` starts from nothing.
"""
from __future__ import annotations

import importlib
import json
import logging
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import yaml

from workflows.config import CONFIG_DIR, parse_args

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    out: str = "runs/demo"
    size: Literal["full", "smoke"] = "full"
    fresh: bool = False                # remove `out` first


@dataclass
class Step:
    name: str
    workflow: str                      # a module of workflows/ with main(argv)
    args: Callable[[Path], list[str]]  # its command line, given the demo folder
    outputs: list[str]                 # what it leaves (relative to the demo folder); the first one marks it done
    smoke: list[str] = field(default_factory=list)   # overrides for --size smoke
    what: str = ""
    entry: str = "main"                # the function of the module that runs it
    needs: tuple[str, ...] = ()        # the steps whose outputs it reads: when one of them runs, this one runs too


def _train(config: str, *more: str) -> Callable[[Path], list[str]]:
    return lambda o: ["--config", str(CONFIG_DIR / "train" / config), f"loop.storage_path={o / 'ray'}", *more]


def _prepare(out: str, tokenizers: str) -> Callable[[Path], list[str]]:
    """The demo manifest through the tokenizer folders under `tokenizers`, into `out` (both in the demo folder)."""
    return lambda o: ["--config", str(CONFIG_DIR / "prepare_demo.yaml"),
                      f"source.manifest={o / 'data/manifest.jsonl'}", "--out", str(o / out),
                      "--tokenizers", str(o / tokenizers), "--text-tokenizer", str(o / "text_tokenizer")]


DATA = "data.path={o}/data/manifest.jsonl"   # every job that reads the demo manifest
SMOKE_LOOP = ["loop.log_every=5", "loop.checkpoint_every=10"]
SMOKE_IMAGE_STAGE = "{name: image, train: [special, image], mix: {image: 1}, steps: 10}"


def _stage(config: str, name: str) -> str:
    """One stage of a shipped train config, as a flow-style value for `stages=[...]`."""
    stages = yaml.safe_load((CONFIG_DIR / "train" / config).read_text())["stages"]
    return json.dumps(next(s for s in stages if s["name"] == name))


STEPS = [
    Step("data", "demo_data", lambda o: ["--out", str(o / "data")], ["data/manifest.parquet", "data"],
         smoke=["images=300", "image_augment=1", "audio_per_digit=4", "videos=40"],
         what="real digits (scikit-learn), spoken digits (espeak-ng), moving-digit clips; manifest"),
    Step("text tokenizer", "text_tokenizer",
         lambda o: ["--manifest", str(o / "data/manifest.jsonl"), "--out", str(o / "text_tokenizer")],
         ["text_tokenizer/tokenizer.json", "text_tokenizer"], needs=("data",),
         what="BPE on the demo texts"),
    Step("image tokenizer", "train_tokenizer",
         _train("image_vq_demo.yaml", DATA, "loop.name=demo-image-vq", "--out", "{o}/tokenizers/image"),
         ["tokenizers/image/model.safetensors", "tokenizers/image", "ray/demo-image-vq"],
         smoke=["loop.steps=20", *SMOKE_LOOP], needs=("data",),
         what="ImageVQ, Ray Train + DeepSpeed ZeRO-2"),
    Step("video tokenizer", "train_tokenizer",
         _train("video_demo.yaml", "init_from={o}/tokenizers/image", "--out", "{o}/tokenizers/video"),
         ["tokenizers/video/model.safetensors", "tokenizers/video"], needs=("image tokenizer",),
         what="frames through the image tokenizer"),
    Step("audio tokenizer", "train_tokenizer",
         _train("audio_vq_demo.yaml", DATA, "loop.name=demo-audio-vq", "--out", "{o}/tokenizers/audio"),
         ["tokenizers/audio/model.safetensors", "tokenizers/audio", "ray/demo-audio-vq"],
         smoke=["loop.steps=20", "loop.micro_batch_size=4", *SMOKE_LOOP], needs=("data",),
         what="AudioVQ, 25 tokens/s"),
    Step("CLIP", "train_clip",
         _train("clip_demo.yaml", DATA, "loop.name=demo-clip", "data.text_tokenizer={o}/text_tokenizer", "--out",
                "{o}/clip"),
         ["clip/model.safetensors", "clip", "ray/demo-clip"], smoke=["loop.steps=20", *SMOKE_LOOP],
         needs=("data", "text tokenizer"),
         what="labels image tokens with words for SEA"),
    Step("base LLM", "train_llm",
         _train("llm_demo.yaml", DATA, "loop.name=demo-llm", "config.text_tokenizer={o}/text_tokenizer",
                "data.text_tokenizer={o}/text_tokenizer", "--out", "{o}/llm"),
         ["llm/model.safetensors", "llm", "ray/demo-llm"],
         smoke=["loop.steps=20", "loop.micro_batch_size=32", *SMOKE_LOOP],
         needs=("data", "text tokenizer"),
         what="a tiny Llama on the demo texts, then frozen"),
    Step("prepare", "prepare", _prepare("prepared", "tokenizers"),
         ["prepared/stats.json", "prepared"],
         needs=("data", "text tokenizer", "image tokenizer", "video tokenizer", "audio tokenizer"),
         what="Ray Data: decode, tokenize, both orders, pack, shards"),
    Step("TEAL", "train",
         _train("teal_demo.yaml", "data={o}/prepared", "base_llm={o}/llm", "model.sea.clip={o}/clip", "--out",
                "{o}/model"),
         ["model/training.json", "model", "model.stages", "ray/demo-teal-"],
         smoke=[f"stages=[{SMOKE_IMAGE_STAGE}, {{name: joint, train: [all], steps: 10}}]", *SMOKE_LOOP],
         needs=("prepare", "base LLM", "CLIP"),
         what="joint embeddings (and LoRA) over the frozen LLM in X-LLM stages with SEA"),
    Step("dynamic tokenizer", "train_tokenizer",
         _train("dynamic_visual_demo.yaml", DATA, "loop.name=demo-dynamic-visual", "--out", "{o}/tokenizers_dynamic/image"),
         ["tokenizers_dynamic/image/model.safetensors", "tokenizers_dynamic", "ray/demo-dynamic-visual"],
         smoke=["loop.steps=20", *SMOKE_LOOP], needs=("data",),
         what="LaVIT's selector + merger: fewer tokens per image"),
    Step("prepare (dynamic)", "prepare", _prepare("prepared_dynamic", "tokenizers_dynamic"),
         ["prepared_dynamic/stats.json", "prepared_dynamic"],
         needs=("data", "text tokenizer", "dynamic tokenizer"),
         what="the images again, through the dynamic tokenizer (audio and video: rejected, no tokenizer given)"),
    Step("TEAL (dynamic)", "train",
         _train("teal_demo.yaml", "name=demo-teal-dynamic", "data={o}/prepared_dynamic", "base_llm={o}/llm",
                # the same stage, rows a step and compute as the grid's: its documents are ~17 tokens against
                # the grid's ~25, so its rows hold about 1.5 times the images
                "model.sea.clip={o}/clip", f"stages=[{_stage('teal_demo.yaml', 'image')}]",
                "--out", "{o}/model_dynamic"),
         ["model_dynamic/training.json", "model_dynamic", "model_dynamic.stages", "ray/demo-teal-dynamic-"],
         smoke=[f"stages=[{SMOKE_IMAGE_STAGE}]", *SMOKE_LOOP],
         needs=("prepare (dynamic)", "base LLM", "CLIP", "TEAL"),     # TEAL's image stage, to compare
         what="TEAL's image stage again on the dynamic tokens, to compare with the grid model after that stage"),
    Step("evaluate", "evaluate",
         lambda o: ["--model", str(o / "model"), "--data", str(o / "data"), "--out", str(o / "eval"),
                    f"dynamic_tokenizer={o / 'tokenizers_dynamic/image'}", f"dynamic_model={o / 'model_dynamic'}"],
         ["eval/report.json", "eval"], smoke=["max_examples=20", "samples_per_digit=1"],
         needs=("data", "TEAL", "dynamic tokenizer", "TEAL (dynamic)"),
         what="held-out accuracy, judged generation, reconstructions, IMA, FFN skipping -> report.md"),
    Step("serve", "serve",
         lambda o: ["--model", str(o / "model"), "--data", str(o / "data"), "--out", str(o / "serve")],
         ["serve/results.json", "serve"], entry="requests_main",
         needs=("data", "TEAL"),
         what="Ray Serve app; image->text, text->image, audio->text, video->text over HTTP; shut down"),
]


def _expand(args: list[str], out: Path) -> list[str]:
    return [a.replace("{o}", str(out)) for a in args]


def _clear(out: Path, outputs: list[str]) -> None:
    for name in outputs[1:]:
        for path in out.glob(f"{name}*") if name.endswith("-") else [out / name]:      # "ray/run-": every stage
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()


def steps_to_run(out: Path) -> list[bool]:
    """Which steps run: those whose output is missing, and those that need a step that runs."""
    runs: dict[str, bool] = {}
    for step in STEPS:
        runs[step.name] = not (out / step.outputs[0]).exists() or any(runs[n] for n in step.needs)
    return list(runs.values())


def clear_what_runs(out: Path) -> list[bool]:
    """steps_to_run, with the old outputs of every step that runs removed now, before the first one starts: a
    run stopped half-way then leaves each of them missing, so the next run makes it again instead of keeping what
    an older model made."""
    runs = steps_to_run(out)
    for step, due in zip(STEPS, runs):
        if due:
            _clear(out, step.outputs)
    return runs


def run_demo(cfg: DemoConfig) -> list[tuple[str, str, float]]:
    """Run (or skip) every step; returns (step, status, seconds)."""
    out = Path(cfg.out).resolve()
    if cfg.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    done = []
    for i, (step, runs) in enumerate(zip(STEPS, clear_what_runs(out)), 1):
        if not runs:
            logger.info("[%d/%d] %s: done before, skipped (%s)", i, len(STEPS), step.name, out / step.outputs[1])
            done.append((step.name, "skipped", 0.0))
            continue
        argv = _expand(step.args(out), out) + (step.smoke if cfg.size == "smoke" else [])
        logger.info("[%d/%d] %s: %s\n    anytoken %s %s", i, len(STEPS), step.name, step.what,
                    step.workflow.replace("_", "-"), " ".join(argv))
        started = time.perf_counter()
        code = getattr(importlib.import_module(f"workflows.{step.workflow}"), step.entry)(argv)
        seconds = time.perf_counter() - started
        if code != 0:
            raise RuntimeError(f"step {step.name!r} failed (exit code {code}); fix it and run the demo again: the "
                               "steps before it are kept")
        done.append((step.name, "ran", seconds))
        logger.info("[%d/%d] %s: done in %.0f s -> %s", i, len(STEPS), step.name, seconds, out / step.outputs[1])
    return done


def main(argv: list[str] | None = None) -> int:
    from actors.cluster import connect
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(DemoConfig, argv, description=__doc__, prog="anytoken demo")
    connect()
    try:
        steps = run_demo(cfg)
    except RuntimeError as err:
        logger.error("%s", err)
        return 1
    out = Path(cfg.out)
    print(f"\n{'step':<18} {'status':<8} {'seconds':>8}")
    for name, status, seconds in steps:
        print(f"{name:<18} {status:<8} {seconds:>8.0f}")
    print(f"\ntotal {sum(s for _, _, s in steps):.0f} s. Results in {out}: data/, tokenizers/, clip/, llm/, "
          f"prepared/ (shards, errors/, stats.json), model/ (the exported TEAL model), tokenizers_dynamic/, "
          f"prepared_dynamic/, model_dynamic/ (the image stage on the dynamic tokens), eval/report.md (with its "
          f"figures), serve/ (the HTTP replies and generated media)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
