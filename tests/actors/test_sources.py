"""Listing inputs on the driver: no Ray, no media read."""
import json

import pytest

from actors.sources import SourceConfig, enumerate_parts, manifest_rows, resolve_under_root


@pytest.mark.parametrize("path, reason", [("../outside.png", "escapes"), ("a/../../b.png", "escapes"),
                                          ("/etc/passwd", "absolute"), ("s3://bucket/x.png", "absolute")])
def test_paths_leaving_the_root_are_refused(tmp_path, path, reason):
    with pytest.raises(PermissionError, match=reason):
        resolve_under_root(str(tmp_path), path)


def test_paths_inside_the_root_resolve(tmp_path):
    assert resolve_under_root(str(tmp_path), "a/./b/../c.png") == str(tmp_path / "a" / "c.png")
    assert resolve_under_root("s3://bucket/data", "img/1.png") == "s3://bucket/data/img/1.png"


def test_bad_manifest_lines_become_error_rows(tmp_path):
    lines = [json.dumps({"id": "ok", "modality": "image", "path": "a.png", "text": "t"}).encode(),
             b'{"id": "latin", "modality": "image", "path": "b.png", "text": "caf\xe9"}',
             b"{not json",
             json.dumps({"id": "up", "modality": "image", "path": "../c.png", "text": "t"}).encode(),
             json.dumps({"id": "nopath", "modality": "audio", "text": "t"}).encode(), b""]
    (tmp_path / "m.jsonl").write_bytes(b"\n".join(lines))
    rows = manifest_rows(str(tmp_path / "m.jsonl"), None, "train")
    assert [(r["id"], r["error_type"]) for r in rows] == [
        ("ok", None), ("line-2", "not_utf8"), ("line-3", "bad_json"), ("up", "path_escapes_root"),
        ("nopath", "missing_path")]
    assert rows[0]["source"] == str(tmp_path / "a.png") and rows[0]["split"] == "train"


def test_parts_cut_rows_and_keep_their_names(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(
        json.dumps({"id": f"r{i}", "modality": "image", "path": f"{i}.png", "text": "t"}) for i in range(5)))
    parts = enumerate_parts(SourceConfig(manifest=str(tmp_path / "m.jsonl")), rows_per_part=2)
    assert [p.name for p in parts] == ["part-00000", "part-00001", "part-00002"]
    assert [len(p.rows) for p in parts] == [2, 2, 1]
    assert [r["index"] for r in parts[1].rows] == [0, 1]
    again = enumerate_parts(SourceConfig(manifest=str(tmp_path / "m.jsonl")), rows_per_part=2)
    assert [p.fingerprint() for p in parts] == [p.fingerprint() for p in again]


def test_no_input_is_an_error():
    with pytest.raises(ValueError, match="no input"):
        enumerate_parts(SourceConfig(), rows_per_part=10)
