"""Sampling settings and log-probabilities through the ``openai`` client, both backends, against an
independent greedy loop: the torch model's plain forward over the whole sequence (no cache, no engine),
transformers' own ``RepetitionPenaltyLogitsProcessor``, and OpenAI's documented presence/frequency
formula (``logit - frequency * count - presence * (count > 0)`` over the answer)."""
import math

import pytest
import torch

from glm_common.prompt import build_prompt
from tests.conftest import TINY_MODEL
from tests.serve.conftest import serving
from tests.serve.test_api import _client

QUERY = "讲个笑话"                   # the tiny model repeats tokens within N of its answer
N = 24


@pytest.fixture(scope="module")
def reference_model():
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    return ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL).eval()


@torch.no_grad()
def _reference(model, tokenizer, prompt, n, repetition=1.0, presence=0.0, frequency=0.0):
    """Greedy ``(answer ids, [log-probabilities of each step's model distribution])``."""
    from transformers import RepetitionPenaltyLogitsProcessor
    ids = tokenizer.encode(prompt)
    start, steps = len(ids), []
    for _ in range(n):
        x = torch.tensor([ids])
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[:, -1].float()
        steps.append(logits.log_softmax(-1)[0])
        scores = RepetitionPenaltyLogitsProcessor(repetition)(x, logits.clone()) if repetition != 1.0 else logits
        for tok in set(ids[start:]):
            count = ids[start:].count(tok)
            scores[0, tok] -= frequency * count + presence
        tok = int(scores.argmax(-1))
        if tok == tokenizer.eos_token_id:
            break
        ids.append(tok)
    return ids[start:], steps


def _ask(url, b, **kw):
    return _client(url).chat.completions.create(model=b.model_id, messages=[{"role": "user", "content": QUERY}],
                                                max_tokens=N, **kw)


def test_penalties_and_top_k(backend, reference_model):
    b = backend
    prompt = build_prompt(QUERY, [])
    with serving(b) as (url, _):
        plain = _ask(url, b, temperature=0).choices[0].message.content
        for kw in (dict(repetition_penalty=3.0), dict(presence_penalty=2.0), dict(frequency_penalty=2.0),
                   dict(presence_penalty=-2.0, frequency_penalty=0.5)):
            ids, _ = _reference(reference_model, b.tokenizer, prompt, N, kw.get("repetition_penalty", 1.0),
                                kw.get("presence_penalty", 0.0), kw.get("frequency_penalty", 0.0))
            from glm_common.prompt import process_response
            want = process_response(b.tokenizer.decode(ids))
            got = _ask(url, b, temperature=0, extra_body=kw if "repetition_penalty" in kw else None,
                       **({} if "repetition_penalty" in kw else kw)).choices[0].message.content
            assert got == want, kw
            assert want != plain, kw                      # the setting changes the answer
        # top_k 1 leaves one token to draw: sampling at temperature 1 answers greedily
        assert _ask(url, b, temperature=1.0, seed=3, extra_body={"top_k": 1}).choices[0].message.content == plain
    if b.name == "torch":                                 # and repetition_penalty is chat()'s own
        assert plain != b.model.chat(b.tokenizer, QUERY, max_new_tokens=N, do_sample=False,
                                     repetition_penalty=3.0)[0]


def test_logprobs(backend, reference_model):
    b = backend
    ids, steps = _reference(reference_model, b.tokenizer, build_prompt(QUERY, []), N)
    tol = 1e-4 if b.name == "torch" else 1e-3
    with serving(b) as (url, _):
        r = _ask(url, b, temperature=0, logprobs=True, top_logprobs=3)
        content = r.choices[0].logprobs.content
        assert len(content) == len(ids) == r.usage.completion_tokens
        for entry, tok, logp in zip(content, ids, steps):
            assert math.isclose(entry.logprob, float(logp[tok]), abs_tol=tol)
            top = torch.topk(logp, 3)
            assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=tol)
            assert entry.top_logprobs[0].logprob == entry.logprob          # greedy: the most likely token
            if entry.token.startswith("bytes:"):                            # a byte-fallback piece
                assert entry.bytes == [int(entry.token[len("bytes:\\x"):], 16)]
            else:                                                          # ("" for a special token)
                assert bytes(entry.bytes).decode() == entry.token == b.tokenizer.convert_id_to_token(tok).replace(
                    "\u2581", " ")
        stream = _client(url).chat.completions.create(
            model=b.model_id, messages=[{"role": "user", "content": QUERY}], max_tokens=N, temperature=0,
            logprobs=True, top_logprobs=3, stream=True)
        streamed = [e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
        assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
        assert _ask(url, b, temperature=0).choices[0].logprobs is None
        c = _client(url).completions.create(model=b.model_id, prompt=build_prompt(QUERY, []), max_tokens=N,
                                            temperature=0, logprobs=2)
        lp = c.choices[0].logprobs
        assert lp.token_logprobs == pytest.approx([float(s[t]) for t, s in zip(ids, steps)], abs=tol)
        for d, s in zip(lp.top_logprobs, steps):         # {token: logprob}: two tokens of one text share a key
            assert sorted(d.values(), reverse=True) == pytest.approx(torch.topk(s, 2).values.tolist()[:len(d)],
                                                                     abs=tol)
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]


