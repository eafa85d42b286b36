"""The OpenAI-shaped HTTP API of the server: request schemas, their checks, errors, and response bodies.

No Ray here: the Serve deployments (actors/serve.py) call these. A bad request becomes an ApiError, answered as
`{"error": {"message", "type", "param", "code"}}` with a 4xx status, as OpenAI's API does.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Union
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse

from models.generation import MAX_BEST_OF, OUTPUT_MODALITIES, Generation
from models.multimodal_generator import DecodedOutput, EncodedPrompt, MediaPart


class ApiError(Exception):
    """A request the server refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Problem:
    """A client error a deployment found, returned as a value: it crosses processes where exceptions with extra
    fields do not unpickle."""

    message: str
    param: str | None = None
    code: str | None = None

    def error(self) -> ApiError:
        return ApiError(400, self.message, self.param, self.code)


# --- request schemas (OpenAI's, plus top_k, guidance_scale and image/audio/video output) -------------------------
class _Schema(BaseModel):
    model_config = ConfigDict(extra="ignore")   # fields other clients send (user, metadata, ...) are ignored


class TextPart(_Schema):
    type: Literal["text"]
    text: str


class ImageUrl(_Schema):
    url: str
    detail: str | None = None


class ImagePart(_Schema):
    type: Literal["image_url"]
    image_url: ImageUrl


class InputAudio(_Schema):
    data: str
    format: str = "wav"


class AudioPart(_Schema):
    type: Literal["input_audio"]
    input_audio: InputAudio


class InputVideo(_Schema):
    data: str
    format: str = "mp4"


class VideoPart(_Schema):
    type: Literal["input_video"]
    input_video: InputVideo


ContentPart = Annotated[Union[TextPart, ImagePart, AudioPart, VideoPart], Field(discriminator="type")]


class Message(_Schema):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Schema):
    include_usage: bool = False


class ChatRequest(_Schema):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = None
    n: int | None = Field(None, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    modalities: list[Literal["text", "image", "audio", "video"]] | None = Field(None, min_length=1)
    guidance_scale: float | None = Field(None, ge=1, le=20)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)
    stop: str | list[str] | None = None


class ImageRequest(_Schema):
    prompt: str = Field(min_length=1)
    model: str | None = None
    n: int | None = Field(None, ge=1)
    size: str | None = None
    response_format: Literal["b64_json", "url"] | None = None
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    guidance_scale: float | None = Field(None, ge=1, le=20)
    best_of: int | None = Field(None, ge=1, le=MAX_BEST_OF)


def parse_body(raw: bytes, schema: type[BaseModel]) -> Any:
    """Request bytes -> the schema, or an ApiError that names the field at fault."""
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ApiError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return schema.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param,
                       code="invalid_value") from None


# --- request -> parts --------------------------------------------------------------------------------------------
@dataclass
class RequestParts:
    """The prompt's pieces in order: text and media bytes, with each media part's place in the request."""

    parts: list[str | MediaPart] = field(default_factory=list)
    params: list[str] = field(default_factory=list)   # "messages[i].content[j]" of each part, for errors


def decode_base64(data: str, param: str) -> bytes:
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not valid base64", param=param, code="invalid_base64") from None
    if not raw:
        raise ApiError(400, f"{param}: empty media (0 bytes)", param=param, code="invalid_media")
    return raw


def remote_host(url: str) -> str | None:
    """The host of an http(s) URL, None for anything else."""
    parts = urlsplit(url)
    return parts.hostname if parts.scheme in ("http", "https") else None


def image_source(url: str, param: str, remote_hosts: list[str]) -> bytes | str:
    """A data URI's bytes, or the URL itself when remote fetching is allowed for its host."""
    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, f"{param}: expected a data URI of the form data:image/png;base64,...", param=param,
                           code="invalid_image_url")
        if not header[5:].startswith("image/"):
            raise ApiError(400, f"{param}: the data URI holds {header[5:-7] or 'no type'}, not an image", param=param,
                           code="invalid_image_url")
        return decode_base64(payload, param)
    host = remote_host(url)
    if host is None:
        raise ApiError(400, f"{param}: expected a data URI (data:image/png;base64,...)", param=param,
                       code="invalid_image_url")
    if host not in remote_hosts:
        raise ApiError(400, f"{param}: remote image URLs are off on this server (host {host!r} is not in "
                            "remote_media_hosts); send the image as a data URI", param=param, code="remote_url_refused")
    return url


def chat_parts(req: ChatRequest, max_media_parts: int, remote_hosts: list[str]) -> tuple[RequestParts, list[tuple[int, str]]]:
    """Messages in order -> text and media parts; remote images come back as (index, url) to fetch."""
    out, fetch = RequestParts(), []
    for i, message in enumerate(req.messages):
        content = message.content
        items: list[Any] = [TextPart(type="text", text=content)] if isinstance(content, str) else (content or [])
        for j, part in enumerate(items):
            param = f"messages.{i}.content" + ("" if isinstance(content, str) else f".{j}")
            if isinstance(part, TextPart):
                if part.text.strip():
                    if out.parts and isinstance(out.parts[-1], str):
                        out.parts[-1] += " " + part.text.strip()
                    else:
                        out.parts.append(part.text.strip())
                        out.params.append(param)
                continue
            media = sum(not isinstance(p, str) for p in out.parts) + 1
            if media > max_media_parts:
                raise ApiError(400, f"too many media parts: at most {max_media_parts} per request", param=param,
                               code="too_many_media_parts")
            if isinstance(part, ImagePart):
                source = image_source(part.image_url.url, param + ".image_url.url", remote_hosts)
                if isinstance(source, str):
                    fetch.append((len(out.parts), source))
                    source = b""
                out.parts.append(MediaPart("image", source))
            elif isinstance(part, AudioPart):
                out.parts.append(MediaPart("audio", decode_base64(part.input_audio.data, param + ".input_audio.data")))
            else:
                out.parts.append(MediaPart("video", decode_base64(part.input_video.data, param + ".input_video.data")))
            out.params.append(param)
    if not out.parts:
        raise ApiError(400, "messages: no text and no media to answer", param="messages", code="empty_prompt")
    return out, fetch


