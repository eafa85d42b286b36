import pytest

from models.sequences import Document, choose_orders, media_text_documents, pack_documents


def test_understanding_targets_the_text_and_generation_targets_the_media():
    block, text = [100, 7, 8, 101], [1, 2, 3]
    und, gen = media_text_documents("x", block, text, ["understanding", "generation"], bos_id=9, eos_id=5)
    assert und.input_ids == [9, 100, 7, 8, 101, 1, 2, 3, 5]
    assert und.loss_mask == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert gen.input_ids == [9, 1, 2, 3, 100, 7, 8, 101, 5]
    assert gen.loss_mask == [0, 0, 0, 0, 1, 1, 1, 1, 1]
    assert (und.sample_id, gen.sample_id) == ("x/understanding", "x/generation")


def test_an_unconditional_document_is_the_media_block_alone_after_bos():
    (uncond,) = media_text_documents("x", [100, 7, 8, 101], [1, 2, 3], ["unconditional"], bos_id=9, eos_id=5)
    assert uncond.input_ids == [9, 100, 7, 8, 101, 5]      # what guidance's twin row reads: bos, then the block
    assert uncond.loss_mask == [0, 1, 1, 1, 1, 1]
    assert uncond.sample_id == "x/unconditional"


def test_unconditional_documents_come_on_top_of_the_captioned_ones_at_their_rate():
    drawn = [choose_orders(f"id{i}", 0, 1.0, 1.0, 0.1) for i in range(2000)]
    assert all(o[:2] == ["understanding", "generation"] for o in drawn)
    share = sum("unconditional" in o for o in drawn) / len(drawn)
    assert 0.08 < share < 0.12
    assert choose_orders("a", 0, 1.0, 0.0, 1.0) == ["understanding", "unconditional"]
    assert all("unconditional" not in choose_orders(f"id{i}", 0, 1.0, 1.0) for i in range(200))


def test_packing_fills_rows_without_crossing_documents():
    docs = [Document(f"d{i}", [i] * n, [1] * n) for i, n in enumerate([5, 3, 6, 2, 8])]
    rows = pack_documents(docs, context_length=8, pad_id=0)
    assert all(len(r.input_ids) == 8 for r in rows)
    assert sorted(s for r in rows for s in r.sample_ids) == sorted(d.sample_id for d in docs)
    for row in rows:
        for doc_id, sample in enumerate(row.sample_ids):
            positions = [i for i, d in enumerate(row.doc_ids) if d == doc_id]
            original = next(d for d in docs if d.sample_id == sample)
            assert positions == list(range(positions[0], positions[0] + len(original.input_ids)))   # contiguous
            assert [row.input_ids[i] for i in positions] == original.input_ids
            assert [row.position_ids[i] for i in positions] == list(range(len(positions)))
        pads = [i for i, d in enumerate(row.doc_ids) if d == -1]
        assert all(row.loss_mask[i] == 0 and row.input_ids[i] == 0 for i in pads)
    # first fit: the 2-token document joins the 5+... row rather than opening a new one
    assert len(rows) == 3


def test_a_document_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="more than the context length 4"):
        pack_documents([Document("long", [1] * 5, [1] * 5)], context_length=4, pad_id=0)


def test_orders_are_drawn_reproducibly_at_the_asked_rates():
    both = [choose_orders(f"id{i}", 0, 1.0, 1.0) for i in range(100)]
    assert all(o == ["understanding", "generation"] for o in both)
    half = [choose_orders(f"id{i}", 0, 1.0, 0.5) for i in range(2000)]
    share = sum("generation" in o for o in half) / len(half)
    assert 0.45 < share < 0.55
    assert half == [choose_orders(f"id{i}", 0, 1.0, 0.5) for i in range(2000)]
    assert choose_orders("a", 0, 0.0, 0.0001) in (["generation"],)