def test_sampling_fields_are_checked(torch_backend):
    import httpx
    user = [{"role": "user", "content": "hi"}]
    with serving(torch_backend) as (url, _):
        for body, words in (({"presence_penalty": 2.5}, "presence_penalty: 2.5 is out of range [-2, 2]"),
                            ({"repetition_penalty": 0}, "repetition_penalty: must be greater than 0"),
                            ({"top_k": 1.5}, "top_k: expected an integer"),
                            ({"top_logprobs": 2}, "top_logprobs: needs logprobs: true"),
                            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs: 21 is out of range [0, 20]"),
                            ({"logprobs": 3}, "logprobs: expected true or false")):
            r = httpx.post(url + "/v1/chat/completions", json={"messages": user, **body}, timeout=60)
            assert r.status_code == 400 and r.json()["error"]["message"].startswith(words), r.json()
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "logprobs": 6}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == "logprobs: 6 is out of range [0, 5]"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": user, "echo": True}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("echo: not supported")
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "echo": "yes"}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["message"] == "echo: expected true or false, got 'yes'"
        r = httpx.post(url + "/v1/completions", json={"prompt": "x", "max_tokens": 0}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"


def test_echo_scores_the_prompt(backend, reference_model):
    """``echo`` with ``logprobs`` (what evaluation harnesses send to score a text): each prompt token's
    log-probability given those before it, from the reference model's plain forward; ``max_tokens: 0``
    scores without answering; with an answer, the prompt comes first and the answer is the one without echo."""
    b = backend
    prompt = build_prompt(QUERY, [])
    ids = b.tokenizer.encode(prompt)
    with torch.no_grad():
        x = torch.tensor([ids])
        ref = reference_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0].float().log_softmax(-1)
    tol = 1e-4 if b.name == "torch" else 1e-3
    with serving(b) as (url, _):
        client = _client(url)
        scored = client.completions.create(model=b.model_id, prompt=prompt, max_tokens=0, echo=True, logprobs=2,
                                           temperature=0)
        ch = scored.choices[0]
        assert ch.text == prompt and ch.finish_reason == "length"
        assert scored.usage.prompt_tokens == len(ids) and scored.usage.completion_tokens == 0
        lp = ch.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert lp.token_logprobs[1:] == pytest.approx([float(ref[i - 1, ids[i]]) for i in range(1, len(ids))],
                                                      abs=tol)
        for d, i in zip(lp.top_logprobs[1:], range(1, len(ids))):
            assert sorted(d.values(), reverse=True) == pytest.approx(torch.topk(ref[i - 1], 2).values.tolist()[:len(d)],
                                                                     abs=tol)
        plain = client.completions.create(model=b.model_id, prompt=prompt, max_tokens=N, temperature=0, logprobs=2)
        both = client.completions.create(model=b.model_id, prompt=prompt, max_tokens=N, temperature=0, logprobs=2,
                                         echo=True)
        assert both.choices[0].text == prompt + plain.choices[0].text
        assert both.choices[0].logprobs.token_logprobs == [None] + lp.token_logprobs[1:] + \
            plain.choices[0].logprobs.token_logprobs
        assert both.usage.completion_tokens == plain.usage.completion_tokens
        stream = client.completions.create(model=b.model_id, prompt=prompt, max_tokens=N, temperature=0, echo=True,
                                           stream=True)
        assert "".join(c.choices[0].text for c in stream if c.choices) == both.choices[0].text
        echoed = client.completions.create(model=b.model_id, prompt=prompt, max_tokens=N, temperature=0, echo=True)
        assert echoed.choices[0].text == both.choices[0].text and echoed.choices[0].logprobs is None