def output_modalities(requested: list[str] | None, available: list[str]) -> tuple[str, ...]:
    modalities = tuple(requested or ["text"])
    missing = [m for m in modalities if m not in available]
    if missing:
        raise ApiError(400, f"modalities: this model cannot produce {missing[0]} (it produces {available})",
                       param="modalities", code="unsupported_modality")
    if "text" not in modalities and len(modalities) > 1:
        raise ApiError(400, f"modalities {list(modalities)}: without text, ask for exactly one of "
                            f"{[m for m in OUTPUT_MODALITIES if m != 'text']}", param="modalities",
                       code="invalid_value")
    return modalities


# --- responses ----------------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def media_items(output: DecodedOutput) -> list[dict[str, Any]]:
    """The reply's generated files: `message.media` (and each stream's last chunk's `delta.media`)."""
    return [{"type": m.modality, "mime_type": m.mime_type, "data": base64.b64encode(m.data).decode("ascii"),
             "tokens": m.tokens, **m.details} for m in output.media]


def usage(prompt: EncodedPrompt, generation: Generation, output: DecodedOutput) -> dict[str, Any]:
    completion_media: dict[str, int] = {}
    for m in output.media:
        completion_media[f"{m.modality}_tokens"] = completion_media.get(f"{m.modality}_tokens", 0) + m.tokens
    return {"prompt_tokens": len(prompt.ids), "completion_tokens": len(generation.ids),
            "total_tokens": len(prompt.ids) + len(generation.ids),
            "prompt_tokens_details": {"text_tokens": prompt.text_tokens,
                                      **{f"{k}_tokens": v for k, v in prompt.media_tokens.items()}},
            "completion_tokens_details": {"text_tokens": output.text_tokens, **completion_media}}


def assistant_message(output: DecodedOutput, created: int) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": output.text, "refusal": None,
                               "media": media_items(output)}
    audio = next((m for m in message["media"] if m["type"] == "audio"), None)
    if audio is not None:   # OpenAI's own field for generated speech, so its clients read it typed
        message["audio"] = {"id": new_id("audio"), "data": audio["data"], "expires_at": created + 3600,
                            "transcript": output.text}
    return message


def chat_completion(model: str, prompt: EncodedPrompt, generation: Generation, output: DecodedOutput) -> dict[str, Any]:
    created = int(time.time())
    return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": created, "model": model,
            "system_fingerprint": None, "seed": generation.seed,
            "choices": [{"index": 0, "message": assistant_message(output, created),
                         "finish_reason": generation.finish_reason, "logprobs": None}],
            "usage": usage(prompt, generation, output)}


def chat_chunk(chunk_id: str, created: int, model: str, delta: dict[str, Any] | None,
               finish_reason: str | None = None, usage_: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {"id": chunk_id, "object": "chat.completion.chunk", "created": created, "model": model,
                            "system_fingerprint": None,
                            "choices": [] if delta is None else
                            [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if usage_ is not None:
        body["usage"] = usage_
    return f"data: {json.dumps(body)}\n\n"


def image_response(outputs: list[tuple[Generation, DecodedOutput]]) -> dict[str, Any]:
    return {"created": int(time.time()),
            "data": [{"b64_json": media_items(out)[0]["data"], "revised_prompt": None, "seed": gen.seed}
                     for gen, out in outputs]}


def model_card(name: str, info: dict[str, Any]) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": info.get("created", 0), "owned_by": "anytoken",
            "modalities": {"input": info["input_modalities"], "output": info["output_modalities"]},
            "context_length": info["context_length"]}


# --- ASGI guards ----------------------------------------------------------------------------------------------
def json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: refuse a body over `limit` bytes with 413, by its Content-Length or, for chunked bodies,
    by the bytes read so far (Serve itself sets no limit)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body exceeds the limit of {self.limit} bytes (limits.max_body_bytes)",
                             code="payload_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await json_response(413, too_large.body())(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await json_response(413, too_large.body())(scope, receive, send)
            if not message.get("more_body"):
                break
        body: bytes | None = b"".join(chunks)

        async def replay():   # the body once, then the real channel (a streaming response awaits the disconnect)
            nonlocal body
            if body is None:
                return await receive()
            out, body = body, None
            return {"type": "http.request", "body": out, "more_body": False}

        return await self.app(scope, replay, send)


class BearerAuth:
    """ASGI middleware: every path but /healthz needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str, open_paths: tuple[str, ...] = ("/healthz",)):
        self.app, self.key, self.open_paths = app, key.encode(), open_paths

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].endswith(self.open_paths):
            given = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = given.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                error = ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                 type="authentication_error", code="invalid_api_key")
                return await json_response(401, error.body(), {"WWW-Authenticate": "Bearer"})(scope, receive, send)
        return await self.app(scope, receive, send)
