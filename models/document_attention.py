"""Attention over packed rows, computed within each document instead of over the whole row.

A packed training row holds many short documents (an image document is ~70 tokens of a 1,024-token row). A
block-causal mask gives the right answer but leaves SDPA to compute every (query, key) pair of the row and
throw most away: at the demo's size that was a third of a TEAL step. Here the documents of a batch are gathered
into a few padded batches of similar length (one SDPA call each, causal) and the outputs scattered back, which
is the same arithmetic as the mask minus the pairs it discards.

The LLM is switched to this attention by name (`DOCUMENT_ATTENTION`); outside `documents(doc_ids)` (generation
with a KV cache, a plain forward) it is Hugging Face's SDPA attention, unchanged.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

DOCUMENT_ATTENTION = "anytoken_documents"


@dataclass
class Bucket:
    index: torch.Tensor     # (n, L) positions in the flattened (B*T) batch; padding repeats a real position
    real: torch.Tensor      # (n, L) bool: which entries are a document's own tokens
    positions: torch.Tensor  # index[real]: where the real entries' outputs go (computed once, read every layer)


def document_buckets(doc_ids: torch.Tensor, growth: float = 2.0) -> list[Bucket]:
    """(B, T) document ids (-1 = padding; a document is a run of equal ids in a row) -> the documents grouped in
    buckets whose lengths differ at most by `growth` times, each padded to its longest document. Padding runs
    are grouped too (their outputs are never read), so every position of the batch is in exactly one bucket."""
    b, t = doc_ids.shape
    flat = doc_ids.reshape(-1)
    new_run = torch.ones_like(flat, dtype=torch.bool)
    new_run[1:] = flat[1:] != flat[:-1]
    new_run[::t] = True                                          # a run never crosses rows
    starts = new_run.nonzero()[:, 0]
    lengths = torch.diff(starts, append=torch.tensor([flat.numel()], device=flat.device))
    order = torch.argsort(lengths, descending=True, stable=True)
    starts, lengths = starts[order].tolist(), lengths[order].tolist()
    buckets, i = [], 0
    while i < len(starts):
        longest, j = lengths[i], i
        while j < len(starts) and lengths[j] * growth >= longest:
            j += 1
        offsets = torch.arange(longest, device=flat.device)
        first = torch.tensor(starts[i:j], device=flat.device)[:, None]
        real = offsets[None] < torch.tensor(lengths[i:j], device=flat.device)[:, None]
        index = torch.where(real, first + offsets, first)
        buckets.append(Bucket(index=index, real=real, positions=index[real]))
        i = j
    return buckets


_BUCKETS: contextvars.ContextVar[list[Bucket] | None] = contextvars.ContextVar("document_buckets", default=None)


@contextlib.contextmanager
def documents(doc_ids: torch.Tensor, growth: float = 2.0) -> Iterator[None]:
    """Within this block, the forward pass of an LLM using `DOCUMENT_ATTENTION` attends within these documents."""
    token = _BUCKETS.set(document_buckets(doc_ids, growth))
    try:
        yield
    finally:
        _BUCKETS.reset(token)


def document_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                               scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Hugging Face's attention signature: query (B, H, T, D), key and value (B, H_kv, T, D) -> (B, T, H, D)."""
    buckets = _BUCKETS.get()
    if buckets is None or query.shape[2] != key.shape[2]:           # not a packed forward (or a cached one)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    b, h, t, d = query.shape
    q, k, v = (x.transpose(1, 2).reshape(b * t, h, x.shape[-1]) for x in (query, key, value))
    out = q.new_zeros(b * t, h, value.shape[-1])
    for bucket in buckets:
        got = F.scaled_dot_product_attention(
            q[bucket.index].transpose(1, 2), k[bucket.index].transpose(1, 2), v[bucket.index].transpose(1, 2),
            dropout_p=dropout if module.training else 0.0, scale=scaling, is_causal=True)   # (n, H, L, D)
        # a document's padding sits after its tokens, so causal attention keeps it out of their outputs
        out = out.index_copy(0, bucket.positions, got.transpose(1, 2)[bucket.real])
    return out.view(b, t, h, -1), None


AttentionInterface.register(DOCUMENT_ATTENTION, document_attention_forward)
AttentionMaskInterface.register(DOCUMENT_ATTENTION, sdpa_mask)
