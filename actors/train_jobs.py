"""The training jobs on the one loop: a tokenizer (or CLIP, or an X2L interface) on media, and the TEAL model
in X-LLM-style stages on the prepared shards, each stage starting from the one before."""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from actors.sources import manifest_rows
from actors.train_data import DataConfig, media_dataset, preprocess_for_model, sequence_dataset, text_dataset
from actors.train_loop import Job, LoopConfig, RunResult, fit
from models.clip import TEXT_TOKENIZER_DIR
from models.configuration import config_from_dict, config_to_dict
from models.pretrained import WEIGHTS_FILE, build_model, write_json
from models.text_lm import HF_DIR

logger = logging.getLogger(__name__)


# --- any model on media or text: tokenizers, CLIP, X2L, a base LLM -------------------------------------
@dataclass
class ModelTrainConfig:
    kind: str = "image_vq"             # any saved kind: image_vq, dynamic_visual, audio_vq, video, clip, x2l, text_lm
    config_file: str | None = None     # a YAML of the kind's config fields (e.g. tokenizers/image_vq_demo.yaml) ...
    config: dict[str, Any] = field(default_factory=dict)   # ... and fields set here on top of it
    init_from: str | None = None       # start from this saved folder's weights
    train: list[str] = field(default_factory=lambda: ["all"])   # parameter groups, for kinds that have them
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="media"))
    loop: LoopConfig = field(default_factory=LoopConfig)
    out: str = "runs/model"            # the exported folder


def _build_media_model(kind: str, config: dict[str, Any], init_from: str | None, groups: list[str]):
    model = build_model(kind, config, init_from)
    if hasattr(model, "set_trainable"):
        model.set_trainable(groups)
    return model


