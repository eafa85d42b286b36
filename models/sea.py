"""SEA: token-level contrastive alignment of modality tokens with the LLM's word embeddings.

Each media token of a document gets a word label: a word of that document's own caption, or, with a CLIP,
a word sampled among the CLIP's top-k words for the decoded media. The token's joint embedding is pulled
towards the LLM's (frozen) input embedding of its label and away from the batch's other labels (InfoNCE).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from models.vocabulary import JointVocabulary


@dataclass
class SeaConfig:
    weight: float = 0.0               # 0: off; the loss is lm_loss + weight * sea_loss
    temperature: float = 0.07         # of the InfoNCE over label embeddings
    clip: str | None = None           # a CLIP folder (anytoken train-clip, or a Hugging Face CLIPModel)
    words: str | None = None          # candidate words, one per line (default: the CLIP folder's words.txt)
    top_k: int = 5                    # labels are drawn among the CLIP's top-k words for the media
    label_temperature: float = 0.1    # softmax temperature over CLIP similarities when drawing a label


def sea_contrastive_loss(z: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """InfoNCE: z (N, D) against label embeddings (U, D); targets (N,) index each z's own label."""
    logits = F.normalize(z.float(), dim=-1) @ F.normalize(labels.float(), dim=-1).t() / temperature
    return F.cross_entropy(logits, targets)


class SeaLabeler:
    """Finds the media tokens of a packed batch and draws each one's word label."""

    cache_size = 200_000          # image blocks whose CLIP word weights are kept

    def __init__(self, config: Any, vocab: "JointVocabulary"):
        self.vocab = vocab
        self.config = config.sea
        self.skip = set(config.text_special_ids)
        self.media_start = vocab.text_size + len(vocab.special_ids)
        self.clip = None
        self._seen: dict[tuple[int, ...], torch.Tensor] = {}    # image block -> its CLIP word weights
        if self.config.clip:
            from transformers import AutoTokenizer

            from models.clip import load_clip_scorer
            from models.pretrained import load_pretrained

            if not (config.tokenizers and config.text_tokenizer):
                raise ValueError("SEA with a CLIP needs model.tokenizers (to decode images) and model.text_tokenizer")
            self.clip = load_clip_scorer(self.config.clip)
            words_file = Path(self.config.words or Path(self.config.clip) / "words.txt")
            self.words = [w.strip() for w in words_file.read_text(encoding="utf-8").splitlines() if w.strip()]
            text = AutoTokenizer.from_pretrained(config.text_tokenizer)
            self.word_ids = [text(" " + w, add_special_tokens=False)["input_ids"] for w in self.words]
            self.image_tokenizer = load_pretrained(Path(config.tokenizers) / "image")
            self.image_tokenizer.requires_grad_(False)

    def _clip_word_weights(self, blocks: list[list[int]]) -> list[torch.Tensor | None]:
        """Per image block (global ids): a softmax over the top-k CLIP words for the image it decodes to, or None
        for a block that does not decode (a partial one: its document falls back to caption words). The blocks
        that decode together are decoded and scored as one batch; a block seen before (the next epoch) is looked
        up: the tokenizer and the CLIP are frozen, so its weights do not change."""
        weights: list[torch.Tensor | None] = [self._seen.get(tuple(ids)) for ids in blocks]
        missing = [i for i, w in enumerate(weights) if w is None]
        for i, w in zip(missing, self._score_blocks([blocks[i] for i in missing])):
            weights[i] = w
            if w is not None and len(self._seen) < self.cache_size:
                self._seen[tuple(blocks[i])] = w
        return weights

    def _score_blocks(self, blocks: list[list[int]]) -> list[torch.Tensor | None]:
        images: list[torch.Tensor | None] = []
        for ids in blocks:
            try:
                codes = torch.as_tensor(self.vocab.to_local("image", ids))
                if hasattr(self.image_tokenizer, "tokens_per_image") and len(codes) != self.image_tokenizer.tokens_per_image:
                    raise ValueError("a partial block")
                images.append(codes)
            except ValueError:
                images.append(None)
        kept = [i for i, codes in enumerate(images) if codes is not None]
        weights: list[torch.Tensor | None] = [None] * len(blocks)
        if not kept:
            return weights
        codes = [images[i] for i in kept]
        try:
            decoded = self.image_tokenizer.decode(torch.stack(codes) if hasattr(self.image_tokenizer, "tokens_per_image")
                                                  else codes)
        except ValueError:       # one block the tokenizer refuses: decode the rest one by one
            decoded, good = [], []
            for i, c in zip(kept, codes):
                try:
                    decoded.append(self.image_tokenizer.decode(c[None] if hasattr(self.image_tokenizer,
                                                                                   "tokens_per_image") else [c]))
                    good.append(i)
                except ValueError:
                    pass
            if not good:
                return weights
            kept, decoded = good, torch.cat(decoded)
        scores = self.clip.score(decoded, self.words)
        top = scores.topk(min(self.config.top_k, len(self.words)), dim=-1)
        for row, i in enumerate(kept):
            w = torch.zeros_like(scores[row])
            w[top.indices[row]] = torch.softmax(top.values[row] / self.config.label_temperature, dim=0)
            weights[i] = w
        return weights

    @torch.no_grad()
    def _labels(self, ids: torch.Tensor, docs: torch.Tensor) -> tuple[list[tuple[int, int]], list[tuple]]:
        image = self.vocab.codebook_range("image") if "image" in self.vocab.codebooks else range(0)
        found = []                                           # (row, media positions, the document's tokens)
        for b in range(ids.shape[0]):
            for doc in docs[b].unique().tolist():
                if doc < 0:
                    continue
                where = (docs[b] == doc).nonzero().flatten()
                tokens = ids[b, where]
                media = where[tokens >= self.media_start]
                if len(media):
                    found.append((b, media, tokens.tolist()))
        blocks = [[t for t in tokens if t in image] for _, _, tokens in found]
        words: list[torch.Tensor | None] = [None] * len(found)
        if self.clip is not None:
            with_image = [i for i, block in enumerate(blocks) if block]
            for i, w in zip(with_image, self._clip_word_weights([blocks[i] for i in with_image])):
                words[i] = w
        positions, keys = [], []
        for (b, media, tokens), weights in zip(found, words):
            if weights is not None:
                drawn = torch.multinomial(weights, len(media), replacement=True).tolist()
                keys += [("word", w) for w in drawn]
            else:
                text = [t for t in tokens if t < self.vocab.text_size and t not in self.skip]
                if not text:
                    continue
                drawn = torch.randint(len(text), (len(media),)).tolist()
                keys += [("token", text[i]) for i in drawn]
            positions += [(b, int(p)) for p in media]
        return positions, keys

    def pairs(self, ids: torch.Tensor, docs: torch.Tensor, embeds: torch.Tensor,
              llm_embedding: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(z, label embeddings, targets) for every media token of the batch, or None if there is none."""
        positions, keys = self._labels(ids, docs)
        if not positions:
            return None
        unique = sorted(set(keys))
        index = {k: i for i, k in enumerate(unique)}
        with torch.no_grad():
            labels = []
            for kind, value in unique:
                spelled = [value] if kind == "token" else self.word_ids[value]
                vectors = llm_embedding(torch.as_tensor(spelled, device=ids.device))
                labels.append(vectors.float().mean(dim=0))
        rows = torch.as_tensor([p[0] for p in positions], device=ids.device)
        cols = torch.as_tensor([p[1] for p in positions], device=ids.device)
        targets = torch.as_tensor([index[k] for k in keys], device=ids.device)
        return embeds[rows, cols], torch.stack(labels), targets
