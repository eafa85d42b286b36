"""The prepare pipeline: inputs -> Ray Data (read, preprocess, tokenize) -> packed Parquet shards, errors, stats.

Work is done part by part (actors/sources.py). A part is committed by writing parts/NAME.json after its
shards and errors; a rerun into the same output skips committed parts and clears what an interrupted
part left behind, so no shard is ever written twice.
"""
from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from actors.cluster import pool_cpus
from actors.prepare_setup import MediaLimits, setup_tokens
from actors.sources import ROW_SCHEMA, Part, SourceConfig, enumerate_parts, error_row, filesystem
from actors.sources import parquet_rows, webdataset_rows
from actors.tokenize import PreprocessConfig, SequenceConfig, TokenizeActor, preprocess_media, read_media
from models.configuration import config_to_dict
from models.sequences import ORDERS, Document, pack_documents
from models.vocabulary import CODEBOOKS

logger = logging.getLogger(__name__)

SHARD_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("loss_mask", pa.list_(pa.int8())),
                          ("doc_ids", pa.list_(pa.int32())), ("position_ids", pa.list_(pa.int32())),
                          ("sample_ids", pa.list_(pa.string())), ("modality", pa.string())])
ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("modality", pa.string()),
                          ("split", pa.string()), ("stage", pa.string()), ("error_type", pa.string()),
                          ("message", pa.string())])
BYTES_PER_TOKEN = 13      # int32 id + int8 mask + int32 doc id + int32 position


@dataclass
class TokenizeConfig:
    concurrency: int = 2      # tokenizer actors in the pool: it starts with this many, may shrink to one
    num_cpus: float = 1.0
    num_gpus: float = 0.0     # per actor, for GPU tokenizers on a cluster
    batch_size: int = 64
    label_selector: dict[str, str] | None = None   # the actors' nodes; None: the run's label_selector


@dataclass
class PrepareConfig:
    source: SourceConfig = field(default_factory=SourceConfig)
    out: str = "runs/prepared"
    tokenizers: str | None = None        # folder holding image/, audio/, video/ tokenizer folders
    text_tokenizer: str | None = None    # the base LLM's tokenizer folder; none: a byte-level tokenizer
    sequences: SequenceConfig = field(default_factory=SequenceConfig)
    limits: MediaLimits = field(default_factory=MediaLimits)
    preprocess_num_cpus: float = 1.0
    read_tasks: int = 4                  # file reads at once: each holds no CPU slot, but is a worker process
    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    label_selector: dict[str, str] = field(default_factory=dict)   # nodes of every task and actor, e.g. {pool: data}
    rows_per_part: int = 2000
    target_shard_mb: float = 64.0


class Output:
    """The output folder, local or a URI, through one pyarrow filesystem."""

    def __init__(self, root: str):
        self.root = root
        self.fs, self.base = filesystem(root)
        self.fs.create_dir(self.base, recursive=True)

    def path(self, relative: str) -> str:
        return f"{self.base.rstrip('/')}/{relative}"

    def exists(self, relative: str) -> bool:
        return self.fs.get_file_info(self.path(relative)).type != pafs.FileType.NotFound

    def read_json(self, relative: str) -> dict[str, Any]:
        with self.fs.open_input_stream(self.path(relative)) as f:
            return json.loads(f.read().decode("utf-8"))

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write then rename, so a reader never sees half a file (on object stores a PUT is whole anyway)."""
        self.fs.create_dir(self.path(relative).rsplit("/", 1)[0], recursive=True)
        temporary = self.path(relative + ".tmp")
        with self.fs.open_output_stream(temporary) as f:
            f.write(data)
        self.fs.move(temporary, self.path(relative))

    def write_json(self, relative: str, data: dict[str, Any]) -> None:
        self.write_bytes(relative, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer)
        self.write_bytes(relative, buffer.getvalue())

    def list(self, relative: str) -> list[str]:
        info = self.fs.get_file_info(pafs.FileSelector(self.path(relative), allow_not_found=True, recursive=True))
        return [i.path[len(self.base.rstrip('/')) + 1:] for i in info if i.type == pafs.FileType.File]

    def delete(self, relative: str) -> None:
        self.fs.delete_file(self.path(relative))


def _placement(cfg: PrepareConfig) -> dict[str, Any]:
    """Where the run's Ray Data tasks go: on a cluster, the nodes its label selector names (the CPU pool)."""
    return {"label_selector": cfg.label_selector or None}


def _tokenize_selector(cfg: PrepareConfig) -> dict[str, str]:
    return cfg.label_selector if cfg.tokenize.label_selector is None else cfg.tokenize.label_selector