def _quiet_data_progress() -> None:
    """The loop logs its own progress (step, loss, tokens/s); Ray Data's bars for every epoch of a training
    dataset would drown it."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False


def _model_datasets(cfg: ModelTrainConfig, build) -> dict[str, Any]:
    _quiet_data_progress()
    splits = {"train": cfg.data.split, **({"val": cfg.data.val_split} if cfg.data.val_split else {})}
    if cfg.data.kind == "text":
        return {name: text_dataset(cfg.data, split) for name, split in splits.items()}
    preprocess = preprocess_for_model(build(), cfg.data.limits)
    return {name: media_dataset(cfg.data, split, preprocess) for name, split in splits.items()}


def train_model(cfg: ModelTrainConfig) -> RunResult:
    """Train one model with the loop and export it to cfg.out: a tokenizer folder, a CLIP folder with its text
    tokenizer and SEA's candidate words, an X2L folder, or (text_lm) a Hugging Face causal LM folder."""
    if cfg.data.kind == "sequences":
        raise ValueError("data.kind 'sequences' is the TEAL model's: use `anytoken train`")
    build = partial(_build_media_model, cfg.kind, cfg.config, cfg.init_from, cfg.train)
    out = Path(cfg.out)
    if cfg.loop.steps == 0:         # nothing to train: export the model as built (e.g. video from an image_vq)
        if out.exists():
            shutil.rmtree(out)
        build().save_pretrained(out)
        logger.info("loop.steps is 0: exported the %s as initialised to %s", cfg.kind, out)
        return RunResult(export=out, history=[], val=[], resumed_from=[], frozen_digest_before="",
                         frozen_digest_after="", checkpoint_path="")
    datasets = _model_datasets(cfg, build)
    staging = out.parent / f".{out.name}.export" if cfg.kind == "text_lm" else out
    result = fit(Job(build=build, loop=cfg.loop, data=cfg.data, datasets=datasets), export_to=staging)
    if cfg.kind == "text_lm":       # the useful artefact is the plain Hugging Face folder inside
        _copy_tree(staging / HF_DIR, out)
        shutil.copy(staging / "metrics.jsonl", out / "metrics.jsonl")
        shutil.rmtree(staging)
        result.export = out
    if cfg.kind == "clip":
        _copy_tree(Path(cfg.data.text_tokenizer), out / TEXT_TOKENIZER_DIR)
        words = caption_words(cfg.data.path, cfg.data.split)
        (out / "words.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    logger.info("exported %s to %s", cfg.kind, out)
    return result


STOP_WORDS = {"a", "an", "and", "at", "by", "for", "in", "is", "it", "of", "on", "or", "the", "this", "to", "with"}


def caption_words(manifest: str, split: str) -> list[str]:
    """The distinct words of a split's captions, less stop words: the words SEA may label media tokens with."""
    import re

    words: set[str] = set()
    for row in manifest_rows(manifest, None, "train"):
        if row["error_stage"] is None and row["split"] == split and row["text"]:
            words |= {w for w in re.findall(r"[a-z0-9]+", row["text"].lower()) if w not in STOP_WORDS}
    return sorted(words)


# --- the TEAL model in stages --------------------------------------------------------------------------
@dataclass
class StageConfig:
    name: str = "stage"
    train: list[str] = field(default_factory=lambda: ["all"])   # parameter groups: special, image, audio, ...
    mix: dict[str, float] = field(default_factory=dict)         # modality -> weight; empty: all shards
    steps: int = 100
    lr: float | None = None            # default: loop.optim.lr
    micro_batch_size: int | None = None   # rows per worker and step; default: loop.micro_batch_size
    # model fields set for this stage on top of the run's `model` (nested keys merge): e.g. {sea: {weight: 0}},
    # {media_loss_weight: 0.1}; fields that shape the weights (sizes, LoRA rank) cannot change between stages
    model: dict[str, Any] = field(default_factory=dict)
    # modality interfaces that start the stage as a copy of another's (its LoRA adapter and block boundary rows):
    # {video: image} starts the video reader as the image stage's (video frames are image codes)
    adapters_from: dict[str, str] = field(default_factory=dict)


@dataclass
class TealConfig:
    name: str = "teal"                 # the Ray Train runs are NAME-STAGE under loop.storage_path
    data: str = "runs/demo/prepared"   # an `anytoken prepare` output: shards, vocabulary, tokenizers
    base_llm: str = ""                 # a Hugging Face causal LM folder, kept frozen
    out: str = "runs/demo/model"       # the exported model folder
    model: dict[str, Any] = field(default_factory=dict)   # MultimodalLMConfig fields beyond the above
    init_from: str | None = None       # the first stage starts from this exported model (or stage folder) of the
                                       # same data and base LLM: later stages on a trained model
    loop: LoopConfig = field(default_factory=LoopConfig)
    stages: list[StageConfig] = field(default_factory=lambda: [StageConfig()])
    cache_max_mb: float = 1024.0       # a stage's shards up to this size are read once, then shuffled by row


def _text_special_ids(text_tokenizer: str) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_tokenizer)
    return sorted({i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id)
                   if i is not None})


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """`base` with `changes` set on top, nested dicts merged key by key."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def teal_model_config(cfg: TealConfig) -> dict[str, Any]:
    from models.multimodal_lm import MultimodalLMConfig

    data = Path(cfg.data)
    vocabulary = json.loads((data / "vocabulary.json").read_text())
    text = str(data / "text_tokenizer")
    base = {"base_llm": cfg.base_llm, "vocabulary": vocabulary, "tokenizers": str(data / "tokenizers"),
            "text_tokenizer": text, "text_special_ids": _text_special_ids(text)}
    return config_to_dict(config_from_dict(MultimodalLMConfig, {**cfg.model, **base}))


def stage_model_config(run_config: dict[str, Any], stage: StageConfig) -> dict[str, Any]:
    """A stage's model config: the run's, with the stage's `model` fields on top."""
    from models.multimodal_lm import MultimodalLMConfig

    return config_to_dict(config_from_dict(MultimodalLMConfig, merged(run_config, stage.model)))


