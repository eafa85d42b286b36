"""`anytoken serve`: its config and its refusal of a folder that is no exported model (before Ray starts)."""
from pathlib import Path

import pytest
import yaml

from workflows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_serve_refuses_a_folder_that_is_no_exported_model(tmp_path, caplog):
    assert main(["serve", "--model", str(tmp_path)]) == 1
    assert "is not an exported model folder" in caplog.text


def test_serve_names_a_base_llm_that_moved(tiny_exported_model, tmp_path, caplog):
    assert main(["serve", "--model", tiny_exported_model, f"base_llm={tmp_path / 'gone'}"]) == 1
    assert "base LLM folder" in caplog.text


def test_serve_help_lists_its_keys(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--model" in out and "--port" in out


def test_the_shipped_serve_configs_build_the_app(tiny_exported_model):
    from actors.serve import build_app
    from actors.serve_config import ServeConfig
    from models.configuration import config_from_dict
    from workflows.config import CONFIG_DIR, load_config

    cluster = yaml.safe_load((ROOT / "cluster" / "serve_config.yaml").read_text())
    (app,) = cluster["applications"]
    assert app["import_path"] == "actors.serve:build_app"
    config_from_dict(ServeConfig, app["args"])
    assert load_config(ServeConfig, CONFIG_DIR / "serve.yaml").generator.batching.max_batch_size == 16
    build_app({**app["args"], "model": tiny_exported_model})
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        build_app({"model": tiny_exported_model, "generator": {"max_ongoing_requests": 4}})
    with pytest.raises(FileNotFoundError, match="not an exported model folder"):
        build_app({"model": "/nowhere"})