def _part_dataset(part: Part, cfg: PrepareConfig) -> ray.data.Dataset:
    """The part's rows in ROW_SCHEMA, read through Ray Data's own readers for containers."""
    if part.kind == "rows":   # blocks of half a batch, so that the pools get work in parallel from the start
        table = pa.Table.from_pylist(part.rows, schema=ROW_SCHEMA)
        step = max(1, cfg.tokenize.batch_size // 2)
        return ray.data.from_arrow([table.slice(i, step) for i in range(0, len(table), step)])
    if part.kind == "webdataset":
        ds = ray.data.read_webdataset(part.uri, decoder=None, **_placement(cfg))
        return ds.map_batches(webdataset_rows, batch_format="pyarrow", batch_size=cfg.tokenize.batch_size,
                              fn_kwargs={"default_split": cfg.source.default_split}, **_placement(cfg))
    ds = ray.data.read_parquet(part.uri, **_placement(cfg))
    return ds.map_batches(parquet_rows, batch_format="pyarrow", batch_size=cfg.tokenize.batch_size,
                          **_placement(cfg),
                          fn_kwargs={"columns": cfg.source.parquet_columns, "uri": part.uri,
                                     "default_split": cfg.source.default_split})


def _initial_pool_size(cfg: PrepareConfig) -> int:
    """As many tokenizer actors as the pool's nodes hold now, up to the configured pool size (an autoscaling
    cluster grows the pool later): a pool started larger than the cluster waits for CPUs that never come."""
    tok = cfg.tokenize
    cpus = pool_cpus(_tokenize_selector(cfg), "tokenizer actors")
    fits = int(cpus // tok.num_cpus) if tok.num_cpus > 0 else tok.concurrency
    return max(1, min(tok.concurrency, fits))


def _run_part(part: Part, cfg: PrepareConfig, actor_kwargs: dict[str, Any],
              preprocess: PreprocessConfig) -> list[dict[str, Any]]:
    """Every row of the part after the pipeline, media dropped: good rows with documents, bad rows with errors."""
    ds = (_part_dataset(part, cfg)
          # reading bytes holds no CPU slot, so the tokenizer pool may fill every core without starving its input;
          # a bounded pool of reading tasks, or Ray starts a worker process (torch imported) for every block at once
          .map_batches(read_media, batch_format="pyarrow", batch_size=cfg.tokenize.batch_size, num_cpus=0,
                       compute=ray.data.TaskPoolStrategy(size=cfg.read_tasks),
                       fn_kwargs={"media": list(actor_kwargs["tokenizers"])}, **_placement(cfg))
          .map_batches(preprocess_media, batch_format="pyarrow", batch_size=cfg.tokenize.batch_size,
                       num_cpus=cfg.preprocess_num_cpus, fn_kwargs={"config": preprocess}, **_placement(cfg))
          .map_batches(TokenizeActor, batch_format="pyarrow", batch_size=cfg.tokenize.batch_size,
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=cfg.tokenize.concurrency,
                                                          initial_size=_initial_pool_size(cfg)),
                       num_cpus=cfg.tokenize.num_cpus, num_gpus=cfg.tokenize.num_gpus or None,
                       label_selector=_tokenize_selector(cfg) or None, fn_constructor_kwargs=actor_kwargs))
    keep = [n for n in ROW_SCHEMA.names if n != "data"]
    try:
        rows = [r for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None)
                for r in batch.select(keep).to_pylist()]
    except Exception as err:  # noqa: BLE001
        if part.kind == "rows":
            raise
        # a tar or Parquet file that cannot be read at all is one rejected input
        return [error_row(0, part.uri, part.uri, "read", "unreadable_container", str(err).splitlines()[0][:500])]
    rows.sort(key=lambda r: (r["index"] if part.kind == "rows" else 0, r["id"] or ""))
    return rows


