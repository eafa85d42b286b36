"""The Ray Serve application: an OpenAI-style HTTP ingress, media tokenizer and de-tokenizer deployments on CPU, and
a generator deployment with dynamic batching (`@serve.batch`), autoscaling and a GPU where there is one.

    serve run cluster/serve_config.yaml        # import_path actors.serve:build_app, args = ServeConfig's keys
    anytoken serve --model runs/demo/model     # the same app from workflows/configs/serve.yaml
"""
# no `from __future__ import annotations`: FastAPI must see real classes in the routes' annotations, whose
# closures Serve pickles by value (string annotations would not resolve in the replica)
import asyncio
import json
import logging
import os
import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any, AsyncIterator, Iterator

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray import serve
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from actors.serve_api import (ApiError, BearerAuth, BodyLimit, ChatRequest, ImageRequest, Problem, chat_chunk,
                              chat_completion, chat_parts, image_response, json_response, media_items, model_card,
                              new_id, output_modalities, parse_body, usage)
from actors.serve_config import AutoscalingConfig, ReplicaConfig, ServeConfig
from models.configuration import config_from_dict, config_to_dict
from models.generation import Generation, SamplingParams, finish_reason, with_seed
from models.exported import ExportedModel
from models.multimodal_generator import (EncodedPrompt, MediaPart, OutputDecoder, PromptEncoder, TextStream,
                                         TokenGenerator)
from models.preprocess import MediaError

logger = logging.getLogger(__name__)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))


# --- deployments -----------------------------------------------------------------------------------------------
@serve.deployment(health_check_period_s=10)
class Tokenizer:
    """CPU: request parts -> prompt ids. Images from concurrent requests share one tokenizer batch."""

    def __init__(self, config: dict[str, Any]):
        cfg = config_from_dict(ServeConfig, config)
        _threads(cfg.tokenizer.threads)
        self.encoder = PromptEncoder(ExportedModel(cfg.model, cfg.base_llm), cfg.input_limits())

    def describe(self) -> dict[str, Any]:
        image = self.encoder.tokenizers.get("image")
        return {"input_modalities": ["text", *self.encoder.tokenizers],
                "image_size": image.config.image_size if image is not None else None}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _images(self, images: list[bytes]) -> list[list[int] | MediaError]:
        return await asyncio.to_thread(self.encoder.encode_images, images)

    async def encode(self, parts: list[str | MediaPart], params: list[str]) -> EncodedPrompt | Problem:
        built: list[Any] = []
        for part, param in zip(parts, params):
            if isinstance(part, str):
                built.append(part)
                continue
            try:
                if part.modality == "image" and "image" in self.encoder.tokenizers:
                    codes = await self._images(part.data)
                    if isinstance(codes, MediaError):
                        raise codes
                else:
                    codes = await asyncio.to_thread(self.encoder.encode_media, part)
            except MediaError as err:
                return Problem(f"{param}: {err}", param, err.reason)
            built.append((part.modality, codes))
        return self.encoder.build(built)


@serve.deployment(health_check_period_s=10)
class Detokenizer:
    """CPU: generated ids -> text and PNG / WAV / MP4 bytes."""

    def __init__(self, config: dict[str, Any]):
        cfg = config_from_dict(ServeConfig, config)
        _threads(cfg.detokenizer.threads)
        self.decoder = OutputDecoder(ExportedModel(cfg.model, cfg.base_llm))

    async def decode(self, ids: list[int]):
        return await asyncio.to_thread(self.decoder.decode, ids)


