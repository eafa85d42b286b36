"""The evaluation workflow end to end on real demo data (small) and an untrained exported model."""
import json
from pathlib import Path

import pytest

from workflows import demo_data, evaluate


@pytest.fixture(scope="module")
def small_demo_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evaluate") / "data"
    assert demo_data.main(["--out", str(out), "images=200", "audio_per_digit=3", "videos=40"]) == 0
    return out


def test_evaluate_writes_every_section_and_figure(small_demo_data, tiny_exported_model, tmp_path):
    out = tmp_path / "eval"
    code = evaluate.main([f"--model={tiny_exported_model}", f"--data={small_demo_data}", f"--out={out}",
                          "samples_per_digit=1", "max_examples=12", "skip_layers=[0, 1]", "best_of=4"])
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["understanding"]) == {"image", "audio", "video"}
    for values in report["understanding"].values():
        assert 0 <= values["ranked_accuracy"] <= 1 and values["examples"] > 0
        assert "free_reply_digit_accuracy" in values and values["replies"]
    # judges see only real media and must know digits well, or their verdicts on generated media mean nothing
    assert report["judges"]["image_judge_accuracy_on_real"] >= 0.8
    assert set(report["generation"]) == {"image", "audio"}
    for values in report["generation"].values():       # judged twice: one draw, and the kept one of 4 draws
        assert values["samples"] == 10 and values["best_of"] == 4
        assert 0 <= values["one_draw_accuracy"] <= 1 and 0 <= values["judged_accuracy"] <= 1
    assert {"image", "audio", "video"} <= set(report["reconstruction"])
    final = report["ima"]["final"]
    assert len(final["ima"]) == 3 and final["perceptual_examples"] > 0        # 2 layers + embeddings
    assert [r["start_layer"] for r in report["skipping"]["runs"]] == [None, 0, 1]
    for png in ("generated_images.png", "image_reconstructions.png", "video_reconstructions.png", "ima.png"):
        assert (out / png).stat().st_size > 0, png
    text = (out / "report.md").read_text()
    assert "## Goals" in text and "missed by" in text      # an untrained model misses every goal, and says so
    assert [g["target"] for g in report["goals"]] == [0.9, 0.8, 0.8, 0.9] and "95 % interval" in text
    assert "best of 4 draws" in text and "one draw" in text


def test_every_stage_checkpoint_is_read_in_every_modality(small_demo_data, tiny_exported_model, tmp_path):
    """A model whose training.json names a stage, its checkpoint the final weights: the stage's accuracies are
    the final model's, for every modality the evaluation reads."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_exported_model, model)
    shutil.copytree(tiny_exported_model, tmp_path / "model.stages" / "image")
    (model / "training.json").write_text(json.dumps({"stages": [{"stage": "image"}]}))
    out = tmp_path / "eval"
    assert evaluate.main([f"--model={model}", f"--data={small_demo_data}", f"--out={out}", "samples_per_digit=1",
                          "max_examples=12", "skip_layers=[0]", "best_of=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    [stage] = report["ima"]["stages"]
    assert stage["accuracy"] == {m: v["ranked_accuracy"] for m, v in report["understanding"].items()}
    assert set(stage["accuracy"]) == {"image", "audio", "video"}
    assert "| stage | IMA score | image | audio | video |" in (out / "report.md").read_text()


def test_evaluate_names_a_missing_model(small_demo_data, tmp_path):
    assert evaluate.main([f"--model={tmp_path / 'nothing'}", f"--data={small_demo_data}",
                          f"--out={tmp_path / 'eval'}"]) == 1


def test_a_goal_reached_exactly_is_met():
    import torch

    spoken = evaluate.share(torch.arange(60) < 54)          # 54 of 60 clips right: 90 %, not 89.99998 %
    assert spoken == 0.9
    assert evaluate.goal("spoken digit", [(spoken, 60)], 0.9)["verdict"].startswith("met")
    assert "missed by 1.7 points" in evaluate.goal("spoken digit", [(53 / 60, 60)], 0.9)["verdict"]


def test_a_goal_says_whether_its_test_split_can_tell():
    """Wilson's interval of 53 of 60 is 77.8-94.2 %: a 90 % goal missed by 1.7 points is within it; 45 of 60 is not
    near it, nor 1,000 of 1,000 wrong answers' share; a mean of two shares widens as its parts do."""
    near = evaluate.goal("spoken digit", [(53 / 60, 60)], 0.9)
    assert [round(100 * x, 1) for x in near["ci95"]] == [77.8, 94.2] and near["verdict"].endswith("within the interval")
    far = evaluate.goal("spoken digit", [(45 / 60, 60)], 0.9)
    assert far["ci95"][1] < 0.9 and far["verdict"] == "missed by 15.0 points"
    assert evaluate.interval([(0.0, 1000)])[0] == 0.0 and evaluate.interval([(1.0, 1000)])[1] == 1.0
    one, two = evaluate.interval([(0.7, 180)]), evaluate.interval([(0.7, 180), (0.4, 40)])
    mean = evaluate.goal("understanding", [(0.7, 180), (0.4, 40)], 0.9)
    assert mean["measured"] == 0.55 and mean["examples"] == 220
    assert two[0] < 0.55 < two[1] and two[1] - two[0] > one[1] - one[0]
    assert "| 55.0 % | " in evaluate.goal_line(mean) and evaluate.goal("generation", [], 0.8)["verdict"] == "not measured"


