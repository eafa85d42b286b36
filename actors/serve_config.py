"""The Serve application's settings (workflows/configs/serve.yaml; `args` of cluster/serve_config.yaml)."""
from __future__ import annotations

from dataclasses import dataclass, field

from models.multimodal_generator import InputLimits


@dataclass
class BatchingConfig:
    max_batch_size: int = 16           # 1: no batching
    batch_wait_timeout_s: float = 0.03   # longer: fuller batches under load, more latency when idle


@dataclass
class AutoscalingConfig:
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    upscale_delay_s: float = 10.0
    downscale_delay_s: float = 120.0


@dataclass
class ReplicaConfig:
    num_cpus: float = 1.0
    threads: int = 1                   # torch threads per replica
    max_ongoing_requests: int = 32     # per replica; beyond it requests wait in the caller's queue
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)


@dataclass
class GeneratorConfig(ReplicaConfig):
    num_gpus: float | None = None      # None: one GPU per replica where the cluster has GPUs, else none
    max_ongoing_requests: int = 64     # at least max_batch_size, or batches never fill
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    use_cache: bool = True             # the KV cache; off recomputes the whole sequence every step
    dtype: str | None = None           # torch dtype of the LM (e.g. bfloat16 on GPU); None: as saved
    stall_s: float = 120.0             # a batch without a step for this long marks the replica unhealthy


@dataclass
class IngressConfig(ReplicaConfig):
    num_cpus: float = 0.5
    max_ongoing_requests: int = 256
    max_queued_requests: int = 1024    # beyond it: 429 with Retry-After
    generator_retry_s: float = 60.0    # how long a request waits out a generator replica that died


@dataclass
class LimitsConfig:
    max_body_bytes: int = 10 * 1024 * 1024
    max_media_parts: int = 4
    image_max_pixels: int = 25_000_000
    audio_max_seconds: float = 10.0    # input audio is trimmed to it; generated audio blocks stop at it
    video_max_pixels: int = 4_000_000
    default_max_tokens: int = 256      # when a chat request names none (media-only replies get their block's size)
    max_images: int = 4                # the most `n` of /v1/images/generations


@dataclass
class ServeConfig:
    model: str = ""                    # the exported model folder (`anytoken train`'s out)
    base_llm: str | None = None        # the frozen base LLM's folder, if not where training left it
    model_name: str | None = None      # the id clients send as `model`; default: the folder's name
    host: str = "127.0.0.1"
    port: int = 8000
    app_name: str = "anytoken"
    route_prefix: str = "/"
    api_key_env: str = "ANYTOKEN_API_KEY"   # where the bearer key is read from; unset or empty: no auth
    require_api_key: bool = False      # refuse to start without a key
    remote_media_hosts: list[str] = field(default_factory=list)   # hosts image URLs may be fetched from; []: none
    request_timeout_s: float = 300.0
    access_log: bool = True            # one log line per request in every replica (costs CPU under load)
    default_guidance_scale: float = 1.0   # images endpoint; 1: no classifier-free guidance
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    ingress: IngressConfig = field(default_factory=IngressConfig)
    tokenizer: ReplicaConfig = field(default_factory=ReplicaConfig)
    detokenizer: ReplicaConfig = field(default_factory=ReplicaConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)

    def input_limits(self) -> InputLimits:
        return InputLimits(self.limits.image_max_pixels, self.limits.audio_max_seconds, self.limits.video_max_pixels)
