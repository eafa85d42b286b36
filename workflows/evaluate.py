"""Evaluate an exported model on the demo's held-out split and write report.md, report.json and the figures.

    anytoken evaluate [--model runs/demo/model] [--data runs/demo/data] [--out runs/demo/eval] [key=value ...]

Understanding: which digit an image shows, which digit word is spoken, which digit moves which way in a clip
(ranked among every candidate answer, and as the greedy free-running reply). Generation: images (and audio) made
from "a handwritten 7"-style prompts, judged by classifiers trained on the real training-split media alone, for one
draw per prompt and for the best of `best_of` draws as the model itself ranks them, at `temperature` and again at
each of `temperatures`.
Tokenizers: reconstruction quality; the dynamic tokenizer's tokens per image. IMA: the alignment curve per layer,
the score against accuracy across the training stages, accuracy and latency when perceptual tokens skip the FFN
from layer k on. Runs in this process (no Ray): the held-out split of the demo is small.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.evaluation import (DigitJudge, audio_features, image_features, mentioned_label, prefill_seconds, psnr,
                               rank_answers, timed)
from models.exported import ExportedModel
from models.generation import SamplingParams
from models.ima import PerceptualSkipping, SkipConfig, decoder_layers, measure_alignment
from models.media import read_image, read_mp4, read_wav, write_grid, write_pairs
from models.multimodal_generator import MediaPart, OutputDecoder, PromptEncoder, TokenGenerator
from models.pretrained import load_pretrained, write_json
from workflows.config import parse_args
from workflows.demo_data import DIRECTIONS, IMAGE_CAPTIONS, VIDEO_CAPTIONS, WORDS, read_manifest, select_rows

logger = logging.getLogger(__name__)

CHANCE = {"image": 1 / 10, "audio": 1 / 10, "video": 1 / 40}
GOALS = {"understanding": 0.9, "generation": 0.8, "spoken_digit": 0.9}


@dataclass
class EvaluateConfig:
    model: str = "runs/demo/model"
    data: str = "runs/demo/data"            # the folder with manifest.jsonl
    out: str = "runs/demo/eval"
    split: str = "test"
    max_examples: int = 200                 # per modality, the first ones of the split
    samples_per_digit: int = 10             # generated images (and audio) per digit prompt
    # generation samples at this temperature, and is judged again at each of `temperatures` (the share of distinct
    # draws shows what a lower one costs). The demo model, 100 prompts a modality, one draw / best of 16: image
    # 11 / 43 % at 1.0, 32 / 72 % at 0.3; audio 74 / 88 % at 1.0, 90 / 87 % at 0.3
    temperature: float = 0.3
    temperatures: list[float] = field(default_factory=lambda: [1.0])
    top_k: int = 0
    guidance_scale: float = 1.0
    best_of: int = 16                       # generation is judged twice: one draw per prompt, and the best of this
                                            # many draws by the model's own reading of the prompt back (best_of)
    skip_layers: list[int] = field(default_factory=list)   # FFN skipping from these layers; empty: every layer
    dynamic_tokenizer: str | None = None    # a dynamic (LaVIT) tokenizer folder to compare with the grid one
    dynamic_model: str | None = None        # a model trained on that tokenizer's tokens: its image accuracy
                                            # against the grid model's checkpoint after the same stage
    curves: list[str] = field(default_factory=list)        # metrics.jsonl files; empty: those beside the model
    batch_size: int = 32
    seed: int = 0


# --- the data ------------------------------------------------------------------------------------------------------
def direction_of(text: str) -> int:
    for i, name in enumerate(DIRECTIONS):
        if re.search(rf"\b{name}\b", text):
            return i
    raise ValueError(f"no direction in the caption {text!r}")


# --- the sections of the report ----------------------------------------------------------------------------------
class Evaluation:
    def __init__(self, cfg: EvaluateConfig):
        self.cfg = cfg
        self.data, self.out = Path(cfg.data), Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.exported = ExportedModel(cfg.model)
        self.model = self.exported.model()
        self.text = self.exported.text_tokenizer()
        self.encoder = PromptEncoder(self.exported)
        self.generator = TokenGenerator(self.exported)
        self.decoder = OutputDecoder(self.exported)
        self.tokenizers = self.exported.media_tokenizers()
        self.manifest = read_manifest(self.data)
        self.report: dict[str, Any] = {"model": str(Path(cfg.model).resolve()), "split": cfg.split}
        self.judges: dict[str, DigitJudge] = {}

    def answer(self, text: str) -> list[int]:
        return self.text(text, add_special_tokens=False)["input_ids"] + [self.text.eos_token_id]

    def rows(self, modality: str, split: str | None = None, limited: bool = False) -> list[dict]:
        rows = select_rows(self.manifest, modality, split or self.cfg.split)
        return rows[: self.cfg.max_examples] if limited else rows

    def media_prompt(self, row: dict) -> list[int]:
        return self.encoder.encode([MediaPart(row["modality"], (self.data / row["path"]).read_bytes())]).ids

    @functools.cache
    def prompts(self, modality: str) -> tuple[list[dict], list[list[int]]]:
        """The evaluated rows of a modality and their prompts, tokenized once for every model and setting."""
        rows = self.rows(modality, limited=True)
        return rows, [self.media_prompt(r) for r in rows]

    def candidates(self, modality: str) -> tuple[list[list[list[int]]], list[list[str]]]:
        """Every candidate answer (its phrasings as ids) and, per candidate, the names a free reply may use."""
        if modality == "image":
            texts = [[t.format(d=d, w=WORDS[d]) for t in IMAGE_CAPTIONS] for d in range(10)]
            names = [[str(d), WORDS[d]] for d in range(10)]
        elif modality == "audio":
            texts = [[WORDS[d]] for d in range(10)]
            names = [[str(d), WORDS[d]] for d in range(10)]
        else:
            texts = [[t.format(d=d, w=WORDS[d], dir=name) for t in VIDEO_CAPTIONS]
                     for d in range(10) for name in DIRECTIONS]
            names = [[str(d), WORDS[d]] for d in range(10)]
        return [[self.answer(t) for t in phrasings] for phrasings in texts], names

    def label(self, row: dict) -> int:
        return int(row["label"]) * len(DIRECTIONS) + direction_of(row["text"]) if row["modality"] == "video" \
            else int(row["label"])

    def understanding(self, modality: str, model=None, before_forward=None, free: bool = True,
                      prompts: list[list[int]] | None = None) -> dict[str, Any]:
        """`prompts`: the rows' prompts as another model's tokenizers make them (default: this model's)."""
        rows, own = self.prompts(modality)
        prompts = own if prompts is None else prompts
        labels = torch.tensor([self.label(r) for r in rows])
        candidates, names = self.candidates(modality)
        scores = rank_answers(model or self.model, prompts, candidates, self.cfg.batch_size, before_forward,
                              reply_ids=self.generator.grammar.reply_ids)
        predicted = scores.argmax(1)
        result: dict[str, Any] = {"examples": len(rows), "chance": CHANCE[modality],
                                  "ranked_accuracy": share(predicted == labels)}
        if modality == "video":
            per = len(DIRECTIONS)
            result["digit_accuracy"] = share(predicted // per == labels // per)
            result["direction_accuracy"] = share(predicted % per == labels % per)
        if free:
            params = [SamplingParams(max_new_tokens=16, temperature=0.0)] * len(prompts)
            replies = [self.decoder.decode(g.ids).text for g in self.generator.generate(prompts, params)]
            digits = labels // len(DIRECTIONS) if modality == "video" else labels
            said = [mentioned_label(r, names) for r in replies]
            result["free_reply_digit_accuracy"] = float(np.mean([s == int(d) for s, d in zip(said, digits)]))
            result["replies"] = [{"id": r["id"], "truth": r["text"], "reply": reply}
                                 for r, reply in list(zip(rows, replies))[:10]]
        return result

    # judges: trained on the real training split, checked on the real held-out split
    @functools.cache
    def images(self, split: str) -> tuple[torch.Tensor, list[int]]:
        rows = self.rows("image", split)
        return torch.stack([read_image(self.data / r["path"]) for r in rows]), [int(r["label"]) for r in rows]

    @functools.cache
    def waves(self, split: str) -> tuple[list[torch.Tensor], list[int]]:
        rows = self.rows("audio", split)
        waves = [read_wav(self.data / r["path"]) for r in rows]
        return [self._mono(w, rate) for w, rate in waves], [int(r["label"]) for r in rows]

    def _mono(self, wave: torch.Tensor, rate: int) -> torch.Tensor:
        import torchaudio

        wave = wave.mean(0) if wave.ndim == 2 else wave
        target = self.audio_rate
        return torchaudio.functional.resample(wave, rate, target) if rate != target else wave

    @property
    def audio_rate(self) -> int:
        audio = self.tokenizers.get("audio")
        return audio.config.sample_rate if audio is not None else 16000

    def train_judges(self) -> dict[str, Any]:
        result = {}
        images, labels = self.images("train")
        self.judges["image"] = DigitJudge(image_features).fit(images, labels)
        test_images, test_labels = self.images(self.cfg.split)
        result["image_judge_accuracy_on_real"] = self.judges["image"].accuracy(test_images, test_labels)
        if self.rows("audio", "train"):
            waves, labels = self.waves("train")
            rate = self.audio_rate
            self.judges["audio"] = DigitJudge(lambda w: audio_features(w, rate), standardize=True).fit(waves, labels)
            test_waves, test_labels = self.waves(self.cfg.split)
            result["audio_judge_accuracy_on_real"] = self.judges["audio"].accuracy(test_waves, test_labels)
        return result

    def generation(self, modality: str) -> dict[str, Any]:
        """Judged accuracy of one draw per prompt, and of the best of cfg.best_of draws (the figures and files
        show those)."""
        temperatures = dict.fromkeys([self.cfg.temperature, *self.cfg.temperatures])     # the headline one first
        runs = {t: self.judged_draws(modality, t) for t in temperatures}
        one, kept = runs[self.cfg.temperature]
        result = {"samples": len(one["labels"]), "chance": 0.1, "temperature": self.cfg.temperature,
                  "one_draw_accuracy": one["accuracy"], "best_of": self.cfg.best_of,
                  "distinct_draws": one["distinct"], "by_temperature": [
                      {"temperature": t, "one_draw_accuracy": o["accuracy"], "judged_accuracy": k["accuracy"],
                       "distinct_draws": o["distinct"]} for t, (o, k) in runs.items()]}
        made, labels = kept["made"], kept["labels"]
        per = self.cfg.samples_per_digit
        if modality == "image":
            write_grid(kept["samples"], self.out / "generated_images.png", per)
        else:
            for d in range(10):
                (self.out / f"generated_audio_{d}.wav").write_bytes(made[d * per].data)
        return {**result, "judged_accuracy": kept["accuracy"], "seconds": kept["seconds"],
                "one_draw_seconds": one["seconds"], "figure": "generated_images.png" if modality == "image" else None,
                "mean_tokens": float(np.mean([m.tokens for m in made]))}

    def judged_draws(self, modality: str, temperature: float) -> tuple[dict[str, Any], dict[str, Any]]:
        """One draw per prompt and the best of cfg.best_of, both judged, at one temperature."""
        one = self.generate(modality, 1, temperature)
        return one, (self.generate(modality, self.cfg.best_of, temperature) if self.cfg.best_of > 1 else one)

    def generate(self, modality: str, best_of: int, temperature: float | None = None) -> dict[str, Any]:
        """samples_per_digit media per digit prompt, judged; `distinct`: how many different media the draws for
        each digit are, over all the draws (1.0: no two alike)."""
        cfg = self.cfg
        shape = self.generator.grammar.shapes[modality]
        prompts, params, labels = [], [], []
        for d in range(10):
            for s in range(cfg.samples_per_digit):
                text = (IMAGE_CAPTIONS[s % len(IMAGE_CAPTIONS)].format(d=d, w=WORDS[d]) if modality == "image"
                        else WORDS[d])
                prompts.append(self.encoder.encode([text]).ids)
                params.append(SamplingParams(max_new_tokens=shape.max_tokens + 3,
                                             temperature=cfg.temperature if temperature is None else temperature,
                                             top_k=cfg.top_k, seed=cfg.seed + 1000 * d + s, modalities=(modality,),
                                             guidance_scale=cfg.guidance_scale,
                                             best_of=best_of))
                labels.append(d)
        started = time.perf_counter()
        made = [self.decoder.decode(g.ids).media[0] for g in self.generator.generate(prompts, params)]
        seconds = time.perf_counter() - started
        base = {"made": made, "labels": labels, "seconds": seconds,
                "distinct": len({(d, m.data) for m, d in zip(made, labels)}) / len(made)}
        if modality == "image":
            samples = torch.stack([read_image(m.data) for m in made])
            return {**base, "samples": samples, "accuracy": self.judges["image"].accuracy(samples, labels)}
        waves = [self._mono(*read_wav(m.data)) for m in made]
        return {**base, "accuracy": self.judges["audio"].accuracy(waves, labels)}

    def reconstruction(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        images, labels = self.images(self.cfg.split)
        images, labels = images[: self.cfg.max_examples], labels[: self.cfg.max_examples]
        if "image" in self.tokenizers:
            grid = self.tokenizers["image"]
            rebuilt = grid.decode(grid.encode(images))
            result["image"] = {"psnr_db": psnr(rebuilt, images), "tokens_per_image": grid.tokens_per_image}
            write_pairs(images[:16], rebuilt[:16], self.out / "image_reconstructions.png")
            if "image" in self.judges:
                result["image"]["judge_accuracy_on_reconstructions"] = self.judges["image"].accuracy(rebuilt, labels)
        if self.cfg.dynamic_tokenizer:
            dynamic = load_pretrained(self.cfg.dynamic_tokenizer).eval()
            with torch.no_grad():
                codes = dynamic.encode(images)
                rebuilt = dynamic.decode(codes)
            counts = torch.tensor([len(c) for c in codes], dtype=torch.float32)
            result["dynamic_image"] = {"psnr_db": psnr(rebuilt, images), "tokens_per_image_mean": float(counts.mean()),
                                       "tokens_per_image_std": float(counts.std()),
                                       "tokens_per_image_max": dynamic.max_tokens_per_image}
            if "image" in result:
                result["dynamic_image"]["token_saving_vs_grid"] = 1 - float(counts.mean()) / result["image"][
                    "tokens_per_image"]
            write_pairs(images[:16], rebuilt[:16], self.out / "dynamic_reconstructions.png")
        if "audio" in self.tokenizers and "audio" in self.judges:
            audio = self.tokenizers["audio"]
            waves, spoken = self.waves(self.cfg.split)
            waves, spoken = waves[: self.cfg.max_examples], spoken[: self.cfg.max_examples]
            with torch.no_grad():
                rebuilt = [audio.decode(audio.encode(w[None]))[0][: len(w)] for w in waves]
                mel_l1 = float(np.mean([(audio.log_mel(r[None]) - audio.log_mel(w[None])).abs().mean().item()
                                        for r, w in zip(rebuilt, waves)]))
            result["audio"] = {"mel_l1": mel_l1, "judge_accuracy_on_reconstructions":
                               self.judges["audio"].accuracy(rebuilt, spoken)}
        if "video" in self.tokenizers:
            video = self.tokenizers["video"]
            clips = []
            for row in self.rows("video", limited=True):
                frames, fps = read_mp4(self.data / row["path"])
                clips.append(video.sample(frames, fps))
            with torch.no_grad():
                rebuilt = video.decode(video.encode(clips))
            result["video"] = {"psnr_db": psnr(torch.cat(rebuilt), torch.cat(clips)),
                               "frames_per_clip_mean": float(np.mean([len(c) for c in clips]))}
            write_pairs(clips[0], rebuilt[0], self.out / "video_reconstructions.png", columns=len(clips[0]))
        return result

    def alignment_batches(self, limit: int = 64) -> list[dict[str, torch.Tensor]]:
        """Image understanding documents with their true caption, padded; doc id -1 marks the padding."""
        rows, prompts = self.prompts("image")
        docs = [prompt + self.answer(r["text"]) for r, prompt in list(zip(rows, prompts))[:limit]]
        batches = []
        for start in range(0, len(docs), self.cfg.batch_size):
            chunk = docs[start:start + self.cfg.batch_size]
            ids = torch.zeros(len(chunk), max(map(len, chunk)), dtype=torch.long)
            doc_ids = torch.full_like(ids, -1)
            for i, doc in enumerate(chunk):
                ids[i, : len(doc)], doc_ids[i, : len(doc)] = torch.tensor(doc), 0
            batches.append({"input_ids": ids, "doc_ids": doc_ids})
        return batches

    def ima(self, modalities: list[str]) -> dict[str, Any]:
        """The alignment curve of the final model; at every stage's checkpoint the score and the ranked accuracy
        of each of `modalities` (what each stage taught, and whether a later one undid it)."""
        batches = self.alignment_batches()
        with torch.no_grad():
            final = measure_alignment(self.model, batches)
        stages = []
        for stage in trained_stages(self.cfg.model):
            folder = stage_folder(self.cfg.model, stage["stage"])
            if not folder.is_dir():
                continue
            model = ExportedModel(folder, self.exported.base_llm).model()
            with torch.no_grad():
                scores = measure_alignment(model, batches)
            accuracy = {m: self.understanding(m, model=model, free=False)["ranked_accuracy"] for m in modalities}
            stages.append({"stage": stage["stage"], "ima_score": scores.ima_score, "accuracy": accuracy,
                           "image_accuracy": accuracy.get("image"), "ima": scores.ima})
        return {"final": final.to_dict(), "stages": stages}

    def dynamic_vs_grid(self) -> dict[str, Any]:
        """Ranked image accuracy of the model built on the dynamic tokenizer against the grid model's checkpoint
        after the same stage (the same recipe and steps, on the grid tokenizer's tokens)."""
        exported = ExportedModel(self.cfg.dynamic_model)
        encoder = PromptEncoder(exported)
        rows, grid_prompts = self.prompts("image")
        prompts = [encoder.encode([MediaPart("image", (self.data / r["path"]).read_bytes())]).ids for r in rows]
        trained = trained_stages(self.cfg.dynamic_model)
        if not trained:
            raise ValueError(f"{self.cfg.dynamic_model} has no training.json stages to compare with the grid model")
        stage = trained[-1]
        runs = {"dynamic": (exported.model(), prompts, stage["steps"])}
        grid = next((s for s in trained_stages(self.cfg.model) if s["stage"] == stage["stage"]), None)
        if grid is not None and stage_folder(self.cfg.model, grid["stage"]).is_dir():
            model = ExportedModel(stage_folder(self.cfg.model, grid["stage"]), self.exported.base_llm).model()
            runs["grid"] = (model, grid_prompts, grid["steps"])
        result: dict[str, Any] = {"stage": stage["stage"]}
        for name, (model, these, steps) in runs.items():
            scored, seconds = timed(lambda: self.understanding("image", model=model, prompts=these, free=False),
                                    repeats=1)
            result[name] = {"ranked_accuracy": scored["ranked_accuracy"], "steps": steps, "seconds": seconds,
                            "prompt_tokens_mean": float(np.mean([len(p) for p in these]))}
        return result

    def skipping(self) -> dict[str, Any]:
        """Image understanding with perceptual tokens skipping the FFN from layer k on: ranked accuracy, and the
        wall time of the prompts' prefill (the pass that holds the image tokens; the answers are text)."""
        _, layers = decoder_layers(self.model.llm)
        ks = self.cfg.skip_layers or list(range(len(layers)))
        _, prompts = self.prompts("image")
        baseline = self.understanding("image", free=False)
        rows = [{"start_layer": None, "ranked_accuracy": baseline["ranked_accuracy"],
                 "prefill_seconds": prefill_seconds(self.model, prompts, self.cfg.batch_size)}]
        for k in ks:
            with PerceptualSkipping(self.model, SkipConfig(start_layer=k)) as skip:
                result = self.understanding("image", before_forward=skip.set_tokens, free=False)
                seconds = prefill_seconds(self.model, prompts, self.cfg.batch_size, skip.set_tokens)
            rows.append({"start_layer": k, "ranked_accuracy": result["ranked_accuracy"], "prefill_seconds": seconds,
                         "speedup": rows[0]["prefill_seconds"] / seconds})
        return {"layers": len(layers), "prompts": len(prompts), "runs": rows}


def trained_stages(model: str) -> list[dict[str, Any]]:
    """The stages training.json records for an exported model (none for a model trained otherwise)."""
    path = Path(model) / "training.json"
    return json.loads(path.read_text()).get("stages", []) if path.is_file() else []


def stage_folder(model: str, stage: str) -> Path:
    return Path(model).parent / f"{Path(model).name}.stages" / stage


# --- figures and the report ------------------------------------------------------------------------------------------
def metric_files(cfg: EvaluateConfig) -> list[Path]:
    if cfg.curves:
        return [Path(c) for c in cfg.curves]
    root = Path(cfg.model).parent
    found = sorted(root.glob("*/metrics.jsonl")) + sorted(root.glob("*/*/metrics.jsonl"))
    # a TEAL run's NAME.stages/ exports repeat what NAME/metrics.jsonl holds for every stage
    return [p for p in found if p.relative_to(root).parts[0] not in {"ray", "prepared"}
            and not p.relative_to(root).parts[0].endswith(".stages") and p.stat().st_size > 0]


def plot_curves(files: list[Path], path: Path) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not files:
        return []
    fig, axes = plt.subplots(1, len(files), figsize=(3.2 * len(files), 2.8), squeeze=False)
    for ax, file in zip(axes[0], files):
        lines = [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        groups: dict[str, list[dict]] = {}
        for line in lines:
            groups.setdefault(line.get("stage", ""), []).append(line)
        offset = 0
        for stage, entries in groups.items():
            steps = [offset + e["step"] for e in entries if "loss" in e]
            ax.plot(steps, [e["loss"] for e in entries if "loss" in e], label=stage or None)
            offset = steps[-1] if steps else offset
        ax.set_title("/".join(file.parent.parts[-2:]) if file.parent.parent.name.startswith("tokenizers")
                     else file.parent.name, fontsize=9)
        ax.set_xlabel("step")
        if any(groups):
            ax.legend(fontsize=7)
    axes[0][0].set_ylabel("training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [str(f) for f in files]


def plot_ima(ima: dict[str, Any], skipping: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    final = ima["final"]
    axes[0].plot(final["ima"], marker="o", label="IMA: perceptual@0 vs text@l")
    axes[0].plot(final["same_layer"], marker="s", label="same layer")
    for stage in ima["stages"]:
        axes[0].plot(stage["ima"], alpha=0.4, linestyle="--", label=f"IMA after {stage['stage']}")
    axes[0].set_xlabel("layer (0 = embeddings)")
    axes[0].set_ylabel("cosine")
    axes[0].legend(fontsize=7)
    axes[0].set_title("implicit alignment per layer")
    if ima["stages"]:
        xs = [s["ima_score"] for s in ima["stages"]]
        ys = [s["image_accuracy"] for s in ima["stages"]]
        axes[1].plot(xs, ys, marker="o")
        for s, x, y in zip(ima["stages"], xs, ys):
            axes[1].annotate(s["stage"], (x, y), fontsize=8)
    axes[1].xaxis.set_major_locator(plt.MaxNLocator(4))   # scores differ in the third decimal: labels collide
    axes[1].set_xlabel("IMA score")
    axes[1].set_ylabel("image understanding accuracy")
    axes[1].set_title("alignment vs accuracy across stages")
    runs = skipping["runs"][1:]
    axes[2].bar([r["start_layer"] for r in runs], [r["speedup"] for r in runs], color="tab:blue")
    axes[2].set_xlabel("FFN skipped from layer k")
    axes[2].set_ylabel("prefill speedup", color="tab:blue")
    twin = axes[2].twinx()
    twin.plot([r["start_layer"] for r in runs], [r["ranked_accuracy"] for r in runs], color="tab:red", marker="o")
    twin.axhline(skipping["runs"][0]["ranked_accuracy"], color="tab:red", linestyle=":")
    twin.set_ylabel("accuracy (dotted: no skipping)", color="tab:red")
    axes[2].set_title("perceptual FFN skipping")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def share(hits: torch.Tensor) -> float:
    """The fraction of true entries, exactly (a float32 mean makes 54 of 60 0.89999998, short of a 90 % goal)."""
    return int(hits.sum()) / hits.numel()


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f} %"


def interval(parts: list[tuple[float, int]], z: float = 1.96) -> tuple[float, float]:
    """The 95 % interval of a share (one (share, examples) part: Wilson's score interval, sound at small n and at
    0 or 1) or of the mean of independent shares (the normal approximation, clipped to [0, 1])."""
    if len(parts) == 1:
        p, n = parts[0]
        scale = 1 + z * z / n
        centre = (p + z * z / (2 * n)) / scale
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / scale
    else:
        centre = float(np.mean([p for p, _ in parts]))
        half = z * math.sqrt(sum(p * (1 - p) / n for p, n in parts)) / len(parts)
    return max(0.0, centre - half), min(1.0, centre + half)


def goal(name: str, parts: list[tuple[float, int]], target: float) -> dict[str, Any]:
    """A goal's measured share (the mean over `parts`, each (share, examples)), its 95 % interval and verdict."""
    if not parts:
        return {"goal": name, "measured": None, "target": target, "verdict": "not measured"}
    value = float(np.mean([p for p, _ in parts])) if len(parts) > 1 else parts[0][0]
    lo, hi = interval(parts)
    verdict = "met" if value >= target else f"missed by {100 * (target - value):.1f} points"
    if lo <= target <= hi:
        verdict += "; within the interval"
    return {"goal": name, "measured": value, "target": target, "ci95": [lo, hi],
            "examples": sum(n for _, n in parts), "verdict": verdict}


def goals(report: dict[str, Any]) -> list[dict[str, Any]]:
    u, g = report["understanding"], report["generation"]
    best_of = max((v["best_of"] for v in g.values()), default=1)
    at = "".join(sorted({f" at temperature {v['temperature']:g}" for v in g.values()}))
    found = [goal("understanding (image, video: mean ranked accuracy)",
                  [(u[m]["ranked_accuracy"], u[m]["examples"]) for m in ("image", "video") if m in u],
                  GOALS["understanding"]),
             goal(f"generation (judged, mean over modalities; best of {best_of} draws{at})",
                  [(v["judged_accuracy"], v["samples"]) for v in g.values()], GOALS["generation"])]
    if best_of > 1:
        found.append(goal(f"generation (judged, mean over modalities; one draw{at})",
                          [(v["one_draw_accuracy"], v["samples"]) for v in g.values()], GOALS["generation"]))
    found.append(goal("spoken digit (audio -> text)",
                      [(u["audio"]["ranked_accuracy"], u["audio"]["examples"])] if "audio" in u else [],
                      GOALS["spoken_digit"]))
    return found


def goal_line(found: dict[str, Any]) -> str:
    if found["measured"] is None:
        return f"| {found['goal']} | n/a | | {pct(found['target'])} | not measured |"
    lo, hi = found["ci95"]
    return (f"| {found['goal']} | {pct(found['measured'])} | {100 * lo:.1f}–{100 * hi:.1f} % | "
            f"{pct(found['target'])} | {found['verdict']} |")


def write_report(report: dict[str, Any], out: Path) -> Path:
    u, g, r = report["understanding"], report["generation"], report["reconstruction"]
    lines = ["# anytoken evaluation", "", f"Model `{report['model']}`, split `{report['split']}`.", "",
             "## Goals", "", "| goal | measured | 95 % interval | target | |", "|---|---|---|---|---|"]
    lines += [goal_line(found) for found in report["goals"]]
    lines += ["", "95 % interval: where the model's true share on such examples lies, given this many test examples "
              "(Wilson's score interval for one share; the normal approximation for a mean of two). A goal within "
              "it is neither shown met nor shown missed by this split.",
              "", "## Understanding", "",
              "| modality | examples | ranked accuracy | 95 % interval | free reply: digit right | chance |",
              "|---|---|---|---|---|---|"]
    for m, v in u.items():
        extra = (f" (digit {pct(v['digit_accuracy'])}, direction {pct(v['direction_accuracy'])})"
                 if m == "video" else "")
        lo, hi = interval([(v["ranked_accuracy"], v["examples"])])
        lines.append(f"| {m} | {v['examples']} | {pct(v['ranked_accuracy'])}{extra} | "
                     f"{100 * lo:.1f}–{100 * hi:.1f} % | {pct(v.get('free_reply_digit_accuracy'))} | {pct(v['chance'])} |")
    lines += ["", "Some free replies:", ""]
    for m, v in u.items():
        for reply in v.get("replies", [])[:3]:
            lines.append(f"- {m} `{reply['id']}` (truth: {reply['truth']!r}): {reply['reply']!r}")
    lines += ["", "## Generation", "", "Judges are scikit-learn SVMs trained on the real training split only. "
              "One draw: a sample per prompt; best of N: N draws per prompt, the model keeps the one it reads the "
              "prompt back from most surely (log p(prompt | media); the judges see only what is kept).", "",
              "| modality | samples | temperature | judged: one draw | judged: best of N | N | distinct draws "
              "| seconds (one draw / best of N) | chance |", "|---|---|---|---|---|---|---|---|---|"]
    for m, v in g.items():
        lines.append(f"| {m} | {v['samples']} | {v['temperature']:g} | {pct(v['one_draw_accuracy'])} | "
                     f"{pct(v['judged_accuracy'])} | {v['best_of']} | {pct(v['distinct_draws'])} | "
                     f"{v['one_draw_seconds']:.1f} / {v['seconds']:.1f} | {pct(v['chance'])} |")
    sweeps = {m: sorted(v["by_temperature"], key=lambda r: -r["temperature"]) for m, v in g.items()
              if len(v["by_temperature"]) > 1}
    if sweeps:
        lines += ["", "The same prompts at other temperatures (distinct draws: different media among a digit's "
                  "draws, over all draws; a lower temperature draws what the model deems likeliest, and alike):", "",
                  "| modality | temperature | judged: one draw | judged: best of N | distinct draws |",
                  "|---|---|---|---|---|"]
        lines += [f"| {m} | {r['temperature']:g} | {pct(r['one_draw_accuracy'])} | {pct(r['judged_accuracy'])} | "
                  f"{pct(r['distinct_draws'])} |" for m, rows in sweeps.items() for r in rows]
    j = report["judges"]
    lines += ["", f"Judge accuracy on real held-out media: image {pct(j.get('image_judge_accuracy_on_real'))}, "
              f"audio {pct(j.get('audio_judge_accuracy_on_real'))}.", ""]
    if "image" in g:
        lines += [f"Generated images (the kept draw of {g['image']['best_of']}), one row per digit 0-9:", "", "![generated](generated_images.png)", ""]
    lines += ["## Tokenizers", "", "| tokenizer | measure | value |", "|---|---|---|"]
    for name, values in r.items():
        for key, value in values.items():
            shown = pct(value) if "accuracy" in key or "saving" in key else (
                f"{value:.3f}" if isinstance(value, float) else str(value))
            lines.append(f"| {name} | {key} | {shown} |")
    for png in ("image_reconstructions.png", "dynamic_reconstructions.png", "video_reconstructions.png"):
        if (out / png).exists():
            lines += ["", f"![{png}]({png})"]
    if "dynamic_vs_grid" in report:
        d = report["dynamic_vs_grid"]
        lines += ["", f"Image understanding after the `{d['stage']}` stage, trained on each tokenizer's tokens "
                  "(its config in each model's training.json):", "",
                  "| image tokenizer | prompt tokens (mean) | steps | ranked image accuracy | seconds |",
                  "|---|---|---|---|---|"]
        for name in ("grid", "dynamic"):
            if name in d:
                v = d[name]
                lines.append(f"| {name} | {v['prompt_tokens_mean']:.1f} | {v['steps']} | {pct(v['ranked_accuracy'])} "
                             f"| {v['seconds']:.2f} |")
    lines += ["", "## IMA", "", f"IMA score of the final model: {report['ima']['final']['ima_score']:.3f} "
              f"(same-layer {report['ima']['final']['same_layer_score']:.3f}).", "",
              "Ranked accuracy of every modality at each stage's checkpoint:", "",
              f"| stage | IMA score | {' | '.join(u)} |", "|---|---|" + "---|" * len(u)]
    for s in report["ima"]["stages"]:
        lines.append(f"| {s['stage']} | {s['ima_score']:.3f} | "
                     + " | ".join(pct(s["accuracy"].get(m)) for m in u) + " |")
    lines += ["", f"Perceptual tokens skipping the FFN from layer k on: ranked image accuracy, and the prefill of the "
              f"{report['skipping']['prompts']} image prompts (best of 2).", "",
              "| FFN skipped from layer | ranked image accuracy | prefill seconds | speedup |", "|---|---|---|---|"]
    for run in report["skipping"]["runs"]:
        lines.append(f"| {run['start_layer'] if run['start_layer'] is not None else 'none'} | "
                     f"{pct(run['ranked_accuracy'])} | {run['prefill_seconds']:.2f} | {run.get('speedup', 1.0):.2f}x |")
    lines += ["", "![ima](ima.png)", "", "## Training", "", "![loss curves](loss_curves.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    ev = Evaluation(cfg)
    report = ev.report
    media = [m for m in ("image", "audio", "video") if m in ev.tokenizers]
    logger.info("judges: training on the real %s split", "train")
    report["judges"] = ev.train_judges()
    report["understanding"] = {}
    for modality in media:
        if ev.rows(modality):
            logger.info("understanding: %s", modality)
            report["understanding"][modality] = ev.understanding(modality)
    report["generation"] = {}
    for modality in ("image", "audio"):
        if modality in ev.generator.grammar.shapes and modality in ev.judges:
            logger.info("generation: %s", modality)
            report["generation"][modality] = ev.generation(modality)
    logger.info("tokenizers: reconstruction")
    report["reconstruction"] = ev.reconstruction()
    logger.info("IMA: alignment per layer and per stage; FFN skipping")
    report["ima"] = ev.ima(list(report["understanding"]))
    report["skipping"] = ev.skipping()
    if cfg.dynamic_model:
        logger.info("the model on the dynamic tokenizer against the grid one")
        report["dynamic_vs_grid"] = ev.dynamic_vs_grid()
    report["goals"] = goals(report)
    plot_ima(report["ima"], report["skipping"], ev.out / "ima.png")
    report["curves"] = plot_curves(metric_files(cfg), ev.out / "loss_curves.png")
    write_json(ev.out / "report.json", report)
    write_report(report, ev.out)
    return report


def main(argv: list[str] | None = None) -> int:
    from workflows.cli import setup_logging

    setup_logging()
    cfg = parse_args(EvaluateConfig, argv, description=__doc__, prog="anytoken evaluate")
    try:
        report = evaluate(cfg)
    except (FileNotFoundError, ValueError) as err:
        logger.error("%s", err)
        return 1
    for modality, values in report["understanding"].items():
        logger.info("understanding %-5s ranked %s, free reply %s (chance %s)", modality,
                    pct(values["ranked_accuracy"]), pct(values.get("free_reply_digit_accuracy")),
                    pct(values["chance"]))
    for modality, values in report["generation"].items():
        logger.info("generation    %-5s judged %s", modality, pct(values["judged_accuracy"]))
    print(json.dumps({"report": str(Path(cfg.out) / "report.md")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
