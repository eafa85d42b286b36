"""Inputs of the prepare pipeline: manifests, folders, WebDataset tar shards and Parquet with embedded bytes.

The driver lists the inputs (names only, never media) and cuts them into parts, the unit of resumption:
chunks of rows for manifests and folders, one part per tar or Parquet file. Every row of every source is
brought to ROW_SCHEMA, which all pipeline stages read and write.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MODALITIES = ("image", "audio", "video", "text")
EXTENSIONS = {
    "image": (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"),
    "audio": (".wav", ".flac", ".ogg", ".mp3"),
    "video": (".mp4", ".webm", ".mkv", ".mov", ".avi"),
}

ROW_SCHEMA = pa.schema([
    ("index", pa.int64()),            # position among the part's input rows
    ("id", pa.string()),
    ("modality", pa.string()),
    ("source", pa.string()),          # where the media comes from: a path, a URI, or container#key
    ("text_source", pa.string()),     # a sidecar caption file still to read
    ("text", pa.string()),
    ("label", pa.int64()),
    ("split", pa.string()),
    ("data", pa.binary()),            # raw file bytes, then the preprocessed array (.npy bytes)
    ("codes", pa.list_(pa.int32())),
    ("documents", pa.list_(pa.struct([("sample_id", pa.string()), ("input_ids", pa.list_(pa.int32())),
                                      ("loss_mask", pa.list_(pa.int8()))]))),
    ("media_tokens", pa.int32()),
    ("text_tokens", pa.int32()),
    ("error_stage", pa.string()),
    ("error_type", pa.string()),
    ("error_message", pa.string()),
])


@dataclass
class ParquetColumns:
    id: str = "id"
    data: str = "bytes"
    modality: str = "modality"
    text: str = "text"
    label: str = "label"
    split: str = "split"


@dataclass
class SourceConfig:
    manifest: str | None = None       # JSONL or Parquet: id, modality, path, text, label, split
    root: str | None = None           # where manifest paths point; default: the manifest's folder
    folder: str | None = None         # media files with sidecar captions (same name, .txt)
    webdataset: str | None = None     # tar shards: a file, a folder, a glob, or several joined by commas
    parquet: str | None = None        # Parquet files holding the media bytes themselves
    parquet_columns: ParquetColumns = field(default_factory=ParquetColumns)
    default_split: str = "train"      # for rows that name no split


@dataclass
class Part:
    name: str
    kind: str                          # "rows", "webdataset" or "parquet"
    rows: list[dict[str, Any]] = field(default_factory=list)
    uri: str | None = None

    def fingerprint(self, fs_info: str = "") -> str:
        """Identifies the part's input, so a resumed run can tell that its input did not change."""
        h = hashlib.sha256(self.kind.encode())
        if self.kind == "rows":
            for row in self.rows:
                h.update(f"{row['id']}\0{row['source']}\0{row['text']}\0{row['split']}\n".encode())
        else:
            h.update(f"{self.uri}\0{fs_info}".encode())
        return h.hexdigest()[:16]


def empty_row(index: int, **values: Any) -> dict[str, Any]:
    row = {name: None for name in ROW_SCHEMA.names}
    row.update(index=index, **values)
    return row


def error_row(index: int, row_id: str, source: str, stage: str, reason: str, message: str) -> dict[str, Any]:
    return empty_row(index, id=row_id, source=source, error_stage=stage, error_type=reason, error_message=message)


def is_uri(path: str) -> bool:
    return "://" in path


def filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a local path or a URI (s3://, gs://, file://, ...), and the path within it."""
    return pafs.FileSystem.from_uri(path if is_uri(path) else os.path.abspath(path))


def read_bytes(path: str) -> bytes:
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as stream:
            return stream.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"missing file: {path}") from None


def join(root: str, relative: str) -> str:
    return f"{root.rstrip('/')}/{relative}" if is_uri(root) else os.path.join(os.path.abspath(root), relative)


