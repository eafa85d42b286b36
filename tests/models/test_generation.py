"""Generation over the MultimodalLM: the modality grammar, the KV cache, batching, seeds, sampling parameters, and the
exported folder's round trip from request bytes to PNG / WAV / MP4 bytes."""
import io
from dataclasses import replace

import pytest
import soundfile
import torch
from PIL import Image

from models.evaluation import prompt_answer_logprobs
from models.generation import SamplingParams, generate, sample_token
from models.media import encode_png, encode_wav, read_mp4
from models.exported import ExportedModel
from models.multimodal_generator import (InputLimits, MediaPart, MultimodalGenerator, OutputDecoder, PromptEncoder,
                                         TextStream, TokenGenerator)
from models.preprocess import MediaError

LIMITS = InputLimits(audio_max_seconds=1.0)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread avoids OpenMP spin-waiting on busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def exported(tiny_exported_model) -> ExportedModel:
    return ExportedModel(tiny_exported_model)


@pytest.fixture(scope="module")
def parts(exported):
    return PromptEncoder(exported, LIMITS), TokenGenerator(exported, LIMITS), OutputDecoder(exported)


def prompt_ids(encoder: PromptEncoder, *texts: str) -> list[list[int]]:
    return [encoder.encode([t]).ids for t in texts]


def check_well_formed(ids: list[int], gen: TokenGenerator, decoder: OutputDecoder, allowed: set[str]) -> list[str]:
    """Every block complete and of the grammar's size, only legal ids in it; returns the blocks' modalities."""
    vocab, shapes = gen.vocab, gen.grammar.shapes
    segments = decoder.segments(ids)
    assert sum(len(s) for _, s in segments) + (ids[-1] == gen.eos_id) == len(ids), "ids outside any segment"
    blocks = []
    for kind, seg in segments:
        if kind == "text":
            assert all(i < vocab.text_size for i in seg)
            continue
        blocks.append(kind)
        assert kind in allowed
        codes = vocab.unwrap(kind, seg)   # raises on a foreign id inside the block
        if kind == "video":
            assert 1 <= len(codes) <= shapes["video"].max_frames
            assert all(len(frame) == shapes["video"].maximum for frame in codes)
        elif shapes[kind].exact:
            assert len(codes) == shapes[kind].maximum
        else:
            assert 1 <= len(codes) <= shapes[kind].maximum
    return blocks


@pytest.mark.parametrize("modality", ["image", "audio", "video"])
def test_a_forced_block_has_the_tokenizers_length_and_only_its_codes(parts, modality):
    encoder, gen, decoder = parts
    params = [SamplingParams(max_new_tokens=80, modalities=(modality,), seed=s) for s in range(6)]
    out = gen.generate(prompt_ids(encoder, *["draw it"] * 6), params)
    for g in out:
        assert check_well_formed(g.ids, gen, decoder, {modality}) == [modality]
        assert g.ids[0] == gen.vocab.special_id({"image": "[IMG]", "audio": "[AUD]", "video": "[VID]"}[modality])
        assert g.finish_reason == "stop" and g.ids[-1] == gen.eos_id   # a media-only reply ends after its block


def test_the_grammar_holds_when_the_model_wants_to_break_it(parts, exported):
    encoder, gen, decoder = parts
    model = exported.model()
    with torch.no_grad():   # the special tokens now win every step unconstrained
        model.heads["special"].weight.mul_(50)
    forced = generate(model, gen.grammar, prompt_ids(encoder, "a"), [SamplingParams(40, 0, modalities=("image",))],
                      gen.pad_id)[0]
    assert check_well_formed(forced.ids, gen, decoder, {"image"}) == ["image"]
    text_only = generate(model, gen.grammar, prompt_ids(encoder, "a"), [SamplingParams(12, 0)], gen.pad_id)[0]
    assert all(i < gen.vocab.text_size for i in text_only.ids)   # understanding: no media ids at all
    # a text reply holds text ids and eos, never bos or pad: the ids answers are scored under (reply_ids)
    reply = set(gen.grammar.reply_ids.tolist())
    assert set(text_only.ids) <= reply and gen.eos_id in reply
    assert reply == set(range(gen.vocab.text_size)) - (set(exported.config["text_special_ids"]) - {gen.eos_id})
    assert gen.uncond_prompt[0] not in reply


