"""The OpenAI-compatible API, driven by the real ``openai`` client (and raw HTTP for malformed input),
against the model's own greedy ``chat()`` on the tiny golden model, both backends."""
import json
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import serving

SYSTEM, Q1, A1, Q2 = "你是一个广告文案助手", "类型#裙*颜色#蓝色", "这条蓝色裙子很好看", "再写一条"
MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": Q1},
            {"role": "assistant", "content": A1}, {"role": "user", "content": Q2}]
# the same conversation as chat() takes it: the system text leads the first user turn
QUERY, HISTORY = Q2, [(SYSTEM + "\n" + Q1, A1)]
N = 24


def _client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def _solo_tokens(backend, query, history, n):
    """The answer's token count as ``generate`` produces it alone (eos not counted)."""
    import numpy as np
    from glm_common.prompt import build_prompt
    ids = backend.tokenizer.encode(build_prompt(query, history))
    if backend.name == "torch":
        import torch
        from torch_glm.generate import invalid_score_processor
        out = backend.model.generate(torch.tensor([ids]), max_new_tokens=n,
                                     logits_processor=[invalid_score_processor])[0, len(ids):].tolist()
    else:
        out = backend.model.generate(np.array([ids]), max_new_tokens=n)[0, len(ids):].tolist()
    eos = backend.tokenizer.eos_token_id
    return len(ids), (out.index(eos) if eos in out else len(out))


