import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

from models.ima import (
    PerceptualSkipping, SkipConfig, alignment_scores, capture_hidden_states, decoder_layers, measure_alignment,
    pool_examples, skipped_layers, token_layer_flops,
)
from models.multimodal_lm import LoraConfig, MultimodalLM, MultimodalLMConfig
from models.vocabulary import JointVocabulary

VOCAB = JointVocabulary(text_size=24, codebooks={"image": 16})
# text before the image (0, 1), [IMG] (2), codes (3, 4, 5), [/IMG] (6), text after the image (7, 8)
ROW = [3, 4, *VOCAB.wrap("image", torch.tensor([1, 2, 3])), 5, 6]
BEFORE, CODES, AFTER = [0, 1], [3, 4, 5], [7, 8]


def llama(layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB.text_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


def make_model(llm=None) -> MultimodalLM:
    torch.manual_seed(1)
    return MultimodalLM(MultimodalLMConfig(vocabulary=VOCAB.to_dict()), llm=llm if llm is not None else llama()).eval()


def logits_of(model, ids, skipping=None, mask=None) -> torch.Tensor:
    if skipping is not None:
        skipping.set_mask(mask) if mask is not None else skipping.set_tokens(ids)
    with torch.no_grad():
        return model.hidden_and_logits(ids)[1]


def pooled(*layers) -> torch.Tensor:
    """Examples given per layer as lists of vectors -> (L+1, N, D)."""
    return torch.tensor(layers, dtype=torch.float64)


# --- the score ---------------------------------------------------------------------------------------------------
def test_parallel_states_score_one_and_orthogonal_states_score_zero():
    e1, e2 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    same = alignment_scores(pooled([e1, [2.0, 0, 0]], [e1, e1]), pooled([[3.0, 0, 0]], [e1]))
    assert same.same_layer == pytest.approx([1.0, 1.0]) and same.ima == pytest.approx([1.0, 1.0])
    assert same.global_same_layer == pytest.approx([1.0, 1.0]) and same.ima_score == pytest.approx(1.0)
    orthogonal = alignment_scores(pooled([e1, [-2.0, 0, 0]], [e1, e1]), pooled([e2, [0, 0, 5.0]], [e2, e2]))
    assert orthogonal.same_layer == pytest.approx([0.0, 0.0], abs=1e-12)
    assert orthogonal.ima_score == pytest.approx(0.0, abs=1e-12)


def test_the_score_averages_every_cross_example_pair_not_only_matched_ones():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    scores = alignment_scores(pooled([e1, e2]), pooled([e1, e2]))
    assert scores.same_layer == pytest.approx([0.5])        # matched pairs alone would give 1
    assert scores.global_same_layer == pytest.approx([1.0])  # the dataset means coincide
    assert (scores.perceptual_examples, scores.textual_examples) == (2, 2)


def test_ima_pairs_perceptual_layer_zero_with_text_at_each_layer_and_scores_layers_before_the_last():
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    perceptual, textual = pooled([e1], [e1], [e2]), pooled([e1], [e2], [e1])
    scores = alignment_scores(perceptual, textual)
    assert scores.ima == pytest.approx([1.0, 0.0, 1.0])
    assert scores.same_layer == pytest.approx([1.0, 0.0, 0.0])
    assert scores.ima_score == pytest.approx(0.5) and scores.same_layer_score == pytest.approx(0.5)
    assert json.loads(json.dumps(scores.to_dict()))["ima"] == pytest.approx([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="at least one example"):
        alignment_scores(perceptual, textual[:, :0])


def test_pooling_is_the_token_mean_per_example_without_padding_or_other_documents():
    states = torch.arange(1.0, 11.0).reshape(1, 1, 5, 2).repeat(2, 2, 1, 1)   # (L+1=2, B=2, T=5, D=2)
    states[:, 1] *= 10
    doc_ids = torch.tensor([[0, 0, 1, 1, -1], [0, 0, 0, -1, -1]])
    mask = torch.tensor([[True, True, True, False, False], [False, True, True, False, False]])
    out = pool_examples(states, mask, doc_ids)
    expected = [[(1 + 3) / 2, (2 + 4) / 2], [5.0, 6.0], [(30 + 50) / 2, (40 + 60) / 2]]   # (row, doc) order
    assert out.shape == (2, 3, 2) and torch.allclose(out[0], torch.tensor(expected, dtype=torch.float64))


def test_capture_records_the_residual_stream_and_masks_each_modality():
    model = make_model()
    ids = torch.tensor([ROW + [VOCAB.codebook_range("image").start, 7]])
    doc_ids = torch.tensor([[0] * len(ROW) + [-1, -1]])                      # a code and a word in the padding
    states = capture_hidden_states(model, ids, doc_ids, sublayers=True)
    assert states.residual.shape == (5, 1, 11, 32) and states.attention.shape == (4, 1, 11, 32)
    assert capture_hidden_states(model, ids, doc_ids).ffn is None                 # residual stream only by default
    assert torch.equal(states.residual[0], model.embed(ids))
    for l in range(4):                              # Llama: h_{l+1} = h_l + SA(LN1 h_l) + FFN(LN2(h_l + SA))
        assert torch.allclose(states.residual[l + 1], states.residual[l] + states.attention[l] + states.ffn[l],
                              atol=1e-5)
    assert torch.allclose(model.llm.model.norm(states.residual[-1]), model.hidden_and_logits(ids, doc_ids)[0],
                          atol=1e-5)
    assert states.perceptual[0].nonzero().flatten().tolist() == CODES
    assert states.textual[0].nonzero().flatten().tolist() == BEFORE + AFTER


def test_measure_alignment_pools_one_vector_per_document_and_modality():
    model = make_model()
    batch = {"input_ids": torch.tensor([ROW + ROW[:3]]), "doc_ids": torch.tensor([[0] * len(ROW) + [1, 1, 1]]),
             "position_ids": torch.tensor([list(range(len(ROW))) + [0, 1, 2]])}
    scores = measure_alignment(model, [batch, {"input_ids": torch.tensor([ROW])}])
    assert (scores.perceptual_examples, scores.textual_examples) == (2, 3)   # the second document has no codes
    assert len(scores.ima) == len(scores.same_layer) == 5
    assert all(-1 <= s <= 1 for s in scores.ima + scores.same_layer + scores.global_ima)


# --- skipping ----------------------------------------------------------------------------------------------------
def test_skipping_no_token_is_bit_identical_to_the_unpatched_model():
    model, ids = make_model(), torch.tensor([ROW])
    before = logits_of(model, ids)
    with PerceptualSkipping(model, SkipConfig(attention=True)) as skipping:
        after = logits_of(model, ids, skipping, mask=torch.zeros_like(ids, dtype=torch.bool))
    assert torch.equal(before, after)


@pytest.mark.parametrize("start, interval, end, expected", [(0, 1, None, [0, 1, 2, 3]), (1, 2, None, [1, 3]),
                                                            (0, 2, 3, [0, 2]), (2, 1, 3, [2])])
def test_perceptual_tokens_skip_the_ffn_exactly_in_the_gated_layers(start, interval, end, expected):
    model, ids = make_model(), torch.tensor([ROW])
    config = SkipConfig(start_layer=start, interval=interval, end_layer=end)
    assert skipped_layers(4, config) == expected
    with PerceptualSkipping(model, config) as skipping:
        skipping.set_tokens(ids)
        states = capture_hidden_states(model, ids, sublayers=True)
    h, codes, layers = states.residual, CODES, decoder_layers(model.llm)[1]
    skipped = [l for l in range(4) if torch.equal(h[l + 1][:, codes], (h[l] + states.attention[l])[:, codes])]
    assert skipped == expected
    for l in expected:                                            # text tokens still go through their FFN
        mid = h[l] + states.attention[l]
        text = mid + layers[l].mlp(layers[l].post_attention_layernorm(mid))
        assert torch.allclose(h[l + 1][:, BEFORE + AFTER], text[:, BEFORE + AFTER], atol=1e-6)


def test_a_skipped_layer_gives_perceptual_tokens_h_plus_self_attention_of_the_normed_input():
    model, ids = make_model(), torch.tensor([ROW])
    with PerceptualSkipping(model, SkipConfig(start_layer=1, end_layer=2)) as skipping:
        skipping.set_tokens(ids)
        h = capture_hidden_states(model, ids).residual
    layer, positions = decoder_layers(model.llm)[1][1], torch.arange(len(ROW))[None]
    with torch.no_grad():                                          # h + SA(LN1 h), computed by hand (causal)
        rotary = model.llm.model.rotary_emb(h[1], position_ids=positions)
        attention = layer.self_attn(hidden_states=layer.input_layernorm(h[1]), attention_mask=None,
                                    position_embeddings=rotary)[0]
    assert torch.allclose(h[2][:, CODES], (h[1] + attention)[:, CODES], atol=1e-6)


def test_the_ffn_run_on_the_kept_tokens_routes_them_through_their_own_lora_adapters():
    """Per-modality LoRA routes every token; the FFN run on the kept tokens alone must route those alone."""
    torch.manual_seed(1)
    model = MultimodalLM(MultimodalLMConfig(vocabulary=VOCAB.to_dict(), lora=LoraConfig(
        rank=2, targets=["q_proj", "gate_proj", "up_proj", "down_proj"])), llm=llama()).eval()
    with torch.no_grad():
        for name, p in model.llm.named_parameters():
            if "lora_b_" in name:
                p.normal_(std=0.5)
    ids = torch.tensor([ROW])
    plain = logits_of(model, ids)
    last_only = torch.zeros(1, len(ROW), dtype=torch.bool)
    last_only[0, -1] = True       # every earlier token (text, the image block, the text after it) is kept
    with PerceptualSkipping(model, SkipConfig(start_layer=0)) as skipping:
        skipped = logits_of(model, ids, skipping, mask=last_only)
    assert torch.allclose(skipped[:, :-1], plain[:, :-1], atol=1e-5)
    assert not torch.allclose(skipped[:, -1], plain[:, -1], atol=1e-3)


def test_skipping_attention_too_passes_perceptual_tokens_through_the_layer():
    model, ids = make_model(), torch.tensor([ROW])
    plain = capture_hidden_states(model, ids).residual
    layer = decoder_layers(model.llm)[1][1]
    for ffn in (True, False):
        with PerceptualSkipping(model, SkipConfig(start_layer=1, end_layer=2, ffn=ffn, attention=True)) as skipping:
            skipping.set_tokens(ids)
            h = capture_hidden_states(model, ids).residual
        through_ffn = h[1] + (0 if ffn else layer.mlp(layer.post_attention_layernorm(h[1])))
        assert torch.allclose(h[2][:, CODES], through_ffn[:, CODES], atol=1e-6)
        assert torch.allclose(h[2][:, AFTER], plain[2][:, AFTER], atol=1e-5)   # their keys and values are intact
        assert not torch.allclose(h[2][:, CODES], plain[2][:, CODES], atol=1e-3)


def test_text_tokens_change_only_where_attention_carries_the_skipped_states():
    model = make_model()
    ids = torch.tensor([ROW + [7, 8, 9]])                                    # a second, text-only document
    doc_ids = torch.tensor([[0] * len(ROW) + [1, 1, 1]])
    positions = torch.tensor([list(range(len(ROW))) + [0, 1, 2]])
    plain = capture_hidden_states(model, ids, doc_ids, positions).residual
    with PerceptualSkipping(model, SkipConfig(start_layer=1)) as skipping:
        skipping.set_tokens(ids)
        skipped = capture_hidden_states(model, ids, doc_ids, positions).residual

    def same(positions, layers):
        return torch.allclose(plain[layers][:, :, positions], skipped[layers][:, :, positions], atol=1e-5)

    other_document = [9, 10, 11]
    assert same(BEFORE + other_document, slice(None))        # causal and block masks hide the image from them
    assert same(AFTER, slice(0, 3))                           # through layer 1, the first skipped one
    assert not same(AFTER, slice(3, 4))                       # layer 2 attends to the changed image states
    assert same(CODES, slice(0, 2)) and not same(CODES, slice(2, 3))


@pytest.mark.parametrize("phase", ["prefill", "decode", "both"])
def test_the_phase_gates_skipping_under_a_kv_cache(phase):
    model = make_model()
    code = VOCAB.codebook_range("image").start + 9
    prompt, ids = torch.tensor([ROW]), torch.tensor([ROW + [code]])        # then decode one image code
    llm, embed = model.llm, model.embed

    def reference(skip_prompt: bool, skip_last: bool) -> torch.Tensor:   # one uncached pass over the whole row
        mask = torch.zeros_like(ids, dtype=torch.bool)
        mask[0, CODES] = skip_prompt
        mask[0, -1] = skip_last
        with PerceptualSkipping(model, SkipConfig(start_layer=1)) as skipping, torch.no_grad():
            skipping.set_mask(mask)
            return llm(inputs_embeds=embed(ids)).logits

    with PerceptualSkipping(model, SkipConfig(start_layer=1, phase=phase)) as skipping, torch.no_grad():
        skipping.set_tokens(prompt)
        prefill = llm(inputs_embeds=embed(prompt), use_cache=True)
        skipping.set_tokens(ids[:, -1:])
        step = llm(inputs_embeds=embed(ids[:, -1:]), past_key_values=prefill.past_key_values, use_cache=True)
    in_prefill, in_decode = phase in ("prefill", "both"), phase in ("decode", "both")
    assert torch.allclose(prefill.logits, reference(in_prefill, in_decode)[:, :-1], atol=1e-5)
    assert torch.allclose(step.logits[:, -1], reference(in_prefill, in_decode)[:, -1], atol=1e-5)
    assert not torch.allclose(step.logits[:, -1], reference(in_prefill, not in_decode)[:, -1], atol=1e-3)
    assert skipping.counts["ffn"] == 3 * 3 * in_prefill + 1 * 3 * in_decode   # tokens x layers 1..3


def test_remove_restores_the_original_model_exactly():
    model, ids = make_model(), torch.tensor([ROW])
    owner, layers = decoder_layers(model.llm)
    before = logits_of(model, ids)
    skipping = PerceptualSkipping(model, SkipConfig(attention=True))
    assert not torch.allclose(logits_of(model, ids, skipping), before, atol=1e-3)
    with pytest.raises(ValueError, match="already patched"):
        PerceptualSkipping(model, SkipConfig())
    with pytest.raises(ValueError, match="no tokens named"):
        logits_of(model, ids)
    with pytest.raises(ValueError, match="name the tokens of this very call"):
        logits_of(model, ids, skipping, mask=torch.ones(1, 3, dtype=torch.bool))
    skipping.remove()
    skipping.remove()
    assert torch.equal(logits_of(model, ids), before)
    assert all("forward" not in vars(part) for layer in layers for part in (layer.mlp, layer.self_attn))
    assert not owner._forward_pre_hooks and not owner._forward_hooks and not hasattr(owner, "_ima_skipping")
    with pytest.raises(RuntimeError), PerceptualSkipping(model, SkipConfig()) as skipping:
        raise RuntimeError("the evaluation failed")
    assert torch.equal(logits_of(model, ids), before)


def test_gpt2_layers_are_supported_and_layers_without_an_ffn_module_are_refused():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB.text_size, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    model, ids = make_model(gpt2.eval()), torch.tensor([ROW])
    with PerceptualSkipping(model, SkipConfig(start_layer=1)) as skipping:
        skipping.set_tokens(ids)
        states = capture_hidden_states(model, ids, sublayers=True)
    h = states.residual
    assert torch.equal(h[2][:, CODES], (h[1] + states.attention[1])[:, CODES])
    assert not torch.equal(h[1][:, CODES], (h[0] + states.attention[0])[:, CODES])
    opt = OPTForCausalLM(OPTConfig(vocab_size=VOCAB.text_size, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=16))
    with pytest.raises(ValueError, match="OPTDecoderLayer has no FFN submodule"):
        PerceptualSkipping(opt, SkipConfig())
    with pytest.raises(ValueError, match="start_layer < end_layer"):
        PerceptualSkipping(model, SkipConfig(start_layer=2))
    with pytest.raises(ValueError, match="interval"):
        skipped_layers(4, SkipConfig(interval=0))


def test_flop_counter_on_known_configs():
    with torch.device("meta"):   # full-size shapes, no memory
        llama_7b = LlamaForCausalLM(LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=1,
                                                num_attention_heads=32, num_key_value_heads=32))
        gpt2_small = GPT2LMHeadModel(GPT2Config(n_layer=1))
    flops = token_layer_flops(llama_7b, context_length=100)
    assert flops.ffn == 2 * 3 * 4096 * 11008 == 270_532_608
    assert flops.attention == 2 * 2 * 4096 * 4096 + 2 * 2 * 4096 * 100
    assert flops.key_value == 2 * 2 * 4096 * 4096
    assert token_layer_flops(gpt2_small, context_length=0).ffn == 2 * 2 * 768 * 3072
    model, ids = make_model(), torch.tensor([ROW])
    with PerceptualSkipping(model, SkipConfig(start_layer=2, attention=True)) as skipping:
        logits_of(model, ids, skipping)
    assert skipping.counts == {"ffn": 3 * 2, "attention": 3 * 2}
    assert skipping.saved_flops(context_length=9) == 6 * 2 * 3 * 32 * 64 + 6 * (2 * 2 * 32 * 32 + 2 * 2 * 32 * 9)
