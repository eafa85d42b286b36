from dataclasses import dataclass, field

import pytest

from models.configuration import ConfigError
from workflows.config import load_config, parse_args


@dataclass
class Sub:
    depth: int = 2
    name: str = "n"


@dataclass
class Job:
    out: str = "runs/x"
    seed: int = 0
    rate: float = 0.1
    sub: Sub = field(default_factory=Sub)


def test_yaml_then_overrides(tmp_path):
    (tmp_path / "job.yaml").write_text("seed: 3\nsub: {depth: 5}\n")
    cfg = load_config(Job, tmp_path / "job.yaml", ["sub.name=deep", "rate=2e-3"])
    assert cfg == Job(seed=3, rate=2e-3, sub=Sub(depth=5, name="deep"))


def test_a_string_key_keeps_digit_values_as_text(tmp_path):
    assert load_config(Job, None, ["sub.name=123", "out=007"]).sub.name == "123"


@pytest.mark.parametrize("override, message", [
    ("sub.dpeth=3", "unknown config key 'sub.dpeth'"),
    ("colour=red", "unknown config key 'colour'"),
    ("seed.x=1", "config key 'seed' has no sub-keys"),
    ("seed", "not of the form key.sub=value"),
    ("seed=abc", "seed: expected an integer, got 'abc'"),
])
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Job, None, [override])


def test_unknown_key_in_a_yaml_file_is_named(tmp_path):
    (tmp_path / "job.yaml").write_text("sub: {width: 3}\n")
    with pytest.raises(ConfigError, match="unknown config key 'sub.width'"):
        load_config(Job, tmp_path / "job.yaml")


def test_command_line_flags_and_overrides_take_precedence(tmp_path):
    (tmp_path / "job.yaml").write_text("seed: 3\nout: from-yaml\n")
    cfg = parse_args(Job, ["--config", str(tmp_path / "job.yaml"), "--out", "flag", "sub.depth=9", "--seed", "4"],
                     description="d", prog="p")
    assert (cfg.out, cfg.seed, cfg.sub.depth) == ("flag", 4, 9)


def test_command_line_errors_exit_with_the_key_named(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(Job, ["sub.nope=1"], description="d", prog="p")
    assert exit_info.value.code == 2
    assert "unknown config key 'sub.nope'" in capsys.readouterr().err


def test_choice_and_switch_flags():
    from dataclasses import dataclass
    from typing import Literal

    @dataclass
    class Run:
        size: Literal["full", "smoke"] = "full"
        fresh: bool = False

    assert parse_args(Run, ["--size", "smoke", "--fresh"], description="d", prog="p") == Run("smoke", True)
    assert parse_args(Run, ["--fresh", "false"], description="d", prog="p") == Run("full", False)
    with pytest.raises(SystemExit):
        parse_args(Run, ["--size", "huge"], description="d", prog="p")
