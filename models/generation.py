"""Batched autoregressive decoding over the MultimodalLM: a KV cache, the modality grammar, per-request sampling.

Prompts of different lengths share one batch through left padding, a 2-D attention mask and per-row position
ids. Every row has its own sampling parameters and its own seeded random generator, so a request draws the
same tokens whatever else shares its batch. The grammar keeps every row well-formed: text outside blocks,
after `[IMG]` only image codes (exactly the tokenizer's count, or 1..max for a dynamic tokenizer) and then
`[/IMG]`, likewise audio and video (frames split by `[FRAME]`), and a block opens only when the row's token
budget can still close it.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from models.vocabulary import BOUNDARIES, FRAME_SEPARATOR, JointVocabulary

logger = logging.getLogger(__name__)

OUTPUT_MODALITIES = ("text", "image", "audio", "video")
MAX_BEST_OF = 64


@dataclass
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0           # 0: greedy
    top_p: float = 1.0                 # nucleus: keep the smallest set of ids whose probability reaches top_p
    top_k: int = 0                     # 0: no top-k cut
    seed: int | None = None            # the same seed and request give the same tokens; None: a fresh seed
    modalities: tuple[str, ...] = ("text",)   # what the reply may hold; one media modality alone forces that block
    guidance_scale: float = 1.0        # classifier-free guidance inside media blocks; 1: off
    best_of: int = 1                   # a media-only reply: draw this many, keep the one the model reads the prompt
                                       # back from most likely (TokenGenerator.pick); 1: off

    def validate(self) -> "SamplingParams":
        """Raise ValueError naming the first bad parameter; returns self."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not _finite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not _finite(self.guidance_scale) or self.guidance_scale < 1:
            raise ValueError(f"guidance_scale must be a number >= 1, got {self.guidance_scale!r}")
        modalities = tuple(self.modalities)
        if not modalities or any(m not in OUTPUT_MODALITIES for m in modalities) or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities must be distinct names from {list(OUTPUT_MODALITIES)}, got {list(modalities)}")
        if "text" not in modalities and len(modalities) > 1:
            raise ValueError(f"modalities {list(modalities)}: without text, ask for exactly one media modality")
        self.modalities = modalities
        if isinstance(self.best_of, bool) or not isinstance(self.best_of, int) or not 1 <= self.best_of <= MAX_BEST_OF:
            raise ValueError(f"best_of must be an integer in [1, {MAX_BEST_OF}], got {self.best_of!r}")
        if self.best_of > 1 and self.forced is None:
            raise ValueError("best_of > 1 ranks media replies: ask for exactly one media modality (no text)")
        return self

    def candidates(self) -> list["SamplingParams"]:
        """The best_of draws of this (seeded) request: candidate 0 is the request itself, the others' seeds are
        spread far apart (image i of n, seeded seed + i, never shares a candidate with image i + 1)."""
        if self.seed is None:
            raise ValueError("pin the seed first (with_seed)")
        return [replace(self, seed=(self.seed + j * 0x9E3779B97F4A7C15) % 2 ** 63, best_of=1)
                for j in range(self.best_of)]

    @property
    def forced(self) -> str | None:
        """The media modality whose block must open first (a media-only request), else None."""
        return self.modalities[0] if "text" not in self.modalities else None


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class BlockShape:
    """How many codes one block of a modality holds: exactly `exact`, or 1..`maximum`; video has frames."""

    maximum: int
    exact: bool = False
    max_frames: int = 1                # > 1: frames of `maximum` codes each, split by [FRAME]

    @property
    def min_tokens(self) -> int:
        """The shortest complete block, boundaries included."""
        return (self.maximum if self.exact else 1) + 2

    @property
    def max_tokens(self) -> int:
        """The longest complete block, boundaries and frame separators included."""
        return self.maximum * self.max_frames + (self.max_frames - 1) + 2


