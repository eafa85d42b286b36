import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from models.media import read_image, read_mp4, read_wav
from workflows.demo_data import DemoDataConfig, build_demo_data

SMALL = dict(images=60, audio_per_digit=2, videos=8, video_frames=[8, 12])


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "data"
    build_demo_data(DemoDataConfig(out=str(out), seed=7, **SMALL))
    return out


def test_same_seed_gives_the_same_bytes(small_demo, tmp_path):
    again = tmp_path / "again"
    build_demo_data(DemoDataConfig(out=str(again), seed=7, **SMALL))
    assert digest(again) == digest(small_demo)


def test_another_seed_gives_another_split(small_demo, tmp_path):
    other = tmp_path / "other"
    build_demo_data(DemoDataConfig(out=str(other), seed=8, **SMALL))
    rows = [json.loads(line) for line in (small_demo / "manifest.jsonl").read_text().splitlines()]
    others = [json.loads(line) for line in (other / "manifest.jsonl").read_text().splitlines()]
    assert [r["split"] for r in rows] != [r["split"] for r in others]


def test_manifest_rows_are_complete_and_agree_in_both_formats(small_demo):
    rows = [json.loads(line) for line in (small_demo / "manifest.jsonl").read_text().splitlines()]
    assert rows == pq.read_table(small_demo / "manifest.parquet").to_pylist()
    assert len(rows) == 60 + 20 + 8
    assert {r["modality"] for r in rows} == {"image", "audio", "video"}
    assert {r["split"] for r in rows} <= {"train", "val", "test"}
    assert len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "modality", "path", "text", "label", "split"}
        assert not Path(r["path"]).is_absolute() and (small_demo / r["path"]).is_file()
        assert 0 <= r["label"] <= 9 and r["text"]


def test_every_file_decodes_to_what_the_manifest_says(small_demo):
    for r in pq.read_table(small_demo / "manifest.parquet").to_pylist():
        path = small_demo / r["path"]
        if r["modality"] == "image":
            assert read_image(path).shape == (3, 32, 32)
            assert str(r["label"]) in r["text"] or r["text"].split()[-1] in (
                "zero one two three four five six seven eight nine".split())
        elif r["modality"] == "audio":
            wave, rate = read_wav(path)
            assert rate == 16000 and wave.shape[0] == 1 and 0.2 * rate < wave.shape[1] < 3 * rate
            assert wave.abs().max() > 0.05
        else:
            frames, fps = read_mp4(path)
            assert 8 <= frames.shape[0] <= 12 and frames.shape[1:] == (3, 32, 32) and fps == 8
            assert r["text"].split()[-1] in ("left", "right", "up", "down")


def test_the_digit_in_a_clip_moves_the_way_its_caption_says(small_demo):
    import torch

    for r in pq.read_table(small_demo / "manifest.parquet").to_pylist():
        if r["modality"] != "video":
            continue
        frames, _ = read_mp4(small_demo / r["path"])
        ink = 1 - frames.mean(dim=1)                                  # (F, H, W)
        grid = torch.arange(32, dtype=torch.float32)
        cx = (ink.sum(dim=1) * grid).sum(dim=1) / ink.sum(dim=(1, 2))
        cy = (ink.sum(dim=2) * grid).sum(dim=1) / ink.sum(dim=(1, 2))
        dx, dy = float(cx[-1] - cx[0]), float(cy[-1] - cy[0])
        expected = {"left": dx < -4, "right": dx > 4, "up": dy < -4, "down": dy > 4}
        assert expected[r["text"].split()[-1]], (r, dx, dy)


def test_a_clip_starts_on_its_digit_image_and_moves_it_out_of_the_frame(small_demo):
    import torch

    rows = pq.read_table(small_demo / "manifest.parquet").to_pylist()
    images = [read_image(small_demo / r["path"]) for r in rows if r["modality"] == "image"]
    for r in rows:
        if r["modality"] != "video":
            continue
        frames, _ = read_mp4(small_demo / r["path"])
        # the first frame is one of the digit images of the data (up to the video codec's loss)
        nearest = min(float((frames[0] - image).abs().mean()) for image in images)
        assert nearest < 0.03, (r, nearest)
        # and the last shows less of it: 16 of its 32 px left the frame
        ink = (1 - frames.mean(dim=1)).sum(dim=(1, 2))
        assert ink[-1] < 0.85 * ink[0], (r, ink[0], ink[-1])


