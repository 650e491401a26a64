"""Data and model parallel sharding for the MindSpore ChatGLM2, in one place.

The split pattern is mindformers' glm2: ``query_key_value`` and ``dense_h_to_4h`` split their weight on
the output axis (column parallel), ``dense`` and ``dense_4h_to_h`` on the input axis (row parallel, the
partial sums are all-reduced), the embedding and the ``output_layer`` on the vocabulary axis (or the
embedding is replicated with ``vocab_emb_dp``), attention shards its batch by ``data_parallel`` and its
key/value groups by ``model_parallel``. Every other operator takes the strategy MindSpore's
semi-auto-parallel propagation gives it.

:func:`check_parallel` validates the sizes before anything is built or compiled; each failure is one
line naming the field. :func:`apply_sharding` writes the strategies onto the operators of a model;
:func:`sharding_plan` lists them (name -> strategy) for logs and tests.

The torch twin, ``torch_glm/parallel.py``, shards parameters, gradients and optimizer states over the
data parallel ranks with FSDP2 (``parallel.enable_parallel_optimizer``); operator-level sharding
strategies are MindSpore's semi-auto parallel alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from glm_common.config import ChatGLM2Config

__all__ = ["ParallelConfig", "ParallelError", "check_parallel", "sharding_plan", "apply_sharding",
           "COLUMN_PARALLEL", "ROW_PARALLEL"]

#: layers whose weight ``[out, in]`` is split on the output axis
COLUMN_PARALLEL = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
#: layers whose weight is split on the input axis
ROW_PARALLEL = ("self_attention.dense", "mlp.dense_4h_to_h")


class ParallelError(ValueError):
    """A parallel layout that cannot shard the model; the message is one line naming the field."""


@dataclass
class ParallelConfig:
    """mindformers' ``parallel_config`` fields that shape the strategies."""

    data_parallel: int = 1
    model_parallel: int = 1
    pipeline_stage: int = 1
    vocab_emb_dp: bool = True
    micro_batch_num: int = 1

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage


def check_parallel(config: ChatGLM2Config, parallel: ParallelConfig, batch_size: Optional[int] = None,
                   device_num: Optional[int] = None, source: str = "parallel_config") -> ParallelConfig:
    """Fail early, with one line, when ``parallel`` cannot shard a model of ``config``."""
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    for name, value in (("data_parallel", dp), ("model_parallel", mp), ("pipeline_stage", pp),
                        ("micro_batch_num", parallel.micro_batch_num)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ParallelError(f"{source}.{name}: must be a positive integer, got {value!r}")
    if device_num is not None and parallel.device_num != device_num:
        raise ParallelError(f"{source}: data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = "
                            f"{parallel.device_num} devices, but {device_num} are available")
    if pp > config.num_layers:
        raise ParallelError(f"{source}.pipeline_stage: {pp} stages for {config.num_layers} layers")
    if pp > 1 and parallel.micro_batch_num < pp:
        raise ParallelError(f"{source}.micro_batch_num: {parallel.micro_batch_num} is less than pipeline_stage {pp}")
    sizes = [("num_attention_heads", config.num_attention_heads), ("kv_groups (multi_query_group_num)",
             config.kv_groups), ("ffn_hidden_size", config.ffn_hidden_size),
             ("padded_vocab_size", config.padded_vocab_size), ("hidden_size", config.hidden_size)]
    for name, value in sizes:
        if value % mp:
            raise ParallelError(f"{source}.model_parallel: {mp} does not divide {name} {value}")
    if batch_size is not None:
        if batch_size % dp:
            raise ParallelError(f"{source}.data_parallel: {dp} does not divide batch_size {batch_size}")
        if pp > 1 and (batch_size // dp) % parallel.micro_batch_num:
            raise ParallelError(f"{source}.micro_batch_num: {parallel.micro_batch_num} does not divide the "
                                f"per-replica batch {batch_size // dp}")
    return parallel


def sharding_plan(config: ChatGLM2Config, parallel: ParallelConfig) -> dict:
    """``{operator: strategy}`` for one layer and the model ends (the strategies :func:`apply_sharding` sets).

    Linear inputs are ``x [tokens, in]`` and ``weight [out, in]`` (``transpose_b``); attention matmuls
    see ``[B, g, rows, hn]``.
    """
    dp, mp = parallel.data_parallel, parallel.model_parallel
    plan = {
        "transformer.embedding.gather": ((1, 1), (dp, 1)) if parallel.vocab_emb_dp else ((mp, 1), (dp, 1)),
        "transformer.output_layer.matmul": ((dp, 1), (mp, 1)),
        "self_attention.scores (q @ k.T)": ((dp, mp, 1, 1), (dp, mp, 1, 1)),
        "self_attention.context (probs @ v)": ((dp, mp, 1, 1), (dp, mp, 1, 1)),
    }
    for name in COLUMN_PARALLEL:
        plan[f"{name}.matmul"] = ((dp, 1), (mp, 1))
    for name in ROW_PARALLEL:
        plan[f"{name}.matmul"] = ((dp, mp), (1, mp))
    return plan


def apply_sharding(model, parallel: ParallelConfig, batch_size: Optional[int] = None,
                   device_num: Optional[int] = None) -> dict:
    """Check ``parallel`` against ``model.config`` and set the strategies of :func:`sharding_plan` on the
    model's operators (they take effect under ``semi_auto_parallel``). Returns the plan."""
    from mindspore import ops

    check_parallel(model.config, parallel, batch_size, device_num)
    plan = sharding_plan(model.config, parallel)
    t = model.transformer
    t.embedding.gather = ops.Gather().shard(plan["transformer.embedding.gather"])
    t.output_layer.matmul.shard(plan["transformer.output_layer.matmul"])
    for layer in t.encoder.layers:
        attn, mlp = layer.self_attention, layer.mlp
        attn.query_key_value.matmul.shard(plan["self_attention.query_key_value.matmul"])
        mlp.dense_h_to_4h.matmul.shard(plan["mlp.dense_h_to_4h.matmul"])
        attn.dense.matmul.shard(plan["self_attention.dense.matmul"])
        mlp.dense_4h_to_h.matmul.shard(plan["mlp.dense_4h_to_h.matmul"])
        attn.bmm_t.shard(plan["self_attention.scores (q @ k.T)"])
        attn.bmm.shard(plan["self_attention.context (probs @ v)"])
    return plan
