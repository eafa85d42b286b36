"""Shared fixtures: real demo-scale data (digits, spoken words) and tiny Hugging Face parts saved to disk."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> tuple[torch.Tensor, np.ndarray]:
    """The real scikit-learn digits at 32px, as the demo data renders them: (1797, 3, 32, 32) and labels."""
    from workflows.demo_data import digit_images

    return digit_images(32)


@pytest.fixture(scope="session")
def spoken_digits() -> tuple[torch.Tensor, list[int]]:
    """espeak-ng speaking each digit word in a few voices: (40, 16000) waveforms at 16 kHz and labels."""
    import torch.nn.functional as F

    from workflows.demo_data import WORDS, speak

    waves, labels = [], []
    for i, voice in enumerate(["en-us", "en-gb+f2", "en-029+m3", "en-gb-scotland"]):
        for label, word in enumerate(WORDS):
            wave = speak(word, voice, pitch=40 + 5 * i, speed=150 + 10 * i, sample_rate=16000)[:16000]
            waves.append(F.pad(wave, (0, 16000 - len(wave))))
            labels.append(label)
    return torch.stack(waves), labels


@pytest.fixture(scope="session")
def text_tokenizer_path(tmp_path_factory) -> str:
    """A tiny word-level Hugging Face tokenizer saved with save_pretrained, as a user's LLM folder would hold."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from workflows.demo_data import WORDS

    words = ["[UNK]", "[PAD]", "a", "the", "digit", "handwritten", "moving", "left", "right", "up", "down", *WORDS]
    words += [str(d) for d in range(10)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]")
    path = tmp_path_factory.mktemp("text_tokenizer")
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture
def tiny_image_vq_config():
    """A factory of ImageVQ configs small enough to train in seconds on 2 cores."""
    from models import ImageVQConfig, QuantizerConfig

    return lambda: ImageVQConfig(image_size=32, channels=16, channel_mult=[1, 2], res_blocks=1,
                         quantizer=QuantizerConfig(codebook_size=64, code_dim=16))


@pytest.fixture
def tiny_dynamic_config():
    """A factory of small dynamic-tokenizer configs: 16 patches of 8px; keyword arguments override."""
    from models import DynamicVisualConfig, QuantizerConfig

    base = dict(image_size=32, patch_size=8, feature_dim=32, heads=2, merger_layers=1, decoder_layers=1,
                pixel_channels=16, quantizer=QuantizerConfig(codebook_size=64, code_dim=16))
    return lambda **overrides: DynamicVisualConfig(**{**base, **overrides})


@pytest.fixture
def tiny_audio_config():
    """A factory of AudioVQ configs small enough to train in seconds on 2 cores."""
    from models import AudioVQConfig, QuantizerConfig

    return lambda: AudioVQConfig(channels=16, n_mels=32, quantizer=QuantizerConfig(codebook_size=64, code_dim=16))


