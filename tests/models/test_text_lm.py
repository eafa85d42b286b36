import pytest
from transformers import AutoTokenizer

from models.text_lm import packed_text_batch


def test_packed_text_batch_fills_rows_with_whole_documents(text_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    texts = [f"a handwritten {d}" for d in range(10)]
    batch = packed_text_batch(tok, texts, context=16)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape[1] == 16 and ids.shape == mask.shape
    stream = ids[mask.bool()].tolist()
    # every text appears once, in order, with the tokenizer's <s>/</s> where it has them; only the last row is padded
    expected = []
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    for t in texts:
        expected += bos + tok(t, add_special_tokens=False)["input_ids"] + eos
    assert stream == expected
    assert mask[:-1].all() and ids.shape[0] == -(-len(expected) // 16)


def test_packed_text_batch_rejects_only_empty_texts(text_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    if tok.bos_token_id is None and tok.eos_token_id is None:
        with pytest.raises(ValueError, match="empty"):
            packed_text_batch(tok, ["", ""], context=8)
    else:
        assert packed_text_batch(tok, ["", ""], context=8)["attention_mask"].sum() >= 2
