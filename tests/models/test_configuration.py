from dataclasses import dataclass, field
from typing import Literal

import pytest

from models.configuration import ConfigError, config_from_dict, config_to_dict, field_names


@dataclass
class Inner:
    size: int = 4
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "x"
    flag: bool = False
    mode: Literal["a", "b"] = "a"
    path: str | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_nested_values_are_typed_and_defaults_fill_the_rest():
    cfg = config_from_dict(Outer, {"name": "y", "inner": {"rate": 2}, "sizes": [3]})
    assert cfg == Outer(name="y", inner=Inner(size=4, rate=2.0), sizes=[3])
    assert isinstance(cfg.inner.rate, float)


def test_round_trip_through_plain_data():
    cfg = Outer(name="z", flag=True, mode="b", path="/p", sizes=[5], inner=Inner(7, 0.1))
    assert config_from_dict(Outer, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize("data, message", [
    ({"nmae": "y"}, "unknown config key 'nmae'"),
    ({"inner": {"sise": 3}}, "unknown config key 'inner.sise'"),
    ({"inner": {"size": "big"}}, "inner.size: expected an integer, got 'big'"),
    ({"flag": "yes"}, "flag: expected true or false"),
    ({"mode": "c"}, "mode: expected one of ['a', 'b']"),
    ({"sizes": 3}, "sizes: expected a list"),
    ({"sizes": [1, "x"]}, "sizes[1]: expected an integer"),
    ({"inner": 3}, "inner: expected a mapping"),
])
def test_bad_keys_and_values_are_named(data, message):
    with pytest.raises(ConfigError) as err:
        config_from_dict(Outer, data)
    assert message in str(err.value)


def test_field_names_lists_dotted_keys():
    assert field_names(Outer) == ["name", "flag", "mode", "path", "sizes", "inner.size", "inner.rate"]
