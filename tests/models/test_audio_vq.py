import pytest
import torch

from models import AudioVQConfig, AudioVQTokenizer
from models.local_training import sample_batches, train_locally
from workflows.config import CONFIG_DIR, load_config


def test_demo_config_gives_25_tokens_per_second(seeded):
    tok = AudioVQTokenizer(load_config(AudioVQConfig, CONFIG_DIR / "tokenizers" / "audio_vq_demo.yaml")).eval()
    assert tok.config.tokens_per_second == 25.0
    for seconds in (1, 2, 4):
        codes = tok.encode(torch.zeros(1, 16000 * seconds))
        assert abs(codes.shape[1] - 25 * seconds) <= 1
        assert codes.shape[1] == tok.num_tokens(16000 * seconds)


def test_round_trip_returns_sound_of_about_the_same_length(seeded, tiny_audio_config):
    tok = AudioVQTokenizer(tiny_audio_config()).eval()
    waves = torch.randn(2, 8000) * 0.1
    codes = tok.encode(waves)
    assert codes.shape == (2, tok.num_tokens(8000))
    sound = tok.decode(codes)
    assert sound.shape[0] == 2 and abs(sound.shape[1] - 8000) <= tok.config.hop_length * tok.config.frames_per_token
    assert sound.abs().max() <= 1


def test_learns_spoken_digits_within_seconds(spoken_digits, seeded, tiny_audio_config):
    waves, _ = spoken_digits
    tok = AudioVQTokenizer(tiny_audio_config())
    history = train_locally(tok, sample_batches(waves[:30], 10), steps=60, lr=3e-3)
    assert history[-1]["mel_l1"] < 0.4 * history[0]["mel_l1"]
    held_out = waves[30:]
    l1 = (tok.decode_mel(tok.encode(held_out)) - tok.log_mel(held_out)).abs().mean()
    assert l1 < 0.35, float(l1)


def test_save_and_load_give_identical_outputs(tmp_path, spoken_digits, seeded, tiny_audio_config):
    waves, _ = spoken_digits
    tok = AudioVQTokenizer(tiny_audio_config())
    train_locally(tok, sample_batches(waves, 8), steps=2)
    tok.save_pretrained(tmp_path / "audio")
    loaded = AudioVQTokenizer.from_pretrained(tmp_path / "audio")
    codes = tok.encode(waves[:4])
    assert torch.equal(codes, loaded.encode(waves[:4]))
    assert torch.equal(tok.decode_mel(codes), loaded.decode_mel(codes))


@pytest.mark.parametrize("waves, message", [
    (torch.zeros(2, 0), "empty"),
    (torch.zeros(0, 100), "empty"),
    (torch.zeros(2, 2, 100), r"\(B, samples\).*got shape \(2, 2, 100\)"),
    (torch.zeros(2, 100, dtype=torch.int16), "got dtype torch.int16"),
])
def test_bad_waveforms_are_refused(waves, message, tiny_audio_config):
    with pytest.raises(ValueError, match=message):
        AudioVQTokenizer(tiny_audio_config()).encode(waves)


def test_out_of_range_codes_are_refused(tiny_audio_config):
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        AudioVQTokenizer(tiny_audio_config()).decode(torch.tensor([[3, 64]]))