@dataclass
class Generation:
    """One request's output: the new ids (eos included when it stopped there), why it stopped, its seed."""

    ids: list[int]
    finish_reason: str                 # "stop" (eos) or "length" (max_new_tokens)
    seed: int
    prompt_tokens: int
    candidate: int = 0                 # of a best_of request: which draw was kept (its seed: params.candidates())


class ModalityGrammar:
    """The legal next ids of a row, from its state: outside blocks, or how far into which block it is."""

    def __init__(self, vocab: JointVocabulary, shapes: dict[str, BlockShape], eos_id: int,
                 banned_text_ids: Sequence[int] = ()):
        unknown = sorted(set(shapes) - set(BOUNDARIES))
        if unknown:
            raise ValueError(f"no block grammar for {unknown[0]!r} (known: {sorted(BOUNDARIES)})")
        if not 0 <= eos_id < vocab.text_size:
            raise ValueError(f"eos id {eos_id} is not a text id of this vocabulary")
        self.vocab, self.shapes, self.eos_id = vocab, dict(shapes), eos_id
        text = torch.zeros(vocab.size, dtype=torch.bool)
        text[: vocab.text_size] = True
        text[[i for i in banned_text_ids if i != eos_id]] = False
        self._text = text
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def modalities(self) -> list[str]:
        return list(self.shapes)

    @property
    def reply_ids(self) -> torch.Tensor:
        """The ids a text reply may hold: the text ids but the banned ones, eos included."""
        return self.mask(("text",), ("eos",)).nonzero()[:, 0]

    def row(self, params: SamplingParams) -> "RowState":
        missing = [m for m in params.modalities if m != "text" and m not in self.shapes]
        if missing:
            raise ValueError(f"this model cannot produce {missing[0]} (it produces: {['text', *self.shapes]})")
        forced = params.forced
        if forced and params.max_new_tokens < self.shapes[forced].min_tokens:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} is too small for one {forced} block "
                             f"({self.shapes[forced].min_tokens} tokens)")
        return RowState(self, params)

    def mask(self, *parts: tuple) -> torch.Tensor:
        """Union of named id sets, cached: ('text',), ('eos',), ('open', m), ('codes', m), ('close', m), ('frame',)."""
        key = tuple(sorted(parts))
        if key not in self._cache:
            allowed = torch.zeros(self.vocab.size, dtype=torch.bool)
            for part in parts:
                name = part[0]
                if name == "text":
                    allowed |= self._text
                elif name == "eos":
                    allowed[self.eos_id] = True
                elif name == "open":
                    allowed[self.vocab.special_id(BOUNDARIES[part[1]][0])] = True
                elif name == "close":
                    allowed[self.vocab.special_id(BOUNDARIES[part[1]][1])] = True
                elif name == "frame":
                    allowed[self.vocab.special_id(FRAME_SEPARATOR)] = True
                elif name == "codes":
                    r = self.vocab.codebook_range(part[1])
                    allowed[r.start: r.stop] = True
                else:
                    raise ValueError(f"unknown id set {part!r}")
            self._cache[key] = allowed
        return self._cache[key]


