"""The Serve application end to end: a real local Ray, a real Serve app on 127.0.0.1 with a tiny exported model, real
HTTP (httpx and the official openai client), every kind of request, the bad-request suite, load, and a killed
generator replica."""
import base64
import io
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import soundfile
import torch
from PIL import Image

from models.generation import SamplingParams
from models.media import encode_mp4, encode_png, encode_wav, read_mp4
from models.multimodal_generator import InputLimits, MultimodalGenerator

pytestmark = pytest.mark.slow   # every test here needs the app up (~30 s to start on 2 cores)

KEY_ENV = "ANYTOKEN_TEST_SERVE_KEY"
KEY = "test-key-123"
APP = "anytoken-test"
MODEL = "tiny-teal"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_uri(width: int = 40, height: int = 48) -> str:
    return "data:image/png;base64," + base64.b64encode(encode_png(torch.rand(3, height, width))).decode()


def wav_b64(seconds: float = 0.5, rate: int = 16000) -> str:
    wave = torch.sin(torch.linspace(0, 2000 * seconds, int(rate * seconds))) * 0.3
    return base64.b64encode(encode_wav(wave, rate)).decode()


def user(*parts) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def text(t: str) -> dict:
    return {"type": "text", "text": t}


def image(uri: str) -> dict:
    return {"type": "image_url", "image_url": {"url": uri}}


