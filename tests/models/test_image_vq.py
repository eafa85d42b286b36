import pytest
import torch

from models import ImageVQConfig, ImageVQTokenizer, QuantizerConfig
from models.local_training import sample_batches, train_locally
from workflows.config import CONFIG_DIR, load_config


def test_shapes_at_demo_scale(seeded):
    tok = ImageVQTokenizer(load_config(ImageVQConfig, CONFIG_DIR / "tokenizers" / "image_vq_demo.yaml")).eval()
    codes = tok.encode(torch.rand(3, 3, 32, 32))
    assert codes.shape == (3, 16) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < 512
    assert tok.decode(codes).shape == (3, 3, 32, 32)


def test_real_scale_config_gives_16x16_tokens_from_8192_codes(seeded):
    cfg = load_config(ImageVQConfig, CONFIG_DIR / "tokenizers" / "image_vq_256.yaml",
                      ["channels=8"])   # narrow, so one 256px forward pass stays quick on 2 cores
    tok = ImageVQTokenizer(cfg).eval()
    assert tok.codebook_size == 8192 and tok.tokens_per_image == 256
    codes = tok.encode(torch.rand(1, 3, 256, 256))
    assert codes.shape == (1, 256)
    assert tok.decode(codes).shape == (1, 3, 256, 256)


def test_round_trip_gives_images_of_the_input_size_and_range(seeded, tiny_image_vq_config):
    tok = ImageVQTokenizer(tiny_image_vq_config()).eval()
    images = tok.decode(tok.encode(torch.rand(2, 3, 32, 32)))
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0 and images.max() <= 1


def test_learns_real_digits_within_seconds(digits, seeded, tiny_image_vq_config):
    tok = ImageVQTokenizer(tiny_image_vq_config())
    history = train_locally(tok, sample_batches(digits[0][:512], 32), steps=80, lr=3e-3)
    first = sum(h["loss"] for h in history[:5]) / 5
    last = sum(h["loss"] for h in history[-5:]) / 5
    assert last < 0.2 * first
    held_out = digits[0][1600:1700]
    mse = torch.mean((tok.decode(tok.encode(held_out)) - held_out) ** 2)
    psnr = 10 * torch.log10(1 / mse)
    assert psnr > 18, f"PSNR {psnr:.1f} dB"


def test_save_and_load_give_identical_outputs(tmp_path, digits, seeded, tiny_image_vq_config):
    tok = ImageVQTokenizer(tiny_image_vq_config())
    train_locally(tok, sample_batches(digits[0][:64], 16), steps=3)
    tok.save_pretrained(tmp_path / "tok")
    loaded = ImageVQTokenizer.from_pretrained(tmp_path / "tok")
    x = digits[0][:8]
    assert torch.equal(tok.encode(x), loaded.encode(x))
    assert torch.equal(tok.decode(tok.encode(x)), loaded.decode(loaded.encode(x)))
    assert loaded.config == tok.config


@pytest.mark.parametrize("images, message", [
    (torch.rand(2, 3, 16, 16), r"shape \(B, 3, 32, 32\).*got shape \(2, 3, 16, 16\)"),
    (torch.rand(3, 32, 32), r"got shape \(3, 32, 32\)"),
    ((torch.rand(2, 3, 32, 32) * 255).to(torch.uint8), "got dtype torch.uint8"),
    (torch.rand(0, 3, 32, 32), "empty batch"),
    ([[0.5]], "got list"),
])
def test_bad_images_are_refused_with_what_was_expected(images, message, tiny_image_vq_config):
    tok = ImageVQTokenizer(tiny_image_vq_config())
    with pytest.raises(ValueError, match=message):
        tok.encode(images)


@pytest.mark.parametrize("codes, message", [
    (torch.full((1, 64), 64), r"ids must lie in \[0, 64\), got values in \[64, 64\]"),
    (torch.full((1, 64), -1), r"\[0, 64\)"),
    (torch.zeros(1, 10, dtype=torch.long), "expected 64 ids per image, got 10"),
    (torch.zeros(1, 64), "got dtype torch.float32"),
    (torch.zeros(1, 0, dtype=torch.long), "empty"),
    (torch.zeros(64, dtype=torch.long), r"expected 2 dimensions"),
])
def test_bad_codes_are_refused_with_what_was_expected(codes, message, tiny_image_vq_config):
    tok = ImageVQTokenizer(tiny_image_vq_config())
    with pytest.raises(ValueError, match=message):
        tok.decode(codes)


def test_image_size_must_fit_the_downsampling():
    with pytest.raises(ValueError, match="not divisible"):
        ImageVQTokenizer(ImageVQConfig(image_size=30, quantizer=QuantizerConfig()))
