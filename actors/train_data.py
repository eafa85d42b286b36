"""What a training job reads: Ray Datasets built on the driver (small data kept in the object store once, larger
data streamed to workers), and the collate functions that turn a worker's numpy batches into the tensors a model's
training_step takes.

Four kinds of data:
- `sequences`: the packed Parquet shards of `anytoken prepare` (input_ids, loss_mask, doc_ids, position_ids),
  with a per-modality mix chosen by the shard file names (`part-N-MODALITY-SSSS.parquet`);
- `media`: one modality of a manifest, read and preprocessed by the same Ray Data tasks as prepare
  (tokenizers train on it);
- `pairs`: media with their captions as text ids (CLIP and the X2L interface train on it);
- `text`: the manifest's texts alone (a base LLM trained from scratch, as the demo does).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
import torch

from actors.prepare_setup import MediaLimits, preprocess_for
from actors.sources import ROW_SCHEMA, filesystem, join, manifest_rows
from actors.tokenize import PreprocessConfig, preprocess_media, read_media
from models.preprocess import AudioPreprocessConfig, ImagePreprocessConfig, decode_array

logger = logging.getLogger(__name__)
SEQUENCE_COLUMNS = ("input_ids", "loss_mask", "doc_ids", "position_ids")


@dataclass
class DataConfig:
    kind: Literal["sequences", "media", "pairs", "text"] = "sequences"
    path: str = ""                  # sequences: a prepare output folder; media/pairs/text: a manifest (JSONL/Parquet)
    mix: dict[str, float] = field(default_factory=dict)   # sequences: modality -> weight; empty = every shard
    modality: str = "image"         # media/pairs: which rows of the manifest
    split: str = "train"
    val_split: str | None = "val"   # held-out loss at every checkpoint; None: none
    text_tokenizer: str | None = None   # pairs, text: how texts become ids
    max_text_tokens: int = 16       # pairs: a caption's ids at most; text: the packed rows' length
    limits: MediaLimits = field(default_factory=MediaLimits)
    seed: int = 0
    cache_max_mb: float = 1024.0    # data up to this size (sequences: the shards times their mix weights; media:
                                    # the rows preprocessed, at the limits) is read once into Ray's object store
                                    # and shuffled by row each epoch; larger data streams from storage each
                                    # epoch, in a shuffled block order. 0: always stream


# --- driver side: datasets ---------------------------------------------------------------------------
def _shard_files(root: str, split: str, mix: dict[str, float]) -> list[tuple[str, float, int]]:
    """(path, mix weight, bytes) of every shard of the split."""
    fs, base = filesystem(join(root, split))
    try:
        infos = fs.get_file_info(pa.fs.FileSelector(base, recursive=False))
    except FileNotFoundError:
        infos = []
    infos = sorted((i for i in infos if i.path.endswith(".parquet")), key=lambda i: i.path)
    if not infos:
        raise FileNotFoundError(f"no Parquet shards in {join(root, split)}: run `anytoken prepare` first")
    prefix = root.split("://")[0] + "://" if "://" in root else ""

    def modality(name: str) -> str:
        return name.rsplit("/", 1)[-1].split("-")[2]

    unknown = [m for m in mix if m not in {modality(i.path) for i in infos}]
    if unknown:
        raise ValueError(f"data mix names {unknown[0]!r}, but {join(root, split)} has no shards of it "
                         f"(has: {sorted({modality(i.path) for i in infos})})")
    return [(prefix + i.path, mix.get(modality(i.path), 0.0) if mix else 1.0, i.size or 0) for i in infos]


def sequence_dataset(cfg: DataConfig, split: str) -> ray.data.Dataset:
    """The split's shards, weighted by the mix (a weight of 2 reads a modality twice per epoch, 0.5 half of it)
    and shuffled, so that every stretch of an epoch mixes the modalities as the weights say.

    Small data (cfg.cache_max_mb) is read once into the object store and shuffled by row, with the same seed
    every epoch: streaming it would read every shard again each epoch, which costs Ray Data about a minute per
    epoch of the demo's joint stage (17 MB, eight read branches), more than its training steps. Larger data
    streams, in a shuffled block order."""
    files = [f for f in _shard_files(cfg.path, split, cfg.mix) if f[1] > 0]
    if not files:
        raise ValueError(f"the data mix {cfg.mix} gives every shard weight 0")
    cached = sum(size * weight for _, weight, size in files) <= cfg.cache_max_mb * 2 ** 20
    by_weight: dict[float, list[str]] = {}
    for path, weight, _ in files:
        by_weight.setdefault(weight, []).append(path)
    parts = []
    for weight, paths in sorted(by_weight.items()):
        ds = ray.data.read_parquet(paths)
        # in file order (what is derived from ds shares its context): unordered, the materialized blocks follow
        # which read finished first, and two runs of one seed and config would shuffle differently
        ds.context.execution_options.preserve_order = True
        ds = ds.select_columns(list(SEQUENCE_COLUMNS))
        if cached:
            ds = ds.materialize()
        whole, rest = int(weight), weight - int(weight)
        parts += [ds] * whole
        if rest > 1e-9:
            parts.append(ds.random_sample(rest, seed=cfg.seed))
    return _epoch_order(parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0], cached, cfg.seed)


def _epoch_order(ds: ray.data.Dataset, cached: bool, seed: int) -> ray.data.Dataset:
    """Every epoch in the same shuffled order (a resumed run reads what the uninterrupted one would): by row when
    the data is in the object store, by block when it streams."""
    return ds.random_shuffle(seed=seed) if cached else ds.randomize_block_order(seed=seed)


def _preprocessed_bytes_at_most(modality: str, preprocess: PreprocessConfig) -> int:
    """One preprocessed row's size at the limits, in float32: what keeping a media split in memory costs a row."""
    if modality == "image":
        return 3 * preprocess.image.size ** 2 * 4
    if modality == "audio":
        return int(preprocess.audio.max_seconds * preprocess.audio.sample_rate) * 4
    return preprocess.video.max_frames * 3 * preprocess.video.size ** 2 * 4