def audio(data: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


@pytest.fixture(scope="module", autouse=True)
def api_key_in_environment():
    """The key the app reads from $ANYTOKEN_TEST_SERVE_KEY: set before Ray starts, so its workers inherit it."""
    os.environ[KEY_ENV] = KEY
    yield
    os.environ.pop(KEY_ENV, None)


@pytest.fixture(scope="module")
def media_host():
    """A plain HTTP server on 127.0.0.1 holding one PNG, for the allowed remote-URL case."""
    png = encode_png(torch.rand(3, 32, 32))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            found = self.path == "/seven.png"
            self.send_response(200 if found else 404)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(png if found else b"")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def server(ray_local, tiny_exported_model, media_host):
    from ray import serve

    from actors.serve import build_app

    port = free_port()
    config = {
        "model": tiny_exported_model, "api_key_env": KEY_ENV, "remote_media_hosts": ["127.0.0.1"],
        "limits": {"max_body_bytes": 1_000_000, "max_media_parts": 3, "image_max_pixels": 200_000,
                   "audio_max_seconds": 1.0, "default_max_tokens": 16, "max_images": 3},
        "ingress": {"num_cpus": 0.25, "generator_retry_s": 90,
                    "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "tokenizer": {"num_cpus": 0.5}, "detokenizer": {"num_cpus": 0.5},
        "generator": {"num_cpus": 1, "max_ongoing_requests": 32, "batching": {"max_batch_size": 8}},
    }
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client
    serve.delete(APP)
    serve.shutdown()


def chat(server: httpx.Client, **body) -> dict:
    reply = server.post("/v1/chat/completions", json={"model": MODEL, **body})
    assert reply.status_code == 200, reply.text
    return reply.json()


def media_of(reply: dict) -> list[dict]:
    return reply["choices"][0]["message"]["media"]


# --- each kind of request ------------------------------------------------------------------------------------
def test_health_and_models(server):
    assert server.get("/healthz", headers={"Authorization": ""}).json()["status"] == "ok"   # open to probes
    models = server.get("/v1/models").json()
    card = models["data"][0]
    assert models["object"] == "list" and card["id"] == MODEL and card["context_length"] == 512
    assert card["modalities"] == {"input": ["text", "image", "audio", "video"],
                                  "output": ["text", "image", "audio", "video"]}


def test_auth_is_required_with_a_key_in_the_environment(server):
    for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        reply = server.post("/v1/chat/completions", headers=headers, json={"messages": user(text("hi"))})
        assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    assert server.get("/v1/models", headers={"Authorization": ""}).status_code == 401


def test_text_to_text_is_reproducible_with_a_seed(server):
    first = chat(server, messages=[{"role": "user", "content": "hello there"}], max_tokens=8, seed=11)
    again = chat(server, messages=[{"role": "user", "content": "hello there"}], max_tokens=8, seed=11)
    assert first["object"] == "chat.completion" and first["seed"] == 11
    assert first["choices"][0]["message"]["content"] == again["choices"][0]["message"]["content"]
    assert first["choices"][0]["finish_reason"] in ("stop", "length") and media_of(first) == []
    assert first["usage"]["total_tokens"] == first["usage"]["prompt_tokens"] + first["usage"]["completion_tokens"]
    assert first["usage"]["completion_tokens"] <= 8


def test_image_to_text(server):
    reply = chat(server, messages=user(image(png_uri()), text("this is")), max_tokens=6, seed=1)
    details = reply["usage"]["prompt_tokens_details"]
    assert details["image_tokens"] == 16 + 2 and details["text_tokens"] == len("this is")
    assert isinstance(reply["choices"][0]["message"]["content"], str) and media_of(reply) == []


def test_text_to_image_gives_a_png_of_the_tokenizers_size(server):
    reply = chat(server, messages=user(text("a handwritten seven")), modalities=["image"], seed=2)
    (item,) = media_of(reply)
    png = Image.open(io.BytesIO(base64.b64decode(item["data"])))
    assert item["type"] == "image" and item["mime_type"] == "image/png" and png.format == "PNG"
    assert png.size == (32, 32) and (item["width"], item["height"]) == (32, 32) and item["tokens"] == 16
    assert reply["usage"]["completion_tokens_details"]["image_tokens"] == 16
    assert reply["choices"][0]["finish_reason"] == "stop"


def test_audio_to_text(server):
    reply = chat(server, messages=user(audio(wav_b64(0.5, 22050))), max_tokens=5, seed=3)
    assert reply["usage"]["prompt_tokens_details"]["audio_tokens"] >= 3


def test_text_to_audio_gives_a_wav_also_in_openais_audio_field(server):
    reply = chat(server, messages=user(text("say seven")), modalities=["audio"], seed=4)
    (item,) = media_of(reply)
    wave, rate = soundfile.read(io.BytesIO(base64.b64decode(item["data"])))
    assert item["mime_type"] == "audio/wav" and rate == 16000 and len(wave) > 0
    assert reply["choices"][0]["message"]["audio"]["data"] == item["data"]


def test_video_in_and_out(server):
    out = chat(server, messages=user(text("a seven moving left")), modalities=["video"], seed=5)
    (item,) = media_of(out)
    frames, _ = read_mp4(base64.b64decode(item["data"]))
    assert item["mime_type"] == "video/mp4" and frames.shape[0] == item["frames"] and frames.shape[2:] == (32, 32)
    clip = base64.b64encode(encode_mp4(torch.rand(4, 3, 32, 32), fps=4)).decode()
    reply = chat(server, messages=user({"type": "input_video", "input_video": {"data": clip}}), max_tokens=4)
    assert reply["usage"]["prompt_tokens_details"]["video_tokens"] >= 16 + 2


def test_images_endpoint(server, tiny_exported_model):
    reply = server.post("/v1/images/generations", json={"model": MODEL, "prompt": "a seven", "n": 2, "seed": 9,
                                                         "size": "32x32"})
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert len(data) == 2 and [d["seed"] for d in data] == [9, 10]
    for d in data:
        assert Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))).size == (32, 32)
    again = server.post("/v1/images/generations", json={"prompt": "a seven", "seed": 9}).json()["data"][0]
    assert again["b64_json"] == data[0]["b64_json"]
    guided = server.post("/v1/images/generations", json={"prompt": "a seven", "seed": 9, "guidance_scale": 3})
    assert guided.status_code == 200
    # best_of: of 4 draws (one batch in the replica) the one the model reads "a seven" back from best, as the
    # generator picks it in one process; draw 0 is the plain request, so here the kept one is another
    best = server.post("/v1/images/generations", json={"prompt": "a seven", "seed": 14, "best_of": 4}).json()["data"]
    local = MultimodalGenerator(tiny_exported_model, limits=InputLimits(audio_max_seconds=1.0))
    shape = local.generator.grammar.shapes["image"]
    (output, kept), = local([(["a seven"], SamplingParams(shape.max_tokens + 1, modalities=("image",), seed=14,
                                                          best_of=4))])
    assert kept.candidate != 0 and best[0]["seed"] == 14
    assert base64.b64decode(best[0]["b64_json"]) == output.media[0].data