def test_loss_curves_come_from_every_run_once(tmp_path):
    for run in ("model", "model.stages/image", "model_dynamic", "model_dynamic.stages/image", "tokenizers/image",
                "ray/demo-llm", "prepared/parts"):
        (tmp_path / run).mkdir(parents=True)
        (tmp_path / run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    found = evaluate.metric_files(evaluate.EvaluateConfig(model=str(tmp_path / "model")))
    assert [str(p.relative_to(tmp_path).parent) for p in found] == ["model", "model_dynamic", "tokenizers/image"]


def test_generation_samples_at_the_temperature_it_is_given(small_demo_data, tiny_exported_model, tmp_path):
    """Six prompts a digit over five caption phrasings: greedy decoding draws the same image for the two prompts
    that share a phrasing, sampling at 1.0 draws a different one every time."""
    ev = evaluate.Evaluation(evaluate.EvaluateConfig(model=str(tiny_exported_model), data=str(small_demo_data),
                                                     out=str(tmp_path / "eval"), samples_per_digit=6))
    ev.train_judges()
    assert ev.generate("image", 1, temperature=0.0)["distinct"] == pytest.approx(5 / 6)
    assert ev.generate("image", 1, temperature=1.0)["distinct"] == 1.0


def test_generation_is_judged_at_every_temperature_of_the_sweep(small_demo_data, tiny_exported_model, tmp_path):
    out = tmp_path / "eval"
    assert evaluate.main([f"--model={tiny_exported_model}", f"--data={small_demo_data}", f"--out={out}",
                          "samples_per_digit=1", "max_examples=4", "skip_layers=[0]", "best_of=2", "temperature=0.5",
                          "temperatures=[1.0, 0.5, 0.0]"]) == 0
    report = json.loads((out / "report.json").read_text())
    for values in report["generation"].values():
        assert values["temperature"] == 0.5
        assert [r["temperature"] for r in values["by_temperature"]] == [0.5, 1.0, 0.0]     # 0.5 judged once
        headline = values["by_temperature"][0]
        assert (headline["one_draw_accuracy"], headline["judged_accuracy"]) == (
            values["one_draw_accuracy"], values["judged_accuracy"])
    text = (out / "report.md").read_text()
    assert "best of 2 draws at temperature 0.5" in text and "| image | 0 |" in text and "| audio | 1 |" in text