def _ok_rows(batch: pa.Table) -> pa.Table:
    return batch.filter(pa.compute.is_null(batch["error_stage"]))


def media_dataset(cfg: DataConfig, split: str, preprocess: PreprocessConfig) -> ray.data.Dataset:
    """The manifest's rows of one modality and split, read and preprocessed on CPU tasks; bad rows are dropped
    here (`anytoken prepare` is where they are recorded). A split that fits cfg.cache_max_mb is decoded once, not
    every epoch."""
    rows = [{**r, "index": i} for i, r in enumerate(manifest_rows(cfg.path, None, "train"))
            if r["modality"] == cfg.modality and r["split"] == split]
    if not rows:
        raise ValueError(f"{cfg.path} has no {cfg.modality} rows in split {split!r}")
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    ds = (ray.data.from_arrow(table)
          .map_batches(read_media, batch_format="pyarrow", num_cpus=0)
          .map_batches(preprocess_media, batch_format="pyarrow", fn_kwargs={"config": preprocess})
          .map_batches(_ok_rows, batch_format="pyarrow", num_cpus=0)
          .select_columns(["id", "data", "text"]))
    cached = len(rows) * _preprocessed_bytes_at_most(cfg.modality, preprocess) <= cfg.cache_max_mb * 2 ** 20
    return _epoch_order(ds.materialize() if cached else ds, cached, cfg.seed)


def text_dataset(cfg: DataConfig, split: str) -> ray.data.Dataset:
    """Every non-empty text of the manifest's split, whatever its modality (duplicates kept: they are the
    distribution the LLM should learn)."""
    texts = [{"text": r["text"]} for r in manifest_rows(cfg.path, None, "train")
             if r["error_stage"] is None and r["split"] == split and r["text"]]
    if not texts:
        raise ValueError(f"{cfg.path} has no texts in split {split!r}")
    return ray.data.from_items(texts)