def test_streaming_sends_text_deltas_then_done(server):
    body = {"model": MODEL, "messages": user(text("count")), "max_tokens": 10, "seed": 21,
            "stream_options": {"include_usage": True}}
    whole = chat(server, **{k: v for k, v in body.items() if k != "stream_options"})
    with server.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in reply.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == whole["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_a_streamed_image_comes_in_the_last_chunk(server):
    with server.stream("POST", "/v1/chat/completions", json={"messages": user(text("a seven")), "stream": True,
                                                             "modalities": ["image"], "seed": 2}) as reply:
        events = [json.loads(line[6:]) for line in reply.iter_lines() if line.startswith("data: {")]
    (item,) = events[-1]["choices"][0]["delta"]["media"]
    assert events[-1]["choices"][0]["finish_reason"] == "stop"
    assert Image.open(io.BytesIO(base64.b64decode(item["data"]))).size == (32, 32)


def test_an_allowed_remote_image_url_is_fetched(server, media_host):
    reply = chat(server, messages=user(image(f"{media_host}/seven.png")), max_tokens=3)
    assert reply["usage"]["prompt_tokens_details"]["image_tokens"] == 18
    missing = server.post("/v1/chat/completions", json={"messages": user(image(f"{media_host}/none.png"))})
    assert missing.status_code == 400 and "HTTP 404" in missing.json()["error"]["message"]


# --- the official openai client, as a user's code calls it ------------------------------------------------------
def test_the_openai_client(server):
    from openai import BadRequestError, OpenAI

    client = OpenAI(base_url=str(server.base_url).rstrip("/") + "/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    plain = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                           max_tokens=6, seed=1, temperature=0.7)
    assert plain.choices[0].message.role == "assistant" and plain.usage.completion_tokens <= 6
    seen = client.chat.completions.create(model=MODEL, max_tokens=4, messages=user(
        text("what is this?"), image(png_uri()), audio(wav_b64())))
    assert seen.usage.prompt_tokens > 18
    drawn = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a seven"}],
                                           modalities=["image"], seed=3)
    (item,) = drawn.choices[0].message.media
    assert Image.open(io.BytesIO(base64.b64decode(item["data"]))).size == (32, 32)
    spoken = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "seven"}],
                                            modalities=["audio"], seed=4)
    assert soundfile.read(io.BytesIO(base64.b64decode(spoken.choices[0].message.audio.data)))[1] == 16000
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=6, seed=1, temperature=0.7, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == plain.choices[0].message.content
    images = client.images.generate(model=MODEL, prompt="a seven", n=1, size="32x32", response_format="b64_json")
    assert Image.open(io.BytesIO(base64.b64decode(images.data[0].b64_json))).size == (32, 32)
    with pytest.raises(BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], temperature=3)


