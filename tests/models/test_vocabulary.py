import json

import pytest
import torch

from models.vocabulary import SPECIAL_TOKENS, JointVocabulary


@pytest.fixture
def vocab(text_tokenizer_path):
    return JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 512, "audio": 256})


def test_layout_is_text_then_specials_then_one_range_per_codebook(vocab, text_tokenizer_path):
    from transformers import AutoTokenizer

    text_size = len(AutoTokenizer.from_pretrained(text_tokenizer_path))
    assert vocab.text_size == text_size
    assert [vocab.special_id(t) for t in SPECIAL_TOKENS] == list(range(text_size, text_size + 7))
    image, audio = vocab.codebook_range("image"), vocab.codebook_range("audio")
    assert image == range(text_size + 7, text_size + 7 + 512)
    assert audio == range(image.stop, image.stop + 256)
    assert vocab.size == audio.stop
    assert vocab.codebook_range("video") == image        # frames are tokenized by the image tokenizer


def test_modality_of_every_region(vocab):
    assert vocab.modality_of(0) == "text"
    assert vocab.modality_of(vocab.special_id("[IMG]")) == "special"
    assert vocab.modality_of(vocab.codebook_range("image").start) == "image"
    assert vocab.modality_of(vocab.size - 1) == "audio"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.modality_of(vocab.size)


@pytest.mark.parametrize("local", [0, 511, [0, 5, 511], torch.tensor([[1, 2], [3, 4]])])
def test_to_global_and_back_round_trips_ints_lists_and_tensors(vocab, local):
    back = vocab.to_local("image", vocab.to_global("image", local))
    if isinstance(local, torch.Tensor):
        assert torch.equal(back, local)
    else:
        assert back == local


@pytest.mark.parametrize("call, message", [
    (lambda v: v.to_global("image", 512), r"image code ids: 512 is outside \[0, 512\)"),
    (lambda v: v.to_global("audio", [-1]), r"\[0, 256\)"),
    (lambda v: v.to_local("audio", [5]), "global audio ids"),
    (lambda v: v.to_global("image", torch.tensor([0.5])), "integer ids"),
    (lambda v: v.to_global("smell", [1]), "unknown modality 'smell'"),
    (lambda v: v.special_id("[SMELL]"), "unknown special token"),
])
def test_out_of_range_and_unknown_names_are_refused(vocab, call, message):
    with pytest.raises(ValueError, match=message):
        call(vocab)


def test_video_can_bring_a_codebook_of_its_own(text_tokenizer_path):
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 8, "audio": 4, "video": 16})
    assert vocab.codebook_range("video").start == vocab.codebook_range("audio").stop
    assert vocab.size == vocab.codebook_range("video").stop
    assert vocab.modality_of(vocab.size - 1) == "video"


def test_a_modality_without_its_codebook_is_refused(text_tokenizer_path):
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"audio": 16})
    with pytest.raises(ValueError, match="no 'image' codebook"):
        vocab.to_global("video", [1])


def test_wrap_and_unwrap_image_audio_and_video_blocks(vocab):
    image = torch.tensor([0, 7, 511])
    ids = vocab.wrap("image", image)
    assert ids[0] == vocab.special_id("[IMG]") and ids[-1] == vocab.special_id("[/IMG]")
    assert torch.equal(vocab.unwrap("image", ids), image)
    audio = torch.tensor([3, 2, 1])
    assert torch.equal(vocab.unwrap("audio", vocab.wrap("audio", audio)), audio)
    video = torch.tensor([[1, 2], [3, 4], [5, 6]])
    ids = vocab.wrap("video", video)
    assert ids.count(vocab.special_id("[FRAME]")) == 2
    assert ids[0] == vocab.special_id("[VID]") and ids[-1] == vocab.special_id("[/VID]")
    assert torch.equal(torch.stack(vocab.unwrap("video", ids)), video)
    with pytest.raises(ValueError, match=r"must start with \[AUD\]"):
        vocab.unwrap("audio", ids)


def test_save_and_load_round_trip(vocab, tmp_path):
    vocab.save_pretrained(tmp_path)
    assert JointVocabulary.from_pretrained(tmp_path) == vocab


def test_a_damaged_vocabulary_file_is_named(vocab, tmp_path):
    vocab.save_pretrained(tmp_path)
    file = tmp_path / "vocabulary.json"
    data = json.loads(file.read_text())
    data["codebooks"][0]["offset"] += 1
    file.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=str(file)):
        JointVocabulary.from_pretrained(tmp_path)
    file.write_text("{not json")
    with pytest.raises(ValueError, match=f"damaged JSON in {file}"):
        JointVocabulary.from_pretrained(tmp_path)
    file.unlink()
    with pytest.raises(FileNotFoundError, match=str(file)):
        JointVocabulary.from_pretrained(tmp_path)


def test_block_state_marks_the_inside_of_each_block_and_the_groups_follow_the_grammar(text_tokenizer_path):
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 4, "audio": 3})
    img, aud = vocab.wrap("image", torch.tensor([0, 1])), vocab.wrap("audio", torch.tensor([2]))
    vid = vocab.wrap("video", torch.tensor([[3], [0]]))
    ids = torch.tensor([[5] + img + [6] + aud + vid + [7]])
    assert vocab.grammar_modalities() == ["image", "audio", "video"]          # video shares the image codebook
    assert vocab.block_state(ids)[0].tolist() == [0, 1, 1, 1, 0, 0, 2, 2, 0, 3, 3, 3, 3, 0, 0]
    outside, image, audio, video = (set(g.tolist()) for g in vocab.grammar_groups())
    assert outside == set(range(vocab.text_size + 7))
    assert image == set(vocab.codebook_range("image")) | {vocab.special_id("[/IMG]")}
    assert audio == set(vocab.codebook_range("audio")) | {vocab.special_id("[/AUD]")}
    assert video == set(vocab.codebook_range("image")) | {vocab.special_id("[/VID]"), vocab.special_id("[FRAME]")}
