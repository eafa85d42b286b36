"""An exported model folder at inference: prompts from text and media bytes, generated ids, and the ids back to text
and PNG / WAV / MP4 bytes. Three parts, so a server can place them apart (media tokenizers and de-tokenizers on
CPU, the LM on a GPU): PromptEncoder, TokenGenerator, OutputDecoder; MultimodalGenerator joins them in-process.

Prompts have the form training sees (models/sequences.py): the text tokenizer's bos, then each part in order,
text ids or a media block. Understanding is `bos [IMG] c.. [/IMG] text` -> text; generation is `bos text` -> a
forced `[IMG] c.. [/IMG]`, then eos.
"""
from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from models.generation import (BlockShape, Generation, ModalityGrammar, SamplingParams, check_request, decode_steps,
                               generate)
from models.media import encode_mp4, encode_png, encode_wav
from models.preprocess import (AudioPreprocessConfig, ImagePreprocessConfig, MediaError, VideoPreprocessConfig,
                               preprocess_audio, preprocess_image, preprocess_video)
from models.pretrained import CONFIG_FILE, WEIGHTS_FILE, load_pretrained, read_json, write_json
from models.vocabulary import BOUNDARIES, JointVocabulary

logger = logging.getLogger(__name__)

MEDIA = ("image", "audio", "video")
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


class ExportedModel:
    """The folder `anytoken train` exports: config.json + model.safetensors (the joint tables), vocabulary.json,
    tokenizers/{image,audio,video}/, text_tokenizer/; the frozen base LLM is loaded from its own folder."""

    def __init__(self, root: str | Path, base_llm: str | None = None):
        self.root = Path(root)
        for name in (CONFIG_FILE, WEIGHTS_FILE, "vocabulary.json", "text_tokenizer"):
            if not (self.root / name).exists():
                raise FileNotFoundError(f"{self.root} is not an exported model folder: it has no {name}")
        meta = read_json(self.root / CONFIG_FILE)
        if meta.get("kind") != "multimodal_lm":
            raise ValueError(f"{self.root / CONFIG_FILE} holds a {meta.get('kind')!r}, not a 'multimodal_lm'")
        self.config = meta["config"]
        self._base_llm = base_llm or self.config["base_llm"]
        self.vocab = JointVocabulary.from_pretrained(self.root)

    @property
    def base_llm(self) -> str:
        """The frozen base LLM's folder, checked when something needs it (a tokenizer replica does not)."""
        if not Path(self._base_llm).is_dir():
            raise FileNotFoundError(f"the base LLM folder {self._base_llm!r} of {self.root} is missing "
                                    "(point base_llm at where it is on this machine)")
        return self._base_llm

    @property
    def name(self) -> str:
        return self.root.name

    def tokenizer_modalities(self) -> list[str]:
        return [m for m in MEDIA if (self.root / "tokenizers" / m / CONFIG_FILE).is_file()]

    def media_tokenizers(self) -> dict[str, Any]:
        """Every media tokenizer the folder holds whose codes the vocabulary knows."""
        loaded = {}
        for modality in self.tokenizer_modalities():
            try:
                codes = self.vocab.codebook_range(modality)
            except ValueError:
                logger.warning("%s: tokenizers/%s is there but the vocabulary has no codebook for it", self.root, modality)
                continue
            tokenizer = load_pretrained(self.root / "tokenizers" / modality)
            if tokenizer.codebook_size != len(codes):
                raise ValueError(f"{self.root}: the {modality} tokenizer has {tokenizer.codebook_size} codes, the "
                                 f"vocabulary {len(codes)}")
            loaded[modality] = tokenizer
        return loaded

    def text_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.root / "text_tokenizer")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{self.root / 'text_tokenizer'} has no end-of-sequence token")
        return tokenizer

    def model(self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        """The MultimodalLM: the base LLM from `base_llm`, the joint tables from this folder."""
        from models.configuration import config_from_dict
        from models.multimodal_lm import MultimodalLM, MultimodalLMConfig
        from models.pretrained import load_weights_into

        config = config_from_dict(MultimodalLMConfig, {**self.config, "base_llm": self.base_llm})
        model = MultimodalLM(config)
        load_weights_into(model, self.root / WEIGHTS_FILE)
        model = model.to(device).eval()
        return model.to(dtype) if dtype is not None else model

    def context_length(self) -> int:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.base_llm)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
        raise ValueError(f"{self.base_llm}: its config names no context length (max_position_embeddings)")

    @staticmethod
    def write(out: str | Path, model, tokenizers: dict[str, Any], text_tokenizer: Any,
              training: dict[str, Any] | None = None) -> Path:
        """Save a MultimodalLM with its tokenizers in the exported layout (the inverse of loading)."""
        out = Path(out)
        if out.exists():
            shutil.rmtree(out)
        model.save_pretrained(out)
        for modality, tokenizer in tokenizers.items():
            tokenizer.save_pretrained(out / "tokenizers" / modality)
        text_tokenizer.save_pretrained(out / "text_tokenizer")
        base = str(Path(model.config.base_llm).resolve())
        write_json(out / "training.json", {"base_llm": base, **(training or {})})
        (out / "base_llm.txt").write_text(base + "\n")
        (out / "metrics.jsonl").write_text("")
        return out


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
        return generate(self.model, self.grammar, prompts, params, self.pad_id, self.uncond_prompt, self.use_cache,
                        self.context_length)


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



def random_exported_model(out: str | Path, tokenizers: dict[str, Any], text_tokenizer: Any, hidden_size: int = 32,
                          layers: int = 2, heads: int = 4, context_length: int = 512, seed: int = 0) -> Path:
    """An untrained model in the exported layout over a random Llama saved beside it (`OUT-llm/`): what tests,
    benchmarks and server smoke runs load when no trained model is at hand."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from models.multimodal_lm import MultimodalLM, MultimodalLMConfig

    out = Path(out)
    torch.manual_seed(seed)
    llm_dir = out.with_name(out.name + "-llm")
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(text_tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=context_length, bos_token_id=text_tokenizer.bos_token_id,
        eos_token_id=text_tokenizer.eos_token_id, pad_token_id=text_tokenizer.pad_token_id,
        initializer_range=0.2)).save_pretrained(llm_dir)
    codebooks = {m: t.codebook_size for m, t in tokenizers.items() if m != "video"}
    if "video" in tokenizers and "image" not in tokenizers:
        codebooks["video"] = tokenizers["video"].codebook_size
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer, codebooks)
    special = sorted({i for i in (text_tokenizer.bos_token_id, text_tokenizer.eos_token_id,
                                  text_tokenizer.pad_token_id, text_tokenizer.unk_token_id) if i is not None})
    model = MultimodalLM(MultimodalLMConfig(base_llm=str(llm_dir.resolve()), vocabulary=vocab.to_dict(),
                                            text_special_ids=special))
    return ExportedModel.write(out, model, tokenizers, text_tokenizer, {"note": "random weights, untrained"})