def test_chat_plain_and_streamed_equal_chat(backend):
    want = backend.solo_answer(QUERY, HISTORY, N)
    prompt_tokens, completion_tokens = _solo_tokens(backend, QUERY, HISTORY, N)
    with serving(backend) as (url, _):
        client = _client(url)
        assert [m.id for m in client.models.list().data] == [backend.model_id]
        r = client.chat.completions.create(model=backend.model_id, messages=MESSAGES, max_tokens=N, temperature=0)
        assert r.choices[0].message.content == want
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].finish_reason == ("length" if completion_tokens == N else "stop")
        assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
            (prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
        stream = client.chat.completions.create(model=backend.model_id, messages=MESSAGES, max_tokens=N,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == want
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-2].choices[0].finish_reason == r.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == completion_tokens and chunks[-1].choices == []
        # the raw stream ends with data: [DONE]
        with httpx.stream("POST", url + "/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "stream": True}, timeout=60) as raw:
            lines = [ln for ln in raw.iter_lines() if ln]
        assert lines[-1] == "data: [DONE]" and all(ln.startswith("data: ") for ln in lines)
        # raw completions: the prompt as given, the answer undecorated
        c = client.completions.create(model=backend.model_id, prompt="[Round 1]\n\n问：你好\n\n答：", max_tokens=5,
                                      temperature=0)
        assert c.usage.completion_tokens <= 5 and c.choices[0].finish_reason in ("stop", "length")


def _status(fn):
    try:
        fn()
    except openai.APIStatusError as e:
        return e.status_code, e.body.get("message") if isinstance(e.body, dict) else str(e.body)
    raise AssertionError("no error")


def test_errors(torch_backend):
    b = torch_backend
    with serving(b, max_tokens=64) as (url, sched):
        client = _client(url)
        create = client.chat.completions.create
        user = [{"role": "user", "content": "hi"}]
        st, msg = _status(lambda: create(model=b.model_id, messages=[{"role": "robot", "content": "x"}]))
        assert st == 400 and "messages[0].role: unknown role 'robot'" in msg
        st, msg = _status(lambda: create(model=b.model_id, messages=[]))
        assert st == 400 and "empty conversation" in msg
        st, msg = _status(lambda: create(model=b.model_id, messages=[{"role": "system", "content": "x"}]))
        assert st == 400 and "empty conversation" in msg
        st, msg = _status(lambda: create(model=b.model_id, messages=user + [{"role": "assistant", "content": "x"}]))
        assert st == 400 and "last message must be a user message" in msg
        long_text = "广告 " * 400
        st, msg = _status(lambda: create(model=b.model_id, messages=[{"role": "user", "content": long_text}]))
        n = len(b.tokenizer.encode(long_text))
        assert st == 400 and f"the prompt has" in msg and f"seq_length is {b.seq_length}" in msg
        st, msg = _status(lambda: create(model=b.model_id, messages=user, max_tokens=65))
        assert st == 400 and "max_tokens: 65 is more than this server's limit 64" in msg and "refused" in msg
        st, msg = _status(lambda: create(model="gpt-4", messages=user))
        assert st == 404 and "'gpt-4' is not served here" in msg
        st, msg = _status(lambda: create(model=b.model_id, messages=user, n=2))
        assert st == 400 and msg.startswith("n: not supported")
        # malformed bodies (raw HTTP: the client cannot send them)
        r = httpx.post(url + "/v1/chat/completions", content=b'{"messages": [', timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("malformed JSON body")
        r = httpx.post(url + "/v1/chat/completions", json={"messages": "hi"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        r = httpx.post(url + "/v1/chat/completions", json={"messages": user, "temperature": "hot"}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("temperature: expected a number")
        assert n > b.seq_length
    # body limit and API key
    with serving(b, api_key="sekrit", max_body_bytes=2000) as (url, _):
        st, msg = _status(lambda: _client(url, "wrong").models.list())
        assert st == 401 and "API key" in msg
        assert [m.id for m in _client(url, "sekrit").models.list().data] == [b.model_id]
        assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"       # no key needed
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer sekrit"},
                       json={"messages": [{"role": "user", "content": "x" * 5000}]}, timeout=30)
        assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["error"]["message"]


def test_queue_full_is_503(torch_backend):
    b = torch_backend
    with serving(b, max_batch=1, max_queue=2, start=False) as (url, sched):
        results = []

        def call():
            results.append(_client(url).chat.completions.create(
                model=b.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0))

        waiting = [threading.Thread(target=call) for _ in range(3)]      # one for the free row, 2 waiting
        for t in waiting:
            t.start()
        with sched.cond:                             # submit() notifies; the loop is not started
            assert sched.cond.wait_for(lambda: len(sched.waiting) >= 3, timeout=120)
        st, msg = _status(lambda: _client(url).chat.completions.create(
            model=b.model_id, messages=[{"role": "user", "content": "hi"}], max_tokens=4))
        assert st == 503 and "busy" in msg and "--max-queue 2" in msg
        sched.start()                                # the queued three are answered
        for t in waiting:
            t.join(60)
        assert len(results) == 3


def test_disconnect_frees_the_row(torch_backend):
    b = torch_backend
    with serving(b, max_batch=2) as (url, sched):
        with httpx.stream("POST", url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 230, "temperature": 0,
                "stream": True}, timeout=60) as raw:
            assert raw.status_code == 200
            for line in raw.iter_lines():              # up to the first answer text, then hang up
                if '"content": "' in line and '"content": ""' not in line:
                    break
        deadline = time.monotonic() + 120              # a bound on the wait, not a measure: the row is
        while sched.stats()["active"] and time.monotonic() < deadline:   # freed at the scheduler's next turn
            time.sleep(0.01)
        assert sched.stats()["active"] == 0 and sched.decoder.free == 2
        assert sched.abandoned == 1, str(sched.stats())  # freed because the client left, not because it finished


PROMPTS = ["你好", "类型#上衣*材质#牛仔布*颜色#白色", "hello there, how are you today?", "讲个笑话",
           "广告文案：裙子", "x y z", "再见吧朋友们", "1+1=?"]


def test_eight_staggered_streams_get_their_solo_answers(backend):
    """Request i is sent once the batch has run 2i decode steps: the scheduler is held at that step
    boundary until the request is queued, so later requests join a running batch by construction (no
    sleeping, nothing that depends on how fast the machine is)."""
    n = 16
    want = [backend.solo_answer(q, [], n) for q in PROMPTS]
    gates = [threading.Event() for _ in PROMPTS]
    active_at = []                                   # rows in the batch at each step boundary

    def boundary(s):
        active_at.append(len(s.active))
        due = [i for i, g in enumerate(gates) if not g.is_set() and s.steps >= 2 * i]
        if not due and not s.active:                 # the batch ran dry before the next was due: send it now
            due = [i for i, g in enumerate(gates) if not g.is_set()][:1]
        for i in due:
            gates[i].set()
        with s.cond:                                 # hold the loop here until they are queued
            assert s.cond.wait_for(lambda: len(s.waiting) >= len(due), timeout=300), "a request never arrived"

    with serving(backend, max_batch=8, start=False) as (url, sched):
        sched.at_step_boundary = boundary
        sched.start()
        got = [None] * len(PROMPTS)

        def run(i):
            gates[i].wait(300)
            stream = _client(url).chat.completions.create(
                model=backend.model_id, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=n,
                temperature=0, stream=True)
            got[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        steps = sched.stats()["decode_steps"]
    assert got == want
    # they really shared the batch: several rows at once, and the last one (sent at step 14 at the
    # latest) done within its n tokens: 8 answers in about n steps, not 8n
    assert max(active_at) > 1, active_at
    assert steps <= 2 * (len(PROMPTS) - 1) + n, steps
