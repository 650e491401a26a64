"""The prefix cache: a five-turn chat through the ``openai`` client answers exactly as without it, while
each later turn prefills only what its prompt adds (tokens counted by the engine, not timed)."""
from tests.serve.conftest import serving
from tests.serve.test_api import _client

TURNS = ["你好", "类型#裙*颜色#蓝色", "再写一条", "讲个笑话", "1+1=?"]
N = 10


def _chat(backend, prefix_cache):
    from glm_common.prompt import build_prompt
    with serving(backend, prefix_cache=prefix_cache) as (url, sched):
        messages, answers, prompts = [], [], []
        for q in TURNS:
            messages.append({"role": "user", "content": q})
            r = _client(url).chat.completions.create(model=backend.model_id, messages=messages, max_tokens=N,
                                                     temperature=0)
            answers.append(r.choices[0].message.content)
            prompts.append(r.usage.prompt_tokens)
            messages.append({"role": "assistant", "content": answers[-1]})
        history = [(m["content"], a["content"]) for m, a in zip(messages[0:-2:2], messages[1:-1:2])]
        assert prompts[-1] == len(backend.tokenizer.encode(build_prompt(TURNS[-1], history)))
        return answers, prompts, sched.decoder.reused_tokens


def test_five_turns_reuse_the_history(backend):
    plain, prompts, reused = _chat(backend, 0)
    assert reused == 0
    cached, prompts_cached, reused = _chat(backend, 8)
    assert cached == plain and prompts_cached == prompts
    # every later turn reuses at least the previous turn's prompt (its answer's tokens may re-encode otherwise)
    assert reused >= sum(prompts[:-1]) - len(prompts[:-1])
    assert reused < sum(prompts[1:])
