import pytest
import torch

from models.evaluation import DigitJudge, image_features, mentioned_label, prompt_answer_logprobs, psnr, rank_answers
from models.multimodal_lm import MultimodalLM, MultimodalLMConfig
from models.vocabulary import JointVocabulary


def make_model(tiny_llm_path, text_tokenizer_path) -> MultimodalLM:
    torch.manual_seed(0)
    vocab = JointVocabulary.from_text_tokenizer(text_tokenizer_path, {"image": 16})
    return MultimodalLM(MultimodalLMConfig(base_llm=tiny_llm_path, vocabulary=vocab.to_dict(),
                                           text_special_ids=[0, 1])).eval()


def test_every_answer_to_every_prompt_is_the_sum_of_its_next_token_logprobs_over_text(tiny_llm_path,
                                                                                      text_tokenizer_path):
    model = make_model(tiny_llm_path, text_tokenizer_path)
    block = model.vocab.wrap("image", torch.tensor([3, 5, 7]))
    prompts, answers = [[2] + block, [2, 4, 6], [2, 8]], [[9, 10, 1], [11, 1], [12, 13, 14, 1]]
    # two prompts per batch and a small cache budget: left padding, the repeated cache and right-padded answers
    scores = prompt_answer_logprobs(model, prompts, answers, batch_size=2, cache_tokens=24)
    assert scores.shape == (3, 3)
    text = torch.arange(model.vocab.text_size)
    column = {int(t): i for i, t in enumerate(text)}
    for n, prompt in enumerate(prompts):
        for a, answer in enumerate(answers):
            with torch.no_grad():
                _, logits = model.hidden_and_logits(torch.tensor([prompt + answer]))
            logp = logits[0, :, text].log_softmax(-1)       # what a text reply is drawn from
            want = sum(float(logp[len(prompt) - 1 + j, column[t]]) for j, t in enumerate(answer))
            assert abs(float(scores[n, a]) - want) < 1e-4


def test_a_text_answer_is_scored_without_the_block_openings_the_model_could_write_instead(tiny_llm_path,
                                                                                        text_tokenizer_path):
    # a model that learned "seven [AUD]" from spoken-digit rows: how likely a block opening is after a word must not
    # move the word's score as an answer, since a text reply may not open a block
    model = make_model(tiny_llm_path, text_tokenizer_path)
    prompts, answers = [[2] + model.vocab.wrap("image", torch.tensor([3, 5])), [2, 4]], [[9, 10, 1], [11, 1]]
    before = prompt_answer_logprobs(model, prompts, answers)
    with torch.no_grad():
        model.heads["special"].weight.normal_(std=5.0)
    after = prompt_answer_logprobs(model, prompts, answers)
    assert torch.allclose(before, after, atol=1e-5)


def test_answers_are_scored_under_the_ids_a_reply_may_hold(tiny_llm_path, text_tokenizer_path):
    # the generator's grammar bans bos and pad from a text reply: scoring renormalises over what it allows
    model = make_model(tiny_llm_path, text_tokenizer_path)
    reply = torch.tensor([i for i in range(model.vocab.text_size) if i not in (0, 3)])
    prompt, answer = [2, 4, 6], [9, 10, 1]
    scores = prompt_answer_logprobs(model, [prompt], [answer], reply_ids=reply)
    with torch.no_grad():
        _, logits = model.hidden_and_logits(torch.tensor([prompt + answer]))
    logp = logits[0, :, reply].log_softmax(-1)
    column = {int(t): i for i, t in enumerate(reply)}
    want = sum(float(logp[len(prompt) - 1 + j, column[t]]) for j, t in enumerate(answer))
    assert abs(float(scores[0, 0]) - want) < 1e-4
    assert float(scores[0, 0]) > float(prompt_answer_logprobs(model, [prompt], [answer])[0, 0])
    with pytest.raises(ValueError, match="may not hold"):
        prompt_answer_logprobs(model, [prompt], [[3, 1]], reply_ids=reply)


def test_rank_answers_scores_each_candidate_by_its_best_phrasing(tiny_llm_path, text_tokenizer_path):
    model = make_model(tiny_llm_path, text_tokenizer_path)
    prompts = [[2, 4], [2, 5, 6]]
    candidates = [[[9, 1], [10, 1]], [[11, 1], [12, 13, 1]]]
    scores = rank_answers(model, prompts, candidates, batch_size=3)
    single = prompt_answer_logprobs(model, [prompts[1]], [[11, 1], [12, 13, 1]])[0]
    assert scores.shape == (2, 2) and abs(float(scores[1, 1]) - float(single.max())) < 1e-4


def test_mentioned_label_takes_the_first_whole_word():
    names = [["0", "zero"], ["1", "one"], ["7", "seven"]]
    assert mentioned_label("the digit seven, not one", names) == 2
    assert mentioned_label("a 1 moving left", names) == 1
    assert mentioned_label("someone wrote 17", names) is None      # not inside words or numbers
    assert mentioned_label("", names) is None


def test_image_judge_knows_real_digits_and_psnr_is_in_db(digits):
    images, labels = digits
    judge = DigitJudge(image_features).fit(images[:1400], labels[:1400])
    assert judge.accuracy(images[1400:], labels[1400:]) > 0.9
    assert judge.accuracy(torch.rand(50, 3, 32, 32), [0] * 50) < 0.5
    assert abs(psnr(torch.zeros(4), torch.full((4,), 0.1)) - 20.0) < 1e-4


def test_the_image_judge_is_not_thrown_by_faint_grey_where_real_digits_are_white(digits):
    images, labels = digits
    judge = DigitJudge(image_features).fit(images[:1400], labels[:1400])
    noisy = (images[1400:] + 0.02 * torch.randn_like(images[1400:])).clamp(0, 1)     # a 34 dB reconstruction
    assert judge.accuracy(noisy, labels[1400:]) > 0.9
