"""Held-out evaluation of a multimodal LM: closed-set answer ranking, independent judges for generated media,
reconstruction quality. Pure PyTorch + scikit-learn; workflows/evaluate.py runs it on the demo's test split.

Understanding is measured by ranking: for each prompt (bos + media block) every candidate answer is scored by
log p(answer + eos | prompt) under the softmax a text reply is drawn from (the text ids: the grammar lets a
text reply open no media block), and the best-scoring candidate is the prediction. Free-running greedy answers
are measured too (`mentioned_label`), which is what a user of the server sees.
"""
from __future__ import annotations

import re
import time
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models.generation import left_padded
from models.vocabulary import JointVocabulary


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two tensors in [0, 1]."""
    return float(10 * torch.log10(1 / F.mse_loss(a.float(), b.float()).clamp(min=1e-10)))


@torch.no_grad()
def prefill_seconds(model, prompts: Sequence[Sequence[int]], batch_size: int = 32,
                    before_forward: Callable[[torch.Tensor], None] | None = None, repeats: int = 2) -> float:
    """Best wall time over `repeats` of running every prompt once, batched (the prefill a reply starts with, and
    the pass perceptual-token skipping shortens)."""
    device = next(model.parameters()).device
    batches = [left_padded(prompts[i:i + batch_size], device) for i in range(0, len(prompts), batch_size)]

    def run() -> None:
        for ids, mask, positions in batches:
            if before_forward is not None:
                before_forward(ids)
            model.next_token_logits(ids, mask, positions, None, use_cache=False)

    return timed(run, repeats)[1]


@torch.no_grad()
def prompt_answer_logprobs(model, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                           batch_size: int = 32, before_forward: Callable[[torch.Tensor], None] | None = None,
                           cache_tokens: int = 2 ** 19, reply_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, A): log p(answers[a] | prompts[n]) for every prompt and every answer, each answer token scored under
    the softmax a text reply is drawn from: `reply_ids`, the ids the generator's grammar lets a reply that may not
    open a media block hold (`ModalityGrammar.reply_ids`; None: every text id). (Training's softmax outside blocks
    holds the block openings too, and a model that has learned "seven [AUD]" from its spoken-digit rows would
    otherwise score "the digit seven" lower after an image for a reason that is not the image.)

    Each prompt is run once; its KV cache is repeated for all the answers, which are scored in one more forward
    pass. Prompts share a batch by left padding; a batch holds at most `batch_size` prompts and about
    `cache_tokens` cached positions once repeated. `before_forward(ids)` runs before every forward pass with the
    ids that pass processes (PerceptualSkipping.set_tokens, for one)."""
    vocab: JointVocabulary = model.vocab
    reply = torch.arange(vocab.text_size) if reply_ids is None else torch.as_tensor(reply_ids).flatten().cpu()
    column = torch.full((vocab.size,), -1, dtype=torch.long)
    column[reply] = torch.arange(len(reply))
    device = next(model.parameters()).device
    n_answers, width = len(answers), max(map(len, answers))
    if min(map(len, answers)) == 0:
        raise ValueError("an empty answer cannot be scored")
    answer_ids = torch.zeros(n_answers, width, dtype=torch.long)
    answer_mask = torch.zeros(n_answers, width, dtype=torch.long)
    for i, answer in enumerate(answers):
        answer_ids[i, : len(answer)], answer_mask[i, : len(answer)] = torch.as_tensor(list(answer)), 1
    targets = torch.where(answer_mask.bool(), column[answer_ids], 0)
    if (targets[answer_mask.bool()] < 0).any():
        raise ValueError("an answer holds ids a text reply may not hold")
    reply, targets, answer_mask = reply.to(device), targets.to(device), answer_mask.to(device)
    scores, start = [], 0
    while start < len(prompts):
        length = max(map(len, prompts[start:start + batch_size]))
        chunk = prompts[start:start + max(1, min(batch_size, cache_tokens // (n_answers * length)))]
        start += len(chunk)
        ids, mask, prompt_positions = left_padded(chunk, device)
        if before_forward is not None:
            before_forward(ids)
        first, cache = model.next_token_logits(ids, mask, prompt_positions, None, use_cache=True)
        cache.batch_repeat_interleave(n_answers)
        feed = answer_ids.to(device).repeat(len(chunk), 1)                        # (chunk * A, width)
        feed_mask = torch.cat([mask.repeat_interleave(n_answers, 0), answer_mask.repeat(len(chunk), 1)], dim=1)
        positions = mask.sum(-1).repeat_interleave(n_answers)[:, None] + torch.arange(width, device=device)
        if before_forward is not None:
            before_forward(feed)
        rest, _ = model.next_token_logits(feed, feed_mask, positions, cache, use_cache=True, keep=width)
        logits = torch.cat([first.repeat_interleave(n_answers, 0)[:, None], rest[:, :-1]], dim=1)  # (chunk*A, width, V)
        logp = logits[..., reply].float().log_softmax(-1)
        picked = logp.gather(-1, targets.repeat(len(chunk), 1)[..., None])[..., 0]
        scores.append((picked * answer_mask.repeat(len(chunk), 1)).sum(-1).view(len(chunk), n_answers).cpu())
    return torch.cat(scores) if scores else torch.zeros(0, n_answers)


def rank_answers(model, prompts: Sequence[Sequence[int]], candidates: Sequence[Sequence[Sequence[int]]],
                 batch_size: int = 32, before_forward: Callable[[torch.Tensor], None] | None = None,
                 reply_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(N, C) scores: candidates[c] is a list of phrasings (token ids) of candidate c; a candidate scores its
    best phrasing (under prompt_answer_logprobs' `reply_ids`). argmax over dim 1 is the prediction."""
    phrasings = [phrasing for options in candidates for phrasing in options]
    owner = torch.tensor([c for c, options in enumerate(candidates) for _ in options])
    per_prompt = prompt_answer_logprobs(model, prompts, phrasings, batch_size, before_forward, reply_ids=reply_ids)
    scores = torch.full((len(prompts), len(candidates)), float("-inf"))
    for c in range(len(candidates)):
        scores[:, c] = per_prompt[:, owner == c].max(dim=1).values
    return scores


def mentioned_label(text: str, names: Sequence[Sequence[str]]) -> int | None:
    """The label whose name appears first in text as a whole word (names[label] lists its spellings), or None."""
    best, where = None, len(text) + 1
    for label, spellings in enumerate(names):
        for name in spellings:
            match = re.search(rf"(?<![\w]){re.escape(name)}(?![\w])", text, flags=re.IGNORECASE)
            if match and match.start() < where:
                best, where = label, match.start()
    return best


def timed(fn: Callable[[], object], repeats: int = 3) -> tuple[object, float]:
    """fn's result and its best wall time over `repeats` runs (seconds)."""
    best, result = float("inf"), None
    for _ in range(repeats):
        started = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - started)
    return result, best


# --- judges: classifiers trained on the real data, blind to the model -----------------------------------------------
def image_features(images: torch.Tensor, side: int = 16) -> np.ndarray:
    """(N, 3, H, W) in [0, 1] -> (N, side*side) grey levels, area-resized."""
    grey = images.float().mean(dim=1, keepdim=True)
    return F.interpolate(grey, size=(side, side), mode="area").flatten(1).numpy()


def audio_features(waves: Sequence[torch.Tensor], sample_rate: int, segments: int = 4) -> np.ndarray:
    """1-D waveforms -> log-mel means over `segments` equal stretches of the voiced part, and their spread."""
    import torchaudio

    mel = torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=400, hop_length=160, n_mels=40)
    rows = []
    for wave in waves:
        spec = (mel(wave.float()[None])[0] + 1e-5).log()                 # (mels, frames)
        energy = spec.mean(0)
        voiced = (energy > energy.max() - 6).nonzero()[:, 0]           # the word, without the silence around it
        spec = spec[:, int(voiced.min()): int(voiced.max()) + 1] if len(voiced) else spec
        parts = [p.mean(1) for p in torch.tensor_split(spec, segments, dim=1) if p.shape[1]]
        parts += [parts[-1]] * (segments - len(parts))
        rows.append(torch.cat(parts + [spec.std(1)]).numpy())
    return np.stack(rows)


class DigitJudge:
    """A scikit-learn classifier on fixed features: trained on real examples, asked about generated ones.

    `standardize` rescales each feature to unit variance: right for log-mel statistics, wrong for pixels, where
    the real digits' always-white border has almost no variance and the faintest grey there (any reconstruction
    or generated image has some) would be blown up to dominate the verdict."""

    def __init__(self, features: Callable[..., np.ndarray], standardize: bool = False):
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from sklearn.svm import SVC

        self.features = features
        svm = SVC(C=10.0, gamma="scale")
        self.classifier = make_pipeline(StandardScaler(), svm) if standardize else svm

    def fit(self, examples, labels: Sequence[int]) -> "DigitJudge":
        self.classifier.fit(self.features(examples), np.asarray(labels))
        return self

    def predict(self, examples) -> np.ndarray:
        return self.classifier.predict(self.features(examples))

    def accuracy(self, examples, labels: Sequence[int]) -> float:
        return float((self.predict(examples) == np.asarray(labels)).mean())