def resolve_under_root(root: str, path: str) -> str:
    """root + path, refusing absolute paths and paths that climb out of root."""
    if not path:
        raise ValueError("the row names no path")
    if is_uri(path) or path.startswith(("/", "\\")) or os.path.isabs(path):
        raise PermissionError(f"absolute path {path!r} refused: manifest paths are relative to {root}")
    normal = posixpath.normpath(path.replace("\\", "/"))
    if normal == ".." or normal.startswith("../"):
        raise PermissionError(f"path {path!r} escapes the root {root}")
    return join(root, normal)


def modality_of_name(name: str) -> str | None:
    lower = name.lower()
    return next((m for m, exts in EXTENSIONS.items() if lower.endswith(exts)), None)


def list_files(spec: str, suffixes: tuple[str, ...]) -> list[str]:
    """Files named by a file, a folder (recursively) or a glob, local or URI; comma-separated specs join."""
    found: list[str] = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        pattern = None
        if any(ch in item for ch in "*?["):
            item, pattern = item.rsplit("/", 1)[0], item
        fs, inner = filesystem(item)
        info = fs.get_file_info(inner)
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"input not found: {item}")
        if info.type == pafs.FileType.File:
            infos = [info]
        else:
            infos = [i for i in fs.get_file_info(pafs.FileSelector(inner, recursive=True))
                     if i.type == pafs.FileType.File]
        prefix = item[: len(item) - len(inner)] if is_uri(item) else ""
        for i in infos:
            full = prefix + i.path if is_uri(item) else i.path
            if i.path.lower().endswith(suffixes) and (pattern is None or fnmatch.fnmatch(full, pattern)
                                                      or fnmatch.fnmatch(i.path, pattern)):
                found.append(full)
    return sorted(set(found))


