"""JointVocabulary: the one owner of the global id layout — text ids, then special tokens, then one range per codebook."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch

from models.pretrained import read_json, write_json

SPECIAL_TOKENS = ("[IMG]", "[/IMG]", "[AUD]", "[/AUD]", "[VID]", "[/VID]", "[FRAME]")
BOUNDARIES = {"image": ("[IMG]", "[/IMG]"), "audio": ("[AUD]", "[/AUD]"), "video": ("[VID]", "[/VID]")}
FRAME_SEPARATOR = "[FRAME]"
CODEBOOKS = ("image", "audio", "video")
# video frames use the image codebook unless the video tokenizer brings a codebook of its own
FALLBACK_CODEBOOK = {"video": "image"}
VOCABULARY_FILE = "vocabulary.json"

IdsLike = torch.Tensor | Sequence[int] | int


class JointVocabulary:
    """Global ids: [0, text_size) text, then SPECIAL_TOKENS, then each codebook's ids in the order given."""

    def __init__(self, text_size: int, codebooks: dict[str, int], text_tokenizer: str | None = None):
        if text_size < 1:
            raise ValueError(f"text_size must be >= 1, got {text_size}")
        unknown = sorted(set(codebooks) - set(CODEBOOKS))
        if unknown:
            raise ValueError(f"unknown codebook {unknown[0]!r} (known: {list(CODEBOOKS)})")
        for name, size in codebooks.items():
            if size < 1:
                raise ValueError(f"codebook {name!r} must have at least one code, got {size}")
        self.text_size = text_size
        self.text_tokenizer = text_tokenizer
        self.codebooks = dict(codebooks)
        self.special_ids = {token: text_size + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.offsets: dict[str, int] = {}
        offset = text_size + len(SPECIAL_TOKENS)
        for name, size in self.codebooks.items():
            self.offsets[name] = offset
            offset += size
        self.size = offset

    @classmethod
    def from_text_tokenizer(cls, tokenizer: Any, codebooks: dict[str, int]) -> "JointVocabulary":
        """Layout after any Hugging Face tokenizer (an object, or a local path loaded with AutoTokenizer)."""
        name = None
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            name = str(tokenizer)
            tokenizer = AutoTokenizer.from_pretrained(name)
        return cls(len(tokenizer), codebooks, text_tokenizer=name or getattr(tokenizer, "name_or_path", None))

    # --- ranges -----------------------------------------------------------------------------------
    def codebook_range(self, modality: str) -> range:
        """Global ids of the codes a modality uses (video shares the image codebook unless it has its own)."""
        if modality not in CODEBOOKS:
            raise ValueError(f"unknown modality {modality!r} (known: {list(CODEBOOKS)})")
        name = modality if modality in self.codebooks else FALLBACK_CODEBOOK.get(modality, modality)
        if name not in self.codebooks:
            raise ValueError(f"this vocabulary has no {name!r} codebook (it has: {sorted(self.codebooks)})")
        return range(self.offsets[name], self.offsets[name] + self.codebooks[name])

    def special_id(self, token: str) -> int:
        if token not in self.special_ids:
            raise ValueError(f"unknown special token {token!r} (known: {list(SPECIAL_TOKENS)})")
        return self.special_ids[token]

    def modality_of(self, global_id: int) -> str:
        """'text', 'special' or the codebook name that owns a global id."""
        if not 0 <= global_id < self.size:
            raise ValueError(f"id {global_id} is outside the vocabulary [0, {self.size})")
        if global_id < self.text_size:
            return "text"
        if global_id < self.text_size + len(SPECIAL_TOKENS):
            return "special"
        return next(name for name in self.codebooks if global_id in self.codebook_range(name))

    def grammar_modalities(self) -> list[str]:
        """The modalities whose blocks this vocabulary can hold, in the order of grammar_groups()[1:]."""
        return [m for m in BOUNDARIES if (FALLBACK_CODEBOOK.get(m, m) in self.codebooks or m in self.codebooks)]

    def grammar_groups(self) -> list[torch.Tensor]:
        """What the next id is chosen among, by where a sequence stands (the modality grammar that generation
        enforces and the grouped training loss follows): [0] outside blocks, text ids and special tokens; then,
        inside a block of each of grammar_modalities(), its codes, its closing boundary (and [FRAME] for video)."""
        outside = torch.arange(self.text_size + len(SPECIAL_TOKENS))
        groups = [outside]
        for modality in self.grammar_modalities():
            r = self.codebook_range(modality)
            extra = [self.special_id(BOUNDARIES[modality][1])]
            if modality == "video":
                extra.append(self.special_id(FRAME_SEPARATOR))
            groups.append(torch.cat([torch.arange(r.start, r.stop), torch.tensor(extra)]))
        return groups

    def block_state(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) global ids -> (B, T): after each position, 0 outside blocks, or 1 + the index in
        grammar_modalities() of the block still open there (its opening boundary counts as inside)."""
        state = torch.zeros_like(ids)
        for i, modality in enumerate(self.grammar_modalities(), 1):
            start, end = (self.special_id(t) for t in BOUNDARIES[modality])
            inside = (ids == start).long().cumsum(-1) > (ids == end).long().cumsum(-1)
            state = torch.where(inside, torch.full_like(ids, i), state)
        return state

    # --- local <-> global -------------------------------------------------------------------------
    def to_global(self, modality: str, local_ids: IdsLike) -> IdsLike:
        r = self.codebook_range(modality)
        return _shift(local_ids, 0, len(r), r.start, f"{modality} code ids")

    def to_local(self, modality: str, global_ids: IdsLike) -> IdsLike:
        r = self.codebook_range(modality)
        return _shift(global_ids, r.start, r.stop, -r.start, f"global {modality} ids")

    # --- blocks of media inside a sequence ----------------------------------------------------------
    def wrap(self, modality: str, codes: torch.Tensor) -> list[int]:
        """Local codes -> global ids with boundaries: [IMG] c... [/IMG]; video (F, T) -> [VID] f0 [FRAME] f1 ... [/VID]."""
        if modality not in BOUNDARIES:
            raise ValueError(f"unknown modality {modality!r} (known: {sorted(BOUNDARIES)})")
        start, end = (self.special_id(t) for t in BOUNDARIES[modality])
        codes = torch.as_tensor(codes)
        if modality == "video":
            if codes.ndim != 2:
                raise ValueError(f"video codes: expected (frames, tokens_per_frame), got shape {tuple(codes.shape)}")
            body: list[int] = []
            for i, frame in enumerate(codes):
                if i:
                    body.append(self.special_id(FRAME_SEPARATOR))
                body.extend(self.to_global("video", frame).tolist())
        else:
            if codes.ndim != 1:
                raise ValueError(f"{modality} codes: expected one sequence of ids, got shape {tuple(codes.shape)}")
            body = self.to_global(modality, codes).tolist()
        return [start, *body, end]

    def unwrap(self, modality: str, ids: Sequence[int]) -> torch.Tensor | list[torch.Tensor]:
        """Inverse of wrap: boundary-delimited global ids -> local codes (a list of frames for video)."""
        if modality not in BOUNDARIES:
            raise ValueError(f"unknown modality {modality!r} (known: {sorted(BOUNDARIES)})")
        ids = [int(i) for i in ids]
        start, end = (self.special_id(t) for t in BOUNDARIES[modality])
        if len(ids) < 2 or ids[0] != start or ids[-1] != end:
            raise ValueError(f"a {modality} block must start with {BOUNDARIES[modality][0]} and end with "
                             f"{BOUNDARIES[modality][1]}, got {ids[:3]}...{ids[-3:]}")
        body = ids[1:-1]
        if modality != "video":
            return torch.as_tensor(self.to_local(modality, body), dtype=torch.long)
        frames, current = [], []
        for i in body + [self.special_id(FRAME_SEPARATOR)]:
            if i == self.special_id(FRAME_SEPARATOR):
                frames.append(torch.as_tensor(self.to_local("video", current), dtype=torch.long))
                current = []
            else:
                current.append(i)
        return frames

    # --- saving -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "text_size": self.text_size,
            "text_tokenizer": self.text_tokenizer,
            "special_tokens": dict(self.special_ids),
            "codebooks": [{"name": n, "size": s, "offset": self.offsets[n]} for n, s in self.codebooks.items()],
            "size": self.size,
        }

    def save_pretrained(self, path: str | Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_json(path / VOCABULARY_FILE, self.to_dict())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "vocabulary") -> "JointVocabulary":
        """Inverse of to_dict, checking that the stored offsets follow from the stored sizes."""
        try:
            vocab = cls(int(data["text_size"]), {c["name"]: int(c["size"]) for c in data["codebooks"]},
                        text_tokenizer=data.get("text_tokenizer"))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"damaged vocabulary in {where}: {err!r}") from None
        if vocab.to_dict() != data:
            raise ValueError(f"damaged vocabulary in {where}: its offsets do not follow from its sizes")
        return vocab

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "JointVocabulary":
        file = Path(path) / VOCABULARY_FILE
        return cls.from_dict(read_json(file), where=str(file))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, JointVocabulary) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        ranges = ", ".join(f"{n}=[{self.offsets[n]}, {self.offsets[n] + s})" for n, s in self.codebooks.items())
        return f"JointVocabulary(text=[0, {self.text_size}), specials={len(SPECIAL_TOKENS)}, {ranges}, size={self.size})"


def _shift(ids: IdsLike, low: int, high: int, delta: int, what: str) -> IdsLike:
    """ids + delta after checking low <= ids < high; keeps the input's type (int, list or tensor)."""
    if isinstance(ids, bool):
        raise ValueError(f"{what}: expected integer ids, got a bool")
    if isinstance(ids, int):
        if not low <= ids < high:
            raise ValueError(f"{what}: {ids} is outside [{low}, {high})")
        return ids + delta
    tensor = torch.as_tensor(ids)
    if tensor.is_floating_point() or tensor.dtype == torch.bool:
        raise ValueError(f"{what}: expected integer ids, got dtype {tensor.dtype}")
    if tensor.numel() and (int(tensor.min()) < low or int(tensor.max()) >= high):
        raise ValueError(f"{what}: ids must lie in [{low}, {high}), got values in [{int(tensor.min())}, {int(tensor.max())}]")
    shifted = tensor.long() + delta
    return shifted if isinstance(ids, torch.Tensor) else shifted.tolist()
