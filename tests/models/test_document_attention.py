import pytest
import torch
import torch.nn.functional as F

from models.document_attention import document_attention_forward, document_buckets, documents


def masked_reference(query, key, value, doc_ids):
    """What document attention must equal: SDPA over the whole row under a block-causal mask."""
    t = doc_ids.shape[1]
    same = doc_ids[:, :, None] == doc_ids[:, None, :]
    mask = (same & torch.ones(t, t, dtype=torch.bool).tril())[:, None]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(query, key, value, attn_mask=mask).transpose(1, 2)


class Attention(torch.nn.Module):
    num_key_value_groups = 2


DOCS = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 2, -1, -1],
                     [0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, -1]])


def test_buckets_hold_every_position_once_and_documents_of_similar_length():
    buckets = document_buckets(DOCS)
    placed = torch.cat([b.positions for b in buckets])
    assert sorted(placed.tolist()) == list(range(DOCS.numel()))
    for b in buckets:
        lengths = b.real.sum(1)
        assert lengths.max() <= 2 * lengths.min()
        flat = DOCS.reshape(-1)
        for row, n in zip(b.index, lengths):       # one document each: one id, consecutive positions
            assert len(set(flat[row[:n]].tolist())) == 1 and torch.equal(row[:n], row[0] + torch.arange(n))


def test_document_attention_equals_the_block_causal_mask_in_values_and_gradients():
    torch.manual_seed(0)
    b, t = DOCS.shape
    query = torch.randn(b, 4, t, 8, requires_grad=True)
    key, value = torch.randn(b, 2, t, 8, requires_grad=True), torch.randn(b, 2, t, 8, requires_grad=True)
    with documents(DOCS):
        got, _ = document_attention_forward(Attention(), query, key, value, None, scaling=8 ** -0.5)
    want = masked_reference(query, key, value, DOCS)
    real = DOCS >= 0                                  # padding's outputs are never read
    assert torch.allclose(got[real], want[real], atol=1e-6)
    grads = torch.autograd.grad((got[real] ** 2).sum(), (query, key, value))
    ref = torch.autograd.grad((want[real] ** 2).sum(), (query, key, value))
    for g, r in zip(grads, ref):
        assert torch.allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("growth", [1.0, 2.0, 4.0])
def test_bucketing_does_not_change_the_result(growth):
    torch.manual_seed(1)
    b, t = DOCS.shape
    query, key, value = torch.randn(b, 2, t, 4), torch.randn(b, 2, t, 4), torch.randn(b, 2, t, 4)
    attention = Attention()
    attention.num_key_value_groups = 1
    with documents(DOCS, growth=growth):
        got, _ = document_attention_forward(attention, query, key, value, None)
    real = DOCS >= 0
    assert torch.allclose(got[real], masked_reference(query, key, value, DOCS)[real], atol=1e-6)
