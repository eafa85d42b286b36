"""anytoken's models: pure PyTorch modality tokenizers, the joint vocabulary and media I/O. Never imports Ray."""
from models.audio_vq import AudioVQConfig, AudioVQTokenizer
from models.dynamic_visual import DynamicVisualConfig, DynamicVisualTokenizer
from models.image_vq import ImageVQConfig, ImageVQTokenizer
from models.pretrained import Pretrained, load_pretrained
from models.quantizer import QuantizerConfig, VectorQuantizer
from models.tokenizer import MediaTokenizer, StepOutput
from models.video import VideoConfig, VideoTokenizer
from models.vocabulary import JointVocabulary

__all__ = [
    "AudioVQConfig", "AudioVQTokenizer", "DynamicVisualConfig", "DynamicVisualTokenizer", "ImageVQConfig",
    "ImageVQTokenizer", "JointVocabulary", "MediaTokenizer", "Pretrained", "QuantizerConfig", "StepOutput",
    "VectorQuantizer", "VideoConfig", "VideoTokenizer", "load_pretrained",
]
