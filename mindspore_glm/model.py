"""ChatGLM2 in MindSpore: the whole model in one file.

Shapes use ``B`` batch, ``S`` query length, ``K`` key length (prefix + past + current), ``H`` hidden,
``np`` query heads, ``g`` key/value groups, ``hn`` head dim, ``V`` vocabulary, ``L`` KV-cache length.

Parameter names are mindformers' (``transformer.embedding.embedding_weight``, the rest as HF), so a
checkpoint of this model loads into mindformers' ``ChatGLM2ForConditionalGeneration`` and back.
The forward pass follows docs/architecture.md (section 3): RMSNorm with a float32 variance, rotary
embedding over the first half of each head (adjacent pairs, cos/sin rounded to ``rotary_dtype``),
multi-query attention with a float32 softmax, SwiGLU MLP, shifted cross-entropy ignoring -100.

Every ``construct`` uses static shapes only, so the same code runs in PYNATIVE and GRAPH mode
(``mindspore.jit``).

On CPU, element-wise ops between tensors of different shapes broadcast explicitly (``ops.broadcast_to``;
:func:`broadcasts_explicitly`): the norms' ``rsqrt`` and weight, the rotary tables, the attention mask;
a bias is added by ``ops.bias_add`` everywhere. In a GRAPH training step on CPU, MindSpore's broadcasting
Mul/Add held full-size buffers for the whole step (and defeated recompute); with them explicit, the same
numbers take a step peak of 2.25 instead of 3.74 GiB (4 layers x 256, batch 8 x 512;
``bench/bench_recompute.py``). Elsewhere (Ascend) the broadcasting ops stay: an explicit broadcast would
be kept for the backward of the Mul that reads it, a full-size copy per norm and rotary pass.
"""
from __future__ import annotations

import contextlib
import glob
import math
import os
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from convert.hf_layout import CheckpointError, HFCheckpoint
from convert.ms_ckpt import MSCheckpoint, MSCheckpointError
from convert.tensor_checks import check_tensor
from glm_common.config import DTYPES, ChatGLM2Config, ConfigError, RunOptions
from glm_common.fsutil import atomic_path
from glm_common.names import hf_to_ms, is_derived_buffer, is_pet_name

from mindspore_glm.generate import GenerationMixin
from mindspore_glm.prefix import PrefixEncoder

__all__ = ["WeightError", "RMSNorm", "Linear", "Embedding", "build_rope_cache", "apply_rope", "rope_tables",
           "pair_swap_matrix", "apply_rope_tables", "broadcasts_explicitly", "build_attention_mask", "SelfAttention",
           "MLP", "GLMBlock", "GLMTransformer", "ChatGLM2Model", "ChatGLM2ForConditionalGeneration", "causal_lm_loss", "ms_dtype",
           "DTYPE_NAMES", "lazy_parameters"]

DTYPE_NAMES = {"float32": ms.float32, "float16": ms.float16, "bfloat16": ms.bfloat16}


def broadcasts_explicitly() -> bool:
    """Whether the cells built now broadcast explicitly (see the module docstring): on the CPU target."""
    return ms.get_context("device_target") == "CPU"


class WeightError(CheckpointError):
    """A checkpoint that does not fit the model; the message is one line naming file and parameter."""


def ms_dtype(name):
    """``"float16"`` (or a MindSpore dtype) -> MindSpore dtype."""
    if not isinstance(name, str):
        return name
    if name not in DTYPE_NAMES:
        raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPE_NAMES[name]


_LAZY = [False]


@contextlib.contextmanager
def lazy_parameters():
    """Inside it, the layers' weights are created with MindSpore's lazy ``initializer`` (no host memory until
    their data is set or read): a model built only to be compiled (:mod:`mindspore_glm.dryrun`) costs nothing."""
    _LAZY[0] = True
    try:
        yield
    finally:
        _LAZY[0] = False


def _zeros(shape, dtype):
    if _LAZY[0]:
        from mindspore.common.initializer import initializer
        return initializer("zeros", shape, dtype)
    return Tensor(np.zeros(shape, np.float32), dtype) if dtype != ms.float32 else Tensor(np.zeros(shape, np.float32))


