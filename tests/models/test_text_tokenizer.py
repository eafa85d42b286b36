from transformers import AutoTokenizer

from models.text_tokenizer import byte_level_tokenizer, train_text_tokenizer


def test_byte_level_tokenizer_round_trips_any_text(tmp_path):
    tok = byte_level_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "a 7 moving left — ünïcödé ✓"
    ids = loaded(text, add_special_tokens=False)["input_ids"]
    assert loaded.decode(ids) == text
    assert len(loaded) == 260 and loaded.eos_token_id is not None and loaded.pad_token_id is not None


def test_trained_tokenizer_uses_fewer_ids_on_its_texts(tmp_path):
    texts = [f"a handwritten {d}" for d in range(10)] * 20 + ["the digit seven"] * 20
    tok = train_text_tokenizer(texts, vocab_size=300)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    ids = loaded("a handwritten 7", add_special_tokens=False)["input_ids"]
    assert len(ids) < len("a handwritten 7") / 2
    assert loaded.decode(ids).strip() == "a handwritten 7"
