"""Every YAML file shipped under workflows/configs/ loads into its dataclass: no stale or misspelt key."""
import pytest

from actors.prepare import PrepareConfig
from actors.serve_config import ServeConfig
from models import AudioVQConfig, DynamicVisualConfig, ImageVQConfig, VideoConfig
from workflows.config import CONFIG_DIR, load_config
from workflows.demo_data import DemoDataConfig

CLASSES = {"demo_data.yaml": DemoDataConfig, "prepare_demo.yaml": PrepareConfig, "serve.yaml": ServeConfig}
TOKENIZERS = {"image_vq": ImageVQConfig, "dynamic_visual": DynamicVisualConfig, "audio_vq": AudioVQConfig,
              "video": VideoConfig}


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIG_DIR)))
def test_shipped_config_loads(path):
    if path.parent.name == "tokenizers":
        cls = next(c for prefix, c in TOKENIZERS.items() if path.stem.startswith(prefix))
    else:
        cls = CLASSES[path.name]
    load_config(cls, path)
