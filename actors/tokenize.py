"""Ray Data stages of the prepare pipeline: read bytes, decode and preprocess (tasks), tokenize (actor pool).

Each stage takes and returns ROW_SCHEMA batches. A row that fails a stage keeps flowing with its
error_stage, error_type and error_message set, and later stages pass it through untouched: nothing is
dropped, so the driver can account for every input row.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import torch

from actors.sources import MODALITIES, ROW_SCHEMA, read_bytes
from models.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, VideoPreprocessConfig, decode_array,
                               encode_array, preprocess_audio, preprocess_image, preprocess_video)
from models.sequences import choose_orders, media_text_documents

logger = logging.getLogger(__name__)


@dataclass
class PreprocessConfig:
    image: ImagePreprocessConfig = field(default_factory=ImagePreprocessConfig)
    audio: AudioPreprocessConfig = field(default_factory=AudioPreprocessConfig)
    video: VideoPreprocessConfig = field(default_factory=VideoPreprocessConfig)


def _reason(err: Exception) -> str:
    if isinstance(err, FileNotFoundError):
        return "missing_file"
    return getattr(err, "reason", type(err).__name__)


def for_each_row(batch: pa.Table, stage: str, step: Callable[[dict[str, Any]], None]) -> pa.Table:
    """Apply `step` to every row still in good standing; a row whose step raises records why."""
    rows = batch.to_pylist()
    for row in rows:
        if row["error_stage"] is not None:
            continue
        try:
            step(row)
        except Exception as err:  # noqa: BLE001 — any failure of one input is that input's error, not the run's
            row.update(error_stage=stage, error_type=_reason(err), error_message=str(err) or type(err).__name__,
                       data=None)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def _read(row: dict[str, Any]) -> None:
    if row["modality"] not in MODALITIES:
        raise _Reject("unknown_modality", f"modality {row['modality']!r} is none of {list(MODALITIES)}")
    if row["text"] is None and row["text_source"]:
        try:
            caption = read_bytes(row["text_source"])
        except FileNotFoundError:
            raise _Reject("missing_caption", f"no caption file {row['text_source']}") from None
        try:
            row["text"] = caption.decode("utf-8").strip()
        except UnicodeDecodeError as err:
            raise _Reject("caption_not_utf8", f"caption {row['text_source']} is not UTF-8: {err}") from None
    if not isinstance(row["text"], str) or not row["text"].strip():
        raise _Reject("missing_caption", "the row has no caption or transcript")
    if row["modality"] != "text" and row["data"] is None:
        row["data"] = read_bytes(row["source"])


class _Reject(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def read_media(batch: pa.Table, media: Sequence[str] | None = None) -> pa.Table:
    """Task: check the row and read its file's bytes (local path or any pyarrow URI).

    `media`: the modalities that have a tokenizer; a row of another one is rejected (no_tokenizer) before its
    bytes are read or decoded."""
    def step(row: dict[str, Any]) -> None:
        if media is not None and row["modality"] in MODALITIES and row["modality"] != "text" \
                and row["modality"] not in media:
            raise _Reject("no_tokenizer", f"no {row['modality']} tokenizer was given (this run tokenizes "
                                          f"{', '.join(media) or 'no media'})")
        _read(row)

    return for_each_row(batch, "read", step)


def preprocess_media(batch: pa.Table, config: PreprocessConfig) -> pa.Table:
    """Task: decode the bytes and bring them to the tokenizer's input size and rate."""
    torch.set_num_threads(1)

    def step(row: dict[str, Any]) -> None:
        if row["modality"] == "image":
            row["data"] = encode_array(preprocess_image(row["data"], config.image))
        elif row["modality"] == "audio":
            row["data"] = encode_array(preprocess_audio(row["data"], config.audio))
        elif row["modality"] == "video":
            row["data"] = encode_array(preprocess_video(row["data"], config.video))

    return for_each_row(batch, "preprocess", step)


@dataclass
class SequenceConfig:
    context_length: int = 1024
    understanding_fraction: float = 1.0   # share of pairs emitted as [media, text]
    generation_fraction: float = 1.0      # share of pairs emitted as [text, media]
    # share of pairs also emitted as [media] alone, the caption left out: the unconditional branch that
    # classifier-free guidance (guidance_scale > 1) reads; without it that branch is a context never trained on
    unconditional_fraction: float = 0.0
    # the fractions for one modality, e.g. {video: {generation: 0.0}}: clips only read, never made, so a
    # stage on them sees twice the reading examples per step (the demo's video reader learns from them)
    by_modality: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0

    def fractions(self, modality: str) -> tuple[float, float, float]:
        """(understanding, generation, unconditional) fractions of a modality's pairs."""
        own = self.by_modality.get(modality, {})
        return (own.get("understanding", self.understanding_fraction), own.get("generation", self.generation_fraction),
                own.get("unconditional", self.unconditional_fraction))


