"""Greedy decoding parity on both golden models (plain and P-tuning prefix): single prompt, batched
left-padded prompts, and the KV cache.

- tokens: torch (cached), MindSpore (compiled prefill/decode graphs, static cache) and the golden
  reference agree, and an uncached torch loop (whole sequence recomputed every step) gives them too;
- step logits: torch's cached decode logits at every step equal MindSpore's logits of one uncached
  forward over the final sequence (1e-4), so the cache changes nothing but the speed.
"""
import numpy as np
import pytest
import mindspore as ms
import torch

from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL
from tests.parity.helpers import golden

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
ATOL = 1e-4

CASES = {   # prompt key -> (attention mask key, position ids key, golden new tokens key)
    "single": ("greedy_single_prompt", None, None, "greedy_single_new"),
    "batch": ("greedy_batch_prompt", "greedy_batch_attention_mask", "greedy_batch_position_ids", "greedy_batch_new"),
}


def _inputs(g, case):
    ids_k, mask_k, pos_k, new_k = CASES[case]
    ids = g[ids_k].astype(np.int64)
    mask = g[mask_k].astype(np.int64) if mask_k else np.ones_like(ids)
    pos = g[pos_k].astype(np.int64) if pos_k else np.broadcast_to(np.arange(ids.shape[1]), ids.shape).copy()
    return ids, mask, pos, g[new_k]


@pytest.fixture(scope="module", params=[TINY_MODEL, TINY_PTUNING_MODEL], ids=["tiny", "ptuning"])
def models(request):
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    msm = MSModel.from_pretrained(request.param)
    msm.set_train(False)
    msm.use_graph = True          # the production path: one prefill and one decode graph per shape
    return golden(request.param), PTModel.from_pretrained(request.param), msm


def _torch_cached_steps(model, ids, mask, pos, steps):
    """Greedy decoding with torch's KV cache by hand: tokens ``[B, N]`` and step logits ``[B, N, V]``."""
    t = torch.as_tensor
    with torch.no_grad():
        out = model(input_ids=t(ids), attention_mask=t(mask), position_ids=t(pos), use_cache=True)
        logits, tokens = [out.logits[:, -1]], []
        m, p = t(mask), t(pos)[:, -1:]
        for _ in range(steps):
            nxt = logits[-1].argmax(-1, keepdim=True)
            tokens.append(nxt)
            if len(tokens) == steps:
                break
            m = torch.cat([m, torch.ones_like(nxt)], 1)
            p = p + 1
            out = model(input_ids=nxt, attention_mask=m, position_ids=p, past_key_values=out.past_key_values,
                        use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.cat(tokens, 1).numpy(), torch.stack(logits, 1).numpy()


def _torch_uncached(model, ids, mask, pos, steps):
    """Greedy decoding recomputing the whole sequence every step (no cache at all)."""
    t = torch.as_tensor
    ids, mask, pos = t(ids), t(mask), t(pos)
    with torch.no_grad():
        for _ in range(steps):
            nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1, keepdim=True)
            ids, mask, pos = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1), \
                torch.cat([pos, pos[:, -1:] + 1], 1)
    return ids[:, -steps:].numpy()


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_tokens(models, case):
    g, pt, msm = models
    ids, mask, pos, want = _inputs(g, case)
    n = want.shape[1]
    if case == "batch":
        assert (mask == 0).any()  # left-padded rows
    got_pt = pt.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(pos),
                         max_new_tokens=n, eos_token_id=-1)[:, ids.shape[1]:].numpy()
    got_ms = msm.generate(ids, attention_mask=mask, position_ids=pos, max_new_tokens=n, eos_token_id=[])[:, ids.shape[1]:]
    np.testing.assert_array_equal(got_pt, want, err_msg="torch vs golden")
    np.testing.assert_array_equal(got_ms, want, err_msg="MindSpore vs golden")
    np.testing.assert_array_equal(_torch_uncached(pt, ids, mask, pos, n), want, err_msg="uncached torch vs golden")


@pytest.mark.parametrize("case", list(CASES))
def test_cached_step_logits_equal_uncached_forward(models, case):
    """torch's cached step logits == MindSpore's uncached forward over prompt + new tokens."""
    g, pt, msm = models
    ids, mask, pos, want = _inputs(g, case)
    n = want.shape[1]
    tokens, step_logits = _torch_cached_steps(pt, ids, mask, pos, n)
    np.testing.assert_array_equal(tokens, want)
    full = np.concatenate([ids, want], 1)
    full_mask = np.concatenate([mask, np.ones_like(want)], 1)
    full_pos = np.concatenate([pos, pos[:, -1:] + np.arange(1, n + 1)], 1)
    logits = msm(*(ms.Tensor(a.astype(np.int32)) for a in (full, full_mask, full_pos))).asnumpy()
    s = ids.shape[1]
    uncached = logits[:, s - 1:s - 1 + n]        # position s-1+t predicts new token t
    err = np.abs(uncached - step_logits).max()
    assert err < ATOL, f"cached torch vs uncached MindSpore step logits: {err:.3g}"
