"""The one config mechanism of every workflow: YAML under workflows/configs/ -> typed dataclass, with overrides.

Precedence, lowest first: the dataclass defaults, the YAML file (--config, or the workflow's default file),
flags such as `--out DIR` (one per top-level scalar key), and `key.sub=value` overrides.
"""
from __future__ import annotations

import argparse
import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from models.configuration import ConfigError, config_from_dict, config_to_dict, field_names

T = TypeVar("T")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    return data


def apply_override(data: dict[str, Any], cls: type, assignment: str) -> None:
    """Apply one `a.b.c=value` to nested plain data, checking every key against the dataclass `cls`."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key.sub=value")
    parts = key.split(".")
    node, node_cls = data, cls
    for depth, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(node_cls)}
        if part not in fields:
            raise ConfigError(f"unknown config key '{key}' (known keys: {', '.join(field_names(cls))})")
        hint = typing.get_type_hints(node_cls)[part]
        if depth == len(parts) - 1:
            node[part] = yaml.safe_load(raw) if raw.strip() else ""
            if hint is str and not isinstance(node[part], str):   # `name=123` means the string "123"
                node[part] = raw
            return
        if typing.get_origin(hint) is dict:     # free-form mapping (e.g. a model kind's config): checked later
            node = node.setdefault(part, {})
            for sub in parts[depth + 1:-1]:
                node = node.setdefault(sub, {})
            node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else ""
            return
        if not dataclasses.is_dataclass(hint):
            raise ConfigError(f"config key '{'.'.join(parts[:depth + 1])}' has no sub-keys")
        node = node.setdefault(part, {})
        node_cls = hint


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | None = None) -> T:
    """Dataclass `cls` from an optional YAML file and a list of `key.sub=value` overrides."""
    data = read_yaml(path) if path else {}
    for assignment in overrides or []:
        apply_override(data, cls, assignment)
    return config_from_dict(cls, data)


def _is_scalar(hint: Any) -> bool:
    """str, int, float, bool, a Literal choice or an optional one: the keys that get a --flag (the others take
    key=value)."""
    if typing.get_origin(hint) is typing.Literal:
        return True
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint in (str, int, float, bool) or (len(args) == 1 and args[0] in (str, int, float, bool))


def parse_args(cls: type[T], argv: list[str] | None, description: str, prog: str,
               default_config: str | None = None, aliases: dict[str, str] | None = None) -> T:
    """Command line -> config: `[--config FILE] [--KEY VALUE ...] [key.sub=value ...]`.

    Top-level scalar keys get a flag (`--out DIR`); `aliases` adds flags for nested keys, e.g.
    {"manifest": "source.manifest"} gives `--manifest PATH`.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     epilog="Any key can also be set as key.sub=value; see the YAML files in "
                                            f"{CONFIG_DIR}.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file" + (f" (default: {default_config})" if default_config else ""))
    hints = typing.get_type_hints(cls)
    defaults = config_to_dict(cls())
    flags = [f.name for f in dataclasses.fields(cls) if _is_scalar(hints[f.name])]
    for name in flags:
        extra: dict[str, Any] = {"metavar": "VALUE"}
        if hints[name] is bool:                 # `--fresh` alone means true; `--fresh false` also works
            extra = {"metavar": "BOOL", "nargs": "?", "const": "true"}
        elif typing.get_origin(hints[name]) is typing.Literal:
            extra = {"choices": [str(c) for c in typing.get_args(hints[name])]}
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name,
                            help=f"sets {name} (built-in default: {defaults[name]})", **extra)
    aliases = aliases or {}
    for flag, key in aliases.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", dest=f"alias_{flag}", metavar="VALUE", help=f"sets {key}")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value")
    args = parser.parse_intermixed_args(argv)   # overrides may come before and after flags
    path = args.config or (CONFIG_DIR / default_config if default_config else None)
    overrides = [f"{name}={getattr(args, name)}" for name in flags if getattr(args, name) is not None]
    overrides += [f"{key}={getattr(args, f'alias_{flag}')}" for flag, key in aliases.items()
                  if getattr(args, f"alias_{flag}") is not None]
    try:
        return load_config(cls, path, overrides + args.overrides)
    except ConfigError as err:
        parser.error(str(err))
        raise  # unreachable: parser.error exits


def dump_config(config: Any) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