# ---------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Cell):
    """``y = cast(weight * x * rsqrt(mean(x^2) + eps), dtype(x))`` computed in ``compute_type``.

    Input ``[..., H]``; output the same shape and dtype as the input.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-5, param_init_type=ms.float32,
                 compute_type=ms.float32):
        super().__init__()
        self.weight = Parameter(Tensor(np.ones(hidden_size, np.float32), param_init_type), name="weight")
        self.eps = eps
        self.compute_type = compute_type
        self.explicit_broadcast = broadcasts_explicitly()

    def construct(self, x):
        dtype, shape = x.dtype, x.shape
        # 2-D rows: MindSpore's CPU reductions (and their gradients) are several times faster on 2-D tensors
        xf = ops.reshape(ops.cast(x, self.compute_type), (-1, shape[-1]))
        variance = ops.mean(ops.square(xf), -1, keep_dims=True)
        r = ops.rsqrt(variance + self.eps)
        w = ops.cast(self.weight, self.compute_type)
        if self.explicit_broadcast:
            r = ops.broadcast_to(r, xf.shape)
            w = ops.broadcast_to(w, xf.shape)
        return ops.reshape(ops.cast(w * (xf * r), dtype), shape)


class Linear(nn.Cell):
    """``y = x @ weight.T (+ bias)`` in ``compute_dtype``; ``weight [out, in]`` as in HF and mindformers.

    With LoRA enabled (see :mod:`mindspore_glm.lora`) it also holds ``mindpet_delta_lora_a [r, in]`` and
    ``mindpet_delta_lora_b [out, r]`` and adds ``scaling * B @ A @ dropout(x)`` unless merged. MindSpore-only:
    mindpet's LoRA layer keeps its matrices inside the linear cell (torch_glm uses nn.Linear and peft).
    Input ``[..., in]``; output ``[..., out]`` in ``compute_dtype``.
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool = False,
                 param_init_type=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = Parameter(_zeros((out_features, in_features), param_init_type), name="weight")
        self.has_bias = has_bias
        if has_bias:
            self.bias = Parameter(_zeros((out_features,), param_init_type), name="bias")
        self.compute_dtype = compute_dtype
        self.matmul = ops.MatMul(transpose_b=True)
        # LoRA state, set by mindspore_glm.lora.apply_lora
        self.lora_rank = 0
        self.lora_scaling = 1.0
        self.lora_merged = False
        self.lora_dropout = None

    def construct(self, x):
        shape = x.shape
        x2 = ops.reshape(ops.cast(x, self.compute_dtype), (-1, shape[-1]))
        y = self.matmul(x2, ops.cast(self.weight, self.compute_dtype))
        if self.has_bias:
            y = ops.bias_add(y, ops.cast(self.bias, self.compute_dtype))
        if self.lora_rank > 0 and not self.lora_merged:
            xd = self.lora_dropout(x2)
            a = ops.cast(self.mindpet_delta_lora_a, self.compute_dtype)
            b = ops.cast(self.mindpet_delta_lora_b, self.compute_dtype)
            y = y + self.matmul(self.matmul(xd, a), b) * self.lora_scaling
        return ops.reshape(y, shape[:-1] + (self.out_features,))


class Embedding(nn.Cell):
    """Token embedding ``embedding_weight [V, H]``: ``[B, S]`` ids -> ``[B, S, H]`` in ``compute_dtype``."""

    def __init__(self, vocab_size: int, hidden_size: int, param_init_type=ms.float32, compute_dtype=ms.float32):
        super().__init__()
        self.embedding_weight = Parameter(_zeros((vocab_size, hidden_size), param_init_type),
                                          name="embedding_weight")
        self.compute_dtype = compute_dtype
        self.gather = ops.Gather()

    def construct(self, input_ids):
        return ops.cast(self.gather(self.embedding_weight, input_ids, 0), self.compute_dtype)


# ---------------------------------------------------------------------------------------------- rotary
def build_rope_cache(seq_len: int, kv_channels: int, base: float = 10000.0):
    """Float32 ``[seq_len, kv_channels // 4, 2]`` table of ``(cos, sin)`` of ``pos * base^(-2i/rot)``,
    ``rot = kv_channels // 2`` (the rotated first half of each head), computed in numpy float32."""
    rot = kv_channels // 2
    theta = (1.0 / (np.float32(base) ** (np.arange(0, rot, 2, dtype=np.float32) / np.float32(rot)))).astype(np.float32)
    idx = np.outer(np.arange(seq_len, dtype=np.float32), theta).astype(np.float32)     # [seq, rot/2]
    return Tensor(np.stack([np.cos(idx).astype(np.float32), np.sin(idx).astype(np.float32)], -1))


def apply_rope(x, rope):
    """Rotate adjacent pairs of the first ``2 * rope.shape[-2]`` dims of each head.

    ``x``: ``[B, heads, S, hn]``; ``rope``: ``[B, S, rot/2, 2]`` (cos, sin) in ``x``'s dtype.
    Returns ``[B, heads, S, hn]``; dims past ``rot`` pass through. (The model itself rotates with
    :func:`apply_rope_tables`, the same numbers with static-shape kernels.)
    """
    rot = rope.shape[-2] * 2
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    xs = ops.reshape(x_rot, x_rot.shape[:-1] + (rot // 2, 2))
    r = ops.expand_dims(rope, 1)                                              # [B, 1, S, rot/2, 2]
    cos, sin = r[..., 0], r[..., 1]
    x0, x1 = xs[..., 0], xs[..., 1]
    out = ops.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], -1)
    return ops.concat((ops.reshape(out, x_rot.shape), x_pass), -1)