def manifest_rows(manifest: str, root: str | None, default_split: str) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet manifest; a line that is not UTF-8 or not JSON becomes an error row."""
    root = root or (manifest.rsplit("/", 1)[0] if is_uri(manifest) else os.path.dirname(os.path.abspath(manifest)))
    if manifest.lower().endswith(".parquet"):
        fs, inner = filesystem(manifest)
        records: list[Any] = pq.read_table(inner, filesystem=fs).to_pylist()
    else:
        records = []
        for number, line in enumerate(read_bytes(manifest).split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError as err:
                records.append(("not_utf8", f"manifest line {number} is not UTF-8: {err}", number))
            except json.JSONDecodeError as err:
                records.append(("bad_json", f"manifest line {number} is not JSON: {err}", number))
    rows = []
    for index, record in enumerate(records):
        if isinstance(record, tuple):
            reason, message, number = record
            rows.append(error_row(index, f"line-{number}", manifest, "source", reason, message))
            continue
        if not isinstance(record, dict):
            rows.append(error_row(index, f"row-{index}", manifest, "source", "bad_row", "a row is not an object"))
            continue
        row_id = str(record.get("id") or f"row-{index}")
        label = record.get("label")
        row = empty_row(index, id=row_id, modality=record.get("modality"), text=record.get("text"),
                        label=label if isinstance(label, int) and not isinstance(label, bool) else None,
                        split=record.get("split") or default_split)
        try:
            row["source"] = None if row["modality"] == "text" else resolve_under_root(root, record.get("path") or "")
        except (ValueError, PermissionError) as err:
            row.update(source=str(record.get("path")), error_stage="source",
                       error_type="path_escapes_root" if isinstance(err, PermissionError) else "missing_path",
                       error_message=str(err))
        rows.append(row)
    return rows


def folder_rows(folder: str, default_split: str) -> list[dict[str, Any]]:
    """One row per media file; its caption is the sidecar file of the same name with .txt."""
    suffixes = tuple(ext for exts in EXTENSIONS.values() for ext in exts)
    rows = []
    base = folder.rstrip("/")
    for index, path in enumerate(list_files(folder, suffixes)):
        relative = path[len(base):].lstrip("/") if path.startswith(base) else os.path.relpath(path, folder)
        split = relative.split("/", 1)[0] if relative.split("/", 1)[0] in ("train", "val", "test") else default_split
        rows.append(empty_row(index, id=relative, modality=modality_of_name(path), source=path,
                              text_source=os.path.splitext(path)[0] + ".txt", split=split))
    return rows


def enumerate_parts(cfg: SourceConfig, rows_per_part: int) -> list[Part]:
    """Every input, cut into parts in a fixed order: manifest rows, folder rows, tar files, Parquet files."""
    if not any((cfg.manifest, cfg.folder, cfg.webdataset, cfg.parquet)):
        raise ValueError("no input: set source.manifest, source.folder, source.webdataset or source.parquet")
    rows: list[dict[str, Any]] = []
    if cfg.manifest:
        rows += manifest_rows(cfg.manifest, cfg.root, cfg.default_split)
    if cfg.folder:
        rows += folder_rows(cfg.folder, cfg.default_split)
    parts = []
    for start in range(0, len(rows), rows_per_part):
        chunk = [{**row, "index": i} for i, row in enumerate(rows[start:start + rows_per_part])]
        parts.append(Part(f"part-{len(parts):05d}", "rows", rows=chunk))
    if cfg.webdataset:
        parts += [Part(f"part-{len(parts) + i:05d}", "webdataset", uri=uri)
                  for i, uri in enumerate(list_files(cfg.webdataset, (".tar",)))]
    if cfg.parquet:
        parts += [Part(f"part-{len(parts) + i:05d}", "parquet", uri=uri)
                  for i, uri in enumerate(list_files(cfg.parquet, (".parquet",)))]
    return parts


def webdataset_rows(batch: pa.Table, default_split: str) -> pa.Table:
    """Ray Data batch function: rows of read_webdataset(decoder=None) -> ROW_SCHEMA rows."""
    rows = []
    for i, sample in enumerate(batch.to_pylist()):
        # fields a sample lacks may arrive as None or NaN, depending on the block format Ray chose
        present = {k: v for k, v in sample.items() if isinstance(v, (bytes, bytearray))}
        key, url = str(sample.get("__key__")), str(sample.get("__url__"))
        row = empty_row(i, id=f"{os.path.basename(url)}#{key}", source=f"{url}#{key}", split=default_split)
        media = [(name, value) for name, value in present.items() if modality_of_name("x." + name)]
        if media:
            name, value = media[0]
            row.update(modality=modality_of_name("x." + name), data=bytes(value))
        try:
            meta = json.loads(present["json"]) if "json" in present else {}
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
            row["text"] = present["txt"].decode("utf-8") if "txt" in present else (meta.get("text") or meta.get("caption"))
            label = meta.get("label", meta.get("cls"))
            row.update(label=label if isinstance(label, int) else None, split=meta.get("split") or default_split)
            if not media:
                raise _SampleError("no_media", f"sample {key} holds no media file")
        except UnicodeDecodeError as err:
            row.update(error_stage="source", error_type="caption_not_utf8", error_message=f"caption is not UTF-8: {err}")
        except _SampleError as err:
            row.update(error_stage="source", error_type=err.reason, error_message=str(err))
        except ValueError as err:
            row.update(error_stage="source", error_type="bad_json", error_message=f"sample json is unreadable: {err}")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


class _SampleError(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parquet_rows(batch: pa.Table, columns: ParquetColumns, default_split: str, uri: str) -> pa.Table:
    """Ray Data batch function: rows of a Parquet file with embedded media bytes -> ROW_SCHEMA rows."""
    rows = []
    for i, record in enumerate(batch.to_pylist()):
        # missing values may arrive as None or NaN, depending on the block format Ray chose
        data = record.get(columns.data)
        data = bytes(data) if isinstance(data, (bytes, bytearray)) else None
        row_id = str(record.get(columns.id) or f"{os.path.basename(uri)}#{i}")
        label, modality, text = record.get(columns.label), record.get(columns.modality), record.get(columns.text)
        split = record.get(columns.split)
        row = empty_row(i, id=row_id, modality=modality if isinstance(modality, str) else None,
                        source=f"{uri}#{row_id}", data=data, label=label if isinstance(label, int) else None,
                        split=split if isinstance(split, str) and split else default_split)
        if data is None and modality != "text":
            row.update(error_stage="source", error_type="no_media", error_message=f"row {row_id} holds no media bytes")
        if isinstance(text, bytes):
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError as err:
                row.update(error_stage="source", error_type="caption_not_utf8",
                           error_message=f"caption is not UTF-8: {err}")
                text = None
        row["text"] = text if isinstance(text, str) else None
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