class RowState:
    """Where one row stands: outside blocks ('text') or inside one, with its code and frame counts."""

    def __init__(self, grammar: ModalityGrammar, params: SamplingParams):
        self.grammar, self.params = grammar, params
        self.mode = "text"
        self.codes = 0                 # codes in the current block (video: in the current frame)
        self.frames = 0                # completed video frames before the current one
        self.blocks = 0
        self.done = False

    def allowed(self, remaining: int) -> torch.Tensor:
        """(V,) bool: the ids this row may take next, with `remaining` tokens left including this one."""
        g, p = self.grammar, self.params
        if self.mode == "text":
            parts: list[tuple] = []
            if p.forced is not None:
                return g.mask(("eos",)) if self.blocks else g.mask(("open", p.forced))
            parts += [("text",), ("eos",)]
            parts += [("open", m) for m in p.modalities if m != "text" and remaining >= g.shapes[m].min_tokens]
            return g.mask(*parts)
        shape = g.shapes[self.mode]
        if shape.exact:
            if self.codes < shape.maximum:
                return g.mask(("codes", self.mode))
            # a full frame: another one if frames and tokens allow, else the block closes
            if self.frames + 1 < shape.max_frames and remaining >= shape.maximum + 2:
                return g.mask(("close", self.mode), ("frame",))
            return g.mask(("close", self.mode))
        if self.codes == 0:
            return g.mask(("codes", self.mode))
        if self.codes >= shape.maximum or remaining < 2:
            return g.mask(("close", self.mode))
        return g.mask(("codes", self.mode), ("close", self.mode))

    def advance(self, token: int) -> None:
        vocab = self.grammar.vocab
        if self.mode == "text":
            if token == self.grammar.eos_id:
                self.done = True
            for modality, (start, _) in BOUNDARIES.items():
                if token == vocab.special_id(start):
                    self.mode, self.codes, self.frames = modality, 0, 0
        elif token == vocab.special_id(BOUNDARIES[self.mode][1]):
            self.mode = "text"
            self.blocks += 1
        elif token == vocab.special_id(FRAME_SEPARATOR):
            self.frames += 1
            self.codes = 0
        else:
            self.codes += 1

    @property
    def in_block(self) -> bool:
        return self.mode != "text"


def sample_token(logits: torch.Tensor, allowed: torch.Tensor, params: SamplingParams,
                 generator: torch.Generator) -> int:
    """One id from (V,) logits restricted to `allowed`: greedy at temperature 0, else top-k, top-p, then a draw."""
    logits = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
    if params.temperature == 0:
        return int(logits.argmax())
    logits = logits / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= params.top_p   # keeps the id that crosses top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


@dataclass
class _Rows:
    """The batch being decoded: requests first, then one unconditional twin per guided request."""

    states: list[RowState]
    params: list[SamplingParams]
    generators: list[torch.Generator]
    twin_of: dict[int, int] = field(default_factory=dict)       # twin row -> its request row
    produced: list[list[int]] = field(default_factory=list)