def test_free_modalities_open_blocks_only_when_they_can_close_within_the_budget(parts):
    encoder, gen, decoder = parts
    seen = set()
    for budget in (3, 10, 17, 18, 19, 40):
        params = [SamplingParams(budget, temperature=1.5, seed=s, modalities=("text", "image", "audio", "video"))
                  for s in range(8)]
        for g in gen.generate(prompt_ids(encoder, *["x"] * 8), params):
            assert len(g.ids) <= budget
            seen |= set(check_well_formed(g.ids, gen, decoder, {"image", "audio", "video"}))
    assert seen, "a hot random model should open some block"


def test_kv_cache_and_full_recompute_give_the_same_greedy_tokens(exported, parts):
    encoder, _, _ = parts
    prompts = prompt_ids(encoder, "one", "a much longer prompt than the first", "mid length")
    params = [SamplingParams(24, temperature=0, modalities=("text", "image")) for _ in prompts]
    cached = TokenGenerator(exported, LIMITS, use_cache=True).generate(prompts, params)
    recomputed = TokenGenerator(exported, LIMITS, use_cache=False).generate(prompts, params)
    assert [g.ids for g in cached] == [g.ids for g in recomputed]


def test_a_request_gets_the_same_tokens_alone_and_inside_any_batch(parts):
    encoder, gen, _ = parts
    prompts = prompt_ids(encoder, "short", "a rather longer prompt here", "x")
    greedy = [SamplingParams(20, temperature=0) for _ in prompts]
    sampled = [SamplingParams(20, temperature=1.0, top_p=0.95, seed=7 + i) for i in range(3)]
    for params in (greedy, sampled):
        together = gen.generate(prompts, params)
        alone = [gen.generate([p], [q])[0] for p, q in zip(prompts, params)]
        reordered = gen.generate(prompts[::-1], params[::-1])[::-1]
        assert [g.ids for g in together] == [g.ids for g in alone] == [g.ids for g in reordered]


def test_a_seed_reproduces_a_request_and_another_seed_does_not(parts):
    encoder, gen, _ = parts
    prompt = prompt_ids(encoder, "hello")
    first = gen.generate(prompt, [SamplingParams(16, seed=3)])[0]
    again = gen.generate(prompt, [SamplingParams(16, seed=3)])[0]
    other = gen.generate(prompt, [SamplingParams(16, seed=4)])[0]
    assert first.ids == again.ids and first.ids != other.ids and first.seed == 3
    unseeded = gen.generate(prompt, [SamplingParams(16)])[0]
    assert gen.generate(prompt, [SamplingParams(16, seed=unseeded.seed)])[0].ids == unseeded.ids


def test_top_k_and_top_p_keep_only_the_most_likely_ids():
    logits = torch.tensor([4.0, 3.0, 2.0, 1.0, 0.0, -1.0])
    allowed = torch.ones(6, dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    top2 = {sample_token(logits, allowed, SamplingParams(temperature=5.0, top_k=2), g) for _ in range(200)}
    assert top2 == {0, 1}
    nucleus = {sample_token(logits, allowed, SamplingParams(temperature=1.0, top_p=0.7), g) for _ in range(200)}
    assert nucleus == {0, 1}   # p(0) = 0.64 < 0.7, so the id crossing 0.7 stays in
    assert sample_token(logits, torch.tensor([False, False, True, True, False, False]),
                        SamplingParams(temperature=0), g) == 2


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=-0.1), "temperature"), (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_k=-1), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed="7"), "seed"), (dict(guidance_scale=0.5), "guidance"),
    (dict(modalities=("text", "smell")), "modalities"), (dict(modalities=("image", "audio")), "modalities"),
    (dict(modalities=()), "modalities"), (dict(best_of=0, modalities=("image",)), "best_of"),
    (dict(best_of=True, modalities=("image",)), "best_of"), (dict(best_of=65, modalities=("image",)), "best_of"),
    (dict(best_of=2), "best_of > 1 ranks media replies"),
])
def test_bad_sampling_parameters_raise_value_errors_that_name_them(parts, bad, message):
    encoder, gen, _ = parts
    with pytest.raises(ValueError, match=message):
        gen.generate(prompt_ids(encoder, "a"), [SamplingParams(**bad)])


