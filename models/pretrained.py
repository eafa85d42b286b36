"""Saving and loading: every saved thing is a folder with config.json and model.safetensors; never pickle."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from models.configuration import ConfigError, config_from_dict, config_to_dict

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1

_REGISTRY: dict[str, type["Pretrained"]] = {}


def read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`; a missing or damaged file raises an error that names it."""
    if not file.is_file():
        raise FileNotFoundError(f"missing file: {file}")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"damaged JSON in {file}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"damaged JSON in {file}: expected an object, got {type(data).__name__}")
    return data


def write_json(file: Path, data: dict[str, Any]) -> None:
    file.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_weights(file: Path) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; a missing or damaged file raises an error that names it."""
    if not file.is_file():
        raise FileNotFoundError(f"missing file: {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"damaged weights in {file}: {err}") from None


def write_weights(file: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state.items():
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.data_ptr() in seen:  # safetensors refuses shared storage; tied weights are saved twice
            tensor = tensor.clone()
        seen.add(tensor.data_ptr())
        tensors[name] = tensor
    save_file(tensors, str(file), metadata=metadata)


def load_weights_into(model: nn.Module, file: Path) -> None:
    """Load a safetensors file into `model`, exactly: every tensor present, of the right shape, nothing extra."""
    state = read_weights(file)
    expected = model.saved_state() if isinstance(model, Pretrained) else model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        details = [f"{label} {names[:5]}" for label, names in
                   (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if names]
        raise ValueError(f"{file} does not fit this model's config: " + "; ".join(details))
    model.load_state_dict(state, strict=len(expected) == len(model.state_dict()))


class Pretrained(nn.Module):
    """Base of every saveable model: a `kind`, a config dataclass, and a folder format.

    Subclasses set `kind` and `config_class`; `Pretrained.from_pretrained(path)` builds whichever
    kind the folder holds, `SomeKind.from_pretrained(path)` insists on that kind.
    """

    kind: ClassVar[str] = ""
    config_class: ClassVar[type] = object

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            _REGISTRY[cls.kind] = cls

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / CONFIG_FILE,
                   {"kind": self.kind, "format_version": FORMAT_VERSION, "config": config_to_dict(self.config)})
        write_weights(path / WEIGHTS_FILE, self.saved_state(), metadata={"kind": self.kind})
        self._save_extra(path)
        return path

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu") -> "Pretrained":
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"missing model folder: {path}")
        meta = read_json(path / CONFIG_FILE)
        kind = meta.get("kind")
        if kind not in _REGISTRY:
            raise ValueError(f"{path / CONFIG_FILE}: unknown kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})")
        target = _REGISTRY[kind]
        if cls.kind and target is not cls:
            raise ValueError(f"{path / CONFIG_FILE}: holds a {kind!r}, not a {cls.kind!r}")
        try:
            config = config_from_dict(target.config_class, meta.get("config"))
        except ConfigError as err:
            raise ValueError(f"{path / CONFIG_FILE}: {err}") from None
        model = target._build_for_loading(config, path)
        load_weights_into(model, path / WEIGHTS_FILE)
        return model.to(map_location).eval()

    @classmethod
    def _build_for_loading(cls, config: Any, path: Path) -> "Pretrained":
        """The model to load weights into; kinds with extra files in their folder override this."""
        return cls(config)

    def _save_extra(self, path: Path) -> None:
        """Write files beyond config and weights; kinds that need them override this."""

    def saved_state(self) -> dict[str, torch.Tensor]:
        """The tensors model.safetensors holds: all of them, unless a kind keeps frozen parts elsewhere."""
        return self.state_dict()

    def optimizer_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        """The trainable parameters as (parameters, learning-rate multiple) groups for the optimiser: one group at
        the base rate, unless a kind trains some parts faster (LoRA+ in the TEAL model)."""
        return [([p for p in self.parameters() if p.requires_grad], 1.0)]

    def start_from(self, other: "Pretrained") -> None:
        """Take the weights of a model of another kind; kinds that can override this."""
        raise ValueError(f"a {self.kind!r} cannot start from a {other.kind!r} folder")


def _register_all() -> None:
    import models  # noqa: F401  (the tokenizers)
    import models.clip  # noqa: F401
    import models.multimodal_lm  # noqa: F401
    import models.text_lm  # noqa: F401
    import models.x2l  # noqa: F401


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu") -> Pretrained:
    """Load any saved anytoken model or tokenizer folder, whatever its kind."""
    _register_all()
    return Pretrained.from_pretrained(path, map_location)


def build_model(kind: str, config: dict[str, Any] | None = None, init_from: str | Path | None = None) -> Pretrained:
    """A fresh model of `kind` from a config dict; with `init_from`, the weights of that saved folder (a folder of
    the same kind, or one of another kind that this kind knows how to start from, e.g. video from image_vq)."""
    _register_all()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown model kind {kind!r} (known: {', '.join(sorted(_REGISTRY))})")
    cls = _REGISTRY[kind]
    try:
        model = cls(config_from_dict(cls.config_class, config or {}))
    except ConfigError as err:
        raise ValueError(f"{kind} config: {err}") from None
    if init_from:
        source = read_json(Path(init_from) / CONFIG_FILE).get("kind")
        if source == kind:
            load_weights_into(model, Path(init_from) / WEIGHTS_FILE)
        else:
            model.start_from(load_pretrained(init_from))
    return model