def test_a_digit_moves_its_travel_and_what_leaves_the_canvas_is_cut_off(digits):
    import torch

    from workflows.demo_data import moving_digit

    images, _ = digits
    clip = moving_digit(images[0], "right", 5, 32, 16, 12, 3)
    ink = 1 - clip.mean(dim=1)
    columns = [torch.nonzero(frame.sum(dim=0) > 0.05).flatten() for frame in ink]
    rows = torch.nonzero(ink[0].sum(dim=1) > 0.05).flatten()
    assert 3 <= int(rows.min()) and int(rows.max()) < 3 + 16           # across: at its offset
    assert int(columns[-1].min()) - int(columns[0].min()) == 12          # along: from the middle, 12 px
    far = moving_digit(images[0], "left", 3, 32, 32, 32, 0)
    assert torch.equal(far[0], images[0]) and bool((far[-1] == 1).all())   # gone, no wrap-around


def test_command_line_builds_the_data(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "workflows.demo_data", "--out", str(out), "images=20", "audio_per_digit=1",
           "videos=2", "--seed", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "demo_data.json").read_text())
    assert summary["rows"] == 32 + 4 * 16 and summary["seed"] == 1      # demo_data.yaml: 4 copies of 16 training images
    assert summary["counts"]["image"] == {"train": 16 + 64, "val": 2, "test": 2}


def test_missing_espeak_says_what_to_do(tmp_path, monkeypatch):
    import workflows.demo_data as demo_data

    monkeypatch.setattr(demo_data.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        build_demo_data(DemoDataConfig(out=str(tmp_path / "x"), images=5, audio_per_digit=1, videos=0))


@pytest.mark.parametrize("overrides, message", [
    (dict(video_digit_size=40), "video_digit_size must lie in"),
    (dict(video_travel=0), "video_travel must lie in"),
    (dict(video_frames=[1, 4]), "video_frames must be"),
])
def test_clip_settings_that_cannot_be_drawn_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        build_demo_data(DemoDataConfig(out=str(tmp_path / "x"), images=5, audio_per_digit=1, **overrides))
    assert not (tmp_path / "x").exists()


def test_augmented_copies_are_more_training_rows_and_change_nothing_else(small_demo, tmp_path):
    out = tmp_path / "augmented"
    build_demo_data(DemoDataConfig(out=str(out), seed=7, image_augment=2, **SMALL))
    rows = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (small_demo / "manifest.jsonl").read_text().splitlines()]
    copies = [r for r in rows if "-a" in r["id"]]
    assert [r for r in rows if r not in copies] == plain                      # the same rows, the same bytes
    before, after = digest(small_demo), digest(out)
    assert all(after[name] == digest_ for name, digest_ in before.items()
               if not name.startswith("manifest") and name != "demo_data.json")
    train = [r for r in plain if r["modality"] == "image" and r["split"] == "train"]
    assert sorted(r["id"] for r in copies) == sorted(f"{r['id']}-a{k}" for r in train for k in (1, 2))
    by_id = {r["id"]: r for r in train}
    for copy in copies:
        source = by_id[copy["id"].rsplit("-a", 1)[0]]
        assert copy["split"] == "train" and copy["label"] == source["label"]
        assert str(copy["label"]) in copy["text"] or copy["text"].split()[-1] in (
            "zero one two three four five six seven eight nine".split())
        image, original = read_image(out / copy["path"]), read_image(out / source["path"])
        ink, ink_before = float((1 - image).sum()), float((1 - original).sum())
        assert (image - original).abs().max() > 0.2                        # moved, turned or scaled ...
        assert 0.7 < ink / ink_before < 1.4                                # ... but the same digit's ink


def test_an_augmentation_of_nothing_is_the_image_itself(digits):
    import numpy as np

    from workflows.demo_data import augment_images

    images, _ = digits
    still = DemoDataConfig(augment_degrees=0.0, augment_scale=0.0, augment_shift=0.0)
    same = augment_images(images[:4], 3, still, np.random.default_rng(0))
    assert same.shape == (12, 3, 32, 32)
    assert (same - images[:4].repeat_interleave(3, dim=0)).abs().max() < 1e-4
    moved = augment_images(images[:4], 3, DemoDataConfig(), np.random.default_rng(0))
    assert (moved - same).abs().amax(dim=(1, 2, 3)).min() > 0.1           # every copy changed
