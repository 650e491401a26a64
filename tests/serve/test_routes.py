"""vLLM's serving extras: ``max_model_len`` in ``/v1/models``, ``/tokenize`` and ``/detokenize``, and CORS
for browser clients (``--allow-origin``)."""
import httpx

from tests.serve.conftest import serving
from tests.serve.test_api import MESSAGES, _client


def test_models_tokenize_detokenize(torch_backend):
    b = torch_backend
    with serving(b) as (url, _):
        client = _client(url)
        (card,) = client.models.list().data
        assert card.id == b.model_id and card.model_extra["max_model_len"] == b.seq_length
        r = httpx.post(url + "/tokenize", json={"model": b.model_id, "messages": MESSAGES}, timeout=60).json()
        used = client.chat.completions.create(model=b.model_id, messages=MESSAGES, max_tokens=1, temperature=0).usage
        assert r["count"] == len(r["tokens"]) == used.prompt_tokens and r["max_model_len"] == b.seq_length
        text = "类型#裙*颜色#蓝色 hello"
        r = httpx.post(url + "/tokenize", json={"prompt": text, "add_special_tokens": False}, timeout=60).json()
        assert r["tokens"] == b.tokenizer.encode(text, add_special_tokens=False)
        assert httpx.post(url + "/detokenize", json={"tokens": r["tokens"]}, timeout=60).json() == {"prompt": text}
        for route, body, words in (("/tokenize", {"prompt": 3}, "prompt: expected a string"),
                                   ("/tokenize", {}, "request body: give either prompt"),
                                   ("/tokenize", {"prompt": "x", "model": "gpt-4"}, "model: 'gpt-4' is not served"),
                                   ("/detokenize", {"tokens": [1, "a"]}, "tokens: expected a list of token ids"),
                                   ("/detokenize", {"tokens": [10 ** 9]}, "tokens: 1000000000 is not a token id")):
            r = httpx.post(url + route, json=body, timeout=60)
            assert r.status_code in (400, 404) and r.json()["error"]["message"].startswith(words), r.json()


def test_cors(torch_backend):
    b = torch_backend
    site, other = "http://localhost:3000", "http://evil.example"
    with serving(b, api_key="sekrit", allow_origins=[site]) as (url, _):
        pre = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization,content-type"}
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": site, **pre}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site   # no key for a preflight
        r = httpx.options(url + "/v1/chat/completions", headers={"Origin": other, **pre}, timeout=60)
        assert r.status_code == 400 and "access-control-allow-origin" not in r.headers
        r = httpx.get(url + "/v1/models", headers={"Origin": site, "Authorization": "Bearer sekrit"}, timeout=60)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == site
        r = httpx.get(url + "/v1/models", headers={"Origin": site}, timeout=60)
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == site   # the page can read why
        r = httpx.get(url + "/v1/models", headers={"Origin": other, "Authorization": "Bearer sekrit"}, timeout=60)
        assert "access-control-allow-origin" not in r.headers
    with serving(b) as (url, _):                       # without --allow-origin: no CORS headers at all
        r = httpx.get(url + "/v1/models", headers={"Origin": site}, timeout=60)
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
