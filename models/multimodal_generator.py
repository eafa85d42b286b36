"""An exported model folder at inference: prompts from text and media bytes, generated ids, and the ids back to text
and PNG / WAV / MP4 bytes. Three parts, so a server can place them apart (media tokenizers and de-tokenizers on
CPU, the LM on a GPU): PromptEncoder, TokenGenerator, OutputDecoder; MultimodalGenerator joins them in-process.

Prompts have the form training sees (models/sequences.py): the text tokenizer's bos, then each part in order,
text ids or a media block. Understanding is `bos [IMG] c.. [/IMG] text` -> text; generation is `bos text` -> a
forced `[IMG] c.. [/IMG]`, then eos.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from models.evaluation import prompt_answer_logprobs
from models.generation import (BlockShape, Generation, ModalityGrammar, SamplingParams, check_request, decode_steps,
                               generate, with_seed)
from models.media import encode_mp4, encode_png, encode_wav
from models.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, MediaError, VideoPreprocessConfig,
                               preprocess_audio, preprocess_image, preprocess_video)
from models.exported import ExportedModel
from models.vocabulary import BOUNDARIES, JointVocabulary

logger = logging.getLogger(__name__)

MIME_TYPES = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}


@dataclass
class InputLimits:
    image_max_pixels: int = 25_000_000   # refused before decoding (decompression bombs)
    audio_max_seconds: float = 10.0      # longer input audio is trimmed; also the longest audio block generated
    video_max_pixels: int = 4_000_000    # per frame


@dataclass
class MediaPart:
    """A media item of a request: its modality and its file bytes (PNG/JPEG/..., WAV/FLAC/..., MP4/...)."""

    modality: str
    data: bytes


@dataclass
class EncodedPrompt:
    ids: list[int]
    text_tokens: int
    media_tokens: dict[str, int] = field(default_factory=dict)


@dataclass
class GeneratedMedia:
    modality: str
    mime_type: str
    data: bytes
    tokens: int
    details: dict[str, Any] = field(default_factory=dict)   # width/height, sample_rate/seconds, frames/fps


@dataclass
class DecodedOutput:
    text: str
    media: list[GeneratedMedia] = field(default_factory=list)
    text_tokens: int = 0


def block_shapes(tokenizers: dict[str, Any], audio_max_seconds: float) -> dict[str, BlockShape]:
    """The grammar's block sizes from the media tokenizers: fixed or dynamic images, audio up to a duration,
    video frames of the image tokenizer's grid."""
    shapes = {}
    for modality, tokenizer in tokenizers.items():
        if modality == "image":
            fixed = getattr(tokenizer, "tokens_per_image", None)
            shapes["image"] = (BlockShape(fixed, exact=True) if fixed is not None
                               else BlockShape(tokenizer.max_tokens_per_image))
        elif modality == "audio":
            samples = int(audio_max_seconds * tokenizer.config.sample_rate)
            shapes["audio"] = BlockShape(tokenizer.num_tokens(samples))
        elif modality == "video":
            shapes["video"] = BlockShape(tokenizer.tokens_per_frame, exact=True, max_frames=tokenizer.config.max_frames)
    return shapes


def _image_size(tokenizer: Any) -> int:
    return tokenizer.config.image_size


