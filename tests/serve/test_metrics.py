"""``GET /metrics``: the counters and histograms match what the ``openai`` client was told (parsed with
``prometheus_client``'s own text parser)."""
import threading
import time

import httpx
import openai

from tests.serve.conftest import serving
from tests.serve.test_api import _client


def _scrape(url):
    from prometheus_client.parser import text_string_to_metric_families
    r = httpx.get(url + "/metrics", timeout=60)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def test_metrics_count_what_was_served(torch_backend):
    b = torch_backend
    user = [{"role": "user", "content": "讲个笑话"}]
    with serving(b, max_batch=1, max_queue=0, start=False) as (url, sched):
        answers = []
        t = threading.Thread(target=lambda: answers.append(_client(url).chat.completions.create(
            model=b.model_id, messages=user, max_tokens=5, temperature=0)))
        t.start()
        while sched.stats()["waiting"] < 1:
            time.sleep(0.01)
        try:                                              # the one row is taken and --max-queue 0: refused
            _client(url).chat.completions.create(model=b.model_id, messages=user, max_tokens=5)
            raise AssertionError("not refused")
        except openai.APIStatusError as e:
            assert e.status_code == 503
        sched.start()
        t.join(120)
        answers.append(_client(url).completions.create(model=b.model_id, prompt="x y z", max_tokens=3, temperature=0))
        m = _scrape(url)
        assert [a.choices[0].finish_reason for a in answers] == ["length", "length"]
        tokens = [a.usage.completion_tokens for a in answers]
        assert m[("glm2_requests_total", (("outcome", "length"),))] == 2
        assert m[("glm2_requests_total", (("outcome", "refused"),))] == 1
        assert m[("glm2_requests_total", (("outcome", "stop"),))] == 0
        assert m[("glm2_generation_tokens_total", ())] == sum(tokens)
        assert m[("glm2_prompt_tokens_total", ())] == sum(a.usage.prompt_tokens for a in answers)
        assert m[("glm2_time_to_first_token_seconds_count", ())] == 2
        assert m[("glm2_time_per_output_token_seconds_count", ())] == sum(n - 1 for n in tokens)
        assert m[("glm2_e2e_request_latency_seconds_count", ())] == 2
        assert (m[("glm2_requests_running", ())], m[("glm2_requests_waiting", ())], m[("glm2_batch_rows", ())]) == \
            (0, 0, 1)
        assert m[("glm2_decode_steps", ())] == sched.steps == sum(n - 1 for n in tokens)   # one row at a time
