"""AudioVQ: log-mel frames -> 1-D conv encoder -> codes at ~25 per second; decoder back to mel, Griffin-Lim to sound."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchaudio

from models.conv import ConvDecoder, ConvEncoder
from models.quantizer import QuantizerConfig, VectorQuantizer
from models.tokenizer import MediaTokenizer, StepOutput, check_codes, check_waveforms


@dataclass
class AudioVQConfig:
    sample_rate: int = 16000
    n_fft: int = 512
    hop_length: int = 160             # 100 mel frames per second at 16 kHz
    n_mels: int = 64
    channels: int = 64
    channel_mult: list[int] = field(default_factory=lambda: [1, 2])   # one halving per entry: 100 -> 25 tokens/s
    res_blocks: int = 1
    log_floor: float = 1e-5           # log(mel + floor): the value of silence
    mel_mean: float = -7.0            # fixed affine normalisation of log-mel into roughly [-1, 1]
    mel_std: float = 5.0
    griffin_lim_iters: int = 32
    quantizer: QuantizerConfig = field(default_factory=lambda: QuantizerConfig(codebook_size=512, code_dim=32))

    @property
    def frames_per_token(self) -> int:
        return 2 ** len(self.channel_mult)

    @property
    def tokens_per_second(self) -> float:
        return self.sample_rate / (self.hop_length * self.frames_per_token)


class AudioVQTokenizer(MediaTokenizer):
    """encode: (B, samples) mono waveforms at `sample_rate` -> (B, T) codes; decode -> (B, samples) waveforms."""

    kind = "audio_vq"
    modality = "audio"
    config_class = AudioVQConfig

    def __init__(self, config: AudioVQConfig):
        super().__init__()
        self.config = config
        q = config.quantizer
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate, n_fft=config.n_fft, hop_length=config.hop_length, n_mels=config.n_mels,
            power=1.0)
        self.encoder = ConvEncoder(config.n_mels, q.code_dim, config.channels, config.channel_mult, config.res_blocks, dims=1)
        self.quantizer = VectorQuantizer(q)
        self.decoder = ConvDecoder(q.code_dim, config.n_mels, config.channels, config.channel_mult, config.res_blocks, dims=1)

    @property
    def codebook_size(self) -> int:
        return self.config.quantizer.codebook_size

    def num_tokens(self, num_samples: int) -> int:
        """How many codes encode() gives for a waveform of this many samples."""
        frames = num_samples // self.config.hop_length + 1
        return math.ceil(frames / self.config.frames_per_token)

    def log_mel(self, waveforms: torch.Tensor) -> torch.Tensor:
        """(B, samples) -> normalised log-mel (B, n_mels, frames), frames padded with silence to whole tokens."""
        cfg = self.config
        with torch.autocast(device_type=waveforms.device.type, enabled=False):
            mel = self.mel(waveforms.float())
        log_mel = (torch.log(mel + cfg.log_floor) - cfg.mel_mean) / cfg.mel_std
        pad = -mel.shape[-1] % cfg.frames_per_token
        silence = (math.log(cfg.log_floor) - cfg.mel_mean) / cfg.mel_std
        return F.pad(log_mel, (0, pad), value=silence)

    def mel_to_waveform(self, log_mel: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel (B, n_mels, frames) -> waveform (B, samples) through Griffin-Lim."""
        cfg = self.config
        mel = (torch.exp(log_mel.float() * cfg.mel_std + cfg.mel_mean) - cfg.log_floor).clamp(min=0)
        inverse = torchaudio.transforms.InverseMelScale(
            n_stft=cfg.n_fft // 2 + 1, n_mels=cfg.n_mels, sample_rate=cfg.sample_rate).to(mel.device)
        griffin_lim = torchaudio.transforms.GriffinLim(
            n_fft=cfg.n_fft, hop_length=cfg.hop_length, power=1.0, n_iter=cfg.griffin_lim_iters).to(mel.device)
        return griffin_lim(inverse(mel)).clamp(-1, 1)

    def _quantize(self, log_mel: torch.Tensor):
        z = self.encoder(log_mel)                       # (B, D, T)
        return self.quantizer(z.transpose(1, 2))       # vectors (B, T, D), codes (B, T)

    @torch.no_grad()
    def encode(self, waveforms: torch.Tensor) -> torch.Tensor:
        waveforms = check_waveforms(waveforms)
        return self._quantize(self.log_mel(waveforms)).codes

    @torch.no_grad()
    def decode_mel(self, codes: torch.Tensor) -> torch.Tensor:
        codes = check_codes(codes, self.codebook_size, ndim=2)
        vectors = self.quantizer.lookup(codes.to(self.quantizer.codebook.device))
        return self.decoder(vectors.transpose(1, 2))   # (B, n_mels, T * frames_per_token)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self.mel_to_waveform(self.decode_mel(codes))

    def training_step(self, waveforms: torch.Tensor) -> StepOutput:
        waveforms = check_waveforms(waveforms)
        target = self.log_mel(waveforms)
        q = self._quantize(target)
        recon = self.decoder(q.vectors.transpose(1, 2))
        mel_l1 = F.l1_loss(recon, target)
        loss = mel_l1 + q.loss
        return StepOutput(loss, {
            "loss": float(loss.detach()), "mel_l1": float(mel_l1.detach()), "commitment": float(q.loss.detach()),
            "codebook_usage": float(q.usage), "perplexity": float(q.perplexity),
        })