def test_requests_the_model_cannot_fit_are_refused(parts):
    encoder, gen, _ = parts
    with pytest.raises(ValueError, match="too small for one image block"):
        gen.generate(prompt_ids(encoder, "a"), [SamplingParams(10, modalities=("image",))])
    with pytest.raises(ValueError, match="context length 512"):
        gen.generate([[5] * 500], [SamplingParams(20)])


def test_best_of_keeps_the_draw_that_reads_the_prompt_back_best(parts):
    encoder, gen, decoder = parts
    prompt = prompt_ids(encoder, "a seven")
    request = SamplingParams(80, modalities=("image",), seed=14, best_of=4)
    draws = [gen.generate(prompt, [c])[0] for c in request.candidates()]
    assert draws[0].ids == gen.generate(prompt, [replace(request, best_of=1)])[0].ids   # draw 0: the plain request
    assert len({tuple(d.ids) for d in draws}) == 4
    # each draw scores log p(the prompt's text + eos | bos + its block): the model reading back what it made
    scores = gen.read_back(prompt[0], draws)
    read = [prompt_answer_logprobs(gen.model, [prompt[0][:1] + d.ids[:-1]], [prompt[0][1:] + [gen.eos_id]],
                                   reply_ids=gen.grammar.reply_ids)[0, 0] for d in draws]
    assert torch.allclose(scores, torch.stack(read), atol=1e-4)
    best = int(scores.argmax())
    assert best != 0                                       # this seed's best is not the plain request's draw
    kept, other = gen.generate(prompt + prompt_ids(encoder, "hello"), [request, SamplingParams(8, seed=1)])
    assert kept.ids == draws[best].ids and (kept.candidate, kept.seed) == (best, 14)
    assert check_well_formed(kept.ids, gen, decoder, {"image"}) == ["image"]
    assert other.ids == gen.generate(prompt_ids(encoder, "hello"), [SamplingParams(8, seed=1)])[0].ids
    # n images seeded seed + i never share a draw
    seeds = [c.seed for i in range(3) for c in replace(request, seed=14 + i).candidates()]
    assert len(set(seeds)) == len(seeds)
    media_prompt = encoder.encode([MediaPart("image", encode_png(torch.rand(3, 32, 32))), "a seven"]).ids
    with pytest.raises(ValueError, match="text only"):
        gen.check(media_prompt, request)
    with pytest.raises(ValueError, match="text only"):
        gen.generate([media_prompt], [request])


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_guidance_steers_media_blocks_only(parts, modality):
    encoder, gen, decoder = parts
    prompt = prompt_ids(encoder, "a seven")
    budget = gen.grammar.shapes[modality].min_tokens + 4
    plain = gen.generate(prompt, [SamplingParams(budget, temperature=0, modalities=(modality,))])[0]
    guided = gen.generate(prompt, [SamplingParams(budget, temperature=0, modalities=(modality,),
                                                  guidance_scale=3.0)])[0]
    assert check_well_formed(guided.ids, gen, decoder, {modality}) == [modality] and guided.ids != plain.ids
    text = [SamplingParams(12, temperature=0, guidance_scale=g) for g in (1.0, 3.0)]
    assert gen.generate(prompt * 2, text)[0].ids == gen.generate(prompt * 2, text)[1].ids


