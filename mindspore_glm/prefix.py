"""P-tuning v2: the prefix encoder that turns ``pre_seq_len`` learned rows into per-layer keys/values.

Parameter names are mindformers' (mindpet) ``prefix_encoder.mindpet_delta_prefixtuning_*``; HF's
``transformer.prefix_encoder.embedding.weight`` / ``trans.0`` / ``trans.2`` map onto them through
:mod:`glm_common.names`. The base model is frozen by :func:`freeze_base`.
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

from glm_common.config import ChatGLM2Config
from glm_common.names import is_prefix_name

__all__ = ["PrefixEncoder", "freeze_base", "prefix_trainable_params"]


class _Table(nn.Cell):
    """Holds ``embedding_table [P, kv]`` (mindpet's ``PrefixEmbedding`` name)."""

    def __init__(self, rows: int, cols: int, dtype):
        super().__init__()
        init = np.random.default_rng(0).normal(0.0, 0.02, (rows, cols)).astype(np.float32)
        self.embedding_table = Parameter(Tensor(init, dtype), name="embedding_table")


class _Dense(nn.Cell):
    """``weight [out, in]``, ``bias [out]``: ``[..., in]`` -> ``[..., out]``."""

    def __init__(self, n_in: int, n_out: int, dtype):
        super().__init__()
        rng = np.random.default_rng(1)
        bound = 1.0 / np.sqrt(n_in)
        self.weight = Parameter(Tensor(rng.uniform(-bound, bound, (n_out, n_in)).astype(np.float32), dtype),
                                name="weight")
        self.bias = Parameter(Tensor(np.zeros(n_out, np.float32), dtype), name="bias")
        self.matmul = ops.MatMul(transpose_b=True)

    def construct(self, x):
        return self.matmul(x, ops.cast(self.weight, x.dtype)) + ops.cast(self.bias, x.dtype)


class PrefixEncoder(nn.Cell):
    """``construct(batch_size)`` -> prefix keys/values ``[2*num_layers, B, g, P, hn]`` (float32 math).

    Diverges from torch_glm's (``[B, P] -> [B, P, kv]``): mindpet's parameter names and layout, so a
    P-tuning ``.ckpt`` loads into mindformers.

    Rows ``2i`` and ``2i+1`` are layer ``i``'s key and value. Without ``prefix_projection`` the rows are
    the table itself; with it, ``Linear(kv, H) -> tanh -> Linear(H, kv)`` of the table. Dropout
    ``dropout_prob`` (0.1 as in ChatGLM2's P-tuning) applies in training only.
    """

    def __init__(self, config: ChatGLM2Config, param_init_type=ms.float32, dropout_prob: float = 0.1):
        super().__init__()
        c = config
        self.pre_seq_len, self.num_layers = c.pre_seq_len, c.num_layers
        self.g, self.hn = c.kv_groups, c.kv_channels
        kv = c.prefix_kv_size
        self.prefix_projection = c.prefix_projection
        self.mindpet_delta_prefixtuning_embedding = _Table(c.pre_seq_len, kv, param_init_type)
        if self.prefix_projection:
            self.mindpet_delta_prefixtuning_dense_in = _Dense(kv, c.hidden_size, param_init_type)
            self.mindpet_delta_prefixtuning_dense_out = _Dense(c.hidden_size, kv, param_init_type)
        self.dropout = nn.Dropout(p=dropout_prob)

    def construct(self, batch_size):
        x = ops.cast(self.mindpet_delta_prefixtuning_embedding.embedding_table, ms.float32)   # [P, kv]
        if self.prefix_projection:
            x = self.mindpet_delta_prefixtuning_dense_out(ops.tanh(self.mindpet_delta_prefixtuning_dense_in(x)))
        x = ops.broadcast_to(ops.expand_dims(x, 0), (batch_size,) + x.shape)          # [B, P, kv]
        x = self.dropout(x)
        x = ops.reshape(x, (batch_size, self.pre_seq_len, 2 * self.num_layers, self.g, self.hn))
        return ops.transpose(x, (2, 0, 3, 1, 4))


def freeze_base(model) -> list:
    """Make only the prefix encoder trainable; return its (trainable) parameters."""
    train = []
    for p in model.get_parameters():
        p.requires_grad = is_prefix_name(p.name)
        if p.requires_grad:
            train.append(p)
    if not train:
        raise ValueError("freeze_base: the model has no prefix_encoder (config.pre_seq_len is null)")
    return train


def prefix_trainable_params(model) -> list:
    """The prefix encoder's parameters."""
    return [p for p in model.get_parameters() if is_prefix_name(p.name)]