def rope_tables(rope, dtype=ms.float32):
    """:func:`build_rope_cache`'s ``[S, rot/2, 2]`` -> ``cos, sin`` each ``[S, hn]`` for :func:`apply_rope_tables`.

    MindSpore-only (static shapes for GRAPH mode): the tables repeat each pair's cos on both dims and
    carry ``-sin`` on the even and ``+sin`` on the odd dim; the second half has cos 1 and sin 0 (it
    passes through). Rounded to ``dtype`` (half-precision parity depends on this rounding).
    """
    cache = rope.asnumpy().astype(np.float32)
    seq_len, half = cache.shape[0], cache.shape[1]
    rot = 2 * half
    kv_channels = 2 * rot
    cos, sin = cache[..., 0], cache[..., 1]
    cos_t = np.ones((seq_len, kv_channels), np.float32)
    sin_t = np.zeros((seq_len, kv_channels), np.float32)
    cos_t[:, 0:rot:2], cos_t[:, 1:rot:2] = cos, cos
    sin_t[:, 0:rot:2], sin_t[:, 1:rot:2] = -sin, sin
    return (Tensor(cos_t, dtype), Tensor(sin_t, dtype)) if dtype != ms.float32 else (Tensor(cos_t), Tensor(sin_t))


def pair_swap_matrix(kv_channels: int, dtype=ms.float32):
    """``[hn, hn]`` permutation with ``(x @ P)[2i] = x[2i+1]`` and ``(x @ P)[2i+1] = x[2i]`` (MindSpore-only:
    the pair swap of :func:`apply_rope_tables` as one matmul, static shapes for GRAPH mode)."""
    m = np.zeros((kv_channels, kv_channels), np.float32)
    m[np.arange(1, kv_channels, 2), np.arange(0, kv_channels, 2)] = 1
    m[np.arange(0, kv_channels, 2), np.arange(1, kv_channels, 2)] = 1
    return Tensor(m, dtype) if dtype != ms.float32 else Tensor(m)


def apply_rope_tables(x, cos, sin, swap, explicit_broadcast: bool = False):
    """:func:`apply_rope` with the tables of :func:`rope_tables` (MindSpore-only: static shapes for GRAPH
    mode): ``x [B, S, n, hn]``, ``cos``/``sin`` ``[B, S, 1, hn]``, ``swap`` from :func:`pair_swap_matrix`.

    ``x * cos + (x @ swap) * sin`` gives ``(x0*cos - x1*sin, x1*cos + x0*sin)`` on each rotated pair and
    ``x`` on the second half, with the same roundings as the pairwise formula. Computed in the dtype of
    ``cos`` and returned in the dtype of ``x``; ``explicit_broadcast``: the tables broadcast to ``x``'s shape
    first (:func:`broadcasts_explicitly`).
    """
    dtype = x.dtype
    xr = ops.cast(x, cos.dtype)
    swapped = ops.reshape(ops.matmul(ops.reshape(xr, (-1, x.shape[-1])), ops.cast(swap, cos.dtype)), x.shape)
    if explicit_broadcast:
        cos = ops.broadcast_to(cos, xr.shape)
        sin = ops.broadcast_to(sin, xr.shape)
    return ops.cast(xr * cos + swapped * sin, dtype)


def build_attention_mask(attention_mask, q_len: int, past_len: int):
    """Boolean ``[B, 1, q_len, past_len + q_len]`` mask (True = may attend); ``[1, 1, q_len, past_len + q_len]``
    (plain causal) when ``attention_mask`` is None.

    ``attention_mask``: ``[B, past_len + q_len]`` of 1 (token) / 0 (padding) over every key column (a
    P-tuning prefix counts as past, its columns 1). Query ``i`` sees key ``j`` when ``j <= past_len + i``
    and key ``j`` is not padding. Without a past, padding queries see every key (their outputs are never
    used); any row left empty sees every key.
    """
    k_len = past_len + q_len
    row = ops.reshape(ops.arange(q_len), (q_len, 1)) + past_len
    col = ops.reshape(ops.arange(k_len), (1, k_len))
    allowed = ops.expand_dims(col <= row, 0)                                    # [1, q, K]
    if attention_mask is None:
        return ops.expand_dims(allowed, 1)
    keys = attention_mask > 0
    allowed = ops.logical_and(allowed, ops.expand_dims(keys, 1))
    if past_len == 0:
        # padding queries attend everywhere (garbage rows, never used) so no row is empty
        allowed = ops.logical_or(allowed, ops.expand_dims(attention_mask <= 0, 2))
    allowed = ops.logical_or(allowed, ops.logical_not(ops.any(allowed, -1, True)))
    return ops.expand_dims(allowed, 1)


