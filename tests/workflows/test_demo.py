"""`anytoken demo --size smoke`: every step of the mission at its smallest, as a user runs it (its own Ray)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.demo import STEPS, clear_what_runs, steps_to_run


def test_a_step_reruns_what_reads_its_output_and_nothing_else(tmp_path):
    names = [step.name for step in STEPS]
    assert all(set(step.needs) <= set(names[:i]) for i, step in enumerate(STEPS))   # earlier steps, real names
    assert steps_to_run(tmp_path) == [True] * len(STEPS)                               # nothing there: all of it
    for step in STEPS:
        (tmp_path / step.outputs[0]).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / step.outputs[0]).touch()
    assert not any(steps_to_run(tmp_path))
    (tmp_path / "model/training.json").unlink()                      # TEAL again: what uses its model follows
    assert [n for n, runs in zip(names, steps_to_run(tmp_path)) if runs] == ["TEAL", "TEAL (dynamic)", "evaluate",
                                                                              "serve"]
    (tmp_path / "model/training.json").touch()
    (tmp_path / "tokenizers/image/model.safetensors").unlink()       # the image tokenizer: all that uses its codes
    assert [n for n, runs in zip(names, steps_to_run(tmp_path)) if runs] == [
        "image tokenizer", "video tokenizer", "prepare", "TEAL", "TEAL (dynamic)", "evaluate", "serve"]
    # what will run is cleared before anything runs: a run stopped during TEAL leaves no old serve/ or eval/ behind
    clear_what_runs(tmp_path)
    assert not (tmp_path / "serve/results.json").exists() and not (tmp_path / "eval").exists()
    assert not (tmp_path / "tokenizers/video/model.safetensors").exists()
    assert (tmp_path / "tokenizers_dynamic/image/model.safetensors").exists() and (tmp_path / "llm").is_dir()
    assert [n for n, runs in zip(names, steps_to_run(tmp_path)) if runs] == [
        "image tokenizer", "video tokenizer", "prepare", "TEAL", "TEAL (dynamic)", "evaluate", "serve"]


@pytest.mark.slow
def test_the_smoke_demo_leaves_every_artefact_and_a_report(tmp_path):
    out = tmp_path / "demo"
    done = subprocess.run([sys.executable, "-m", "workflows.demo", "--out", str(out), "--size", "smoke"],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    for step in STEPS:
        assert (out / step.outputs[0]).exists(), f"{step.name} left no {step.outputs[0]}"
    report = json.loads((out / "eval/report.json").read_text())
    assert set(report["understanding"]) == {"image", "audio", "video"}
    assert set(report["generation"]) == {"image", "audio"}
    # the judges of generated media know real digits far above chance, so their verdicts mean something
    assert report["judges"]["image_judge_accuracy_on_real"] > 0.5
    assert report["judges"]["audio_judge_accuracy_on_real"] > 0.1
    for png in ("generated_images.png", "image_reconstructions.png", "dynamic_reconstructions.png", "ima.png",
                "loss_curves.png"):
        assert (out / "eval" / png).stat().st_size > 0, png
    assert "## Goals" in (out / "eval/report.md").read_text()
    # the image stage trained again on the dynamic tokenizer's tokens, compared with the grid model after it
    versus = report["dynamic_vs_grid"]
    assert versus["stage"] == "image" and versus["dynamic"]["steps"] == versus["grid"]["steps"]
    assert versus["dynamic"]["prompt_tokens_mean"] < versus["grid"]["prompt_tokens_mean"]
    dynamic = json.loads((out / "prepared_dynamic/stats.json").read_text())
    assert set(dynamic["media_tokens"]) == {"image"} and set(dynamic["errors_by_reason"]) == {"read:no_tokenizer"}
    assert dynamic["ok_rows"] + dynamic["error_rows"] == dynamic["input_rows"]
    served = json.loads((out / "serve/results.json").read_text())
    assert set(served) == {"image_to_text", "text_to_image", "audio_to_text", "video_to_text"}
    assert [Path(f).suffix for f in served["text_to_image"]["files"]] == [".png"]
    assert all(isinstance(served[k]["reply"], str) for k in ("image_to_text", "audio_to_text", "video_to_text"))
    # a second run finds everything done and redoes nothing
    again = subprocess.run([sys.executable, "-m", "workflows.demo", "--out", str(out), "--size", "smoke"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stdout.count("skipped") == len(STEPS), again.stdout[-2000:]