class TokenizeActor:
    """Actor: loads the media tokenizers, the text tokenizer and the vocabulary once, then turns preprocessed
    rows into training documents (both orders, boundary tokens, loss masks)."""

    def __init__(self, tokenizers: dict[str, str], text_tokenizer: str, vocabulary: dict[str, Any],
                 sequences: SequenceConfig, threads: int = 1):
        from transformers import AutoTokenizer

        from models import load_pretrained
        from models.vocabulary import JointVocabulary

        torch.set_num_threads(max(1, threads))
        self.tokenizers = {modality: load_pretrained(path) for modality, path in tokenizers.items()}
        self.text_tokenizer = AutoTokenizer.from_pretrained(text_tokenizer)
        self.vocab = JointVocabulary.from_dict(vocabulary)
        self.sequences = sequences

    @torch.inference_mode()
    def _encode(self, modality: str, arrays: list[np.ndarray]) -> list[list[int]]:
        tokenizer = self.tokenizers[modality]
        if modality == "image":
            images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
            return [c.tolist() for c in tokenizer.encode(images)]
        if modality == "audio":  # one at a time: a clip's codes must not depend on its batch-mates' lengths
            return [tokenizer.encode(torch.from_numpy(a)[None])[0].tolist() for a in arrays]
        clips = [torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255.0 for a in arrays]
        return [c.tolist() for c in tokenizer.encode(clips)]   # (frames, tokens) per clip

    def _media_codes(self, rows: list[dict[str, Any]]) -> None:
        by_modality: dict[str, list[dict[str, Any]]] = {}
        for row in rows:
            if row["error_stage"] is None and row["modality"] != "text":
                by_modality.setdefault(row["modality"], []).append(row)
        for modality, group in by_modality.items():
            if modality not in self.tokenizers:
                for row in group:
                    row.update(error_stage="tokenize", error_type="no_tokenizer",
                               error_message=f"no {modality} tokenizer was given")
                continue
            try:
                codes = self._encode(modality, [decode_array(r["data"]) for r in group])
            except Exception:  # noqa: BLE001 — find the row at fault by encoding one at a time
                codes = []
                for row in group:
                    try:
                        codes.append(self._encode(modality, [decode_array(row["data"])])[0])
                    except Exception as err:  # noqa: BLE001
                        row.update(error_stage="tokenize", error_type=type(err).__name__, error_message=str(err))
                        codes.append(None)
            for row, c in zip(group, codes):
                if c is not None:
                    row["codes_nested"] = c

    def _documents(self, row: dict[str, Any]) -> None:
        cfg = self.sequences
        tok = self.text_tokenizer
        text_ids = tok(row["text"], add_special_tokens=False)["input_ids"]
        row["text_tokens"] = len(text_ids)
        if row["modality"] == "text":
            block, orders = [], ["understanding"]
        else:
            nested = row.pop("codes_nested")
            block = self.vocab.wrap(row["modality"], torch.as_tensor(nested))
            row["codes"] = np.asarray(nested, dtype=np.int32).reshape(-1).tolist()
            row["media_tokens"] = len(row["codes"])
            orders = choose_orders(row["id"], cfg.seed, *cfg.fractions(row["modality"]))
        docs = media_text_documents(row["id"], block, text_ids, orders, tok.bos_token_id, tok.eos_token_id)
        longest = max(len(d.input_ids) for d in docs)
        if longest > cfg.context_length:
            raise _Reject("too_long", f"{longest} tokens, more than the context length {cfg.context_length}")
        row["documents"] = [{"sample_id": d.sample_id, "input_ids": d.input_ids, "loss_mask": d.loss_mask}
                            for d in docs]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        self._media_codes(rows)
        for row in rows:
            row["data"] = None     # media stay on the workers; only tokens travel on
            if row["error_stage"] is None:
                try:
                    self._documents(row)
                except Exception as err:  # noqa: BLE001
                    row.update(error_stage="tokenize", error_type=_reason(err), error_message=str(err))
            row.pop("codes_nested", None)
        return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
