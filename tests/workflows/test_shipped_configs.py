"""Every YAML file shipped under workflows/configs/ loads into its dataclass: no stale or misspelt key."""
import pytest

from actors.prepare import PrepareConfig
from actors.serve_config import ServeConfig
from actors.train_jobs import ModelTrainConfig, TealConfig
from models import AudioVQConfig, DynamicVisualConfig, ImageVQConfig, VideoConfig
from models.configuration import config_from_dict
from models.pretrained import _REGISTRY, _register_all
from workflows.config import CONFIG_DIR, load_config, read_yaml
from workflows.demo_data import DemoDataConfig

CLASSES = {"demo_data.yaml": DemoDataConfig, "prepare_demo.yaml": PrepareConfig, "serve.yaml": ServeConfig}
TOKENIZERS = {"image_vq": ImageVQConfig, "dynamic_visual": DynamicVisualConfig, "audio_vq": AudioVQConfig,
              "video": VideoConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    if path.parent.name == "tokenizers":
        cls = next(c for prefix, c in TOKENIZERS.items() if path.stem.startswith(prefix))
    elif path.parent.name == "train":
        cls = TealConfig if path.stem.startswith("teal") else ModelTrainConfig
    elif path.parent.name == "cluster":
        cls = {"prepare.yaml": PrepareConfig, "train.yaml": TealConfig}[path.name]
    else:
        cls = CLASSES[path.name]
    config = load_config(cls, path)
    if isinstance(config, ModelTrainConfig):      # and the model's own fields fit its kind
        _register_all()
        fields = {**(read_yaml(CONFIG_DIR / config.config_file) if config.config_file else {}), **config.config}
        config_from_dict(_REGISTRY[config.kind].config_class, fields)