@serve.deployment(health_check_period_s=5, health_check_timeout_s=30, graceful_shutdown_timeout_s=30)
class Generator:
    """The LM: batches of prompts decoded together, token by token, each request with its own sampling and seed."""

    def __init__(self, config: dict[str, Any]):
        import torch

        cfg = config_from_dict(ServeConfig, config)
        gen = cfg.generator
        _threads(gen.threads)
        device = "cuda" if torch.cuda.is_available() and ray.get_gpu_ids() else "cpu"
        dtype = getattr(torch, gen.dtype) if gen.dtype else None
        self.core = TokenGenerator(ExportedModel(cfg.model, cfg.base_llm), cfg.input_limits(), device, gen.use_cache,
                                   dtype)
        for batched in (self.whole, self.steps):
            batched.set_max_batch_size(gen.batching.max_batch_size)
            batched.set_batch_wait_timeout_s(gen.batching.batch_wait_timeout_s)
        self.batch_sizes: Counter[int] = Counter()
        self.decoding, self.last_step, self.stall_s = 0, time.monotonic(), gen.stall_s
        logger.info("generator on %s, batches of up to %d, KV cache %s", device, gen.batching.max_batch_size,
                    "on" if gen.use_cache else "off")

    def describe(self) -> dict[str, Any]:
        return self.core.describe()

    def pid(self) -> int:
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """How many batches of each size this replica has decoded."""
        return {"pid": os.getpid(), "batch_sizes": dict(self.batch_sizes)}

    def check_health(self) -> None:
        """Unhealthy (and replaced by Serve) when a batch has made no step for `stall_s`: a wedged decode."""
        if self.decoding and time.monotonic() - self.last_step > self.stall_s:
            raise RuntimeError(f"no decoding step for {time.monotonic() - self.last_step:.0f} s")

    def _decode(self, requests: list[tuple[list[int], SamplingParams]]) -> Iterator[list[int | None]]:
        """The batch's steps, noting each for the health check."""
        self.batch_sizes[len(requests)] += 1
        self.decoding += 1
        self.last_step = time.monotonic()
        try:
            for step in self.core.steps([r[0] for r in requests], [r[1] for r in requests]):
                self.last_step = time.monotonic()
                yield step
                time.sleep(0)   # hand the GIL to the event loop between steps, so arriving requests queue up
        finally:
            self.decoding -= 1

    def _decode_to_end(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        produced: list[list[int]] = [[] for _ in requests]
        for step in self._decode(requests):
            for ids, token in zip(produced, step):
                if token is not None:
                    ids.append(token)
        return [Generation(ids, finish_reason(ids, self.core.eos_id), params.seed, len(prompt))
                for ids, (prompt, params) in zip(produced, requests)]

    # Two batch queues: whole replies come back once (no per-token traffic in the replica's event loop, which
    # shares the GIL with the decoding thread); streams get every token as it comes.
    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def whole(self, requests: list[tuple[list[int], SamplingParams]]) -> list[Generation]:
        return await asyncio.to_thread(self._decode_to_end, requests)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.01)
    async def steps(self, requests: list[tuple[list[int], SamplingParams]]) -> AsyncIterator[list[Any]]:
        async for step in _in_thread(self._decode(requests)):   # the replica takes new requests meanwhile
            yield [StopIteration if token is None else token for token in step]

    async def stream(self, prompt: list[int], params: SamplingParams) -> AsyncIterator[int]:
        params = with_seed(params)
        self.core.check(prompt, params)    # a bad request must not fail its batch-mates
        async for token in self.steps((prompt, params)):
            yield token

    async def generate(self, prompt: list[int], params: SamplingParams) -> Generation:
        params = with_seed(params)
        self.core.check(prompt, params)
        draws = await asyncio.gather(*[self.whole((prompt, c)) for c in params.candidates()])   # one batch
        if len(draws) == 1:
            return draws[0]
        return await asyncio.to_thread(self.core.pick, prompt, params, draws)   # one scoring pass