class PromptEncoder:
    """Request parts (text, media bytes) -> prompt ids: media decoded, resized and tokenized, then wrapped."""

    def __init__(self, exported: ExportedModel, limits: InputLimits | None = None, media: bool = True):
        self.limits = limits or InputLimits()
        self.vocab = exported.vocab
        self.text = exported.text_tokenizer()
        self.tokenizers = exported.media_tokenizers() if media else {}   # media=False: text prompts only
        self.preprocess: dict[str, Any] = {}
        if "image" in self.tokenizers:
            self.preprocess["image"] = ImagePreprocessConfig(size=_image_size(self.tokenizers["image"]),
                                                             max_pixels=self.limits.image_max_pixels)
        if "audio" in self.tokenizers:
            self.preprocess["audio"] = AudioPreprocessConfig(sample_rate=self.tokenizers["audio"].config.sample_rate,
                                                             max_seconds=self.limits.audio_max_seconds)
        if "video" in self.tokenizers:
            video = self.tokenizers["video"].config
            self.preprocess["video"] = VideoPreprocessConfig(size=video.image.image_size, fps=video.fps,
                                                             max_frames=video.max_frames,
                                                             max_pixels=self.limits.video_max_pixels)

    def _tokenizer(self, modality: str) -> Any:
        if modality not in self.tokenizers:
            raise MediaError("unsupported_modality", f"this model takes no {modality} input "
                             f"(it takes: {['text', *self.tokenizers]})")
        return self.tokenizers[modality]

    @torch.inference_mode()
    def encode_images(self, images: Sequence[bytes]) -> list[list[int] | MediaError]:
        """Many images in one tokenizer batch; a bad one gets its MediaError in its place, the rest still encode."""
        tokenizer = self._tokenizer("image")
        arrays: list[np.ndarray | MediaError] = []
        for data in images:
            try:
                arrays.append(preprocess_image(data, self.preprocess["image"]))
            except MediaError as err:
                arrays.append(err)
        good = [a for a in arrays if not isinstance(a, MediaError)]
        codes: list[list[int]] = []
        if good:
            batch = torch.from_numpy(np.stack(good)).permute(0, 3, 1, 2).float() / 255.0
            codes = [c.tolist() for c in tokenizer.encode(batch)]
        it = iter(codes)
        return [a if isinstance(a, MediaError) else next(it) for a in arrays]

    @torch.inference_mode()
    def encode_media(self, part: MediaPart) -> list[int] | list[list[int]]:
        """One media item -> local codes (video: one list per frame). Raises MediaError for unusable bytes."""
        tokenizer = self._tokenizer(part.modality)
        if part.modality == "image":
            result = self.encode_images([part.data])[0]
            if isinstance(result, MediaError):
                raise result
            return result
        if part.modality == "audio":
            wave = preprocess_audio(part.data, self.preprocess["audio"])
            return tokenizer.encode(torch.from_numpy(wave)[None])[0].tolist()
        frames = preprocess_video(part.data, self.preprocess["video"])
        clip = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255.0
        return tokenizer.encode([clip])[0].tolist()

    def build(self, parts: Sequence[str | tuple[str, Any]]) -> EncodedPrompt:
        """Text parts and (modality, codes) parts, in order, after bos -> the prompt's ids."""
        ids = [self.text.bos_token_id] if self.text.bos_token_id is not None else []
        text_tokens, media_tokens = 0, {}
        for part in parts:
            if isinstance(part, str):
                text = self.text(part, add_special_tokens=False)["input_ids"]
                ids += text
                text_tokens += len(text)
            else:
                modality, codes = part
                block = self.vocab.wrap(modality, torch.as_tensor(codes))
                ids += block
                media_tokens[modality] = media_tokens.get(modality, 0) + len(block)
        if not ids:
            raise ValueError("the prompt is empty: give some text or media")
        return EncodedPrompt(ids, text_tokens, media_tokens)

    def encode(self, parts: Sequence[str | MediaPart]) -> EncodedPrompt:
        return self.build([p if isinstance(p, str) else (p.modality, self.encode_media(p)) for p in parts])

    @property
    def uncond_prompt(self) -> list[int]:
        """What classifier-free guidance conditions on instead of the prompt: bos alone (LaVIT, Emu3)."""
        return [self.text.bos_token_id] if self.text.bos_token_id is not None else []