def test_the_step_path_and_the_training_path_give_the_same_logits(exported, parts):
    encoder, _, _ = parts
    model = exported.model()
    ids = torch.tensor(prompt_ids(encoder, "two words"))
    with torch.no_grad():
        full = model.hidden_and_logits(ids)[1][:, -1]
        step, _ = model.next_token_logits(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    assert torch.allclose(full, step, atol=1e-5)


def test_requests_round_trip_to_png_wav_and_mp4(tiny_exported_model):
    generator = MultimodalGenerator(tiny_exported_model, limits=LIMITS)
    picture = torch.rand(3, 48, 40)
    speech = torch.sin(torch.linspace(0, 900, 8000)) * 0.3
    requests = [
        (["draw a seven"], SamplingParams(40, modalities=("image",), seed=1)),
        (["say seven"], SamplingParams(40, modalities=("audio",), seed=2)),
        (["a seven moving left"], SamplingParams(80, modalities=("video",), seed=3)),
        ([MediaPart("image", encode_png(picture)), "this is"], SamplingParams(8, seed=4)),
        ([MediaPart("audio", encode_wav(speech, 8000))], SamplingParams(8, seed=5)),
    ]
    (image, g_image), (audio, _), (video, _), (caption, g_caption), (transcript, _) = generator(requests)
    png = Image.open(io.BytesIO(image.media[0].data))
    assert png.format == "PNG" and png.size == (32, 32) and image.media[0].details == {"width": 32, "height": 32}
    wave, rate = soundfile.read(io.BytesIO(audio.media[0].data))
    assert rate == 16000 and len(wave) > 0 and audio.media[0].mime_type == "audio/wav"
    frames, _ = read_mp4(video.media[0].data)
    assert frames.shape[1:] == (3, 32, 32) and frames.shape[0] == video.media[0].details["frames"]
    words = len(generator.encoder.text("this is", add_special_tokens=False)["input_ids"])
    assert caption.media == [] and transcript.media == [] and g_caption.prompt_tokens == 1 + 18 + words
    assert isinstance(caption.text, str) and caption.text_tokens == len(g_caption.ids) - (g_caption.finish_reason == "stop")


def test_prompts_follow_the_training_formats(parts):
    encoder, gen, _ = parts
    bos = encoder.text.bos_token_id
    text_ids = encoder.text("a seven", add_special_tokens=False)["input_ids"]
    codes = list(range(16))
    understanding = encoder.build([("image", codes), "a seven"])
    assert understanding.ids == [bos, *gen.vocab.wrap("image", torch.tensor(codes)), *text_ids]
    assert understanding.media_tokens == {"image": 18} and understanding.text_tokens == len(text_ids)
    assert encoder.build(["a seven"]).ids == [bos, *text_ids]


def test_unusable_media_bytes_raise_media_errors_that_say_why(exported):
    encoder = PromptEncoder(exported, InputLimits(image_max_pixels=1000))
    with pytest.raises(MediaError, match="not an image") as err:
        encoder.encode([MediaPart("image", b"GIF89a but not really")])
    assert err.value.reason == "not_an_image"
    with pytest.raises(MediaError, match="max_pixels 1000"):
        encoder.encode([MediaPart("image", encode_png(torch.rand(3, 40, 40)))])
    with pytest.raises(MediaError, match="not a readable audio file"):
        encoder.encode([MediaPart("audio", b"RIFF....WAVEfmt garbage")])
    good, bad = encoder.encode_images([encode_png(torch.rand(3, 20, 20)), b"nope"])
    assert len(good) == 16 and isinstance(bad, MediaError)


def test_text_streams_in_whole_characters(parts):
    encoder, gen, _ = parts
    text = "naïve café ☕ done"
    ids = encoder.text(text, add_special_tokens=False)["input_ids"]
    img = gen.vocab.wrap("image", torch.arange(16))
    stream = TextStream(encoder.text, gen.vocab)
    deltas = [stream.push(i) for i in ids[:5] + img + ids[5:] + [gen.eos_id, ids[0]]]
    assert "".join(deltas) == text and not any("\ufffd" in d for d in deltas)


def test_an_incomplete_folder_or_a_missing_base_llm_is_named(tmp_path, tiny_exported_model):
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        (tmp_path / "config.json").write_text("{}")
        ExportedModel(tmp_path)
    with pytest.raises(FileNotFoundError, match="base LLM folder"):
        ExportedModel(tiny_exported_model, base_llm=str(tmp_path / "nowhere")).model()


def test_a_moved_folder_loads_without_the_folders_training_read(tmp_path, tiny_exported_model):
    """A trained model's config records its run's SEA CLIP and data folders; serving it elsewhere (another machine,
    the folder copied) needs only the folder and its base LLM."""
    import json
    import shutil

    moved = tmp_path / "copied"
    shutil.copytree(tiny_exported_model, moved)
    meta = json.loads((moved / "config.json").read_text())
    gone = str(tmp_path / "training-machine")
    meta["config"].update(tokenizers=f"{gone}/prepared/tokenizers", text_tokenizer=f"{gone}/prepared/text_tokenizer")
    meta["config"]["sea"].update(weight=0.1, clip=f"{gone}/clip")
    (moved / "config.json").write_text(json.dumps(meta))
    original, copy = ExportedModel(tiny_exported_model).model(), ExportedModel(moved).model()
    ids = torch.tensor([[5, 6, 7, 8]])
    assert copy.sea_labeler is None
    with torch.no_grad():
        assert torch.equal(copy.hidden_and_logits(ids)[1], original.hidden_and_logits(ids)[1])
