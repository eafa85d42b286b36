"""What decides the tokens of a prepare run: media tokenizers, text tokenizer, vocabulary and preprocessing.

They are saved beside the shards (tokenizers/, text_tokenizer/, vocabulary.json), so the output says how
it was made, and a resumed run must use the very same ones.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from actors.sources import is_uri
from actors.tokenize import PreprocessConfig
from models import AudioVQConfig, AudioVQTokenizer, ImageVQConfig, ImageVQTokenizer, VideoConfig, VideoTokenizer
from models import load_pretrained
from models.preprocess import AudioPreprocessConfig, ImagePreprocessConfig, VideoPreprocessConfig
from models.vocabulary import JointVocabulary

logger = logging.getLogger(__name__)
MEDIA = ("image", "audio", "video")


@dataclass
class MediaLimits:
    image_max_pixels: int = 50_000_000   # larger images are refused before decoding (decompression bombs)
    audio_max_seconds: float = 10.0      # longer audio is trimmed
    audio_pad_to_max: bool = False
    video_max_pixels: int = 10_000_000   # per frame


@dataclass
class TokenSetup:
    tokenizer_paths: dict[str, str]      # modality -> folder the actors load
    text_tokenizer_path: str
    vocabulary: JointVocabulary
    preprocess: PreprocessConfig
    pad_id: int
    fingerprint: str = ""
    notes: list[str] = field(default_factory=list)


def _fresh_tokenizers(seed: int) -> dict[str, Any]:
    torch.manual_seed(seed)
    image = ImageVQTokenizer(ImageVQConfig())
    return {"image": image, "audio": AudioVQTokenizer(AudioVQConfig()),
            "video": VideoTokenizer(VideoConfig(), image_tokenizer=image)}


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _digest(folder: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(folder)).encode())
        h.update(file.read_bytes())
    return h.hexdigest()[:16]


def preprocess_for(tokenizers: dict[str, Any], limits: MediaLimits) -> PreprocessConfig:
    """Decode settings that bring media to what these tokenizers take: image size, sample rate, frame rate."""
    preprocess = PreprocessConfig()
    if "image" in tokenizers:
        preprocess.image = ImagePreprocessConfig(size=tokenizers["image"].config.image_size,
                                                 max_pixels=limits.image_max_pixels)
    if "audio" in tokenizers:
        preprocess.audio = AudioPreprocessConfig(sample_rate=tokenizers["audio"].config.sample_rate,
                                                 max_seconds=limits.audio_max_seconds,
                                                 pad_to_max=limits.audio_pad_to_max)
    if "video" in tokenizers:
        video = tokenizers["video"].config
        preprocess.video = VideoPreprocessConfig(size=video.image.image_size, fps=video.fps,
                                                 max_frames=video.max_frames, max_pixels=limits.video_max_pixels)
    return preprocess


def setup_tokens(tokenizers: str | None, text_tokenizer: str | None, out: str, limits: MediaLimits,
                 seed: int) -> TokenSetup:
    """Load (or make) the tokenizers, save copies under `out`, and derive vocabulary and preprocessing."""
    from transformers import AutoTokenizer

    from models.text_tokenizer import byte_level_tokenizer

    if is_uri(out):
        # the actors load from the given folders; a copy is uploaded beside the shards
        if not tokenizers or not text_tokenizer:
            raise ValueError("an output URI needs --tokenizers and --text-tokenizer on a path every worker can read")
        local = Path(tempfile.mkdtemp(prefix="anytoken-prepare-"))
    else:
        local = Path(out)
    notes = []
    saved = local / "tokenizers"
    if tokenizers:
        paths = {m: str(Path(tokenizers) / m) for m in MEDIA if (Path(tokenizers) / m / "config.json").is_file()}
        if not paths:
            raise FileNotFoundError(f"no tokenizer folders in {tokenizers} (expected image/, audio/ or video/)")
        loaded = {m: load_pretrained(p) for m, p in paths.items()}
    elif (saved / "image" / "config.json").is_file() or (saved / "audio" / "config.json").is_file():
        loaded = {m: load_pretrained(saved / m) for m in MEDIA if (saved / m / "config.json").is_file()}
        notes.append(f"reusing the tokenizers saved in {saved}")
    else:
        loaded = _fresh_tokenizers(seed)
        logger.warning("no --tokenizers given: using freshly initialised tokenizers of the default sizes; "
                       "their tokens carry little meaning until the tokenizers are trained")
        notes.append("fresh untrained tokenizers")
    for modality, tokenizer in loaded.items():
        target = saved / modality
        if target.exists():
            if not _same_weights(load_pretrained(target), tokenizer):
                raise ValueError(f"{out} was prepared with other {modality} tokenizer weights; "
                                 "use a new output folder for other tokenizers")
        else:
            tokenizer.save_pretrained(target)
    actor_paths = {m: str(Path(tokenizers) / m) if is_uri(out) else str(saved / m) for m in loaded}

    text_dir = local / "text_tokenizer"
    if text_tokenizer:
        text = AutoTokenizer.from_pretrained(text_tokenizer)
    elif (text_dir / "tokenizer.json").is_file() or (text_dir / "tokenizer_config.json").is_file():
        text = AutoTokenizer.from_pretrained(text_dir)
    else:
        text = byte_level_tokenizer()
        logger.warning("no --text-tokenizer given: using a byte-level tokenizer; pass the base LLM's tokenizer "
                       "folder to prepare data for that LLM")
        notes.append("byte-level text tokenizer")
    if text.eos_token_id is None:
        raise ValueError(f"the text tokenizer {text_tokenizer} has no end-of-sequence token")
    if not text_dir.exists():
        text.save_pretrained(text_dir)
    elif len(AutoTokenizer.from_pretrained(text_dir)) != len(text):
        raise ValueError(f"{out} was prepared with another text tokenizer; use a new output folder")

    codebooks = {}
    if "image" in loaded:
        codebooks["image"] = loaded["image"].codebook_size
    if "audio" in loaded:
        codebooks["audio"] = loaded["audio"].codebook_size
    if "video" in loaded and not ("image" in loaded and _same_weights(loaded["video"].image, loaded["image"])):
        codebooks["video"] = loaded["video"].codebook_size    # frames have a codebook of their own
    vocabulary = JointVocabulary(len(text), codebooks, text_tokenizer=text_tokenizer)
    vocabulary.save_pretrained(local)

    preprocess = preprocess_for(loaded, limits)
    pad_id = text.pad_token_id if text.pad_token_id is not None else text.eos_token_id
    setup = TokenSetup(actor_paths, str(text_dir) if not is_uri(out) else text_tokenizer, vocabulary, preprocess,
                       pad_id, notes=notes)
    setup.fingerprint = _digest(saved) + _digest(text_dir)
    if is_uri(out):
        import pyarrow.fs as pafs

        pafs.copy_files(str(local), out)
        shutil.rmtree(local, ignore_errors=True)
    return setup
