"""Every saveable kind fails loudly, naming the file, on a missing or damaged folder."""
import json

import pytest

from models import (AudioVQTokenizer, DynamicVisualTokenizer, ImageVQTokenizer, Pretrained, VideoConfig,
                    VideoTokenizer, load_pretrained)


@pytest.fixture(params=["image_vq", "dynamic_visual", "audio_vq", "video"])
def saved(request, tmp_path, tiny_image_vq_config, tiny_dynamic_config, tiny_audio_config):
    model = {
        "image_vq": lambda: ImageVQTokenizer(tiny_image_vq_config()),
        "dynamic_visual": lambda: DynamicVisualTokenizer(tiny_dynamic_config()),
        "audio_vq": lambda: AudioVQTokenizer(tiny_audio_config()),
        "video": lambda: VideoTokenizer(VideoConfig(image=tiny_image_vq_config())),
    }[request.param]()
    return model, model.save_pretrained(tmp_path / request.param)


def test_load_pretrained_finds_the_kind_itself(saved):
    model, path = saved
    loaded = load_pretrained(path)
    assert type(loaded) is type(model) and loaded.config == model.config


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_pretrained(tmp_path / "nowhere")


def test_missing_or_damaged_config_is_named(saved):
    _, path = saved
    (path / "config.json").write_text("{ damaged")
    with pytest.raises(ValueError, match=f"damaged JSON in {path / 'config.json'}"):
        load_pretrained(path)
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=str(path / "config.json")):
        load_pretrained(path)


def test_missing_or_damaged_weights_are_named(saved):
    _, path = saved
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=f"damaged weights in {weights}"):
        load_pretrained(path)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match=str(weights)):
        load_pretrained(path)


def test_config_with_an_unknown_key_or_kind_is_named(saved):
    _, path = saved
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**meta, "config": {**meta["config"], "colour": 3}}))
    with pytest.raises(ValueError, match="unknown config key 'colour'"):
        load_pretrained(path)
    (path / "config.json").write_text(json.dumps({**meta, "kind": "teleporter"}))
    with pytest.raises(ValueError, match="unknown kind 'teleporter'"):
        load_pretrained(path)


def test_weights_of_another_size_are_refused(saved, tmp_path):
    model, path = saved
    meta = json.loads((path / "config.json").read_text())
    config = meta["config"]
    quantizer = config["image"]["quantizer"] if "image" in config else config["quantizer"]
    quantizer["codebook_size"] += 1
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors"):
        load_pretrained(path)


def test_a_folder_of_another_kind_is_refused(tmp_path, tiny_image_vq_config):
    path = ImageVQTokenizer(tiny_image_vq_config()).save_pretrained(tmp_path / "image")
    with pytest.raises(ValueError, match="holds a 'image_vq', not a 'audio_vq'"):
        AudioVQTokenizer.from_pretrained(path)
    assert isinstance(Pretrained.from_pretrained(path), ImageVQTokenizer)