def _write_part(part: Part, rows: list[dict[str, Any]], cfg: PrepareConfig, out: Output, pad_id: int,
                fingerprint: str) -> dict[str, Any]:
    """Errors, packed shards per split, then the commit marker with the part's counts."""
    errors = [r for r in rows if r["error_stage"] is not None]
    good = [r for r in rows if r["error_stage"] is None]
    files = []
    if errors:
        table = pa.Table.from_pylist([{"id": r["id"], "source": r["source"], "modality": r["modality"],
                                       "split": r["split"], "stage": r["error_stage"],
                                       "error_type": r["error_type"], "message": r["error_message"]}
                                      for r in errors], schema=ERROR_SCHEMA)
        out.write_table(f"errors/{part.name}.parquet", table)
        files.append(f"errors/{part.name}.parquet")
    counts: dict[str, Any] = {
        "input_rows": len(rows), "ok_rows": len(good), "error_rows": len(errors),
        "errors_by_reason": {}, "samples_by_order": {}, "packed_rows": {}, "media_tokens": {},
        "text_tokens": 0, "document_tokens": 0, "padding_tokens": 0,
    }
    for r in errors:
        key = f"{r['error_stage']}:{r['error_type']}"
        counts["errors_by_reason"][key] = counts["errors_by_reason"].get(key, 0) + 1
    # rows hold documents of one modality, so that training can mix modalities in chosen proportions
    per_group: dict[tuple[str, str], list[Document]] = {}
    for r in good:
        counts["text_tokens"] += r["text_tokens"] or 0
        if r["media_tokens"]:
            counts["media_tokens"][r["modality"]] = counts["media_tokens"].get(r["modality"], 0) + r["media_tokens"]
        for d in r["documents"]:
            order = d["sample_id"].rsplit("/", 1)[1]
            counts["samples_by_order"][order] = counts["samples_by_order"].get(order, 0) + 1
            per_group.setdefault((r["split"], r["modality"]), []).append(
                Document(d["sample_id"], d["input_ids"], d["loss_mask"]))
    counts["output_samples"] = sum(counts["samples_by_order"].values())
    rows_per_shard = max(1, int(cfg.target_shard_mb * 2 ** 20 // (cfg.sequences.context_length * BYTES_PER_TOKEN)))
    for (split, modality), docs in sorted(per_group.items()):
        packed = pack_documents(docs, cfg.sequences.context_length, pad_id)
        counts["packed_rows"][split] = counts["packed_rows"].get(split, 0) + len(packed)
        counts["document_tokens"] += sum(len(d.input_ids) for d in docs)
        counts["padding_tokens"] += sum(r.doc_ids.count(-1) for r in packed)
        for shard, start in enumerate(range(0, len(packed), rows_per_shard)):
            chunk = packed[start:start + rows_per_shard]
            table = pa.Table.from_pylist([{**vars(r), "modality": modality} for r in chunk], schema=SHARD_SCHEMA)
            name = f"{split}/{part.name}-{modality}-{shard:04d}.parquet"
            out.write_table(name, table)
            files.append(name)
    marker = {"part": part.name, "kind": part.kind, "uri": part.uri, "fingerprint": fingerprint,
              "files": files, **counts}
    out.write_json(f"parts/{part.name}.json", marker)
    return marker


def _clear_uncommitted(out: Output, committed: set[str]) -> None:
    """Remove what an interrupted run wrote for parts it did not commit."""
    for relative in out.list(""):
        name = relative.rsplit("/", 1)[-1]
        if relative.startswith("parts/") or not name.startswith("part-"):
            if relative.endswith(".tmp"):
                out.delete(relative)
            continue
        if name[: len("part-00000")] not in committed:
            out.delete(relative)


def _merge_counts(markers: list[dict[str, Any]]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for marker in markers:
        for key, value in marker.items():
            if isinstance(value, dict):
                bucket = total.setdefault(key, {})
                for k, v in value.items():
                    bucket[k] = bucket.get(k, 0) + v
            elif isinstance(value, int) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
    return total


def _part_fingerprint(part: Part) -> str:
    info = ""
    if part.uri:
        fs, inner = filesystem(part.uri)
        stat = fs.get_file_info(inner)
        info = f"{stat.size}:{stat.mtime_ns}"
    return part.fingerprint(info)


def run_parts(cfg: PrepareConfig, out: Output, actor_kwargs: dict[str, Any], preprocess: PreprocessConfig,
              pad_id: int) -> dict[str, Any]:
    """Run every part not yet committed; return the stats of the whole output."""
    started = time.perf_counter()
    parts = enumerate_parts(cfg.source, cfg.rows_per_part)
    committed = {p.name for p in parts if out.exists(f"parts/{p.name}.json")}
    _clear_uncommitted(out, committed)
    markers, resumed = [], 0
    for number, part in enumerate(parts, start=1):
        fingerprint = _part_fingerprint(part)
        if part.name in committed:
            marker = out.read_json(f"parts/{part.name}.json")
            if marker.get("fingerprint") != fingerprint:
                raise ValueError(f"{out.root}: {part.name} was prepared from other input; "
                                 "use a new output folder for new input")
            markers.append(marker)
            resumed += 1
            continue
        logger.info("part %d/%d (%s%s)", number, len(parts), part.kind,
                    f", {len(part.rows)} rows" if part.kind == "rows" else f", {part.uri}")
        rows = _run_part(part, cfg, actor_kwargs, preprocess)
        markers.append(_write_part(part, rows, cfg, out, pad_id, fingerprint))
    stats = _merge_counts(markers)
    stats.update(parts=len(parts), parts_resumed=resumed, seconds=round(time.perf_counter() - started, 2))
    for key in ("errors_by_reason", "samples_by_order", "packed_rows", "media_tokens"):
        stats.setdefault(key, {})
    out.write_json("stats.json", stats)
    return stats


def check_config(cfg: PrepareConfig) -> None:
    seq = cfg.sequences
    for name in ("understanding_fraction", "generation_fraction", "unconditional_fraction"):
        if not 0.0 <= getattr(seq, name) <= 1.0:
            raise ValueError(f"sequences.{name} must lie in [0, 1], got {getattr(seq, name)}")
    if seq.understanding_fraction == seq.generation_fraction == 0:
        raise ValueError("sequences.understanding_fraction and generation_fraction cannot both be 0")
    for modality, fractions in seq.by_modality.items():
        where = f"sequences.by_modality.{modality}"
        if modality not in CODEBOOKS:
            raise ValueError(f"{where}: no such modality (known: {', '.join(CODEBOOKS)})")
        for name, value in fractions.items():
            if name not in ORDERS:
                raise ValueError(f"{where}.{name}: expected one of {', '.join(ORDERS)}")
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{where}.{name} must lie in [0, 1], got {value}")
        if seq.fractions(modality)[:2] == (0, 0):
            raise ValueError(f"{where}: understanding and generation cannot both be 0")
    if seq.context_length < 8:
        raise ValueError(f"sequences.context_length must be at least 8, got {seq.context_length}")
    if min(cfg.rows_per_part, cfg.tokenize.batch_size, cfg.tokenize.concurrency, cfg.read_tasks) < 1:
        raise ValueError("rows_per_part, tokenize.batch_size, tokenize.concurrency and read_tasks must be at least 1")


def run_prepare(cfg: PrepareConfig) -> dict[str, Any]:
    """Prepare cfg.source into cfg.out on the Ray cluster this process is connected to; returns the stats."""
    check_config(cfg)
    out = Output(cfg.out)
    setup = setup_tokens(cfg.tokenizers, cfg.text_tokenizer, cfg.out, cfg.limits, cfg.sequences.seed)
    out.write_json("prepare_config.json", config_to_dict(cfg))
    actor_kwargs = {"tokenizers": setup.tokenizer_paths, "text_tokenizer": setup.text_tokenizer_path,
                    "vocabulary": setup.vocabulary.to_dict(), "sequences": cfg.sequences,
                    "threads": max(1, int(cfg.tokenize.num_cpus))}
    stats = run_parts(cfg, out, actor_kwargs, setup.preprocess, setup.pad_id)
    stats["vocabulary_size"] = setup.vocabulary.size
    stats["notes"] = setup.notes
    out.write_json("stats.json", stats)
    return stats


def summary_table(stats: dict[str, Any]) -> str:
    """The end-of-run table: where every input row went, and what the shards hold."""
    lines = [f"{'input rows':<28}{stats.get('input_rows', 0):>10}",
             f"{'  tokenized':<28}{stats.get('ok_rows', 0):>10}",
             f"{'  rejected':<28}{stats.get('error_rows', 0):>10}"]
    lines += [f"{'    ' + reason:<28}{n:>10}" for reason, n in sorted(stats.get("errors_by_reason", {}).items())]
    lines.append(f"{'documents':<28}{stats.get('output_samples', 0):>10}")
    lines += [f"{'  ' + order:<28}{n:>10}" for order, n in sorted(stats.get("samples_by_order", {}).items())]
    lines += [f"{'packed rows, ' + split:<28}{n:>10}" for split, n in sorted(stats.get("packed_rows", {}).items())]
    lines += [f"{'tokens, ' + m:<28}{n:>10}" for m, n in sorted(stats.get("media_tokens", {}).items())]
    lines.append(f"{'tokens, text':<28}{stats.get('text_tokens', 0):>10}")
    lines.append(f"{'padding tokens':<28}{stats.get('padding_tokens', 0):>10}")
    lines.append(f"{'parts (resumed)':<28}{stats.get('parts', 0):>6} ({stats.get('parts_resumed', 0)})")
    lines.append(f"{'seconds':<28}{stats.get('seconds', 0):>10}")
    return "\n".join(lines)
