"""Training documents (media and text in both orders) and their packing into fixed-length rows.

A document's loss_mask marks its prediction targets: position t counts in the loss when loss_mask[t] == 1,
predicted from the tokens before it. Packed rows keep document ids so attention never crosses documents.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

ORDERS = ("understanding", "generation", "unconditional")


@dataclass
class Document:
    sample_id: str
    input_ids: list[int]
    loss_mask: list[int]


@dataclass
class PackedRow:
    input_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)
    doc_ids: list[int] = field(default_factory=list)       # -1 on padding
    position_ids: list[int] = field(default_factory=list)  # restart at 0 in every document
    sample_ids: list[str] = field(default_factory=list)


def media_text_documents(sample_id: str, media_block: list[int], text_ids: list[int], orders: Iterable[str],
                         bos_id: int | None, eos_id: int) -> list[Document]:
    """One document per order: understanding = [media, text] (text is the target), generation = [text, media],
    unconditional = [media] alone: what classifier-free guidance conditions its twin row on (bos, then the block)."""
    head = [bos_id] if bos_id is not None else []
    docs = []
    for order in orders:
        if order == "understanding":
            context, target = media_block, text_ids + [eos_id]
        elif order == "generation":
            context, target = text_ids, media_block + [eos_id]
        elif order == "unconditional":
            context, target = [], media_block + [eos_id]
        else:
            raise ValueError(f"unknown order {order!r} (known: {list(ORDERS)})")
        docs.append(Document(f"{sample_id}/{order}", head + context + target,
                             [0] * (len(head) + len(context)) + [1] * len(target)))
    return docs


def pack_documents(docs: Iterable[Document], context_length: int, pad_id: int, open_rows: int = 64) -> list[PackedRow]:
    """First fit over the last `open_rows` rows: each document goes into the earliest open row with room.

    Deterministic for a given document order; rows are padded to context_length.
    """
    done: list[PackedRow] = []
    rows: list[PackedRow] = []
    for doc in docs:
        n = len(doc.input_ids)
        if n > context_length:
            raise ValueError(f"document {doc.sample_id} has {n} tokens, more than the context length {context_length}")
        row = next((r for r in rows if len(r.input_ids) + n <= context_length), None)
        if row is None:
            if len(rows) == open_rows:
                done.append(_pad(rows.pop(0), context_length, pad_id))
            row = PackedRow()
            rows.append(row)
        doc_id = len(row.sample_ids)
        row.input_ids += doc.input_ids
        row.loss_mask += doc.loss_mask
        row.doc_ids += [doc_id] * n
        row.position_ids += list(range(n))
        row.sample_ids.append(doc.sample_id)
    return done + [_pad(r, context_length, pad_id) for r in rows]


def _pad(row: PackedRow, context_length: int, pad_id: int) -> PackedRow:
    missing = context_length - len(row.input_ids)
    row.input_ids += [pad_id] * missing
    row.loss_mask += [0] * missing
    row.doc_ids += [-1] * missing
    row.position_ids += [0] * missing
    return row


def choose_orders(sample_id: str, seed: int, understanding: float, generation: float,
                  unconditional: float = 0.0) -> list[str]:
    """Which orders a pair is emitted in: each with its probability, drawn from (seed, id) so reruns agree.

    A pair drawn for neither understanding nor generation is emitted in the more likely one, so every pair yields
    a captioned document; an unconditional document comes on top of those (it leaves the caption out).
    """
    import hashlib

    def draw(order: str) -> float:
        digest = hashlib.sha256(f"{seed}:{sample_id}:{order}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2 ** 64

    orders = [o for o, p in (("understanding", understanding), ("generation", generation)) if draw(o) < p]
    orders = orders or (["understanding"] if understanding >= generation else ["generation"])
    return orders + (["unconditional"] if draw("unconditional") < unconditional else [])