def _build_stage(model_config: dict[str, Any], init_from: str | None, groups: list[str],
                 adapters_from: dict[str, str] | None = None):
    model = build_model("multimodal_lm", model_config, init_from)
    for target, source in (adapters_from or {}).items():      # a resumed stage then loads its checkpoint over it
        model.copy_interface(source, target)
    model.set_trainable(groups)
    return model


def _copy_tree(source: Path, target: Path) -> None:
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source, target)


def train_teal(cfg: TealConfig) -> dict[str, Any]:
    """Every stage in order, each from the previous stage's export; returns a summary per stage."""
    if not cfg.stages:
        raise ValueError("no stages: declare at least one under `stages`")
    run_config = teal_model_config(cfg)
    configs = [stage_model_config(run_config, stage) for stage in cfg.stages]   # a bad field fails before any runs
    if cfg.init_from and not (Path(cfg.init_from) / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"init_from: {cfg.init_from} is not an exported model or stage folder "
                                "(no model.safetensors)")
    _quiet_data_progress()
    out = Path(cfg.out)
    stages_dir = out.parent / f"{out.name}.stages"
    previous: str | None = cfg.init_from
    summary = []
    for i, (stage, config) in enumerate(zip(cfg.stages, configs)):
        own: dict[str, Any] = {"name": f"{cfg.name}-{stage.name}", "steps": stage.steps}
        if stage.micro_batch_size is not None:
            own["micro_batch_size"] = stage.micro_batch_size
        if stage.lr is not None:
            own["optim"] = {"lr": stage.lr}
        loop = config_from_dict(LoopConfig, merged(config_to_dict(cfg.loop), own))
        data = DataConfig(kind="sequences", path=cfg.data, mix=stage.mix, cache_max_mb=cfg.cache_max_mb)
        datasets = {"train": sequence_dataset(data, "train")}
        if (Path(cfg.data) / "val").is_dir():
            datasets["val"] = sequence_dataset(data, "val")
        logger.info("stage %d/%d %r: trains %s on %s for %d steps", i + 1, len(cfg.stages), stage.name,
                    stage.train, stage.mix or "every shard", stage.steps)
        build = partial(_build_stage, config, previous, stage.train, stage.adapters_from)
        result = fit(Job(build=build, loop=loop, data=data, datasets=datasets), export_to=stages_dir / stage.name)
        previous = str(result.export)
        # each stage's folder is a whole model (evaluate and serve read it): the tokenizers it was trained with
        _copy_tree(Path(cfg.data) / "tokenizers", Path(previous) / "tokenizers")
        _copy_tree(Path(cfg.data) / "text_tokenizer", Path(previous) / "text_tokenizer")
        summary.append({"stage": stage.name, "train": stage.train, "mix": stage.mix, "steps": stage.steps,
                        "micro_batch_size": loop.micro_batch_size, "lr": loop.optim.lr,
                        "adapters_from": stage.adapters_from, "model": stage.model,
                        "final_loss": result.history[-1].get("loss") if result.history else None,
                        "val": result.val, "resumed_from": result.resumed_from,
                        "frozen_llm_unchanged": result.frozen_digest_before == result.frozen_digest_after})
    _finish_export(cfg, Path(previous), out, stages_dir, summary)
    return {"out": str(out), "stages": summary}


def _finish_export(cfg: TealConfig, last: Path, out: Path, stages_dir: Path, summary: list[dict]) -> None:
    """The model folder a server loads: the last stage's folder (weights, config, the tokenizers and text tokenizer
    it was trained with), every stage's metrics, and where the base LLM is."""
    _copy_tree(last, out)
    with (out / "metrics.jsonl").open("w") as sink:
        for stage in summary:
            for line in (stages_dir / stage["stage"] / "metrics.jsonl").read_text().splitlines():
                sink.write(json.dumps({"stage": stage["stage"], **json.loads(line)}) + "\n")
    write_json(out / "training.json", {"base_llm": str(Path(cfg.base_llm).resolve()), "data": cfg.data,
                                       "stages": summary})
    (out / "base_llm.txt").write_text(str(Path(cfg.base_llm).resolve()) + "\n")