def left_padded(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu", pad_id: int = 0
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one batch: (B, T) ids padded on the left (every row's last token at -1), their
    mask and positions."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):], mask[r, width - len(prompt):] = torch.as_tensor(list(prompt)), 1
    ids, mask = ids.to(device), mask.to(device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def decode_steps(model, grammar: ModalityGrammar, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                 pad_id: int, uncond_prompt: Sequence[int] = (), use_cache: bool = True,
                 context_length: int | None = None) -> Iterator[list[int | None]]:
    """Decode a batch step by step: yields, per step, each request's new id (None once it has finished).

    `model` is a MultimodalLM; `uncond_prompt` starts the unconditional twin of a request with
    guidance_scale > 1 (the twin only sees the request's media blocks, as the unconditional documents of
    training show them: bos, then the block).
    """
    if len(prompts) != len(params) or not prompts:
        raise ValueError(f"expected one SamplingParams per prompt and at least one prompt, got {len(prompts)} "
                         f"prompts and {len(params)} params")
    for prompt, p in zip(prompts, params):
        check_request(grammar, prompt, p, context_length)
    params = [with_seed(p) for p in params]
    rows = _Rows(states=[grammar.row(p) for p in params], params=params,
                 generators=[torch.Generator().manual_seed(p.seed) for p in params])
    all_prompts = [list(map(int, p)) for p in prompts]
    for i, p in enumerate(params):
        if p.guidance_scale > 1:
            if not uncond_prompt:
                raise ValueError("guidance_scale > 1 needs an unconditional prompt (the text tokenizer's bos)")
            rows.twin_of[len(all_prompts)] = i
            all_prompts.append(list(uncond_prompt))
    device = next(model.parameters()).device
    n = len(all_prompts)
    ids, mask, positions = left_padded(all_prompts, device, pad_id)
    next_position = mask.sum(-1)                   # (n,)
    budget = max(p.max_new_tokens for p in params)
    cache = None
    feed_ids, feed_mask, feed_positions = ids, mask, positions
    for step in range(budget):
        with torch.no_grad():
            logits, cache = model.next_token_logits(feed_ids, feed_mask, feed_positions, cache if use_cache else None,
                                                    use_cache=use_cache)           # (n, V)
        new = torch.full((n,), pad_id, dtype=torch.long)
        new_mask = torch.zeros(n, dtype=torch.long)
        out: list[int | None] = []
        for r in range(len(params)):
            state, p = rows.states[r], rows.params[r]
            if state.done:
                out.append(None)
                continue
            row_logits = logits[r]
            twin = next((t for t, owner in rows.twin_of.items() if owner == r), None)
            if twin is not None and state.in_block:
                row_logits = logits[twin] + p.guidance_scale * (logits[r] - logits[twin])
            token = sample_token(row_logits, state.allowed(p.max_new_tokens - step), p, rows.generators[r])
            was_in_block = state.in_block
            state.advance(token)
            in_block = was_in_block or state.in_block      # a block's opening, codes and closing reach the twin
            if step + 1 >= p.max_new_tokens:
                state.done = True
            new[r], new_mask[r] = token, 1
            if twin is not None and in_block:
                new[twin], new_mask[twin] = token, 1
            out.append(token)
        yield out
        if all(s.done for s in rows.states):
            return
        new, new_mask = new.to(device), new_mask.to(device)
        new_positions = next_position.clone()
        next_position = next_position + new_mask
        if use_cache:
            feed_ids, feed_positions = new[:, None], new_positions[:, None]
            feed_mask = torch.cat([feed_mask, new_mask[:, None]], dim=1)
        else:
            feed_ids = torch.cat([feed_ids, new[:, None]], dim=1)
            feed_mask = torch.cat([feed_mask, new_mask[:, None]], dim=1)
            feed_positions = torch.cat([feed_positions, new_positions[:, None]], dim=1)


def check_request(grammar: ModalityGrammar, prompt: Sequence[int], params: SamplingParams,
                  context_length: int | None = None) -> None:
    """Raise ValueError for a request that cannot be decoded: bad parameters, ids, or too long for the context."""
    params.validate()
    grammar.row(params)
    if not prompt:
        raise ValueError("the prompt is empty")
    if not all(0 <= int(t) < grammar.vocab.size for t in prompt):
        raise ValueError(f"the prompt holds ids outside the vocabulary [0, {grammar.vocab.size})")
    if params.best_of > 1 and not all(int(t) < grammar.vocab.text_size for t in prompt):
        raise ValueError("best_of > 1 ranks replies by how well they give back the prompt's text: the prompt must "
                         "be text only")
    if context_length is not None and len(prompt) + params.max_new_tokens > context_length:
        raise ValueError(f"{len(prompt)} prompt tokens + max_new_tokens {params.max_new_tokens} exceed the context "
                         f"length {context_length}")


def generate(model, grammar: ModalityGrammar, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
             pad_id: int, uncond_prompt: Sequence[int] = (), use_cache: bool = True,
             context_length: int | None = None) -> list[Generation]:
    """Decode a batch to the end: one Generation per prompt."""
    params = [with_seed(p) for p in params]
    produced: list[list[int]] = [[] for _ in prompts]
    for step in decode_steps(model, grammar, prompts, params, pad_id, uncond_prompt, use_cache, context_length):
        for r, token in enumerate(step):
            if token is not None:
                produced[r].append(token)
    return [Generation(ids, finish_reason(ids, grammar.eos_id), p.seed, len(prompt))
            for ids, p, prompt in zip(produced, params, prompts)]


def with_seed(params: SamplingParams) -> SamplingParams:
    """The params with a concrete seed: the given one, or a fresh random one to report back."""
    if params.seed is not None:
        return params
    return replace(params, seed=random.SystemRandom().randrange(2 ** 63))


def finish_reason(ids: Sequence[int], eos_id: int) -> str:
    return "stop" if ids and ids[-1] == eos_id else "length"
