"""The prepare pipeline on a real local Ray: demo data, bad input, every kind of source, resumption."""
import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from actors.prepare import PrepareConfig, TokenizeConfig, run_prepare
from actors.sources import SourceConfig
from actors.tokenize import SequenceConfig
from models import (AudioVQConfig, AudioVQTokenizer, ImageVQConfig, ImageVQTokenizer, QuantizerConfig, VideoConfig,
                    VideoTokenizer, load_pretrained)
from models.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, VideoPreprocessConfig, preprocess_audio,
                               preprocess_image, preprocess_video)
from models.text_tokenizer import train_text_tokenizer
from models.vocabulary import JointVocabulary
from workflows.demo_data import DemoDataConfig, build_demo_data

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = 768


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A small demo dataset, tiny tokenizers and a text tokenizer, all on disk as a user would have them."""
    root = tmp_path_factory.mktemp("prepare")
    build_demo_data(DemoDataConfig(out=str(root / "data"), images=30, audio_per_digit=2, videos=6, seed=3))
    torch.manual_seed(0)
    small = QuantizerConfig(codebook_size=64, code_dim=16)
    image = ImageVQTokenizer(ImageVQConfig(channels=16, quantizer=small))
    image.save_pretrained(root / "tokenizers" / "image")
    AudioVQTokenizer(AudioVQConfig(channels=16, n_mels=32, quantizer=small)).save_pretrained(root / "tokenizers" / "audio")
    VideoTokenizer(VideoConfig(fps=4, max_frames=8), image_tokenizer=image).save_pretrained(root / "tokenizers" / "video")
    texts = [json.loads(line)["text"] for line in (root / "data" / "manifest.jsonl").read_text().splitlines()]
    train_text_tokenizer(texts, vocab_size=300).save_pretrained(root / "text")
    return root


def config(inputs: Path, out: Path, **source) -> PrepareConfig:
    return PrepareConfig(source=SourceConfig(**(source or {"manifest": str(inputs / "data" / "manifest.jsonl")})),
                         out=str(out), tokenizers=str(inputs / "tokenizers"), text_tokenizer=str(inputs / "text"),
                         sequences=SequenceConfig(context_length=CONTEXT), rows_per_part=40,
                         tokenize=TokenizeConfig(concurrency=2, batch_size=16))


def manifest_rows(inputs: Path) -> list[dict]:
    return [json.loads(line) for line in (inputs / "data" / "manifest.jsonl").read_text().splitlines()]


def shard_rows(out: Path) -> dict[str, list[dict]]:
    return {split: [r for f in sorted((out / split).glob("*.parquet")) for r in pq.read_table(f).to_pylist()]
            for split in ("train", "val", "test") if (out / split).exists()}


def document(rows: list[dict], sample_id: str) -> tuple[list[int], list[int]]:
    for row in rows:
        if sample_id in row["sample_ids"]:
            doc = row["sample_ids"].index(sample_id)
            where = [i for i, d in enumerate(row["doc_ids"]) if d == doc]
            return [row["input_ids"][i] for i in where], [row["loss_mask"][i] for i in where]
    raise KeyError(sample_id)


@pytest.fixture(scope="module")
def demo_run(ray_local, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "prepared"
    return out, run_prepare(config(inputs, out))


def test_demo_data_goes_through_and_the_counts_reconcile(demo_run, inputs):
    out, stats = demo_run
    manifest = manifest_rows(inputs)
    assert stats["input_rows"] == len(manifest) == 30 + 20 + 6
    assert stats["ok_rows"] + stats["error_rows"] == stats["input_rows"]
    assert stats["error_rows"] == 0 and not (out / "errors").exists()
    assert stats["output_samples"] == 2 * stats["ok_rows"]
    assert stats["samples_by_order"] == {"understanding": stats["ok_rows"], "generation": stats["ok_rows"]}
    shards = shard_rows(out)
    assert {len(r["sample_ids"]) for rows in shards.values() for r in rows} and set(shards) <= {"train", "val", "test"}
    assert sum(len(rows) for rows in shards.values()) == sum(stats["packed_rows"].values())
    assert sum(len(r["sample_ids"]) for rows in shards.values() for r in rows) == stats["output_samples"]
    real = sum(d != -1 for rows in shards.values() for r in rows for d in r["doc_ids"])
    assert real == stats["document_tokens"]
    assert json.loads((out / "stats.json").read_text())["input_rows"] == stats["input_rows"]
    assert (out / "vocabulary.json").is_file() and (out / "tokenizers" / "image" / "model.safetensors").is_file()


def test_rows_fill_the_context_and_never_mix_documents(demo_run):
    out, _ = demo_run
    for rows in shard_rows(out).values():
        for row in rows:
            assert len(row["input_ids"]) == len(row["loss_mask"]) == len(row["doc_ids"]) == CONTEXT
            ids = [d for d in row["doc_ids"] if d != -1]
            assert ids == sorted(ids) and set(ids) == set(range(len(row["sample_ids"])))
            for doc in set(ids):     # positions restart at every document
                positions = [p for p, d in zip(row["position_ids"], row["doc_ids"]) if d == doc]
                assert positions == list(range(len(positions)))
            assert all(m == 0 for m, d in zip(row["loss_mask"], row["doc_ids"]) if d == -1)


def test_shards_decode_back_to_the_tokenizers_codes_in_both_orders(demo_run, inputs):
    out, _ = demo_run
    vocab = JointVocabulary.from_pretrained(out)
    rows = [r for split in shard_rows(out).values() for r in split]
    manifest = manifest_rows(inputs)
    data = inputs / "data"
    checks = {
        "image": lambda b: load_pretrained(out / "tokenizers" / "image").encode(
            torch.from_numpy(preprocess_image(b, ImagePreprocessConfig(size=32))).permute(2, 0, 1)[None].float() / 255)[0],
        "audio": lambda b: load_pretrained(out / "tokenizers" / "audio").encode(
            torch.from_numpy(preprocess_audio(b, AudioPreprocessConfig()))[None])[0],
        "video": lambda b: torch.stack(load_pretrained(out / "tokenizers" / "video").encode(
            [torch.from_numpy(preprocess_video(b, VideoPreprocessConfig(size=32, fps=4, max_frames=8)))
             .permute(0, 3, 1, 2).float() / 255])),
    }
    starts = {"image": "[IMG]", "audio": "[AUD]", "video": "[VID]"}
    ends = {"image": "[/IMG]", "audio": "[/AUD]", "video": "[/VID]"}
    for modality, expected_codes in checks.items():
        row = next(r for r in manifest if r["modality"] == modality)
        expected = expected_codes((data / row["path"]).read_bytes())
        for order in ("understanding", "generation"):
            ids, mask = document(rows, f"{row['id']}/{order}")
            start, end = ids.index(vocab.special_id(starts[modality])), ids.index(vocab.special_id(ends[modality]))
            got = vocab.unwrap(modality, ids[start:end + 1])
            got = torch.stack(got) if modality == "video" else got
            assert torch.equal(got.reshape(expected.shape), expected.long()), (modality, order)
            media_targets = mask[start:end + 1]
            assert set(media_targets) == ({1} if order == "generation" else {0}), (modality, order)
            text_targets = mask[end + 1:-1] if order == "understanding" else mask[1:start]
            assert set(text_targets) == ({1} if order == "understanding" else {0}), (modality, order)


def _write_bad_inputs(folder: Path, media_cases: dict) -> tuple[Path, dict[str, str | None]]:
    """A manifest of every kind of bad (and some awkward but valid) input; returns it and the expected reasons."""
    folder.mkdir(parents=True)
    lines, expected = [], {}
    for name, (modality, data, reason) in media_cases.items():
        (folder / name).write_bytes(data)
        lines.append(json.dumps({"id": name, "modality": modality, "path": name, "text": f"about {name}"}).encode())
        expected[name] = f"preprocess:{reason}" if reason else None
    extra = [({"id": "missing", "modality": "image", "path": "nowhere.png", "text": "x"}, "read:missing_file"),
             ({"id": "escape", "modality": "image", "path": "../good.png", "text": "x"}, "source:path_escapes_root"),
             ({"id": "absolute", "modality": "image", "path": "/etc/passwd", "text": "x"}, "source:path_escapes_root"),
             ({"id": "no_caption", "modality": "image", "path": "good.png"}, "read:missing_caption"),
             ({"id": "smell", "modality": "smell", "path": "good.png", "text": "x"}, "read:unknown_modality"),
             ({"id": "just_text", "modality": "text", "text": "a sentence of plain text"}, None)]
    for row, reason in extra:
        lines.append(json.dumps(row).encode())
        expected[row["id"]] = reason
    lines.append(b'{"id": "latin1", "modality": "image", "path": "good.png", "text": "caf\xe9"}')
    expected["line-%d" % len(lines)] = "source:not_utf8"
    (folder / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return folder / "manifest.jsonl", expected


def test_bad_input_is_rejected_with_its_reason_and_the_rest_is_tokenized(ray_local, inputs, media_cases, tmp_path):
    manifest, expected = _write_bad_inputs(tmp_path / "bad", media_cases)
    cfg = config(inputs, tmp_path / "out", manifest=str(manifest))
    cfg.limits.image_max_pixels = 1_000_000
    stats = run_prepare(cfg)
    errors = {r["id"]: f"{r['stage']}:{r['error_type']}"
              for f in (tmp_path / "out" / "errors").glob("*.parquet") for r in pq.read_table(f).to_pylist()}
    assert errors == {k: v for k, v in expected.items() if v is not None}
    assert stats["input_rows"] == len(expected)
    assert stats["ok_rows"] == sum(v is None for v in expected.values())
    assert stats["ok_rows"] + stats["error_rows"] == stats["input_rows"]
    tokenized = {s.rsplit("/", 1)[0] for rows in shard_rows(tmp_path / "out").values() for r in rows
                 for s in r["sample_ids"]}
    assert tokenized == {k for k, v in expected.items() if v is None}
    messages = [r["message"] for f in (tmp_path / "out" / "errors").glob("*.parquet") for r in pq.read_table(f).to_pylist()]
    assert all(m for m in messages)


def _most_processes_at_once(title: str, work) -> tuple[object, int]:
    """Run `work()` while counting, every few milliseconds, the processes whose title holds `title` (Ray names a
    worker process after the task it is running); returns work's result and the largest count seen. Only this
    process's descendants count (the local Ray's raylet and its workers): another Ray on the machine is not ours."""
    import threading

    import psutil

    def count() -> int:
        seen = 0
        for proc in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                seen += title in " ".join(proc.cmdline())
        return seen

    most, done = [0], threading.Event()

    def watch() -> None:
        while not done.is_set():
            most[0] = max(most[0], count())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        result = work()
    finally:
        done.set()
        watcher.join()
    return result, most[0]


def test_files_are_read_by_a_bounded_pool_of_tasks(ray_local, inputs, tmp_path):
    # one row per block: unbounded, Ray starts a worker process (torch imported) for every block at once, and on
    # 2 cores those start-ups cost more than the whole preparation
    cfg = config(inputs, tmp_path / "out")
    cfg.tokenize.batch_size, cfg.read_tasks, cfg.rows_per_part = 2, 2, 1000
    stats, most = _most_processes_at_once("MapBatches(read_media)", lambda: run_prepare(cfg))
    assert stats["ok_rows"] + stats["error_rows"] == stats["input_rows"] > 40
    assert 1 <= most <= cfg.read_tasks


def test_a_modality_can_be_emitted_in_one_order_only(ray_local, inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out")
    cfg.sequences.by_modality = {"video": {"generation": 0.0}}
    stats = run_prepare(cfg)
    videos = sum(r["modality"] == "video" for r in manifest_rows(inputs))
    assert stats["error_rows"] == 0 and videos == 6
    assert stats["samples_by_order"] == {"understanding": stats["ok_rows"], "generation": stats["ok_rows"] - videos}
    ids = [i for rows in shard_rows(tmp_path / "out").values() for r in rows for i in r["sample_ids"]]
    assert sorted(i for i in ids if i.startswith("vid-")) == sorted(
        f"{i.split('/')[0]}/understanding" for i in ids if i.startswith("vid-"))
    assert sum(i.endswith("/generation") for i in ids) == stats["ok_rows"] - videos


def test_unconditional_documents_are_emitted_for_the_asked_modality_and_counted(ray_local, inputs, tmp_path):
    cfg = config(inputs, tmp_path / "out")
    cfg.sequences.by_modality = {"image": {"unconditional": 1.0}}
    stats = run_prepare(cfg)
    images = sum(r["modality"] == "image" for r in manifest_rows(inputs))
    assert stats["error_rows"] == 0 and images > 0
    assert stats["samples_by_order"]["unconditional"] == images
    assert stats["output_samples"] == 2 * stats["ok_rows"] + images
    ids = [i for rows in shard_rows(tmp_path / "out").values() for r in rows for i in r["sample_ids"]]
    assert sorted(i for i in ids if i.endswith("/unconditional")) == sorted(
        i.replace("/generation", "/unconditional") for i in ids if i.startswith("img-") and i.endswith("/generation"))


@pytest.mark.parametrize("by_modality, message", [
    ({"text": {"generation": 0.0}}, "no such modality"),
    ({"video": {"making": 0.0}}, "expected one of understanding, generation, unconditional"),
    ({"video": {"generation": 1.5}}, "must lie in [0, 1]"),
    ({"image": {"unconditional": -0.1}}, "must lie in [0, 1]"),
    ({"audio": {"generation": 0.0, "understanding": 0.0}}, "cannot both be 0"),
])
def test_bad_per_modality_fractions_are_refused_naming_the_key(inputs, tmp_path, by_modality, message):
    from actors.prepare import check_config

    cfg = config(inputs, tmp_path / "out")
    cfg.sequences.by_modality = by_modality
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        check_config(cfg)
    assert f"sequences.by_modality.{next(iter(by_modality))}" in str(err.value)


def test_rows_of_a_modality_without_a_tokenizer_are_rejected_before_reading_and_counted(ray_local, inputs,
                                                                                        tmp_path):
    import shutil

    shutil.copytree(inputs / "tokenizers" / "image", tmp_path / "tokenizers" / "image")   # images only
    cfg = config(inputs, tmp_path / "out")
    cfg.tokenizers = str(tmp_path / "tokenizers")
    stats = run_prepare(cfg)
    manifest = manifest_rows(inputs)
    others = {r["id"] for r in manifest if r["modality"] != "image"}
    errors = {r["id"]: f"{r['stage']}:{r['error_type']}" for f in (tmp_path / "out" / "errors").glob("*.parquet")
              for r in pq.read_table(f).to_pylist()}
    assert errors == {i: "read:no_tokenizer" for i in others}             # rejected before any decoding
    assert stats["input_rows"] == len(manifest) and stats["error_rows"] == len(others)
    assert stats["ok_rows"] == len(manifest) - len(others) and set(stats["media_tokens"]) == {"image"}


def test_webdataset_parquet_and_folder_sources(ray_local, inputs, media_cases, tmp_path):
    png, wav = media_cases["good.png"][1], media_cases["speech.wav"][1]

    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    (tmp_path / "wds").mkdir()
    with tarfile.open(tmp_path / "wds" / "shard-000.tar", "w") as tar:
        add(tar, "a.png", png), add(tar, "a.txt", b"a picture")
        add(tar, "b.wav", wav), add(tar, "b.json", json.dumps({"text": "a tone", "label": 3}).encode())
        add(tar, "c.png", png)                                     # no caption
        add(tar, "d.png", png), add(tar, "d.txt", "caf\xe9".encode("latin-1"))
        add(tar, "e.png", media_cases["truncated.png"][1]), add(tar, "e.txt", b"broken")
    (tmp_path / "wds" / "shard-001.tar").write_bytes(os.urandom(3000))   # not a tar at all

    table = pa.table({"id": ["p1", "p2", "p3"], "bytes": [png, b"\x00garbage", wav],
                      "modality": ["image", "image", "audio"], "text": ["one", "two", "three"], "label": [1, 2, 3]})
    pq.write_table(table, tmp_path / "embedded.parquet")

    folder = tmp_path / "folder" / "val"
    folder.mkdir(parents=True)
    (folder / "f1.png").write_bytes(png), (folder / "f1.txt").write_text("first")
    (folder / "f2.wav").write_bytes(wav), (folder / "f2.txt").write_text("second")
    (folder / "f3.png").write_bytes(png)                              # no sidecar caption
    (folder / "f4.png").write_bytes(png), (folder / "f4.txt").write_bytes(b"\xff\xfe bad")

    cfg = config(inputs, tmp_path / "out", webdataset=str(tmp_path / "wds"), parquet=str(tmp_path / "embedded.parquet"),
                 folder=str(tmp_path / "folder"))
    stats = run_prepare(cfg)
    errors = {r["id"]: r["error_type"] for f in (tmp_path / "out" / "errors").glob("*.parquet")
              for r in pq.read_table(f).to_pylist()}
    assert errors == {
        "shard-000.tar#c": "missing_caption", "shard-000.tar#d": "caption_not_utf8",
        "shard-000.tar#e": "corrupt_image", str(tmp_path / "wds" / "shard-001.tar"): "unreadable_container",
        "p2": "not_an_image", "val/f3.png": "missing_caption", "val/f4.png": "caption_not_utf8"}
    assert stats["input_rows"] == 5 + 1 + 3 + 4
    assert stats["ok_rows"] == 2 + 2 + 2
    assert stats["media_tokens"]["audio"] > 0 and stats["media_tokens"]["image"] > 0
    assert stats["packed_rows"].get("val", 0) >= 1      # the folder's val/ subfolder names the split


@pytest.mark.slow
def test_an_interrupted_run_resumes_without_redoing_or_duplicating(ray_local, inputs, tmp_path):
    out = tmp_path / "out"
    manifest = inputs / "data" / "manifest.jsonl"
    cmd = [sys.executable, "-m", "workflows.prepare", "--manifest", str(manifest), "--out", str(out),
           "--tokenizers", str(inputs / "tokenizers"), "--text-tokenizer", str(inputs / "text"),
           f"sequences.context_length={CONTEXT}", "rows_per_part=12", "tokenize.batch_size=8"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "driver.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdout=sink, stderr=sink)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list((out / "parts").glob("*.json")):
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)  # the driver and its local Ray, mid-run
    process.wait()
    committed = sorted(p.name for p in (out / "parts").glob("*.json"))
    assert committed and len(committed) < 5, (committed, log.read_text()[-3000:])
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.json")}

    cfg = config(inputs, out)
    cfg.rows_per_part, cfg.tokenize.batch_size = 12, 8
    stats = run_prepare(cfg)
    assert stats["parts"] == 5 and stats["parts_resumed"] == len(committed)
    assert {p: (out / "parts" / p).stat().st_mtime_ns for p in before} == before     # not redone
    samples = [s for rows in shard_rows(out).values() for r in rows for s in r["sample_ids"]]
    assert len(samples) == len(set(samples)) == stats["output_samples"] == 2 * 56
    assert not list(out.rglob("*.tmp"))