# ---------------------------------------------------------------------------------------------- blocks
class SelfAttention(nn.Cell):
    """Multi-query self-attention with rotary embedding and an optional prefix or KV cache.

    Diverges from torch_glm's ``forward(x, rope, mask, past, use_cache)``: a static KV cache written
    through a slot mask and an additive mask bias keep every shape fixed for GRAPH mode.

    ``construct(x [B,S,H], cos/sin [B,S,1,hn], mask_bias [B,1,S,K] (0 where a query may read a key, a
    large negative number elsewhere), prefix_kv=None, kv_cache=None, slot=None)`` -> ``(out [B,S,H], (key [B,g,K,hn], value [B,g,K,hn]))``.

    - ``prefix_kv``: ``(key, value)`` each ``[B, g, P, hn]``, put before the current keys.
    - ``kv_cache``: ``(key, value)`` each ``[B, g, L, hn]`` for one decode step (``S == 1``); the new key
      and value are written at the cache slot marked by ``slot [1, 1, L, 1]`` (bool, True at one slot),
      and the updated caches are returned.
    """

    def __init__(self, config: ChatGLM2Config, param_init_type, compute_dtype, softmax_compute_type):
        super().__init__()
        c = config
        self.num_heads, self.head_dim, self.groups = c.num_attention_heads, c.kv_channels, c.kv_groups
        self.multi_query = c.multi_query_attention
        self.projection_size = c.projection_size
        self.query_key_value = Linear(c.hidden_size, c.qkv_size, c.add_qkv_bias, param_init_type, compute_dtype)
        self.dense = Linear(c.projection_size, c.hidden_size, c.add_bias_linear, param_init_type, compute_dtype)
        self.compute_dtype = compute_dtype
        self.softmax_compute_type = softmax_compute_type
        self.explicit_broadcast = broadcasts_explicitly()
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.rope_swap = pair_swap_matrix(self.head_dim)
        self.bmm_t = ops.BatchMatMul(transpose_b=True)
        self.bmm = ops.BatchMatMul()
        # set by mindspore_glm.parallel: copies of each key/value group (np/g when model_parallel does not
        # divide g, so the heads shard evenly) and MindSpore's fused attention (Ascend, no prefix/cache)
        self.kv_repeat = 1
        self.use_flash_attention = False
        self.flash_attention = None
        # attention_dropout on the probabilities (training only), as ChatGLM2's CoreAttention
        self.attention_dropout = nn.Dropout(p=c.attention_dropout) if c.attention_dropout > 0 else None

    def construct(self, x, cos, sin, mask_bias, prefix_kv=None, kv_cache=None, slot=None):
        b, s, _ = x.shape
        np_, hn, g = self.num_heads, self.head_dim, self.groups
        qkv = self.query_key_value(x)
        if self.multi_query:
            # queries and keys lie side by side: one rotary pass over both (fewer kernels, same numbers)
            qk, v = ops.split(qkv, [(np_ + g) * hn, g * hn], -1)
            qk = apply_rope_tables(ops.reshape(qk, (b, s, np_ + g, hn)), cos, sin, self.rope_swap,
                                   self.explicit_broadcast)
            q, k = ops.split(qk, [np_, g], 2)
            v = ops.reshape(v, (b, s, g, hn))
        else:
            qkv = ops.reshape(qkv, (b, s, np_, 3 * hn))
            q, k, v = ops.split(qkv, hn, -1)
            q = apply_rope_tables(q, cos, sin, self.rope_swap, self.explicit_broadcast)
            k = apply_rope_tables(k, cos, sin, self.rope_swap, self.explicit_broadcast)
        q = ops.transpose(q * self.scale, (0, 2, 1, 3))      # [B, np, S, hn]
        k = ops.transpose(k, (0, 2, 1, 3))                   # [B, g, S, hn]
        v = ops.transpose(v, (0, 2, 1, 3))
        if prefix_kv is not None:
            k = ops.concat((ops.cast(prefix_kv[0], k.dtype), k), 2)
            v = ops.concat((ops.cast(prefix_kv[1], v.dtype), v), 2)
        if kv_cache is not None:
            k = ops.select(slot, k, kv_cache[0])
            v = ops.select(slot, v, kv_cache[1])
        kl = k.shape[2]
        if self.use_flash_attention and prefix_kv is None and kv_cache is None:
            # FlashAttentionScore: [B, np, S, hn] queries (already scaled), [B, g, K, hn] keys/values, mask 1 = hidden
            hidden = ops.cast(mask_bias < 0, ms.uint8)
            if mask_bias.shape[0] == 1:    # one mask for the batch (training): FlashAttentionScore's [S, K] form
                hidden = ops.reshape(hidden, (s, kl))
            if self.kv_repeat > 1:         # model parallel wider than the groups: each head its own key/value
                k = ops.reshape(ops.broadcast_to(ops.expand_dims(k, 2), (b, g, self.kv_repeat, kl, hn)),
                                (b, g * self.kv_repeat, kl, hn))
                v = ops.reshape(ops.broadcast_to(ops.expand_dims(v, 2), (b, g, self.kv_repeat, kl, hn)),
                                (b, g * self.kv_repeat, kl, hn))
            ctx = self.flash_attention(q, k, v, None, None, None, hidden)[3]
            ctx = ops.reshape(ops.transpose(ops.cast(ctx, self.compute_dtype), (0, 2, 1, 3)), (b, s, np_ * hn))
            return self.dense(ctx), (k, v)
        gk, kr, vr = g, k, v
        if self.kv_repeat > 1:
            # model parallel wider than the groups: every head reads its own copy of its group
            gk = g * self.kv_repeat
            kr = ops.reshape(ops.broadcast_to(ops.expand_dims(k, 2), (b, g, self.kv_repeat, kl, hn)), (b, gk, kl, hn))
            vr = ops.reshape(ops.broadcast_to(ops.expand_dims(v, 2), (b, g, self.kv_repeat, kl, hn)), (b, gk, kl, hn))
        # query heads h read group h // (np/g): group them so keys/values are never repeated
        qg = ops.reshape(q, (b, gk, (np_ // gk) * s, hn))
        scores = self.bmm_t(qg, kr)                          # [B, g, (np/g)*S, K]
        scores = ops.reshape(ops.cast(scores, self.softmax_compute_type), (b, np_, s, kl))
        bias = ops.cast(mask_bias, self.softmax_compute_type)
        scores = scores + (ops.broadcast_to(bias, scores.shape) if self.explicit_broadcast else bias)
        # the softmax over 2-D rows: its CPU kernels (forward and gradient) are several times faster than on 4-D
        probs = ops.softmax(ops.reshape(scores, (-1, kl)), -1)
        if self.attention_dropout is not None:
            probs = self.attention_dropout(probs)
        probs = ops.reshape(ops.cast(probs, self.compute_dtype), (b, gk, (np_ // gk) * s, kl))
        ctx = ops.reshape(self.bmm(probs, vr), (b, np_, s, hn))
        ctx = ops.reshape(ops.transpose(ctx, (0, 2, 1, 3)), (b, s, np_ * hn))
        return self.dense(ctx), (k, v)


class MLP(nn.Cell):
    """SwiGLU: ``dense_4h_to_h(silu(a) * b)`` with ``a, b`` the halves of ``dense_h_to_4h(x)``.
    ``[B, S, H]`` -> ``[B, S, H]``."""

    def __init__(self, config: ChatGLM2Config, param_init_type, compute_dtype):
        super().__init__()
        c = config
        self.ffn = c.ffn_hidden_size
        self.dense_h_to_4h = Linear(c.hidden_size, 2 * c.ffn_hidden_size, c.add_bias_linear, param_init_type,
                                    compute_dtype)
        self.dense_4h_to_h = Linear(c.ffn_hidden_size, c.hidden_size, c.add_bias_linear, param_init_type,
                                    compute_dtype)

    def construct(self, x):
        a, b = ops.split(self.dense_h_to_4h(x), self.ffn, -1)
        return self.dense_4h_to_h(ops.silu(a) * b)


class GLMBlock(nn.Cell):
    """Pre-norm block: ``x + Attn(RMSNorm(x))`` then ``x + MLP(RMSNorm(x))``. ``[B,S,H]`` -> ``[B,S,H]``
    plus the attention's ``(key, value)``."""

    def __init__(self, config: ChatGLM2Config, param_init_type, compute_dtype, layernorm_compute_type,
                 softmax_compute_type):
        super().__init__()
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.layernorm_epsilon, param_init_type, layernorm_compute_type)
        self.self_attention = SelfAttention(c, param_init_type, compute_dtype, softmax_compute_type)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.layernorm_epsilon, param_init_type,
                                                layernorm_compute_type)
        self.mlp = MLP(c, param_init_type, compute_dtype)
        # hidden_dropout on both residual branches (training only), as ChatGLM2's GLMBlock
        self.hidden_dropout = nn.Dropout(p=c.hidden_dropout) if c.hidden_dropout > 0 else None

    def construct(self, x, cos, sin, mask_bias, prefix_kv=None, kv_cache=None, slot=None):
        attn, present = self.self_attention(self.input_layernorm(x), cos, sin, mask_bias, prefix_kv, kv_cache, slot)
        if self.hidden_dropout is not None:
            attn = self.hidden_dropout(attn)
        x = x + attn
        mlp_in = self.mlp(self.post_attention_layernorm(x))
        if self.hidden_dropout is not None:
            mlp_in = self.hidden_dropout(mlp_in)
        x = x + mlp_in
        return x, present


class GLMTransformer(nn.Cell):
    """``layers`` then ``final_layernorm``. Returns hidden ``[B, S, H]`` and a tuple of per-layer
    ``(key, value)``."""

    def __init__(self, config: ChatGLM2Config, param_init_type, compute_dtype, layernorm_compute_type,
                 softmax_compute_type):
        super().__init__()
        self.num_layers = config.num_layers
        self.layers = nn.CellList([GLMBlock(config, param_init_type, compute_dtype, layernorm_compute_type,
                                            softmax_compute_type) for _ in range(config.num_layers)])
        self.final_layernorm = RMSNorm(config.hidden_size, config.layernorm_epsilon, param_init_type,
                                       layernorm_compute_type)

    def construct(self, x, cos, sin, mask_bias, prefix_kvs=None, kv_caches=None, slot=None):
        presents = ()
        for i in range(self.num_layers):
            pkv = None if prefix_kvs is None else prefix_kvs[i]
            cache = None if kv_caches is None else kv_caches[i]
            x, present = self.layers[i](x, cos, sin, mask_bias, pkv, cache, slot)
            presents = presents + (present,)
        return self.final_layernorm(x), presents


class ChatGLM2Model(nn.Cell):
    """``embedding`` -> ``encoder`` (and ``output_layer``, applied by :class:`ChatGLM2ForConditionalGeneration`).

    ``construct(input_ids [B, S], allowed [B, 1, S, K] bool (:func:`build_attention_mask`), position_ids
    [B, S], prefix_kvs=None, kv_caches=None, slot=None)`` -> ``(hidden [B, S, H], presents)`` as
    torch_glm's; the prefix and cache arguments are the static-shape ones of :class:`SelfAttention`.
    """

    def __init__(self, config: ChatGLM2Config, param_init_type, compute_dtype, layernorm_compute_type,
                 softmax_compute_type, rotary_dtype):
        super().__init__()
        c = config
        self.embedding = Embedding(c.padded_vocab_size, c.hidden_size, param_init_type, compute_dtype)
        self.encoder = GLMTransformer(c, param_init_type, compute_dtype, layernorm_compute_type,
                                      softmax_compute_type)
        self.output_layer = Linear(c.hidden_size, c.padded_vocab_size, False, param_init_type, compute_dtype)
        self.rotary_cos, self.rotary_sin = rope_tables(build_rope_cache(c.seq_length, c.kv_channels, c.rope_base),
                                                       rotary_dtype)
        # large enough to zero a probability, small enough not to overflow when added in the softmax dtype
        self.mask_min = -1e9 if softmax_compute_type == ms.float32 else -3e4

    def rope(self, position_ids):
        """``position_ids [B, S]`` -> cos, sin ``[B, S, 1, hn]`` (rows of :func:`rope_tables`)."""
        cos = ops.expand_dims(ops.gather(self.rotary_cos, position_ids, 0), 2)
        sin = ops.expand_dims(ops.gather(self.rotary_sin, position_ids, 0), 2)
        return cos, sin

    def construct(self, input_ids, allowed, position_ids, prefix_kvs=None, kv_caches=None, slot=None):
        # the mask as an additive bias [B, 1, S, K], made once: 0 where allowed, the dtype's minimum elsewhere
        bias = (1.0 - ops.cast(allowed, ms.float32)) * self.mask_min
        x = self.embedding(input_ids)
        cos, sin = self.rope(position_ids)
        return self.encoder(x, cos, sin, bias, prefix_kvs, kv_caches, slot)


def causal_lm_loss(logits, labels):
    """``logits [B, S, V]``, ``labels [B, S]`` -> mean float32 cross-entropy of ``logits[:, :-1]`` vs
    ``labels[:, 1:]``, ignoring -100."""
    v = logits.shape[-1]
    lg = ops.reshape(ops.cast(logits[:, :-1, :], ms.float32), (-1, v))      # 2-D rows: faster CPU kernels
    tgt = ops.reshape(labels[:, 1:], (-1,))
    valid = tgt != -100
    safe = ops.cast(ops.select(valid, tgt, ops.zeros_like(tgt)), ms.int32)
    logp = ops.log_softmax(lg, -1)
    picked = ops.squeeze(ops.gather_elements(logp, -1, ops.expand_dims(safe, -1)), -1)
    w = ops.cast(valid, ms.float32)
    return -(picked * w).sum() / ops.maximum(w.sum(), 1.0)


def _default_position_ids(input_ids):
    b, s = input_ids.shape
    return ops.broadcast_to(ops.expand_dims(ops.arange(s, dtype=ms.int32), 0), (b, s))


# ---------------------------------------------------------------------------------------------- model
class ChatGLM2ForConditionalGeneration(GenerationMixin, nn.Cell):
    """ChatGLM2 with the language-model head (and a P-tuning v2 ``prefix_encoder`` when the config has
    ``pre_seq_len``).

    ``model(input_ids [B,S], attention_mask=None [B,S], position_ids=None [B,S], labels=None [B,S])``
    returns logits ``[B, S, V]`` (``compute_dtype``) or, with labels, ``(loss, logits)`` where ``loss``
    is the float32 mean cross-entropy of ``logits[:, :-1]`` against ``labels[:, 1:]`` over labels != -100.

    Dtypes (mindformers' names): ``param_init_type``, ``compute_dtype``, ``layernorm_compute_type``,
    ``softmax_compute_type``, ``rotary_dtype`` (default: ``compute_dtype``); taken from ``options``
    (:class:`glm_common.config.RunOptions`) and overridden by keyword; without either all are float32.
    """

    def __init__(self, config: ChatGLM2Config, options: Optional[RunOptions] = None, **dtypes):
        super().__init__()
        names = ("param_init_type", "compute_dtype", "layernorm_compute_type", "softmax_compute_type",
                 "rotary_dtype")
        for k in dtypes:
            if k not in names:
                raise TypeError(f"ChatGLM2ForConditionalGeneration: unknown argument {k!r}; dtypes are {names}")
        chosen = {n: (getattr(options, n) if options is not None else "float32") for n in names}
        chosen.update({k: v for k, v in dtypes.items() if v is not None})
        if chosen["rotary_dtype"] is None:
            chosen["rotary_dtype"] = chosen["compute_dtype"]
        self.dtypes = {k: (v if isinstance(v, str) else str(v)) for k, v in chosen.items()}
        d = {k: ms_dtype(v) for k, v in chosen.items()}
        self.config = config
        self.compute_dtype = d["compute_dtype"]
        self.param_init_type = d["param_init_type"]
        self.transformer = ChatGLM2Model(config, d["param_init_type"], d["compute_dtype"],
                                         d["layernorm_compute_type"], d["softmax_compute_type"], d["rotary_dtype"])
        self.pre_seq_len = config.pre_seq_len or 0
        if self.pre_seq_len:
            self.prefix_encoder = PrefixEncoder(config, d["param_init_type"])
        self.num_layers = config.num_layers

    # ------------------------------------------------------------------ forward
    def get_prompt(self, batch_size: int):
        """The P-tuning prefix as a per-layer past: ``num_layers`` pairs ``(key, value)`` each
        ``[B, g, P, hn]`` (in ``compute_dtype``), or None without ``pre_seq_len``."""
        if not self.pre_seq_len:
            return None
        kv = ops.cast(self.prefix_encoder(batch_size), self.compute_dtype)   # [2*layers, B, g, P, hn]
        return tuple((kv[2 * i], kv[2 * i + 1]) for i in range(self.num_layers))

    def construct(self, input_ids, attention_mask=None, position_ids=None, labels=None):
        if position_ids is None:
            position_ids = _default_position_ids(input_ids)
        allowed = self._allowed(input_ids, attention_mask)
        prefix = self.get_prompt(input_ids.shape[0])
        hidden, _ = self.transformer(input_ids, allowed, position_ids, prefix)
        logits = self.transformer.output_layer(hidden)
        if labels is None:
            return logits
        return self.loss(logits, labels), logits

    def _allowed(self, input_ids, attention_mask):
        """:func:`build_attention_mask` of a prompt after the P-tuning prefix (its columns visible to all)."""
        p = self.pre_seq_len
        if attention_mask is not None and p:
            attention_mask = ops.concat((ops.ones((attention_mask.shape[0], p), attention_mask.dtype),
                                         attention_mask), 1)
        return build_attention_mask(attention_mask, input_ids.shape[1], p)

    @staticmethod
    def loss(logits, labels):
        """:func:`causal_lm_loss`."""
        return causal_lm_loss(logits, labels)

    # ------------------------------------------------------------------ generation graphs
    def prefill(self, input_ids, attention_mask, position_ids):
        """Prompt pass: ids/mask/positions ``[B, S]`` -> last-token logits ``[B, V]`` (float32) and the
        per-layer ``(key, value)`` ``[B, g, P+S, hn]``."""
        allowed = self._allowed(input_ids, attention_mask)
        prefix = self.get_prompt(input_ids.shape[0])
        hidden, presents = self.transformer(input_ids, allowed, position_ids, prefix, None, None)
        logits = self.transformer.output_layer(hidden[:, -1:, :])
        return ops.cast(logits[:, -1, :], ms.float32), presents

    def prefill_after(self, input_ids, position_ids, past):
        """Prompt pass after ``past``, the per-layer ``(key, value)`` ``[B, g, M, hn]`` of the prompt's first
        ``M`` tokens kept from an earlier pass (the serving engine's prefix cache): ids/positions ``[B, S]`` of
        the rest -> last-token logits ``[B, V]`` (float32) and the per-layer ``(key, value)`` ``[B, g, M+S, hn]``."""
        b, s = input_ids.shape
        m = past[0][0].shape[2]
        allowed = build_attention_mask(ops.ones((b, m + s), ms.int32), s, m)
        hidden, presents = self.transformer(input_ids, allowed, position_ids, past, None, None)
        logits = self.transformer.output_layer(hidden[:, -1:, :])
        return ops.cast(logits[:, -1, :], ms.float32), presents

    def decode(self, input_ids, position_ids, cache_mask, slot, kv_caches):
        """One cached step: ids/positions ``[B, 1]``, ``cache_mask [B, L]`` (1 for filled slots, the new
        one included), ``slot [1, 1, L, 1]`` bool, True at the write position, ``kv_caches`` per layer
        ``(key, value) [B, g, L, hn]`` -> logits ``[B, V]`` (float32) and the updated caches."""
        allowed = ops.expand_dims(ops.expand_dims(cache_mask > 0, 1), 1)      # [B, 1, 1, L]
        hidden, presents = self.transformer(input_ids, allowed, position_ids, None, kv_caches, slot)
        logits = self.transformer.output_layer(hidden)
        return ops.cast(logits[:, -1, :], ms.float32), presents

    # ------------------------------------------------------------------ weights
    def param_dict(self) -> dict:
        return {p.name: p for p in self.get_parameters()}

    def load_weights(self, tensors, source: str = "checkpoint", strict: bool = True):
        """Load ``(name, numpy array)`` pairs named in HF or mindformers style; check names and shapes.

        Raises :class:`WeightError` (one line: source and parameter) for an unknown name, a shape that
        does not match, or (``strict``) a parameter the checkpoint lacks. Returns the loaded names.
        """
        params = self.param_dict()
        loaded = set()
        self.__dict__.pop("_gen_fns", None)     # graphs compiled before would keep the old values
        for name, array in tensors:
            if is_derived_buffer(name):
                continue
            ms_name = hf_to_ms(name) if name not in params else name
            if ms_name not in params:
                raise WeightError(f"{source}: {name}: unknown parameter (not part of a ChatGLM2 model with "
                                  f"this config)")
            p = params[ms_name]
            if tuple(array.shape) != tuple(p.shape):
                raise WeightError(f"{source}: {name}: shape {tuple(array.shape)} does not match the model's "
                                  f"{tuple(p.shape)}")
            try:
                check_tensor(name, array, source)
            except CheckpointError as e:
                raise WeightError(str(e)) from None
            p.set_data(Tensor(np.ascontiguousarray(np.asarray(array, dtype=np.float32)), p.dtype))
            loaded.add(ms_name)
        if strict:
            # LoRA and prefix weights are not part of a base checkpoint: they keep their initialisation
            missing = [n for n in params if n not in loaded and not is_pet_name(n)]
            if missing:
                raise WeightError(f"{source}: {missing[0]}: missing from the checkpoint"
                                  + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        return loaded

    @classmethod
    def from_pretrained(cls, path, config: Optional[ChatGLM2Config] = None, options: Optional[RunOptions] = None,
                        strict: bool = True, **dtypes) -> "ChatGLM2ForConditionalGeneration":
        """Build and load from an HF ChatGLM2 directory (``*.safetensors`` or ``*.bin`` shards, read one
        tensor at a time) or a MindSpore ``.ckpt`` (its config is ``config`` or the ``config.json`` beside
        it)."""
        path = os.fspath(path)
        try:
            if os.path.isdir(path):
                config = config or ChatGLM2Config.from_hf(path)
                model = cls(config, options, **dtypes)
                ckpts = glob.glob(os.path.join(path, "*.ckpt"))
                if len(ckpts) == 1 and not any(glob.glob(os.path.join(path, p))
                                               for p in ("*.safetensors", "*.bin")):
                    model.load_weights(MSCheckpoint(ckpts[0]).items(), source=ckpts[0], strict=strict)
                else:
                    model.load_weights(HFCheckpoint(path).items(), source=path, strict=strict)
                return model
            if path.endswith(".ckpt"):
                if not os.path.isfile(path):
                    raise WeightError(f"{path}: no such file")
                if config is None:
                    cfg_path = os.path.join(os.path.dirname(path) or ".", "config.json")
                    if not os.path.isfile(cfg_path):
                        raise ConfigError(f"{path}: no config given and no config.json beside the checkpoint")
                    config = ChatGLM2Config.from_hf(cfg_path)
                model = cls(config, options, **dtypes)
                model.load_weights(MSCheckpoint(path).items(), source=path, strict=strict)
                return model
        except (CheckpointError, MSCheckpointError) as e:
            if isinstance(e, WeightError):
                raise
            raise WeightError(str(e)) from None
        raise WeightError(f"{path}: expected an HF model directory or a MindSpore .ckpt file")

    def save_pretrained(self, directory, name: str = "model.ckpt") -> str:
        """Write ``<directory>/<name>`` (MindSpore checkpoint, mindformers names) and ``config.json``
        atomically; return the checkpoint path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, name)
        with atomic_path(path, ".ckpt") as tmp:
            ms.save_checkpoint([{"name": p.name, "data": p} for p in self.get_parameters()], tmp)
        self.config.save_hf(directory)
        return path
