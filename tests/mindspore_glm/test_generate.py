"""Cached generation against the golden greedy tokens; logits processing; chat and stream_chat."""
import numpy as np
import pytest
import mindspore as ms

from glm_common.prompt import build_prompt
from mindspore_glm import ChatGLM2ForConditionalGeneration
from mindspore_glm.generate import invalid_score_processor, process_logits, sample_next
from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")


@pytest.fixture(scope="module", params=[TINY_MODEL, TINY_PTUNING_MODEL], ids=["tiny", "ptuning"])
def loaded(request):
    return request.param, ChatGLM2ForConditionalGeneration.from_pretrained(request.param)


def test_greedy_single(loaded):
    path, model = loaded
    g = np.load(path / "golden.npz")
    prompt = g["greedy_single_prompt"]
    out = model.generate(prompt, max_new_tokens=g["greedy_single_new"].shape[1], eos_token_id=[])
    assert isinstance(out, np.ndarray)
    np.testing.assert_array_equal(out[:, :prompt.shape[1]], prompt)
    np.testing.assert_array_equal(out[:, prompt.shape[1]:], g["greedy_single_new"])


def test_greedy_batch_left_padded(loaded):
    path, model = loaded
    g = np.load(path / "golden.npz")
    prompt = g["greedy_batch_prompt"]
    out = model.generate(ms.Tensor(prompt.astype(np.int32)), attention_mask=g["greedy_batch_attention_mask"],
                         position_ids=g["greedy_batch_position_ids"],
                         max_new_tokens=g["greedy_batch_new"].shape[1], eos_token_id=[])
    np.testing.assert_array_equal(out[:, prompt.shape[1]:], g["greedy_batch_new"])


def test_pynative_decode_matches():
    """Op-by-op (no graph) decoding gives the same greedy tokens."""
    g = np.load(TINY_MODEL / "golden.npz")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    model.use_graph = False
    out = model.generate(g["greedy_single_prompt"], max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(out[:, 12:], g["greedy_single_new"][:, :6])


def test_eos_stops(loaded):
    path, model = loaded
    g = np.load(path / "golden.npz")
    new = g["greedy_single_new"][0]
    eos = int(new[5])
    out = model.generate(g["greedy_single_prompt"], max_new_tokens=20, eos_token_id=eos)
    assert out.shape[1] == 12 + 6 and out[0, -1] == eos
    out = model.generate(g["greedy_single_prompt"], max_length=12 + 4, eos_token_id=[eos + 1, eos])
    assert out.shape[1] == 12 + 4
    # batch: the row that finishes first is padded with pad id until the other finishes
    gb = np.load(path / "golden.npz")
    eos = int(gb["greedy_batch_new"][0, 2])
    if eos in gb["greedy_batch_new"][1, :8]:
        pytest.skip("row 1 also emits the chosen token early")
    out = model.generate(gb["greedy_batch_prompt"], gb["greedy_batch_attention_mask"],
                         gb["greedy_batch_position_ids"], max_new_tokens=8, eos_token_id=eos)
    new_out = out[:, 16:]
    assert new_out[0, 2] == eos and (new_out[0, 3:] == model.config.pad_token_id).all()
    np.testing.assert_array_equal(new_out[1], gb["greedy_batch_new"][1, :new_out.shape[1]])


def test_sampling(loaded):
    path, model = loaded
    g = np.load(path / "golden.npz")
    prompt = g["greedy_single_prompt"]
    a = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.8, seed=3, eos_token_id=[])
    b = model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.8, top_p=0.8, seed=3, eos_token_id=[])
    np.testing.assert_array_equal(a, b)
    hot = [model.generate(prompt, max_new_tokens=8, do_sample=True, temperature=5.0, seed=s, eos_token_id=[])
           for s in range(3)]
    assert len({tuple(h[0]) for h in hot}) > 1
    # top_k=1 sampling is greedy
    k1 = model.generate(prompt, max_new_tokens=8, do_sample=True, top_k=1, seed=0, eos_token_id=[])
    np.testing.assert_array_equal(k1[:, 12:], g["greedy_single_new"][:, :8])


