"""One request never breaks another: a row whose token choice fails ends alone, bad bodies are 400s on a
connection that stays usable, queue limits count what really waits, a client that hangs up frees its
row, and slow or excess connections are cut. Driven by the ``openai`` client where it can send the
request, raw HTTP otherwise. Concurrency is proven by construction (requests queued before the
scheduler starts, decode steps counted, the decoder held at a gate), never by timing."""
import http.client
import json
import socket
import threading
import time

import httpx
import openai
import pytest

from tests.serve.conftest import serving
from tests.serve.test_api import PROMPTS, _client, _status

POISON_SEED = 4242


def _wait(cond, what, limit=60):
    """Wait for ``cond()`` (a state the test brought about; the limit only stops a broken run)."""
    deadline = time.time() + limit
    while not cond():
        if time.time() > deadline:
            raise AssertionError(f"never: {what}")
        time.sleep(0.01)


def test_a_poisoned_row_fails_alone(backend):
    """8 requests decode in one batch; one row's sampler fails at its third token: that request gets a
    one-row error, the other 7 (one with temperature 1.2e-38, answered greedily) get their solo answers."""
    n = 12
    want = [backend.solo_answer(q, [], n) for q in PROMPTS]
    with serving(backend, max_batch=8, start=False) as (url, sched):
        pick, calls = sched.decoder._pick, []

        def poisoned(row, scores):
            if row.settings.seed == POISON_SEED:
                calls.append(1)
                if len(calls) == 3:
                    raise FloatingPointError("probability tensor contains inf, nan")
            return pick(row, scores)

        sched.decoder._pick = poisoned
        got, errors = [None] * 8, [None] * 8

        def run(i):
            kw = dict(temperature=1.2e-38) if i == 2 else dict(temperature=0)
            if i == 5:
                kw["seed"] = POISON_SEED
            try:
                r = _client(url).chat.completions.create(
                    model=backend.model_id, messages=[{"role": "user", "content": PROMPTS[i]}], max_tokens=n, **kw)
                got[i] = r.choices[0].message.content
            except openai.APIStatusError as e:
                errors[i] = (e.status_code, e.body.get("message", ""))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        _wait(lambda: sched.stats()["waiting"] == 8, "8 requests waiting")
        sched.start()                                  # all 8 are admitted in one turn: one batch
        for t in threads:
            t.join(600)
        steps = sched.steps
    assert [g for i, g in enumerate(got) if i != 5] == [w for i, w in enumerate(want) if i != 5]
    assert got[5] is None and errors[5][0] == 500 and "probability tensor contains inf, nan" in errors[5][1]
    assert [e for i, e in enumerate(errors) if i != 5] == [None] * 7
    assert steps < n                                   # one shared decode step per token, not one per row


def _post(url, body, **kw):
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120, **kw)


def test_queue_limits_count_what_waits(torch_backend):
    b = torch_backend
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    with serving(b, max_batch=8, max_queue=4, start=False) as (url, sched):
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(_post(url, body).status_code)) for _ in range(6)]
        for t in threads:
            t.start()
        _wait(lambda: sched.stats()["waiting"] == 6, "a burst of 6 waiting")     # 8 rows free: none refused
        more = [threading.Thread(target=lambda: codes.append(_post(url, body).status_code)) for _ in range(6)]
        for t in more:
            t.start()
        _wait(lambda: sched.stats()["waiting"] == 12, "8 rows' worth and 4 more waiting")
        r = _post(url, body)                            # the 13th: 8 rows taken and 4 really waiting
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "--max-queue 4" in r.json()["error"]["message"]
        sched.start()
        for t in threads + more:
            t.join(300)
        assert codes == [200] * 12
    with serving(b, max_batch=2, max_queue=0, start=False) as (url, sched):   # 0: no waiting, not refuse-all
        codes = []
        threads = [threading.Thread(target=lambda: codes.append(_post(url, body).status_code)) for _ in range(2)]
        for t in threads:
            t.start()
        _wait(lambda: sched.stats()["waiting"] == 2, "2 requests for 2 free rows")
        assert _post(url, body).status_code == 503
        sched.start()
        for t in threads:
            t.join(300)
        assert codes == [200, 200]


