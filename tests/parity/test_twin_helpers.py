"""Helpers with the same name mean the same thing in both backends: the rotary cache and rotation, the
attention mask (with and without a past, with left padding), the invalid-score guard. Checked against
each other and against a plain numpy statement of docs/architecture.md's rules.
"""
from __future__ import annotations

import mindspore as ms
import numpy as np
import pytest
import torch

from mindspore_glm import model as msm
from mindspore_glm.generate import invalid_score_processor as ms_invalid
from torch_glm import model as ptm
from torch_glm.generate import invalid_score_processor as pt_invalid


def _np_rope(seq_len, kv_channels, base=10000.0):
    rot = kv_channels // 2
    theta = 1.0 / base ** (np.arange(0, rot, 2, dtype=np.float64) / rot)
    ang = np.outer(np.arange(seq_len, dtype=np.float64), theta)
    return np.stack([np.cos(ang), np.sin(ang)], -1)


def test_rope_cache_same_layout_and_values():
    a = msm.build_rope_cache(40, 16).asnumpy()
    b = ptm.build_rope_cache(40, 16).numpy()
    assert a.shape == b.shape == (40, 4, 2) and a.dtype == b.dtype == np.float32
    np.testing.assert_allclose(a, _np_rope(40, 16), atol=2e-6)
    np.testing.assert_allclose(a, b, atol=2e-6)


def test_apply_rope_same_in_both_and_as_the_tables():
    rng = np.random.default_rng(0)
    B, heads, S, hn = 2, 3, 5, 16
    x = rng.normal(size=(B, heads, S, hn)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])
    cache = msm.build_rope_cache(8, hn).asnumpy()
    rope = cache[pos]                                                     # [B, S, rot/2, 2]
    got_ms = msm.apply_rope(ms.Tensor(x), ms.Tensor(rope)).asnumpy()
    got_pt = ptm.apply_rope(torch.from_numpy(x), torch.from_numpy(rope)).numpy()
    # docs/architecture.md: adjacent pairs of the first half rotated, the second half passes through
    x0, x1 = x[..., 0:hn // 2:2], x[..., 1:hn // 2:2]
    c, s = rope[:, None, ..., 0], rope[:, None, ..., 1]
    want = x.copy()
    want[..., 0:hn // 2:2], want[..., 1:hn // 2:2] = x0 * c - x1 * s, x1 * c + x0 * s
    np.testing.assert_allclose(got_ms, want, atol=1e-5)
    np.testing.assert_allclose(got_pt, want, atol=1e-5)
    # the static-shape tables MindSpore's model rotates with give the same numbers ([B, S, n, hn] layout)
    cos_t, sin_t = msm.rope_tables(ms.Tensor(cache))
    cos_b = ms.Tensor(cos_t.asnumpy()[pos][:, :, None]), ms.Tensor(sin_t.asnumpy()[pos][:, :, None])
    tab = msm.apply_rope_tables(ms.Tensor(x.transpose(0, 2, 1, 3)), *cos_b, msm.pair_swap_matrix(hn)).asnumpy()
    np.testing.assert_allclose(tab.transpose(0, 2, 1, 3), want, atol=1e-5)


def _np_mask(keep, q_len, past_len):
    """docs/architecture.md's rule, written out: causal, not padding; without a past padding queries see all."""
    B, K = keep.shape
    out = np.zeros((B, 1, q_len, K), bool)
    for b in range(B):
        for i in range(q_len):
            for j in range(K):
                out[b, 0, i, j] = j <= past_len + i and keep[b, j] > 0
            if past_len == 0 and keep[b, past_len + i] == 0:
                out[b, 0, i, :] = True
            if not out[b, 0, i].any():
                out[b, 0, i, :] = True
    return out


@pytest.mark.parametrize("past_len", [0, 3])
def test_attention_mask_same_in_both(past_len):
    q = 4
    keep = np.ones((3, past_len + q), np.int32)
    keep[1, :2] = 0                                   # left padding
    keep[2, :1] = 0
    want = _np_mask(keep, q, past_len)
    a = msm.build_attention_mask(ms.Tensor(keep), q, past_len).asnumpy()
    b = ptm.build_attention_mask(torch.from_numpy(keep), q, past_len).numpy()
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, want)
    causal = np.tril(np.ones((q, past_len + q), bool), past_len)[None, None]
    np.testing.assert_array_equal(msm.build_attention_mask(None, q, past_len).asnumpy(), causal)
    np.testing.assert_array_equal(ptm.build_attention_mask(None, q, past_len).numpy(), causal)


def test_invalid_score_processor_same_rule():
    scores = np.array([[1.0, np.nan, 3.0, 0, 0, 0, 0], [1.0, 2.0, 3.0, 0, 0, 0, 0]], np.float32)
    a = ms_invalid(None, scores.copy())
    b = pt_invalid(None, torch.from_numpy(scores.copy())).numpy()
    want = np.zeros_like(scores)
    want[:, 5] = 5e4
    np.testing.assert_array_equal(a, want)
    np.testing.assert_array_equal(b, want)
    fine = scores[1:]
    np.testing.assert_array_equal(ms_invalid(None, fine), fine)
    np.testing.assert_array_equal(pt_invalid(None, torch.from_numpy(fine)).numpy(), fine)
