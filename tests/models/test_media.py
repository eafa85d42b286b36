import pytest
import torch

from models.media import image_grid, read_image, read_mp4, read_wav, write_mp4, write_png, write_wav


def test_png_round_trip_is_exact_at_8_bits(tmp_path):
    image = torch.randint(0, 256, (3, 10, 12)).float() / 255
    write_png(image, tmp_path / "a.png")
    assert torch.equal(read_image(tmp_path / "a.png"), image)
    assert torch.equal(read_image((tmp_path / "a.png").read_bytes()), image)


def test_wav_round_trip_at_16_bits(tmp_path):
    wave = torch.sin(torch.linspace(0, 100, 1600)) * 0.5
    write_wav(wave, tmp_path / "a.wav", 16000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and back.shape == (1, 1600)
    assert (back[0] - wave).abs().max() < 1e-4


def test_mp4_needs_even_sizes_and_frames():
    with pytest.raises(ValueError, match="even frame sizes"):
        write_mp4(torch.rand(2, 3, 31, 32), "/tmp/never.mp4", fps=4)
    with pytest.raises(ValueError, match=r"F >= 1"):
        write_mp4(torch.rand(0, 3, 32, 32), "/tmp/never.mp4", fps=4)


def test_mp4_bytes_are_reproducible(tmp_path, digits):
    clip = digits[0][:10]
    write_mp4(clip, tmp_path / "a.mp4", fps=8)
    write_mp4(clip, tmp_path / "b.mp4", fps=8)
    assert (tmp_path / "a.mp4").read_bytes() == (tmp_path / "b.mp4").read_bytes()
    frames, fps = read_mp4((tmp_path / "a.mp4").read_bytes(), max_frames=4)
    assert frames.shape == (4, 3, 32, 32) and fps == 8


def test_image_grid_lays_out_rows():
    grid = image_grid(torch.zeros(5, 3, 4, 4), columns=3, padding=1)
    assert grid.shape == (3, 2 * 5 + 1, 3 * 5 + 1)
    assert grid[:, 0].min() == 1 and grid[:, 1, 1:5].max() == 0
