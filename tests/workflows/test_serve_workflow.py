"""`anytoken serve`: its config and its refusal of a folder that is no exported model (before Ray starts)."""
from workflows.cli import main


def test_serve_refuses_a_folder_that_is_no_exported_model(tmp_path, caplog):
    assert main(["serve", "--model", str(tmp_path)]) == 1
    assert "is not an exported model folder" in caplog.text


def test_serve_names_a_base_llm_that_moved(tiny_exported_model, tmp_path, caplog):
    assert main(["serve", "--model", tiny_exported_model, f"base_llm={tmp_path / 'gone'}"]) == 1
    assert "base LLM folder" in caplog.text


def test_serve_help_lists_its_keys(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--model" in out and "--port" in out