async def _in_thread(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """Run a blocking iterator in a thread of its own and hand its items to the event loop as they come."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    def run() -> None:
        try:
            for item in iterator:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            loop.call_soon_threadsafe(queue.put_nowait, done)
        except BaseException as err:  # noqa: BLE001 — re-raised in the caller
            loop.call_soon_threadsafe(queue.put_nowait, err)

    threading.Thread(target=run, name="decode", daemon=True).start()
    while True:
        item = await queue.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


@serve.deployment(health_check_period_s=10)
@serve.ingress()
class Ingress:
    """HTTP: /v1/chat/completions, /v1/images/generations, /v1/models, /healthz. Checks every request before any
    model sees it; a bad one gets a 4xx JSON error and the server goes on."""

    def __init__(self, tokenizer, generator, detokenizer, config: dict[str, Any]):
        self.cfg = config_from_dict(ServeConfig, config)
        self.tokenizer, self.generator, self.detokenizer = tokenizer, generator, detokenizer
        exported = ExportedModel(self.cfg.model, self.cfg.base_llm)
        self.name = self.cfg.model_name or exported.name
        # text-only prompts and replies are handled here; media goes through the tokenizer deployments
        self.prompts = PromptEncoder(exported, media=False)
        self.replies = OutputDecoder(exported, media=False)
        self.text = self.prompts.text
        self.vocab = exported.vocab
        self.api_key = os.environ.get(self.cfg.api_key_env, "") if self.cfg.api_key_env else ""
        if self.cfg.require_api_key and not self.api_key:
            raise RuntimeError(f"require_api_key is set but ${self.cfg.api_key_env} is empty in the ingress replica")
        self._info: dict[str, Any] | None = None
        self.created = int(time.time())

    async def info(self) -> dict[str, Any]:
        """What the model takes and makes, asked of the deployments once."""
        if self._info is None:
            tok, gen = await asyncio.gather(self.tokenizer.describe.remote(), self.generator.describe.remote())
            self._info = {**tok, **gen, "created": self.created}
        return self._info

    def __serve_build_asgi_app__(self):
        api = FastAPI(title="anytoken", docs_url="/docs")

        @api.exception_handler(ApiError)
        async def api_error(_: Request, err: ApiError):
            return json_response(err.status, err.body())

        @api.exception_handler(HTTPException)
        async def http_error(_: Request, err: HTTPException):
            return json_response(err.status_code, ApiError(err.status_code, str(err.detail), code="not_found"
                                                   if err.status_code == 404 else None).body())

        @api.exception_handler(RequestValidationError)
        async def validation_error(_: Request, err: RequestValidationError):
            first = err.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ()))
            return json_response(400, ApiError(400, f"{param}: {first.get('msg')}", param, "invalid_value").body())

        @api.exception_handler(Exception)
        async def internal_error(_: Request, err: Exception):
            logger.exception("request failed")
            return json_response(500, ApiError(500, f"internal error: {type(err).__name__}", type="server_error").body())

        @api.get("/healthz")
        async def healthz():
            return {"status": "ok", "model": self.name}

        @api.get("/v1/models")
        async def models():
            return {"object": "list", "data": [model_card(self.name, await self.info())]}

        @api.get("/v1/models/{model_id}")
        async def model(model_id: str):
            self._check_model(model_id)
            return model_card(self.name, await self.info())

        @api.post("/v1/chat/completions")
        async def chat(request: Request):
            req: ChatRequest = parse_body(await request.body(), ChatRequest)
            prompt, params = await self._chat_request(req)
            if req.stream:
                include_usage = bool(req.stream_options and req.stream_options.include_usage)
                return StreamingResponse(self._sse(prompt, params, include_usage), media_type="text/event-stream")
            generation = await self._generate(prompt.ids, params)
            return chat_completion(self.name, prompt, generation, await self._decode(generation.ids))

        @api.post("/v1/images/generations")
        async def images(request: Request):
            req: ImageRequest = parse_body(await request.body(), ImageRequest)
            return await self._images(req)

        api.add_middleware(BodyLimit, limit=self.cfg.limits.max_body_bytes)
        if self.api_key:
            api.add_middleware(BearerAuth, key=self.api_key)   # added last: runs first, before any body is read
        return api

    # --- request handling ----------------------------------------------------------------------------------------
    def _check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"the model {model!r} does not exist here (served: {self.name!r})", param="model",
                           code="model_not_found")

    async def _chat_request(self, req: ChatRequest) -> tuple[EncodedPrompt, SamplingParams]:
        self._check_model(req.model)
        if req.stop:
            raise ApiError(400, "stop: stop sequences are not supported", param="stop", code="unsupported_parameter")
        info = await self.info()
        modalities = output_modalities(req.modalities, info["output_modalities"])
        parts, fetch = chat_parts(req, self.cfg.limits.max_media_parts, self.cfg.remote_media_hosts)
        await self._fetch_remote(parts.parts, fetch)
        prompt = await self._encode(parts.parts, parts.params)
        wanted = req.max_completion_tokens or req.max_tokens
        params = SamplingParams(
            max_new_tokens=1, temperature=_pick(req.temperature, 1.0), top_p=_pick(req.top_p, 1.0),
            top_k=_pick(req.top_k, 0), seed=req.seed, modalities=modalities,
            guidance_scale=_pick(req.guidance_scale, 1.0), best_of=_pick(req.best_of, 1))
        if params.best_of > 1 and req.stream:
            raise ApiError(400, "best_of: a reply chosen among several draws cannot be streamed", param="best_of",
                           code="unsupported_parameter")
        try:
            params.validate()
        except ValueError as err:
            raise ApiError(400, str(err), code="invalid_value") from None
        return prompt, replace(params, max_new_tokens=self._budget(prompt, params, wanted, info))

    def _budget(self, prompt: EncodedPrompt, params: SamplingParams, wanted: int | None, info: dict[str, Any]) -> int:
        """max_new_tokens: the asked one if it fits the context, else a 400; by default what the reply needs."""
        room = info["context_length"] - len(prompt.ids)
        forced = params.forced
        needed = info["block_min_tokens"][forced] + 1 if forced else 1
        if params.guidance_scale > 1 and not info["guidance"]:
            raise ApiError(400, "guidance_scale: this model's text tokenizer has no bos to condition guidance on",
                           param="guidance_scale", code="unsupported_parameter")
        if room < needed:
            raise ApiError(400, f"the prompt has {len(prompt.ids)} tokens: with {needed} to generate it exceeds the "
                                f"context length of {info['context_length']}", param="messages",
                           code="context_length_exceeded")
        if wanted is None:   # a media-only reply gets room for its longest block, then eos
            return min(room, info["block_max_tokens"][forced] + 1 if forced else self.cfg.limits.default_max_tokens)
        if wanted > room:
            raise ApiError(400, f"max_tokens {wanted} + {len(prompt.ids)} prompt tokens exceed the context length of "
                                f"{info['context_length']}", param="max_tokens", code="context_length_exceeded")
        if wanted < needed:
            raise ApiError(400, f"max_tokens {wanted} is too small for one {forced} block ({needed - 1} tokens)",
                           param="max_tokens", code="invalid_value")
        return wanted

    async def _fetch_remote(self, parts: list[Any], fetch: list[tuple[int, str]]) -> None:
        import httpx

        if not fetch:   # a client costs ~20 ms to make (its TLS context): only when there is something to fetch
            return
        limit = self.cfg.limits.max_body_bytes
        async with httpx.AsyncClient(timeout=10, follow_redirects=False) as client:
            for index, url in fetch:
                try:
                    async with client.stream("GET", url) as reply:
                        if reply.status_code != 200:
                            raise ApiError(400, f"fetching {url} gave HTTP {reply.status_code}", code="remote_url_failed")
                        data = b""
                        async for chunk in reply.aiter_bytes():
                            data += chunk
                            if len(data) > limit:
                                raise ApiError(413, f"{url} is larger than {limit} bytes", code="payload_too_large")
                except httpx.HTTPError as err:
                    raise ApiError(400, f"fetching {url} failed: {err}", code="remote_url_failed") from None
                parts[index] = MediaPart("image", data)

    async def _encode(self, parts: list[Any], params: list[str]) -> EncodedPrompt:
        if all(isinstance(p, str) for p in parts):
            return self.prompts.build(parts)
        prompt = await self.tokenizer.encode.remote(parts, params)
        if isinstance(prompt, Problem):
            raise prompt.error()
        return prompt

    async def _decode(self, ids: list[int]):
        if self.replies.has_media(ids):
            return await self.detokenizer.decode.remote(ids)
        return self.replies.decode(ids)

    async def _generate(self, prompt: list[int], params: SamplingParams) -> Generation:
        """One generation; if the generator replica dies under it, again on another (a fresh seed is pinned first,
        so a retried request draws the same tokens)."""
        params = with_seed(params)
        deadline = time.monotonic() + self.cfg.ingress.generator_retry_s
        delay = 0.25
        while True:
            try:
                return await self.generator.generate.remote(prompt, params)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as err:
                if time.monotonic() + delay > deadline:
                    raise ApiError(503, f"the generator is unavailable: {type(err).__name__}", type="server_error",
                                   code="generator_unavailable") from None
                logger.warning("generator replica lost (%s); retrying in %.2fs", type(err).__name__, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 4.0)
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, ValueError):   # a request the checks above should have refused
                    raise ApiError(400, str(err.cause), code="invalid_request") from None
                raise

    async def _sse(self, prompt: EncodedPrompt, params: SamplingParams, include_usage: bool) -> AsyncIterator[str]:
        chunk_id, created = new_id("chatcmpl"), int(time.time())
        yield chat_chunk(chunk_id, created, self.name, {"role": "assistant", "content": ""})
        params = with_seed(params)
        stream, ids = TextStream(self.text, self.vocab), []
        try:
            async for token in self.generator.options(stream=True).stream.remote(prompt.ids, params):
                ids.append(token)
                delta = stream.push(token)
                if delta:
                    yield chat_chunk(chunk_id, created, self.name, {"content": delta})
            output = await self._decode(ids)
        except Exception as err:  # noqa: BLE001 — the status line is sent: report in the stream, then end it
            logger.exception("stream failed")
            error = ApiError(500, f"generation failed: {type(err).__name__}", type="server_error")
            yield f"data: {json.dumps(error.body())}\n\n"
            yield "data: [DONE]\n\n"
            return
        generation = Generation(ids, finish_reason(ids, self.text.eos_token_id), params.seed, len(prompt.ids))
        final = {"media": media_items(output)} if output.media else {}
        yield chat_chunk(chunk_id, created, self.name, final, generation.finish_reason)
        if include_usage:
            yield chat_chunk(chunk_id, created, self.name, None, usage_=usage(prompt, generation, output))
        yield "data: [DONE]\n\n"

    async def _images(self, req: ImageRequest) -> dict[str, Any]:
        self._check_model(req.model)
        info = await self.info()
        if "image" not in info["output_modalities"]:
            raise ApiError(400, "this model does not generate images", param="model", code="unsupported_modality")
        n = req.n or 1
        if n > self.cfg.limits.max_images:
            raise ApiError(400, f"n: at most {self.cfg.limits.max_images} images per request", param="n",
                           code="invalid_value")
        size = f"{info['image_size']}x{info['image_size']}"
        if req.size not in (None, "auto", size):
            raise ApiError(400, f"size: this model makes {size} images, not {req.size}", param="size",
                           code="invalid_value")
        if req.response_format == "url":
            raise ApiError(400, "response_format: only b64_json is served (no image hosting)", param="response_format",
                           code="invalid_value")
        prompt = await self._encode([req.prompt], ["prompt"])
        params = SamplingParams(1, temperature=_pick(req.temperature, 1.0), top_p=_pick(req.top_p, 1.0),
                                top_k=_pick(req.top_k, 0), modalities=("image",),
                                guidance_scale=_pick(req.guidance_scale, self.cfg.default_guidance_scale),
                                best_of=_pick(req.best_of, 1))
        params = replace(params, max_new_tokens=self._budget(prompt, params, None, info))
        try:
            params.validate()
        except ValueError as err:
            raise ApiError(400, str(err), code="invalid_value") from None
        seeds = [None if req.seed is None else req.seed + i for i in range(n)]
        generations = await asyncio.gather(*[self._generate(prompt.ids, replace(params, seed=s)) for s in seeds])
        outputs = await asyncio.gather(*[self._decode(g.ids) for g in generations])
        return image_response(list(zip(generations, outputs)))


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


# --- the application -------------------------------------------------------------------------------------------
def _autoscaling(a: AutoscalingConfig) -> dict[str, Any]:
    if not 1 <= a.min_replicas <= a.max_replicas:
        raise ValueError(f"autoscaling: need 1 <= min_replicas <= max_replicas, got {a.min_replicas}, {a.max_replicas}")
    return {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas, "initial_replicas": a.min_replicas,
            "target_ongoing_requests": a.target_ongoing_requests, "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s}


def _gpus(requested: float | None) -> float:
    if requested is not None:
        return requested
    return 1.0 if ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def app_from_config(cfg: ServeConfig) -> serve.Application:
    """The bound application: Ingress over Tokenizer, Generator and Detokenizer, each with its replica settings."""
    if not cfg.model:
        raise ValueError("no model folder: set `model` (anytoken serve --model DIR)")
    ExportedModel(cfg.model, cfg.base_llm)   # fail here, not in a replica, when the folder is wrong
    gen = cfg.generator
    if gen.max_ongoing_requests < gen.batching.max_batch_size:
        raise ValueError(f"generator.max_ongoing_requests ({gen.max_ongoing_requests}) must be at least "
                         f"generator.batching.max_batch_size ({gen.batching.max_batch_size}), or batches never fill")
    plain = config_to_dict(cfg)
    env = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}

    def replica(c: ReplicaConfig, num_gpus: float = 0.0) -> dict[str, Any]:
        return {"ray_actor_options": {"num_cpus": c.num_cpus, "num_gpus": num_gpus, "runtime_env": {"env_vars": env}},
                "max_ongoing_requests": c.max_ongoing_requests, "autoscaling_config": _autoscaling(c.autoscaling)}

    tokenizer = Tokenizer.options(**replica(cfg.tokenizer)).bind(plain)
    detokenizer = Detokenizer.options(**replica(cfg.detokenizer)).bind(plain)
    generator = Generator.options(**replica(gen, _gpus(gen.num_gpus))).bind(plain)
    ingress = Ingress.options(**replica(cfg.ingress), max_queued_requests=cfg.ingress.max_queued_requests,
                              backpressure_config={"status_code": 429, "retry_after_s": 1})
    return ingress.bind(tokenizer, generator, detokenizer, plain)


def build_app(args: dict[str, Any]) -> serve.Application:
    """`serve run` / `serve deploy` builder: `args` are ServeConfig's keys (as in workflows/configs/serve.yaml)."""
    return app_from_config(config_from_dict(ServeConfig, args))
