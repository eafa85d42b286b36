import pytest
import torch
from transformers import AutoTokenizer

from models.clip import ClipConfig, TinyCLIP, load_clip_scorer
from models.local_training import train_locally
from models.x2l import X2LConfig, X2LModel

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def caption_batches(digits, tokenizer, n: int, seed: int = 0):
    images, labels = digits
    generator = torch.Generator().manual_seed(seed)
    while True:
        pick = torch.randperm(500, generator=generator)[:n]
        texts = [f"the digit {WORDS[labels[i]]}" for i in pick.tolist()]
        enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
        yield {"media": images[pick], "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}


def test_tiny_clip_learns_which_word_names_a_digit(digits, text_tokenizer_path, tmp_path, seeded):
    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_path)
    clip = TinyCLIP(ClipConfig(text_vocab_size=len(tokenizer), channels=16))
    history = train_locally(clip, caption_batches(digits, tokenizer, 32), steps=150, lr=3e-3)
    assert history[-1]["loss"] < 0.6 * history[0]["loss"]
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip" / "text_tokenizer")
    scorer = load_clip_scorer(tmp_path / "clip")
    images, labels = digits
    scores = scorer.score(images[1600:1700], WORDS)
    assert scores.shape == (100, 10)
    accuracy = (scores.argmax(dim=1) == torch.as_tensor(labels[1600:1700])).float().mean()
    assert accuracy > 0.3, accuracy          # chance is 0.1


def test_a_hugging_face_clip_folder_also_scores(tmp_path, text_tokenizer_path, digits):
    from transformers import CLIPConfig, CLIPModel

    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_path)
    config = CLIPConfig(text_config={"vocab_size": len(tokenizer), "hidden_size": 16, "intermediate_size": 32,
                                     "num_hidden_layers": 1, "num_attention_heads": 2, "projection_dim": 8},
                        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8,
                                       "projection_dim": 8}, projection_dim=8)
    CLIPModel(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    assert load_clip_scorer(tmp_path / "hf").score(digits[0][:3], WORDS[:4]).shape == (3, 4)


def test_an_unknown_clip_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither"):
        load_clip_scorer(tmp_path)


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_x2l_adapter_learns_to_caption_through_a_frozen_llm(modality, digits, spoken_digits, text_tokenizer_path,
                                                           tiny_llm_path, tmp_path, seeded):
    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_path)
    model = X2LModel(X2LConfig(base_llm=tiny_llm_path, modality=modality, num_queries=4, width=32, layers=1,
                               heads=2, n_mels=32, text_special_ids=[0, 1]))
    llm_before = {n: p.clone() for n, p in model.llm.named_parameters()}
    media, labels = (digits[0][:40], digits[1][:40]) if modality == "image" else spoken_digits

    def batches():
        while True:
            pick = torch.randperm(len(labels))[:8]
            enc = tokenizer([WORDS[int(labels[i])] for i in pick], padding=True, return_tensors="pt",
                            add_special_tokens=False)
            yield {"media": media[pick], "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}

    history = train_locally(model, batches(), steps=400, lr=3e-3)
    assert sum(h["loss"] for h in history[-5:]) / 5 < 0.6 * history[0]["loss"]
    # it reads the media: the true captions are likelier than the same captions shuffled across the media
    enc = tokenizer([WORDS[int(label)] for label in labels], padding=True, return_tensors="pt", add_special_tokens=False)
    true = {"media": media, "text_ids": enc["input_ids"], "text_mask": enc["attention_mask"]}
    shuffled = {**true, "media": media[torch.randperm(len(media), generator=torch.Generator().manual_seed(1))]}
    model.eval()
    with torch.no_grad():
        assert model.training_step(true).loss < 0.8 * model.training_step(shuffled).loss
    assert all(torch.equal(llm_before[n], p) for n, p in model.llm.named_parameters())
    model.save_pretrained(tmp_path / "x2l")
    loaded = X2LModel.from_pretrained(tmp_path / "x2l")
    probe = next(batches())
    assert torch.allclose(model.eval().training_step(probe).loss, loaded.training_step(probe).loss, atol=1e-6)
