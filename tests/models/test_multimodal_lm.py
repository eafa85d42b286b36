import pytest
import torch

from models.multimodal_lm import LoraConfig, MultimodalLM, MultimodalLMConfig
from models.sea import SeaConfig
from models.sequences import Document, media_text_documents, pack_documents
from models.vocabulary import JointVocabulary

WORDS = ["zero", "one", "two", "three"]


@pytest.fixture
def vocab(text_tokenizer_path) -> JointVocabulary:
    return JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 16, "audio": 8})


def make_model(tiny_llm_path, vocab, **overrides) -> MultimodalLM:
    torch.manual_seed(0)
    return MultimodalLM(MultimodalLMConfig(base_llm=tiny_llm_path, vocabulary=vocab.to_dict(),
                                           text_special_ids=[0, 1], **overrides))


def batch_of_pairs(vocab, text_tokenizer_path, n: int = 8, context: int = 64) -> dict[str, torch.Tensor]:
    """Image codes 4*d .. 4*d+3 paired with the word for d: a mapping the joint embedding can learn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    docs = []
    for i in range(n):
        digit = i % 4
        block = vocab.wrap("image", torch.arange(4 * digit, 4 * digit + 4))
        text = tok(WORDS[digit], add_special_tokens=False)["input_ids"]
        docs += media_text_documents(f"s{i}", block, text, ["understanding", "generation"], bos_id=None, eos_id=1)
    rows = pack_documents(docs, context, pad_id=1)
    return {k: torch.tensor([getattr(r, k) for r in rows]) for k in ("input_ids", "loss_mask", "doc_ids",
                                                                      "position_ids")}


def test_ids_go_to_the_right_table(tiny_llm_path, vocab):
    model = make_model(tiny_llm_path, vocab)
    ids = torch.tensor([[3, vocab.special_id("[IMG]"), vocab.codebook_range("image").start + 5,
                         vocab.codebook_range("audio").start + 2]])
    out = model.embed(ids)[0]
    assert torch.equal(out[0], model.llm.get_input_embeddings().weight[3])
    assert torch.equal(out[1], model.embeddings["special"].weight[0])
    assert torch.equal(out[2], model.embeddings["image"].weight[5])
    assert torch.equal(out[3], model.embeddings["audio"].weight[2])
    logits = model.hidden_and_logits(ids)[1]
    assert logits.shape == (1, 4, vocab.size)


def test_a_document_in_a_packed_row_sees_only_itself(tiny_llm_path, vocab):
    model = make_model(tiny_llm_path, vocab).eval()
    first, second = torch.tensor([[4, 5, 6]]), torch.tensor([[7, vocab.special_id("[IMG]"), 8, 9]])
    packed = torch.cat([first, second], dim=1)
    docs = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    with torch.no_grad():
        together = model.hidden_and_logits(packed, docs, positions)[1]
        alone = model.hidden_and_logits(second)[1]
    assert torch.allclose(together[:, 3:], alone, atol=1e-5)


def test_a_packed_forward_never_attends_across_a_row(tiny_llm_path, vocab, monkeypatch):
    """The point of it: SDPA sees documents, not 1,000-token rows of which it would discard most pairs."""
    model = make_model(tiny_llm_path, vocab).eval()
    row, docs, positions = [], [], []
    for d in range(12):                               # twelve 5-token documents in one 60-token row
        row += [4 + d, vocab.special_id("[IMG]"), vocab.codebook_range("image").start + d, 7, 8]
        docs += [d] * 5
        positions += list(range(5))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda q, k, *a, **kw: seen.append(k.shape[-2]) or
                        sdpa(q, k, *a, **kw))
    ids = torch.tensor([row])
    with torch.no_grad():
        packed = model.hidden_and_logits(ids, torch.tensor([docs]), torch.tensor([positions]))[1]
    assert seen and max(seen) == 5
    seen.clear()
    with torch.no_grad():
        alone = model.hidden_and_logits(ids[:, 10:15])[1]          # without packing: plain SDPA over the document
    assert seen and torch.allclose(packed[:, 10:15], alone, atol=1e-5)


def test_training_moves_only_the_joint_tables_and_learns(tiny_llm_path, vocab, text_tokenizer_path):
    model = make_model(tiny_llm_path, vocab)
    before = model.frozen_digest()
    llm_before = {n: p.clone() for n, p in model.llm.named_parameters()}
    batch = batch_of_pairs(vocab, text_tokenizer_path)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(40):
        out = model.training_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.metrics["lm_loss"])
    assert losses[-1] < 0.5 * losses[0]
    assert model.frozen_digest() == before
    assert all(torch.equal(llm_before[n], p) for n, p in model.llm.named_parameters())


def test_a_stage_trains_only_its_groups(tiny_llm_path, vocab, text_tokenizer_path):
    model = make_model(tiny_llm_path, vocab)
    assert model.set_trainable(["image"]) == ["image"]
    audio = model.embeddings["audio"].weight.clone()
    out = model.training_step(batch_of_pairs(vocab, text_tokenizer_path))
    out.loss.backward()
    assert model.embeddings["audio"].weight.grad is None and model.embeddings["special"].weight.grad is None
    assert model.embeddings["image"].weight.grad.abs().sum() > 0
    assert torch.equal(model.embeddings["audio"].weight, audio)
    with pytest.raises(ValueError, match="unknown parameter group 'smell'"):
        model.set_trainable(["smell"])
    with pytest.raises(ValueError, match="group 'lora' is empty"):
        model.set_trainable(["lora"])


def test_save_keeps_only_trained_parts_and_reloads_identically(tiny_llm_path, vocab, tmp_path, text_tokenizer_path):
    model = make_model(tiny_llm_path, vocab).eval()
    model.save_pretrained(tmp_path / "m")
    from models.pretrained import read_weights

    saved = read_weights(tmp_path / "m" / "model.safetensors")
    assert saved and not any(k.startswith("llm.") for k in saved)
    loaded = MultimodalLM.from_pretrained(tmp_path / "m")
    batch = batch_of_pairs(vocab, text_tokenizer_path)
    assert torch.equal(model.training_step(batch).loss, loaded.training_step(batch).loss)
    assert JointVocabulary.from_pretrained(tmp_path / "m") == vocab


def test_lora_starts_as_the_identity_and_trains_alone(tiny_llm_path, vocab, text_tokenizer_path, tmp_path):
    plain = make_model(tiny_llm_path, vocab).eval()
    model = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2)).eval()
    batch = batch_of_pairs(vocab, text_tokenizer_path)
    assert torch.allclose(plain.training_step(batch).loss, model.training_step(batch).loss, atol=1e-6)
    model.set_trainable(["lora"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    model.save_pretrained(tmp_path / "lora")
    assert MultimodalLM.from_pretrained(tmp_path / "lora").config.lora.rank == 2


def random_adapters(model: MultimodalLM, std: float = 0.5) -> MultimodalLM:
    """LoRA B starts at zero (no effect); random B makes every adapter change what the model computes."""
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_b_" in name:
                p.normal_(std=std)
    return model


def test_each_token_goes_through_the_adapter_of_the_block_it_follows_within_its_document(tiny_llm_path, vocab):
    model = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2))
    assert model.lora_adapters == ["image", "audio", "video"]
    img, end_img = vocab.special_id("[IMG]"), vocab.special_id("[/IMG]")
    aud, end_aud = vocab.special_id("[AUD]"), vocab.special_id("[/AUD]")
    code, sound = vocab.codebook_range("image").start, vocab.codebook_range("audio").start
    ids = torch.tensor([[4, img, code, end_img, 5, 6, aud, sound, end_aud, 7, 8, 9]])
    docs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1]])
    #                    text  [IMG] .. [/IMG] text    [AUD] ...     text | the next document: no block yet
    assert model.lora_routes(ids, docs).tolist() == [[-1, 0, 0, 0, 0, 0, 1, 1, 1, 1, -1, -1]]
    # generation feeds a few ids at a time: the route of the tokens before them carries on until a block opens
    carried = torch.tensor([0, 1])
    assert model.lora_routes(torch.tensor([[5, 6], [aud, 5]]), carried=carried).tolist() == [[0, 0], [1, 1]]
    assert make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, adapters="shared")).lora_routes(ids) is None


def test_lora_inside_reads_a_clips_frames_through_the_image_adapter_and_what_follows_through_the_video_one(
        tiny_llm_path, vocab):
    model = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, inside={"video": "image"}))
    vid, end_vid, frame = (vocab.special_id(t) for t in ("[VID]", "[/VID]", "[FRAME]"))
    img, end_img = vocab.special_id("[IMG]"), vocab.special_id("[/IMG]")
    code = vocab.codebook_range("image").start
    ids = torch.tensor([[4, vid, code, frame, code, end_vid, 5, img, code, end_img, 6]])
    #                    text [VID] frames (image)  [/VID] text  [IMG] ... [/IMG] text
    assert model.lora_routes(ids).tolist() == [[-1, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0]]
    # generation a few ids at a time: inside a clip the image route carries on, after it the video one
    assert model.lora_routes(torch.tensor([[code, end_vid, 5]]), carried=torch.tensor([0])).tolist() == [[0, 2, 2]]
    with pytest.raises(ValueError, match="lora.inside"):
        make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, inside={"video": "text"}))
    with pytest.raises(ValueError, match="lora.inside"):
        make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, adapters="shared", inside={"video": "image"}))


def test_training_one_modalitys_adapter_leaves_the_model_on_other_modalities_unchanged(tiny_llm_path, vocab,
                                                                                         text_tokenizer_path):
    """X-LLM's per-modality interfaces: an image stage cannot erase what an audio stage learned (one shared
    adapter does)."""
    aud, end_aud = vocab.special_id("[AUD]"), vocab.special_id("[/AUD]")
    sound = vocab.codebook_range("audio").start
    audio_doc = torch.tensor([[aud, sound, sound + 3, end_aud, 5, 6]])
    image_batch = batch_of_pairs(vocab, text_tokenizer_path)
    changes = {}
    for adapters in ("per_modality", "shared"):
        model = random_adapters(make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, adapters=adapters)))
        with torch.no_grad():
            before = model.hidden_and_logits(audio_doc)[1]
            image_before = model.hidden_and_logits(image_batch["input_ids"][:1])[1]
        model.set_trainable(["lora"])
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        for _ in range(3):
            optimizer.zero_grad()
            model.training_step(image_batch).loss.backward()
            optimizer.step()
        with torch.no_grad():
            changes[adapters] = float((model.hidden_and_logits(audio_doc)[1] - before).abs().max())
            assert not torch.allclose(model.hidden_and_logits(image_batch["input_ids"][:1])[1], image_before)
    assert changes["per_modality"] == 0.0 and changes["shared"] > 1e-3
    # data-parallel ranks reduce the same gradients whatever modalities their batches hold: zeros, never None
    model = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2))
    model.training_step(image_batch).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    assert all(float(g.abs().sum()) == 0 for n, g in grads.items() if "lora_a_audio" in n or "lora_b_audio" in n)
    image_only = model.set_trainable(["lora.image"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert image_only == ["lora.image"] and trainable and all(n.endswith("_image") for n in trainable)


def test_lora_plus_puts_the_b_matrices_in_a_faster_optimiser_group(tiny_llm_path, vocab):
    plain = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2))
    plain.set_trainable(["image", "lora.image"])
    assert [(len(params), scale) for params, scale in plain.optimizer_groups()] == \
        [(sum(p.requires_grad for p in plain.parameters()), 1.0)]
    model = make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2, b_lr_ratio=16.0))
    model.set_trainable(["image", "lora.image"])
    (base, one), (faster, sixteen) = model.optimizer_groups()
    names = {id(p): n for n, p in model.named_parameters()}
    assert (one, sixteen) == (1.0, 16.0)
    assert faster and all(".lora_b_image" in names[id(p)] for p in faster)
    assert any(".lora_a_image" in names[id(p)] for p in base) and any("embeddings.image" in names[id(p)] for p in base)
    assert len(base) + len(faster) == sum(p.requires_grad for p in model.parameters())
    model.set_trainable(["image"])                         # no LoRA trains: one group
    assert [scale for _, scale in model.optimizer_groups()] == [1.0]


def test_an_interface_copied_from_another_reads_its_block_as_that_one_did(tiny_llm_path, vocab):
    model = random_adapters(make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2))).eval()
    code = vocab.codebook_range("image").start
    frames = [code + 1, code + 2, code + 3]
    image = torch.tensor([[vocab.special_id("[IMG]"), *frames, vocab.special_id("[/IMG]"), 4]])
    video = torch.tensor([[vocab.special_id("[VID]"), *frames, vocab.special_id("[/VID]"), 4]])   # image codes

    def read(ids):
        with torch.no_grad():
            return model.hidden_and_logits(ids)
    assert not torch.allclose(read(image)[0], read(video)[0])
    model.copy_interface("image", "video")
    (hidden_image, logits_image), (hidden_video, logits_video) = read(image), read(video)
    assert torch.allclose(hidden_image, hidden_video)      # the boundary rows and the adapter both copied
    ends = [vocab.special_id(t) for t in ("[/IMG]", "[/VID]")]
    assert torch.allclose(logits_image[..., ends[0]], logits_video[..., ends[1]])   # the heads' rows too
    model.set_trainable(["lora.video"])                   # its own tensors: training it leaves the image adapter
    before = {n: p.clone() for n, p in model.named_parameters() if n.endswith("_image")}
    img = model.embeddings["special"].weight[vocab.special_id("[IMG]") - vocab.text_size].clone()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("_video"):
                p.add_(1.0)
        model.embeddings["special"].weight[vocab.special_id("[VID]") - vocab.text_size] += 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.endswith("_image"))
    assert torch.equal(model.embeddings["special"].weight[vocab.special_id("[IMG]") - vocab.text_size], img)
    with pytest.raises(ValueError, match="no LoRA adapter 'speech'"):
        model.copy_interface("speech", "video")


def test_decoding_with_the_cache_goes_through_the_same_adapters_as_the_whole_sequence(tiny_llm_path, vocab):
    model = random_adapters(make_model(tiny_llm_path, vocab, lora=LoraConfig(rank=2))).eval()
    img, end_img, aud = vocab.special_id("[IMG]"), vocab.special_id("[/IMG]"), vocab.special_id("[AUD]")
    code, sound = vocab.codebook_range("image").start, vocab.codebook_range("audio").start
    ids = torch.tensor([[4, img, code + 1, code + 2, end_img, 5, 6, aud, sound, sound + 1]])
    with torch.no_grad():
        whole = model.hidden_and_logits(ids)[1]
        cache, stepped = None, []
        for t in range(ids.shape[1]):     # one token at a time, then the repeated cache of answer ranking
            logits, cache = model.next_token_logits(ids[:, t:t + 1], torch.ones(ids.shape[0], t + 1, dtype=torch.long),
                                                    torch.full((ids.shape[0], 1), t), cache)
            stepped.append(logits)
            if t == 5:
                cache.batch_repeat_interleave(2)
                assert cache.last_route.tolist() == [0, 0]      # both copies are after an image block
                ids, whole = ids.repeat(2, 1), whole.repeat(2, 1, 1)
    assert torch.allclose(torch.stack([s[0] for s in stepped]), whole[0], atol=1e-4)
    assert torch.allclose(stepped[-1], whole[:, -1], atol=1e-4)


def test_codebook_init_puts_code_vectors_at_the_text_scale(tiny_llm_path, vocab, tmp_path, tiny_image_vq_config,
                                                           tiny_audio_config):
    from models import AudioVQTokenizer, ImageVQTokenizer, QuantizerConfig

    image_cfg, audio_cfg = tiny_image_vq_config(), tiny_audio_config()
    image_cfg.quantizer, audio_cfg.quantizer = QuantizerConfig(codebook_size=16), QuantizerConfig(codebook_size=8)
    ImageVQTokenizer(image_cfg).save_pretrained(tmp_path / "tok" / "image")
    AudioVQTokenizer(audio_cfg).save_pretrained(tmp_path / "tok" / "audio")
    model = make_model(tiny_llm_path, vocab, embedding_init="codebook", tokenizers=str(tmp_path / "tok"))
    text_norm = model.llm.get_input_embeddings().weight.norm(dim=-1).mean()
    norms = model.embeddings["image"].weight.norm(dim=-1)
    assert torch.allclose(norms, text_norm.expand_as(norms), rtol=1e-4)
    # rows keep the codebook's geometry: similar codes, similar rows
    codes = ImageVQTokenizer.from_pretrained(tmp_path / "tok" / "image").quantizer.codebook
    code_sim = codes @ codes.t()
    row_sim = torch.nn.functional.normalize(model.embeddings["image"].weight, dim=-1)
    assert torch.corrcoef(torch.stack([code_sim.flatten(), (row_sim @ row_sim.t()).flatten()]))[0, 1] > 0.5


def test_sea_pulls_media_tokens_towards_their_caption_words(tiny_llm_path, vocab, text_tokenizer_path):
    model = make_model(tiny_llm_path, vocab, sea=SeaConfig(weight=1.0, temperature=0.1))
    batch = batch_of_pairs(vocab, text_tokenizer_path)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    first = model.training_step(batch).metrics["sea_loss"]
    for _ in range(30):
        out = model.training_step(batch)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert out.metrics["sea_loss"] < 0.5 * first
    # the image codes of digit 2 now sit nearest the LLM's embedding of "two" among the four words
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_tokenizer_path)
    words = torch.stack([model.llm.get_input_embeddings().weight[tok.convert_tokens_to_ids(w)] for w in WORDS])
    rows = model.embeddings["image"].weight[8:12]
    similarity = torch.nn.functional.normalize(rows, dim=-1) @ torch.nn.functional.normalize(words, dim=-1).t()
    assert (similarity.argmax(dim=1) == 2).all()


def test_a_text_range_beyond_the_llm_is_refused(tiny_llm_path):
    big = JointVocabulary(10_000, {"image": 4})
    with pytest.raises(ValueError, match="exceeds the LLM"):
        MultimodalLM(MultimodalLMConfig(base_llm=tiny_llm_path, vocabulary=big.to_dict()))


def test_a_missing_base_llm_is_named(vocab, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing base LLM folder"):
        MultimodalLM(MultimodalLMConfig(base_llm=str(tmp_path / "nope"), vocabulary=vocab.to_dict()))


def test_the_grammar_loss_normalises_over_what_the_grammar_allows_so_media_heads_cannot_crowd_out_text(
        tiny_llm_path, vocab, text_tokenizer_path):
    import torch.nn.functional as F

    batch = batch_of_pairs(vocab, text_tokenizer_path)
    grammar, joint = make_model(tiny_llm_path, vocab), make_model(tiny_llm_path, vocab, loss="joint")
    with torch.no_grad():
        before = {m: m.training_step(batch).metrics for m in (grammar, joint)}
        for m in (grammar, joint):
            m.heads["image"].weight.mul_(50)          # huge image logits everywhere
        after = {m: m.training_step(batch).metrics for m in (grammar, joint)}
    assert after[grammar]["text_loss"] == pytest.approx(before[grammar]["text_loss"], abs=1e-5)
    assert after[joint]["text_loss"] > before[joint]["text_loss"] + 1.0
    # and a target inside an image block is scored against the image codes and [/IMG] only
    ids = batch["input_ids"]
    state = vocab.block_state(ids)
    b, t = (state[:, :-1] == 1).nonzero()[0].tolist()
    with torch.no_grad():
        logits = make_model(tiny_llm_path, vocab).hidden_and_logits(
            ids[b:b + 1], batch["doc_ids"][b:b + 1], batch["position_ids"][b:b + 1])[1][0, t]
    group = vocab.grammar_groups()[1]
    expected = F.cross_entropy(logits[group][None], (group == ids[b, t + 1]).nonzero()[0])
    assert torch.isfinite(expected) and expected < F.cross_entropy(logits[None], ids[b, t + 1][None])


def test_media_loss_weight_weighs_code_targets_against_text_targets(tiny_llm_path, vocab, text_tokenizer_path):
    batch = batch_of_pairs(vocab, text_tokenizer_path)
    ids, docs = batch["input_ids"], batch["doc_ids"]
    valid = (batch["loss_mask"][:, 1:] > 0) & (docs[:, 1:] == docs[:, :-1]) & (docs[:, 1:] >= 0)
    media = int((vocab.block_state(ids)[:, :-1][valid] > 0).sum())     # targets inside a block: its codes, its end
    text = int(valid.sum()) - media
    assert media > 0 and text > 0
    lm = {}
    for weight in (1.0, 0.3):
        with torch.no_grad():
            m = make_model(tiny_llm_path, vocab, media_loss_weight=weight).training_step(batch).metrics
        lm[weight] = m["lm_loss"]
        expected = (weight * media * m["media_loss"] + text * m["text_loss"]) / (weight * media + text)
        assert m["lm_loss"] == pytest.approx(expected, rel=1e-5)
    assert lm[0.3] != pytest.approx(lm[1.0], rel=1e-3)


def test_sea_with_a_clip_labels_each_image_block_from_its_decoded_image_in_one_batch(tiny_llm_path,
                                                                                      text_tokenizer_path, tmp_path):
    from transformers import AutoTokenizer

    from models.clip import ClipConfig, TinyCLIP
    from models.image_vq import ImageVQConfig, ImageVQTokenizer
    from models.quantizer import QuantizerConfig

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(text_tokenizer_path)
    clip = TinyCLIP(ClipConfig(text_vocab_size=len(tokenizer), channels=16))
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip" / "text_tokenizer")
    (tmp_path / "clip" / "words.txt").write_text("\n".join(WORDS))
    image = ImageVQTokenizer(ImageVQConfig(channels=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=8)))
    image.save_pretrained(tmp_path / "tokenizers" / "image")
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 16})
    model = make_model(tiny_llm_path, vocab, tokenizers=str(tmp_path / "tokenizers"),
                       text_tokenizer=text_tokenizer_path,
                       sea=SeaConfig(weight=1.0, clip=str(tmp_path / "clip"), top_k=2))
    labeler = model.sea_labeler
    n = image.config.tokens_per_image
    blocks = [(torch.arange(n) * (d + 1) % 16 + vocab.codebook_range("image").start).tolist() for d in range(3)]
    blocks.append(blocks[0][: n // 2])                                       # a partial block: no image
    weights = labeler._clip_word_weights(blocks)
    assert weights[3] is None and len(labeler._seen) == 3
    for block, got in zip(blocks[:3], weights):                              # the batch equals one at a time
        alone = labeler._score_blocks([block])[0]
        assert torch.allclose(got, alone, atol=1e-5)
        assert (got > 0).sum() == 2 and abs(float(got.sum()) - 1) < 1e-5    # top-2 words only
    labeler.image_tokenizer = None                                           # seen blocks need no decoding now
    assert all(torch.equal(a, b) for a, b in zip(labeler._clip_word_weights(blocks[:3]), weights[:3]))
    # in a packed batch, every image token of a document with a whole block gets one of its CLIP words
    docs = [Document(f"s{i}", [*vocab.wrap("image", torch.tensor(b) - vocab.codebook_range("image").start),
                               tokenizer(WORDS[i], add_special_tokens=False)["input_ids"][0], 1],
                     [0] * (n + 2) + [1, 1]) for i, b in enumerate(blocks[:3])]
    rows = pack_documents(docs, 3 * (n + 4), pad_id=1)
    ids, doc_ids = torch.tensor([r.input_ids for r in rows]), torch.tensor([r.doc_ids for r in rows])
    positions, keys = labeler._labels(ids, doc_ids)
    assert len(positions) == 3 * n and {k[0] for k in keys} == {"word"}   # the codes, not [IMG] [/IMG]