# --- bad requests: each a 4xx with a JSON error naming the problem, and the server goes on ------------------------
def big_png(side: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), "white").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
    "JSON that is no object": (b'[1, 2]', 400, "must be a JSON object"),
    "no messages": ({"model": MODEL}, 400, "messages"),
    "unknown model": ({"model": "gpt-9", "messages": user(text("hi"))}, 404, "gpt-9"),
    "bad base64": ({"messages": user(image("data:image/png;base64,@@@not base64@@@"))}, 400, "not valid base64"),
    "bytes that are no image": ({"messages": user(image("data:image/png;base64," + base64.b64encode(
        b"definitely not a picture").decode()))}, 400, "not an image"),
    "bytes that are no audio": ({"messages": user(audio(base64.b64encode(b"RIFF but no wave").decode()))}, 400,
                                "not a readable audio file"),
    "a data URI of another type": ({"messages": user(image("data:text/plain;base64,aGk="))}, 400, "not an image"),
    "a remote URL of a host not allowed": ({"messages": user(image("https://example.com/cat.png"))}, 400,
                                           "remote image URLs are off"),
    "an image too large in pixels": ({"messages": user(image(big_png(600)))}, 400, "max_pixels"),
    "too many media parts": ({"messages": user(*[image(png_uri(8, 8))] * 4)}, 400, "too many media parts"),
    "a prompt longer than the context": ({"messages": user(text("x" * 600))}, 400, "context length"),
    "max_tokens beyond the context": ({"messages": user(text("hi")), "max_tokens": 600}, 400, "context length"),
    "temperature too high": ({"messages": user(text("hi")), "temperature": 2.5}, 400, "temperature"),
    "negative top_k": ({"messages": user(text("hi")), "top_k": -1}, 400, "top_k"),
    "top_p of zero": ({"messages": user(text("hi")), "top_p": 0}, 400, "top_p"),
    "max_tokens of zero": ({"messages": user(text("hi")), "max_tokens": 0}, 400, "max_tokens"),
    "a seed that is no integer": ({"messages": user(text("hi")), "seed": "seven"}, 400, "seed"),
    "n above one": ({"messages": user(text("hi")), "n": 2}, 400, "n"),
    "an unknown output modality": ({"messages": user(text("hi")), "modalities": ["smell"]}, 400, "modalities"),
    "two media outputs without text": ({"messages": user(text("hi")), "modalities": ["image", "audio"]}, 400,
                                       "exactly one"),
    "max_tokens too small for an image": ({"messages": user(text("hi")), "modalities": ["image"], "max_tokens": 5},
                                          400, "too small for one image block"),
    "stop sequences": ({"messages": user(text("hi")), "stop": ["\n"]}, 400, "stop"),
    "best_of for a text reply": ({"messages": user(text("hi")), "best_of": 2}, 400, "ranks media replies"),
    "best_of streamed": ({"messages": user(text("a seven")), "modalities": ["image"], "best_of": 2, "stream": True},
                         400, "cannot be streamed"),
    "best_of above its limit": ({"messages": user(text("a seven")), "modalities": ["image"], "best_of": 65}, 400,
                                "best_of"),
    "best_of with media in the prompt": ({"messages": user(image(png_uri()), text("a seven")), "modalities": ["image"],
                                          "best_of": 2}, 400, "text only"),
    "an unknown content part": ({"messages": user({"type": "hologram", "data": "x"})}, 400, "messages"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_chat_request_gets_a_4xx_that_names_the_problem(server, case):
    body, status, words = BAD_REQUESTS[case]
    reply = (server.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
             if isinstance(body, bytes) else server.post("/v1/chat/completions", json=body))
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_bodies_over_the_size_limit_get_413_declared_or_chunked(server):
    huge = {"messages": user(image("data:image/png;base64," + "A" * 1_200_000))}
    reply = server.post("/v1/chat/completions", json=huge)
    assert reply.status_code == 413 and "1000000 bytes" in reply.json()["error"]["message"]

    def chunked():   # no Content-Length: the limit counts the bytes as they arrive
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(12):
            yield b"x" * 100_000
        yield b'"}]}'

    reply = server.post("/v1/chat/completions", content=chunked(), headers={"Content-Type": "application/json"})
    assert reply.status_code == 413


def test_bad_image_requests(server):
    for body, words in [({"prompt": "a seven", "size": "1024x1024"}, "32x32"), ({"prompt": "x", "n": 4}, "at most 3"),
                        ({"prompt": "x", "response_format": "url"}, "b64_json"), ({"prompt": ""}, "prompt"),
                        ({"prompt": "x", "model": "dall-e-3"}, "dall-e-3")]:
        reply = server.post("/v1/images/generations", json=body)
        assert 400 <= reply.status_code < 500 and words in reply.json()["error"]["message"], reply.text
    assert server.get("/v1/nothing").status_code == 404 and "error" in server.get("/v1/nothing").json()


def test_the_server_goes_on_after_bad_requests(server):
    for body, _, _ in BAD_REQUESTS.values():
        if isinstance(body, dict):
            server.post("/v1/chat/completions", json=body)
    assert chat(server, messages=user(text("still there?")), max_tokens=3)["choices"][0]["message"]["role"] == \
        "assistant"


# --- load and failure --------------------------------------------------------------------------------------------
REQUEST_MIX = [
    {"messages": user(text("hello")), "max_tokens": 8},
    {"messages": user(image(png_uri(16, 16)), text("this is")), "max_tokens": 6},
    {"messages": user(text("a seven")), "modalities": ["image"]},
    {"messages": user(text("tell me")), "max_tokens": 12, "temperature": 0.8, "top_p": 0.9},
]


def run_load(server: httpx.Client, total: int, concurrency: int, during=None) -> list[tuple[int, float]]:
    """(status, time it came back) of each request; `during(replies so far)` runs here while they are in flight."""
    replies: list[tuple[int, float]] = []

    def one(i: int) -> tuple[int, float]:
        reply = server.post("/v1/chat/completions", json={**REQUEST_MIX[i % len(REQUEST_MIX)], "seed": i})
        replies.append((reply.status_code, time.monotonic()))
        return replies[-1]

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(one, i) for i in range(total)]
        if during is not None:
            during(replies)
        return [f.result() for f in futures]


def count(replies: list[tuple[int, float]]) -> dict[int, int]:
    statuses = [status for status, _ in replies]
    return {s: statuses.count(s) for s in set(statuses)}


def generator_handle():
    from ray import serve

    return serve.get_deployment_handle("Generator", APP)


def test_200_requests_at_concurrency_16_all_succeed_in_batches(server):
    replies = run_load(server, total=200, concurrency=16)
    assert count(replies) == {200: 200}
    sizes = generator_handle().stats.remote().result()["batch_sizes"]
    assert max(sizes) > 1, f"no request shared a batch: {sizes}"


def test_a_killed_generator_replica_is_replaced_and_no_request_is_lost(server):
    old_pid = generator_handle().pid.remote().result()
    killed_at = []

    def kill_once_busy(replies):
        while len(replies) < 16:   # the server is warm and every client has a request in flight
            time.sleep(0.01)
        os.kill(old_pid, signal.SIGKILL)
        killed_at.append(time.monotonic())

    replies = run_load(server, total=96, concurrency=16, during=kill_once_busy)
    assert count(replies) == {200: 96}
    assert sum(done > killed_at[0] for _, done in replies) >= 32, "the kill came after the load, not during it"
    new_pid = generator_handle().pid.remote().result()
    assert new_pid != old_pid
    assert chat(server, messages=user(text("back?")), max_tokens=3)["usage"]["completion_tokens"] <= 3