def test_bad_bodies_are_400s_and_the_connection_lives_on(torch_backend):
    b = torch_backend
    user = [{"role": "user", "content": "hi"}]
    with serving(b) as (url, sched):
        conn = http.client.HTTPConnection(url[len("http://"):], timeout=120)

        def post(raw: bytes, path="/v1/chat/completions"):
            conn.request("POST", path, body=raw, headers={"content-type": "application/json"})
            r = conn.getresponse()
            return r.status, json.loads(r.read())

        st, body = post(b'{"messages": [{"role": "user", "content": "\\ud800"}]}')
        sock = conn.sock
        assert st == 400 and "\\ud800 is a lone UTF-16 surrogate" in body["error"]["message"]
        st, body = post(b"[" * 50_000 + b"]" * 50_000)
        assert st == 400 and body["error"]["message"] == "malformed JSON body: nested too deep"
        for field, value, words in (("temperature", float("nan"), "temperature: nan is out of range"),
                                    ("top_p", float("nan"), "top_p: nan is out of range"),
                                    ("n", True, "n: not supported"),
                                    ("stream_options", {"include_usage": True},
                                     "stream_options: only allowed when stream is true")):
            st, body = post(json.dumps({"messages": user, field: value}).encode())
            assert st == 400 and body["error"]["message"].startswith(words), body
            assert body["error"]["param"] == field
        prepare = sched.prepare
        sched.prepare = lambda *a: (_ for _ in ()).throw(RuntimeError("unforeseen"))
        st, body = post(json.dumps({"messages": user, "max_tokens": 2}).encode())
        assert st == 500 and body["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                               "param": None, "code": None}
        sched.prepare = prepare
        st, body = post(json.dumps({"messages": user, "max_tokens": 2, "temperature": 0}).encode())
        assert st == 200 and body["choices"][0]["message"]["content"] == b.solo_answer("hi", [], 2)
        assert conn.sock is sock                         # every answer above came on one keep-alive connection
        conn.close()
    # a chunked body (no Content-Length) over the limit: 413 in JSON, not a 500
    with serving(b, max_body_bytes=2000) as (url, _):
        r = httpx.post(url + "/v1/chat/completions", content=iter([b'{"messages": "'] + [b"x" * 1000] * 5 + [b'"}']),
                       timeout=60)
        assert r.status_code == 413 and "larger than 2000 bytes" in r.json()["error"]["message"]
        assert "content-length" not in r.request.headers and r.request.headers["transfer-encoding"] == "chunked"


def test_a_non_stream_client_that_hangs_up_frees_its_row(torch_backend):
    b = torch_backend
    with serving(b, max_batch=2) as (url, sched):
        gate, held = threading.Event(), threading.Event()
        step = sched.decoder.step

        def gated():
            held.set()
            gate.wait(120)
            return step()

        sched.decoder.step = gated
        host, port = url[len("http://"):].split(":")
        sock = socket.create_connection((host, int(port)))
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 200,
                           "temperature": 0}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        held.wait(60)                                    # the row is decoding, its first step held at the gate
        assert sched.stats()["active"] == 1
        sock.close()                                     # the client hangs up
        _wait(lambda: all(j.cancelled for j in sched.active.values()), "the server saw the hang-up")
        gate.set()
        _wait(lambda: sched.stats()["active"] == 0, "the row freed")
        assert sched.abandoned == 1 and sched.decoder.free == 2
        assert sched.steps <= 1                          # freed after the held step, not decoded to the end


def test_slow_headers_are_cut_and_connections_limited(torch_backend):
    b = torch_backend
    with serving(b, header_timeout=0.5, body_timeout=0.5) as (url, _):
        host, port = url[len("http://"):].split(":")
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHo")        # and never the rest
        assert sock.recv(100) == b""                                     # closed by the server
        sock.close()
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess")
        reply = b""
        while b"}}" not in reply:                                        # a JSON 408, then closed
            piece = sock.recv(4096)
            assert piece, reply
            reply += piece
        sock.close()
        assert reply.startswith(b"HTTP/1.1 408 ") and b"request body not received within 0.5 s" in reply
    with serving(b, max_connections=3) as (url, _):
        host, port = url[len("http://"):].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(3)]
        try:
            codes = set()
            for _ in range(100):                       # until the server has taken the 3 idle connections
                codes.add(httpx.get(url + "/health", timeout=60).status_code)
                if 503 in codes:
                    break
                time.sleep(0.05)
            assert 503 in codes
        finally:
            for s in idle:
                s.close()
        _wait(lambda: httpx.get(url + "/health", timeout=60).status_code == 200, "served again")