class TokenGenerator:
    """The MultimodalLM and its grammar: prompt ids in, generated ids out, batched, with or without a KV cache."""

    def __init__(self, exported: ExportedModel, limits: InputLimits | None = None, device: str = "cpu",
                 use_cache: bool = True, dtype: torch.dtype | None = None):
        limits = limits or InputLimits()
        text = exported.text_tokenizer()
        self.model = exported.model(device, dtype)
        self.vocab = exported.vocab
        self.eos_id = text.eos_token_id
        self.pad_id = text.pad_token_id if text.pad_token_id is not None else text.eos_token_id
        self.uncond_prompt = [text.bos_token_id] if text.bos_token_id is not None else []
        self.grammar = ModalityGrammar(self.vocab, block_shapes(exported.media_tokenizers(), limits.audio_max_seconds),
                                       self.eos_id, banned_text_ids=exported.config.get("text_special_ids", []))
        self.context_length = exported.context_length()
        self.use_cache = use_cache

    def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
        """Raise ValueError for a request this model cannot decode (before it joins a batch)."""
        check_request(self.grammar, prompt, params, self.context_length)

    def describe(self) -> dict[str, Any]:
        """What a server tells its clients and checks requests against."""
        return {"context_length": self.context_length, "output_modalities": ["text", *self.grammar.shapes],
                "block_min_tokens": {m: s.min_tokens for m, s in self.grammar.shapes.items()},
                "block_max_tokens": {m: s.max_tokens for m, s in self.grammar.shapes.items()},
                "guidance": bool(self.uncond_prompt)}

    def steps(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> Iterator[list[int | None]]:
        return decode_steps(self.model, self.grammar, prompts, params, self.pad_id, self.uncond_prompt,
                            self.use_cache, self.context_length)

    def generate(self, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]) -> list[Generation]:
        """Decode a batch to the end; a best_of request's draws share the batch and the best one comes back."""
        params = [with_seed(p).validate() for p in params]
        for prompt, p in zip(prompts, params):
            if p.best_of > 1:
                self.check(prompt, p)      # a text-only prompt: what its draws are ranked by
        draws = [c for p in params for c in p.candidates()]
        made = generate(self.model, self.grammar, [q for q, p in zip(prompts, params) for _ in range(p.best_of)],
                        draws, self.pad_id, self.uncond_prompt, self.use_cache, self.context_length)
        kept, start = [], 0
        for prompt, p in zip(prompts, params):
            kept.append(self.pick(prompt, p, made[start:start + p.best_of]))
            start += p.best_of
        return kept

    @torch.inference_mode()
    def read_back(self, prompt: Sequence[int], generations: Sequence[Generation]) -> torch.Tensor:
        """log p(the prompt's text + eos | bos + the reply's media) for each reply: how surely the model, reading
        what it made, says what it was asked for (the understanding order of the same pairs it was trained on)."""
        replies_may_hold = set(self.grammar.reply_ids.tolist())
        text = [int(t) for t in prompt if int(t) in replies_may_hold and int(t) not in self.uncond_prompt]
        if not text:
            raise ValueError("best_of > 1 needs prompt text to read back")
        replies = [[int(t) for t in g.ids if int(t) != self.eos_id] for g in generations]
        return prompt_answer_logprobs(self.model, [self.uncond_prompt + r for r in replies], [text + [self.eos_id]],
                                      batch_size=len(replies), reply_ids=self.grammar.reply_ids)[:, 0]

    def pick(self, prompt: Sequence[int], params: SamplingParams, generations: Sequence[Generation]) -> Generation:
        """Of a (seeded) request's draws, in params.candidates() order, the one that reads back its prompt best,
        reported under the request's seed with its draw's index."""
        if len(generations) == 1:
            return generations[0]
        best = int(self.read_back(prompt, generations).argmax())
        return replace(generations[best], seed=params.seed, candidate=best)