@pytest.fixture
def seeded():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(scope="session")
def media_cases() -> dict[str, tuple[str, bytes, str | None]]:
    """Files a user's data really holds: name -> (modality, bytes, expected rejection reason or None if valid)."""
    import io

    import soundfile
    from PIL import Image

    from models.media import write_mp4
    from workflows.demo_data import digit_images

    rng = np.random.default_rng(0)
    photo = Image.fromarray((rng.random((48, 40, 3)) * 255).astype(np.uint8))

    def save(image: Image.Image, fmt: str, **kwargs) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **kwargs)
        return buffer.getvalue()

    def wav(data: np.ndarray, rate: int) -> bytes:
        buffer = io.BytesIO()
        soundfile.write(buffer, data, rate, format="WAV", subtype="PCM_16")
        return buffer.getvalue()

    jpeg, png = save(photo, "JPEG"), save(photo, "PNG")
    palette = photo.convert("P")
    sixteen = Image.fromarray((rng.random((40, 40)) * 65535).astype(np.uint16))
    t = np.linspace(0, 1, 48000, dtype=np.float32)
    eight_channels = np.stack([np.sin(2 * np.pi * (200 + 50 * c) * t) * 0.3 for c in range(8)], axis=1)
    clip_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"anytoken-case-{os.getpid()}.mp4"
    write_mp4(digit_images(32)[0][:8], clip_path, fps=8)
    mp4 = clip_path.read_bytes()
    clip_path.unlink()
    return {
        "good.png": ("image", png, None),
        "cmyk.jpg": ("image", save(photo.convert("CMYK"), "JPEG"), None),
        "sixteen_bit.png": ("image", save(sixteen, "PNG"), None),
        "palette.png": ("image", save(palette, "PNG", transparency=0), None),
        "corrupt.jpg": ("image", jpeg[:30] + bytes(rng.integers(0, 256, 400, dtype=np.uint8)), "corrupt_image"),
        "truncated.jpg": ("image", jpeg[: len(jpeg) // 3], "corrupt_image"),
        "truncated.png": ("image", png[: len(png) // 2], "corrupt_image"),
        "zero.png": ("image", b"", "empty_file"),
        "bomb.png": ("image", save(Image.new("L", (1500, 1500)), "PNG"), "too_many_pixels"),
        "speech.wav": ("audio", wav(np.sin(np.linspace(0, 800, 8000)).astype(np.float32) * 0.3, 16000), None),
        "eight_channel_48k.wav": ("audio", wav(eight_channels, 48000), None),
        "no_samples.wav": ("audio", wav(np.zeros((0, 1), np.float32), 16000), "no_samples"),
        "text.wav": ("audio", b"this is a text file, not a wave\n", "not_audio"),
        "clip.mp4": ("video", mp4, None),
        "corrupt.mp4": ("video", mp4[: len(mp4) // 2], "corrupt_video"),
    }


@pytest.fixture(scope="module")
def ray_local():
    """One real local Ray per test module: 4 logical CPUs so a 2-worker trainer and a data pool fit on 2 cores."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_llm_path(tmp_path_factory, text_tokenizer_path) -> str:
    """A tiny random Llama for the word-level tokenizer, saved with save_pretrained like any base LLM folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_path)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=None, eos_token_id=None, pad_token_id=tokenizer.pad_token_id,
                         initializer_range=0.2)   # wide enough that inputs can steer the frozen head
    path = tmp_path_factory.mktemp("tiny_llm")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


# --- serving: a tiny exported model folder (models/multimodal_generator.py reads this layout) -----------------
@pytest.fixture(scope="session")
def tiny_exported_model(tmp_path_factory) -> str:
    """An untrained TEAL model in exactly the layout `anytoken train` exports: a random tiny Llama over a byte-level
    text tokenizer (with bos/eos/pad), ImageVQ of 16 codes per 32px image, AudioVQ of 12.5 codes per second, and a
    video tokenizer of 3 frames sharing the image tokenizer's weights."""
    from models import AudioVQConfig, AudioVQTokenizer, ImageVQConfig, ImageVQTokenizer, QuantizerConfig
    from models import VideoConfig, VideoTokenizer
    from models.exported import random_exported_model
    from models.text_tokenizer import byte_level_tokenizer

    torch.manual_seed(0)
    image = ImageVQTokenizer(ImageVQConfig(image_size=32, channels=8, channel_mult=[1, 2, 2], res_blocks=1,
                                           quantizer=QuantizerConfig(codebook_size=32, code_dim=8)))
    audio = AudioVQTokenizer(AudioVQConfig(channels=8, n_mels=16, channel_mult=[1, 2, 2], griffin_lim_iters=4,
                                           quantizer=QuantizerConfig(codebook_size=32, code_dim=8)))
    video = VideoTokenizer(VideoConfig(fps=4.0, max_frames=3), image_tokenizer=image)
    out = tmp_path_factory.mktemp("exported") / "tiny-teal"
    return str(random_exported_model(out, {"image": image, "audio": audio, "video": video}, byte_level_tokenizer()))