def preprocess_for_model(model: torch.nn.Module, limits: MediaLimits) -> PreprocessConfig:
    """Media decoded to what the model takes: its image size, sample rate, or the video's frame settings."""
    config = model.config
    if getattr(model, "kind", "") == "video":
        return preprocess_for({"video": model}, limits)
    preprocess = PreprocessConfig()
    if hasattr(config, "image_size"):
        preprocess.image = ImagePreprocessConfig(size=config.image_size, max_pixels=limits.image_max_pixels)
    if hasattr(config, "sample_rate"):
        preprocess.audio = AudioPreprocessConfig(sample_rate=config.sample_rate, max_seconds=limits.audio_max_seconds,
                                                 pad_to_max=limits.audio_pad_to_max)
    return preprocess


# --- worker side: collate -----------------------------------------------------------------------------
def collate_sequences(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(np.stack(batch[k]), dtype=torch.long) for k in SEQUENCE_COLUMNS}


def media_tensor(modality: str, blobs: Any) -> torch.Tensor:
    """npy blobs -> images (B, 3, H, W) in [0, 1], waveforms (B, T) zero-padded, or video frames (B*F, 3, H, W)."""
    arrays = [decode_array(b) for b in blobs]
    if modality == "image":
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    if modality == "audio":
        longest = max(len(a) for a in arrays)
        return torch.stack([torch.nn.functional.pad(torch.from_numpy(a).float(), (0, longest - len(a)))
                            for a in arrays])
    return torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).float() / 255.0


class PairCollate:
    """Media plus caption ids padded to max_text_tokens, for CLIP and the X2L interface."""

    def __init__(self, modality: str, text_tokenizer: str, max_tokens: int):
        from transformers import AutoTokenizer

        self.modality, self.max_tokens = modality, max_tokens
        self.tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
        pad = self.tokenizer.pad_token_id
        self.pad = pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        ids = [self.tokenizer(str(t), add_special_tokens=False)["input_ids"][: self.max_tokens] for t in batch["text"]]
        text = torch.full((len(ids), self.max_tokens), self.pad, dtype=torch.long)
        mask = torch.zeros_like(text)
        for i, row in enumerate(ids):
            text[i, : len(row)], mask[i, : len(row)] = torch.tensor(row, dtype=torch.long), 1
        return {"media": media_tensor(self.modality, batch["data"]), "text_ids": text, "text_mask": mask}


class TextCollate:
    """A batch of texts -> rows of max_text_tokens ids packed with <s> text </s>, for a base LLM."""

    def __init__(self, text_tokenizer: str, max_tokens: int):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
        self.max_tokens = max_tokens

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        from models.text_lm import packed_text_batch

        return packed_text_batch(self.tokenizer, [str(t) for t in batch["text"]], self.max_tokens)


def make_collate(cfg: DataConfig):
    if cfg.kind == "sequences":
        return collate_sequences
    if cfg.kind in ("pairs", "text") and not cfg.text_tokenizer:
        raise ValueError(f"data.kind {cfg.kind!r} needs data.text_tokenizer")
    if cfg.kind == "text":
        return TextCollate(cfg.text_tokenizer, cfg.max_text_tokens)
    if cfg.kind == "pairs":
        return PairCollate(cfg.modality, cfg.text_tokenizer, cfg.max_text_tokens)
    return lambda batch: media_tensor(cfg.modality, batch["data"])


def count_tokens(batch: Any) -> int:
    """Tokens a batch trains on (for tokens/s): targets of sequences, else elements of the media's first axis."""
    if isinstance(batch, dict) and "loss_mask" in batch:
        return int(batch["loss_mask"].sum())
    if isinstance(batch, dict) and "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    if isinstance(batch, dict):
        return int(batch["text_mask"].sum())
    return int(batch.shape[0])


def batch_size_of(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    return int(batch.shape[0])