# ------------------------------------------------------------------ logits processing (numpy references)
def test_invalid_score_processor():
    s = np.array([[1.0, np.nan, 2.0, 0, 0, 0, 0]], np.float32)
    out = invalid_score_processor(None, s)
    assert out[0, 5] == 5e4 and out.sum() == 5e4
    ok = np.array([[1.0, 2.0, 3, 4, 5, 6]], np.float32)
    np.testing.assert_array_equal(invalid_score_processor(None, ok), ok)


def test_top_p_top_k_temperature_penalty():
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    out = process_logits(logits, np.zeros((1, 0), np.int64), top_p=0.7, do_sample=True)
    # keep the smallest set whose mass reaches 0.7: {0.5, 0.3}
    assert np.isfinite(out[0, :2]).all() and np.isinf(out[0, 2:]).all()
    out = process_logits(logits, np.zeros((1, 0), np.int64), top_k=3, do_sample=True)
    assert np.isinf(out[0, 3]) and np.isfinite(out[0, :3]).all()
    out = process_logits(logits, np.zeros((1, 0), np.int64), temperature=0.5, do_sample=True)
    np.testing.assert_allclose(out, logits / 0.5, rtol=1e-6)
    s = np.array([[2.0, -2.0, 1.0]], np.float32)
    out = process_logits(s, np.array([[0, 1]]), repetition_penalty=2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0]])
    rng = np.random.default_rng(0)
    draws = [int(sample_next(np.log(np.array([[0.2, 0.8]])), True, rng)[0]) for _ in range(2000)]
    assert abs(np.mean(draws) - 0.8) < 0.04


# ------------------------------------------------------------------ chat
def test_chat_and_stream_chat(tokenizer):
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    history = [("你好", "你好！")]
    query = "类型#裙*颜色#白色"
    response, new_history = model.chat(tokenizer, query, history, max_new_tokens=10, do_sample=False)
    assert new_history == history + [(query, response)]
    # the reply is the greedy continuation of the chat prompt, decoded and post-processed
    ids = np.asarray([tokenizer.encode(build_prompt(query, history))])
    ref = model.generate(ids, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    if tokenizer.eos_token_id in ref:
        ref = ref[:ref.index(tokenizer.eos_token_id)]
    assert response == tokenizer.decode(ref).strip()
    states = list(model.stream_chat(tokenizer, query, history, max_new_tokens=10, do_sample=False))
    assert states and states[-1] == (response, new_history)
    assert all(h[:-1] == history and h[-1][0] == query for _, h in states)
    # sampling defaults of chat (top_p 0.8, temperature 0.8), reproducible with a seed
    a, _ = model.chat(tokenizer, query, max_new_tokens=6, seed=1)
    b, _ = model.chat(tokenizer, query, max_new_tokens=6, seed=1)
    assert a == b


def test_reloading_weights_recompiles():
    """Compiled graphs keep the parameter values they were compiled with; loading weights drops the
    model's generation graphs so the next call sees the new values."""
    g = np.load(TINY_MODEL / "golden.npz")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    first = model.generate(g["greedy_single_prompt"], max_new_tokens=3, eos_token_id=[])
    np.testing.assert_array_equal(first[:, 12:], g["greedy_single_new"][:, :3])
    out_w = model.transformer.output_layer.weight.asnumpy()
    model.load_weights([("transformer.output_layer.weight", out_w[::-1].copy())], strict=False)
    again = model.generate(g["greedy_single_prompt"], max_new_tokens=3, eos_token_id=[])
    model.use_graph = False
    np.testing.assert_array_equal(again, model.generate(g["greedy_single_prompt"], max_new_tokens=3, eos_token_id=[]))
    assert not np.array_equal(again, first)
