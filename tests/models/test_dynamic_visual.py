import pytest
import torch

from models import DynamicVisualConfig, DynamicVisualTokenizer
from models.attention import WeightedAttention
from models.local_training import sample_batches, train_locally
from workflows.config import CONFIG_DIR, load_config


def test_demo_config_encodes_a_variable_number_of_tokens_per_image(seeded):
    cfg = load_config(DynamicVisualConfig, CONFIG_DIR / "tokenizers" / "dynamic_visual_demo.yaml")
    tok = DynamicVisualTokenizer(cfg).eval()
    codes = tok.encode(torch.rand(4, 3, 32, 32))
    assert len(codes) == 4
    assert all(c.ndim == 1 and 1 <= len(c) <= 16 and c.dtype == torch.long for c in codes)
    assert tok.decode(codes).shape == (4, 3, 32, 32)


def test_weighted_attention_ignores_keys_of_weight_zero(seeded):
    attn = WeightedAttention(8, 2)
    x, ctx = torch.randn(1, 3, 8), torch.randn(1, 4, 8)
    weights = torch.tensor([[[1.0, 1.0, 0.0, 0.0]] * 3])
    changed = ctx.clone()
    changed[:, 2:] = torch.randn(1, 2, 8) * 10
    assert torch.allclose(attn(x, ctx, weights), attn(x, changed, weights), atol=1e-6)


def test_weighted_attention_with_no_keys_adds_nothing(seeded):
    attn = WeightedAttention(8, 2)
    out = attn(torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.zeros(2, 3, 4))
    assert torch.allclose(out, attn.out.bias.expand_as(out), atol=1e-6)


def test_merger_is_causal_over_kept_tokens_and_reads_dropped_ones(seeded, tiny_dynamic_config):
    tok = DynamicVisualTokenizer(tiny_dynamic_config(merger_layers=2)).eval()
    features = torch.randn(1, 16, 32)
    keep = torch.zeros(1, 16)
    keep[0, [1, 4, 9, 12]] = 1
    base = tok._merge(features, keep)
    later_kept = features.clone()
    later_kept[0, 12] += 3 * torch.randn(32)       # a kept token after position 9
    assert torch.allclose(tok._merge(later_kept, keep)[0, [1, 4, 9]], base[0, [1, 4, 9]], atol=1e-5)
    assert not torch.allclose(tok._merge(later_kept, keep)[0, 12], base[0, 12], atol=1e-3)
    dropped = features.clone()
    dropped[0, 15] += 3 * torch.randn(32)          # a dropped token reaches kept ones through cross-attention
    assert not torch.allclose(tok._merge(dropped, keep)[0, 1], base[0, 1], atol=1e-3)


@pytest.fixture(scope="module")
def trained_dynamic(digits):
    """The tiny dynamic tokenizer after 250 steps on 512 real digits (target keep ratio 1/3)."""
    from models import DynamicVisualConfig, QuantizerConfig

    torch.manual_seed(0)
    cfg = DynamicVisualConfig(image_size=32, patch_size=8, feature_dim=32, heads=2, merger_layers=1, decoder_layers=1,
                              pixel_channels=16, quantizer=QuantizerConfig(codebook_size=64, code_dim=16))
    tok = DynamicVisualTokenizer(cfg)
    history = train_locally(tok, sample_batches(digits[0][:512], 32), steps=250, lr=2e-3)
    return tok, history


@pytest.mark.parametrize("target", [0.25, 0.4])
def test_keep_ratio_follows_its_target_in_training_and_at_inference(digits, seeded, target, tiny_dynamic_config):
    tok = DynamicVisualTokenizer(tiny_dynamic_config(keep_ratio=target))
    history = train_locally(tok, sample_batches(digits[0][:512], 32), steps=250, lr=2e-3)
    trained = sum(h["keep_ratio"] for h in history[-20:]) / 20
    assert abs(trained - target) < 0.05, trained
    counts = torch.tensor([len(c) for c in tok.encode(digits[0][1600:1700])], dtype=torch.float32)
    assert abs(counts.mean() / 16 - target) < 0.08, counts.mean()