class OutputDecoder:
    """Generated ids -> the reply's text and its media files, through the de-tokenizers."""

    def __init__(self, exported: ExportedModel, media: bool = True):
        self.vocab = exported.vocab
        self.text = exported.text_tokenizer()
        self.tokenizers = exported.media_tokenizers() if media else {}   # media=False: text replies only
        self.opens = {self.vocab.special_id(start) for start, _ in BOUNDARIES.values()}

    def has_media(self, ids: Sequence[int]) -> bool:
        return any(int(i) in self.opens for i in ids)

    def segments(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """Split ids into ('text', ids) and (modality, block ids incl. boundaries); stops at eos; a block cut
        short (never made by the grammar) is dropped."""
        opens = {self.vocab.special_id(start): m for m, (start, _) in BOUNDARIES.items()}   # id -> modality
        out: list[tuple[str, list[int]]] = []
        block: tuple[str, list[int]] | None = None
        for i in map(int, ids):
            if block is not None:
                block[1].append(i)
                if i == self.vocab.special_id(BOUNDARIES[block[0]][1]):
                    out.append(block)
                    block = None
            elif i == self.text.eos_token_id:
                break
            elif i in opens:
                block = (opens[i], [i])
            elif i < self.vocab.text_size:
                if not out or out[-1][0] != "text":
                    out.append(("text", []))
                out[-1][1].append(i)
        if block is not None:
            logger.warning("dropped an unfinished %s block of %d ids", block[0], len(block[1]))
        return out

    @torch.inference_mode()
    def decode_block(self, modality: str, block: list[int]) -> GeneratedMedia:
        if modality not in self.tokenizers:
            raise ValueError(f"this model has no {modality} de-tokenizer")
        tokenizer = self.tokenizers[modality]
        codes = self.vocab.unwrap(modality, block)
        if modality == "image":
            pixels = tokenizer.decode(codes[None] if getattr(tokenizer, "tokens_per_image", None) else [codes])[0]
            return GeneratedMedia("image", MIME_TYPES["image"], encode_png(pixels), len(codes),
                                  {"width": pixels.shape[2], "height": pixels.shape[1]})
        if modality == "audio":
            wave = tokenizer.decode(codes[None])[0]
            rate = tokenizer.config.sample_rate
            return GeneratedMedia("audio", MIME_TYPES["audio"], encode_wav(wave, rate), len(codes),
                                  {"sample_rate": rate, "seconds": round(wave.shape[-1] / rate, 3)})
        frames = tokenizer.decode([torch.stack(codes)])[0]
        fps = max(1, round(tokenizer.config.fps))
        return GeneratedMedia("video", MIME_TYPES["video"], encode_mp4(frames, fps), sum(len(c) for c in codes),
                              {"frames": frames.shape[0], "fps": fps, "width": frames.shape[3],
                               "height": frames.shape[2]})

    def decode(self, ids: Sequence[int]) -> DecodedOutput:
        text_ids: list[int] = []
        media = []
        for kind, part in self.segments(ids):
            if kind == "text":
                text_ids += part
            else:
                media.append(self.decode_block(kind, part))
        return DecodedOutput(self.text.decode(text_ids, skip_special_tokens=True), media, len(text_ids))


class TextStream:
    """Text deltas from ids arriving one by one: media blocks are skipped, a partial UTF-8 character waits."""

    def __init__(self, text_tokenizer: Any, vocab: JointVocabulary):
        self.text, self.text_size = text_tokenizer, vocab.text_size
        self.opens = {vocab.special_id(start) for start, _ in BOUNDARIES.values()}
        self.closes = {vocab.special_id(end) for _, end in BOUNDARIES.values()}
        self.ids: list[int] = []
        self.sent = ""
        self.in_block = False
        self.ended = False

    def push(self, token: int) -> str:
        """The new text this id adds ('' inside media blocks, after eos, or mid-character)."""
        if self.ended:
            return ""
        if token in self.opens:
            self.in_block = True
        elif token in self.closes:
            self.in_block = False
        elif self.in_block:
            pass
        elif token == self.text.eos_token_id:
            self.ended = True
        elif token < self.text_size:
            self.ids.append(token)
            text = self.text.decode(self.ids, skip_special_tokens=True)
            if not text.endswith("\ufffd"):
                delta, self.sent = text[len(self.sent):], text
                return delta
        return ""


class MultimodalGenerator:
    """All three parts in one process: requests of (parts, SamplingParams) -> (DecodedOutput, Generation)."""

    def __init__(self, folder: str | Path, device: str = "cpu", limits: InputLimits | None = None,
                 use_cache: bool = True, base_llm: str | None = None):
        exported = ExportedModel(folder, base_llm)
        self.encoder = PromptEncoder(exported, limits)
        self.generator = TokenGenerator(exported, limits, device, use_cache)
        self.decoder = OutputDecoder(exported)

    def __call__(self, requests: Sequence[tuple[Sequence[str | MediaPart], SamplingParams]]
                 ) -> list[tuple[DecodedOutput, Generation]]:
        prompts = [self.encoder.encode(parts).ids for parts, _ in requests]
        generations = self.generator.generate(prompts, [p for _, p in requests])
        return [(self.decoder.decode(g.ids), g) for g in generations]
