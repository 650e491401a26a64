"""Generation: processors against transformers' own, eos stop, sampling, chat and stream_chat."""
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from glm_common.prompt import build_prompt
from tests.conftest import TINY_MODEL
from torch_glm import ChatGLM2ForConditionalGeneration
from torch_glm.generate import (apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                invalid_score_processor)


@pytest.fixture(scope="module")
def model():
    return ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def g():
    data = np.load(TINY_MODEL / "golden.npz")
    return {k: torch.from_numpy(data[k]) for k in data.files}


def test_processors_match_transformers():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(3, 50, generator=gen) * 3
    ids = torch.randint(0, 50, (3, 7), generator=gen)
    torch.testing.assert_close(apply_repetition_penalty(ids, scores, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()))
    torch.testing.assert_close(apply_temperature(scores, 0.7), TemperatureLogitsWarper(0.7)(ids, scores.clone()))
    for k in (1, 5, 49):
        assert torch.equal(apply_top_k(scores, k), TopKLogitsWarper(k)(ids, scores.clone()))
    for p in (0.1, 0.5, 0.8, 0.99):
        assert torch.equal(apply_top_p(scores, p), TopPLogitsWarper(p)(ids, scores.clone()))


def test_invalid_score_processor():
    scores = torch.tensor([[0.0, float("nan"), 1.0, 2.0, 3.0, 4.0, 5.0]])
    out = invalid_score_processor(None, scores)
    assert out[0, 5] == 5e4 and out.sum() == 5e4
    fine = torch.randn(2, 8)
    assert torch.equal(invalid_score_processor(None, fine), fine)


def test_eos_stops_and_pads_finished_rows(model, g):
    prompt, new = g["greedy_batch_prompt"], g["greedy_batch_new"]
    mask = g["greedy_batch_attention_mask"]
    eos = int(new[0, 3])  # row 0 emits this token at step 4 (row 1 never does)
    assert eos not in new[1].tolist() and eos not in new[0, :3].tolist()
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0)
    assert out.shape == (2, 32)
    assert out[0, 16:20].tolist() == new[0, :4].tolist() and (out[0, 20:] == 0).all()
    assert torch.equal(out[1, 16:], new[1])
    single = model.generate(prompt[1:], max_new_tokens=16, eos_token_id=int(new[1, 5]))
    assert single.shape == (1, 16 + 6) and torch.equal(single[0, 16:], new[1, :6])


def test_sampling_seeded_and_topk1_is_greedy(model, g):
    prompt = g["greedy_single_prompt"]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.9, top_p=0.9, eos_token_id=-1)
    a = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    b = model.generate(prompt, generator=torch.Generator().manual_seed(1), **kw)
    c = model.generate(prompt, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    topk1 = model.generate(prompt, max_new_tokens=10, do_sample=True, top_k=1, eos_token_id=-1,
                           generator=torch.Generator().manual_seed(3))
    assert torch.equal(topk1[:, 12:], g["greedy_single_new"][:, :10])


def test_sampling_draws_from_the_model_distribution(model, g):
    """First sampled token frequencies follow softmax(logits / T) of the golden single forward."""
    prompt = g["greedy_single_prompt"]
    probs = (g["single_logits"][0, 11] / 2.0).softmax(-1)
    gen = torch.Generator().manual_seed(0)
    n = 400
    batch = prompt.expand(n, -1)
    out = model.generate(batch, max_new_tokens=1, do_sample=True, temperature=2.0, generator=gen, eos_token_id=-1)
    counts = torch.bincount(out[:, -1], minlength=probs.numel()).float() / n
    top = probs.topk(3).indices
    assert (counts[top] - probs[top]).abs().max() < 0.05


def test_chat_and_stream_chat(model, tokenizer):
    query, history = "类型#裙", [("你好", "好")]
    response, new_history = model.chat(tokenizer, query, history, max_new_tokens=8, do_sample=False)
    assert new_history == history + [(query, response)]
    # the same answer by hand: prompt format of docs/architecture.md, greedy generate, decode, strip
    ids = torch.tensor([tokenizer.encode(build_prompt(query, history))])
    out = model.generate(ids, max_new_tokens=8)
    new = [t for t in out[0, ids.shape[1]:].tolist() if t != tokenizer.eos_token_id]
    assert response == tokenizer.decode(new).strip()
    steps = list(model.stream_chat(tokenizer, query, history, max_new_tokens=8, do_sample=False))
    assert steps and steps[-1] == (response, history + [(query, response)])
    # defaults sample (do_sample=True, top_p=0.8, temperature=0.8) and are reproducible with a generator
    r1, _ = model.chat(tokenizer, query, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    r2, _ = model.chat(tokenizer, query, max_new_tokens=6, generator=torch.Generator().manual_seed(5))
    assert r1 == r2


def test_stream_chat_continues_a_cache(model, tokenizer):
    """Round 2 on round 1's cache = greedy decoding of the whole token sequence without a cache."""
    *_, (r1, h1, cache) = model.stream_chat(tokenizer, "类型#裙", max_new_tokens=6, do_sample=False,
                                            return_past_key_values=True)
    assert h1 == [("类型#裙", r1)]
    *_, (r2, h2, cache2) = model.stream_chat(tokenizer, "颜色#红", h1, past_key_values=cache, max_new_tokens=6,
                                             do_sample=False, return_past_key_values=True)
    assert h2 == h1 + [("颜色#红", r2)] and cache2[0][0].shape[2] > cache[0][0].shape[2]
    first = tokenizer.encode(build_prompt("类型#裙"))
    new1 = model.generate(torch.tensor([first]), max_new_tokens=6)[0, len(first):].tolist()
    round2 = tokenizer.encode("\n\n[Round 2]\n\n问：颜色#红\n\n答：", add_special_tokens=False)[1:]  # "▁" dropped
    assert cache[0][0].shape[2] == len(first) + len(new1) - 1  # the newest token is not cached yet
    whole = torch.tensor([first + new1[:-1] + round2])
    new2 = model.generate(whole, max_new_tokens=6)[0, whole.shape[1]:].tolist()
    new2 = [t for t in new2 if t != tokenizer.eos_token_id]
    assert r2 == tokenizer.decode(new2).strip()