def test_token_count_follows_image_content(trained_dynamic, digits):
    tok, _ = trained_dynamic
    counts = torch.tensor([len(c) for c in tok.encode(digits[0][1600:1700])], dtype=torch.float32)
    blank = len(tok.encode(torch.ones(1, 3, 32, 32))[0])     # an empty sheet: nothing worth a token
    assert counts.std() > 0, "every digit got the same number of tokens"
    assert blank <= counts.min() and blank < counts.mean(), (blank, counts.min(), counts.mean())


def test_learns_to_reconstruct(trained_dynamic, digits):
    tok, history = trained_dynamic
    assert history[-1]["feature_cosine_loss"] < 0.3 * history[0]["feature_cosine_loss"]
    held_out = digits[0][1600:1700]
    mse = torch.mean((tok.decode(tok.encode(held_out)) - held_out) ** 2)
    assert 10 * torch.log10(1 / mse) > 12


def assert_reloads_identically(tok: DynamicVisualTokenizer, path, images: torch.Tensor) -> None:
    tok.save_pretrained(path)
    loaded = DynamicVisualTokenizer.from_pretrained(path)
    codes = tok.encode(images)
    assert [c.tolist() for c in codes] == [c.tolist() for c in loaded.encode(images)]
    assert torch.equal(tok.decode(codes), loaded.decode(codes))


def _save_tiny_vision_model(kind: str, path) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    model = CLIPVisionModel(CLIPVisionConfig(**common)) if kind == "clip" else ViTModel(ViTConfig(**common))
    model.save_pretrained(path)


@pytest.mark.parametrize("kind", ["clip", "vit"])
def test_frozen_hugging_face_vision_encoder_from_a_path(tmp_path, digits, seeded, kind, tiny_dynamic_config):
    _save_tiny_vision_model(kind, tmp_path / "encoder")
    cfg = tiny_dynamic_config(vision_encoder=str(tmp_path / "encoder"), feature_dim=999, patch_size=4)
    tok = DynamicVisualTokenizer(cfg)
    assert (tok.config.feature_dim, tok.config.patch_size, tok.config.num_patches) == (32, 8, 16)
    frozen = {n: p.clone() for n, p in tok.vision_encoder.named_parameters()}
    assert not any(p.requires_grad for p in tok.vision_encoder.parameters())
    train_locally(tok, sample_batches(digits[0][:64], 16), steps=3)
    assert all(torch.equal(frozen[n], p) for n, p in tok.vision_encoder.named_parameters())
    assert_reloads_identically(tok, tmp_path / "tok", digits[0][:8])


def test_save_and_load_give_identical_outputs(tmp_path, digits, seeded, tiny_dynamic_config):
    tok = DynamicVisualTokenizer(tiny_dynamic_config())
    train_locally(tok, sample_batches(digits[0][:64], 16), steps=3)
    assert_reloads_identically(tok, tmp_path / "tok", digits[0][:8])


def test_a_model_that_is_no_vision_encoder_is_refused(tmp_path, tiny_dynamic_config):
    from transformers import GPT2Config, GPT2Model

    GPT2Model(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50)).save_pretrained(tmp_path / "gpt")
    with pytest.raises(ValueError, match="expected a vision model"):
        DynamicVisualTokenizer(tiny_dynamic_config(vision_encoder=str(tmp_path / "gpt")))


@pytest.mark.parametrize("codes, message", [
    ([torch.tensor([], dtype=torch.long)], "empty"),
    ([torch.tensor([1, 64])], r"\[0, 64\)"),
    ([torch.zeros(17, dtype=torch.long)], "at most 16 ids per sequence, got 17"),
    ([torch.zeros(3)], "dtype torch.float32"),
    ([], "at least one sequence"),
])
def test_bad_codes_are_refused(codes, message, tiny_dynamic_config):
    tok = DynamicVisualTokenizer(tiny_dynamic_config())
    with pytest.raises(ValueError, match=message):
        tok.decode(codes)


def test_bad_images_are_refused(tiny_dynamic_config):
    tok = DynamicVisualTokenizer(tiny_dynamic_config())
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        tok.encode(torch.rand(1, 1, 32, 32))
