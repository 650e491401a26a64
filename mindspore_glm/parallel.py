"""Scale-out of the MindSpore ChatGLM2 through MindSpore's own parallel engine, in one place.

The split pattern is mindformers' glm2: ``query_key_value`` and ``dense_h_to_4h`` split their weight on
the output axis (column parallel), ``dense`` and ``dense_4h_to_h`` on the input axis (row parallel, the
partial sums are all-reduced), the embedding and the ``output_layer`` on the vocabulary axis (or the
embedding is replicated with ``vocab_emb_dp``), attention shards its batch by ``data_parallel`` and its
heads by ``model_parallel`` (key/value groups when ``model_parallel`` divides them, else each head reads
its own copy of its group). Every other operator gets MindSpore's semi-auto default, its batch dimension
split over every device (``search_mode`` acts only in auto-parallel mode and is named in the run's
"ignored" warning).

What a run YAML's scale-out keys become (read by :mod:`glm_common.parallel_keys`):

* :func:`context_kwargs` / :func:`init_parallel`: ``mindspore.set_auto_parallel_context`` with
  ``parallel_mode`` (0 ``data_parallel``, 1 ``semi_auto_parallel``), ``device_num``, ``full_batch``,
  ``search_mode``, ``loss_repeated_mean``, ``gradients_mean``, ``pipeline_stages``,
  ``enable_parallel_optimizer`` with ``parallel_optimizer_config``, and ``strategy_ckpt_config.save_file``
  (``<output_dir>/strategy/ckpt_strategy_rank_<rank>.ckpt``, where mindformers writes it);
* :func:`configure_model`: the operator strategies of :func:`sharding_plan` (:func:`apply_sharding`), each
  layer's ``pipeline_stage`` and communication-fusion group (mindformers' layer settings:
  ``gradient_aggregation_group`` groups for the optimizer's fusion), ``Cell.recompute`` per layer with
  ``mp_comm_recompute``, ``parallel_optimizer_comm_recompute``, ``recompute_slice_activation`` (also in
  single-device and data-parallel runs, GRAPH mode; on CPU the same gradients and a lower step peak, see
  ``bench/bench_recompute.py``), or, with ``select_recompute``,
  ``Cell.recompute`` on the named cells of each layer only (``True``: attention and the MLP, as
  mindformers; a name matching no cell is refused), and ``use_flash_attention``
  through ``FlashAttentionScore`` on Ascend;
* :func:`pipeline_network`: pipeline stages run ``micro_batch_num`` micro-batches through
  ``mindspore.parallel.nn.PipelineCell``, gradients accumulated by ``PipelineGradReducer``.

:func:`check_scaleout` and :func:`check_parallel` validate everything before a model is built or a graph
compiled; each failure is one line naming the key. Semi-auto parallel compiles only on Ascend (or GPU):
on CPU :func:`check_scaleout` stops ``parallel_mode: 1`` with ``use_parallel`` and says so, and the same
YAML with ``use_parallel: False`` trains on one device.

No sharding or collective code of our own: strategies, redistribution, gradient reduction, optimizer
shard, pipelines and recompute are MindSpore's. The torch twin, ``torch_glm/parallel.py``, is
another engine: FSDP2 shards parameters, gradients and optimizer states over the data-parallel ranks
(``parallel.enable_parallel_optimizer``); operator-level strategies are MindSpore's alone.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional

from glm_common.config import ChatGLM2Config
from glm_common.parallel_keys import layer_stages  # mindformers' rule, shared with the memory plan

__all__ = ["ParallelConfig", "RecomputeConfig", "ParallelError", "check_parallel", "check_scaleout",
           "sharding_plan", "apply_sharding", "kv_repeat", "layer_stages", "apply_layer_settings",
           "apply_recompute", "recompute_flags", "select_recompute_flags", "pipeline_stage_map", "operator_strategies", "context_kwargs",
           "init_parallel", "configure_model", "pipeline_network", "strategy_file", "dataset_split",
           "semi_auto", "COLUMN_PARALLEL", "ROW_PARALLEL", "ascend_soc", "FLASH_ATTENTION_SOCS"]

#: layers whose weight ``[out, in]`` is split on the output axis
COLUMN_PARALLEL = ("self_attention.query_key_value", "mlp.dense_h_to_4h")
#: layers whose weight is split on the input axis
ROW_PARALLEL = ("self_attention.dense", "mlp.dense_4h_to_h")

_MODES = {0: "data_parallel", 1: "semi_auto_parallel"}


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
    gradient_aggregation_group: int = 4

    @property
    def device_num(self) -> int:
        return self.data_parallel * self.model_parallel * self.pipeline_stage

    @classmethod
    def from_settings(cls, s) -> "ParallelConfig":
        return cls(s.data_parallel, s.model_parallel, s.pipeline_stage, s.vocab_emb_dp, s.micro_batch_num,
                   (s.scaleout or {}).get("gradient_aggregation_group", 4))


@dataclass
class RecomputeConfig:
    """mindformers' ``recompute_config`` keys that MindSpore's ``Cell.recompute`` has."""

    recompute: bool = False
    mp_comm_recompute: bool = True
    parallel_optimizer_comm_recompute: bool = False
    recompute_slice_activation: bool = False
    #: names of a layer's cells (regular expressions, matched whole) recomputed when ``recompute`` is False
    select_recompute: tuple = ()

    @classmethod
    def from_settings(cls, s) -> "RecomputeConfig":
        rc = dict((s.scaleout or {}).get("recompute") or {})
        rc["recompute"] = bool(s.gradient_checkpointing)
        return cls(**rc)


def kv_repeat(config: ChatGLM2Config, model_parallel: int) -> int:
    """Copies of each key/value group the attention makes: 1 when ``model_parallel`` divides the groups,
    else ``heads / groups`` (each head its own copy, so the heads shard evenly)."""
    if config.kv_groups % model_parallel == 0:
        return 1
    return config.num_attention_heads // config.kv_groups


def check_parallel(config: ChatGLM2Config, parallel: ParallelConfig, batch_size: Optional[int] = None,
                   device_num: Optional[int] = None, source: str = "parallel_config") -> ParallelConfig:
    """Fail early, with one line, when ``parallel`` cannot shard a model of ``config``.

    ``batch_size``: the global batch of one optimizer update (every data-parallel replica's micro-batches)."""
    dp, mp, pp = parallel.data_parallel, parallel.model_parallel, parallel.pipeline_stage
    for name, value in (("data_parallel", dp), ("model_parallel", mp), ("pipeline_stage", pp),
                        ("micro_batch_num", parallel.micro_batch_num),
                        ("gradient_aggregation_group", parallel.gradient_aggregation_group)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ParallelError(f"{source}.{name}: must be a positive integer, got {value!r}")
    if device_num is not None and parallel.device_num != device_num:
        raise ParallelError(f"{source}: data_parallel {dp} x model_parallel {mp} x pipeline_stage {pp} = "
                            f"{parallel.device_num} devices, but {device_num} are available")
    if pp > config.num_layers:
        raise ParallelError(f"{source}.pipeline_stage: {pp} stages for {config.num_layers} layers")
    if pp > 1 and parallel.micro_batch_num < pp:
        raise ParallelError(f"{source}.micro_batch_num: {parallel.micro_batch_num} is less than pipeline_stage {pp}")
    sizes = [("num_attention_heads", config.num_attention_heads), ("ffn_hidden_size", config.ffn_hidden_size),
             ("padded_vocab_size", config.padded_vocab_size), ("hidden_size", config.hidden_size),
             ("query_key_value width", config.qkv_size)]
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
    see ``[B, groups (x kv_repeat), rows, hn]``; fused attention ``q [B, np, S, hn]``, ``k, v [B, g, K, hn]``
    and the mask ``[B, 1, S, K]``.
    """
    dp, mp = parallel.data_parallel, parallel.model_parallel
    plan = {
        "transformer.embedding.gather": ((1, 1), (dp, 1)) if parallel.vocab_emb_dp else ((mp, 1), (dp, 1)),
        "transformer.output_layer.matmul": ((dp, 1), (mp, 1)),
        "self_attention.scores (q @ k.T)": ((dp, mp, 1, 1), (dp, mp, 1, 1)),
        "self_attention.context (probs @ v)": ((dp, mp, 1, 1), (dp, mp, 1, 1)),
        # keys/values split like the query heads when model_parallel divides the groups, else repeated to one
        # per head first (kv_repeat; FlashAttentionScore needs equal N1 and N2 splits); the training mask is
        # one [S, K] for the whole batch, not split
        "self_attention.flash_attention": ((dp, mp, 1, 1), (dp, mp, 1, 1), (dp, mp, 1, 1), (1, 1)),
    }
    for name in COLUMN_PARALLEL:
        plan[f"{name}.matmul"] = ((dp, 1), (mp, 1))
    for name in ROW_PARALLEL:
        plan[f"{name}.matmul"] = ((dp, mp), (1, mp))
    return plan


#: MindSpore's names of the Ascend chips that have FlashAttentionScore (Atlas A2 and A3 training series)
FLASH_ATTENTION_SOCS = ("ascend910b", "ascend910_93", "ascend950")


def ascend_soc() -> str:
    """MindSpore's name of this Ascend chip (``ascend910`` is the 910A of the Atlas training series,
    ``ascend910b`` Atlas A2), once ``device_target`` is Ascend. A DryRun without a device knows none: there
    ``GLM2_ASCEND_SOC`` names the chip to compile for (``python -m mindspore_glm.dryrun --soc``); '' if unset."""
    from mindspore._c_expression import MSContext
    return MSContext.get_instance().get_ascend_soc_version() or os.environ.get("GLM2_ASCEND_SOC", "")


def _flash_op(config: ChatGLM2Config):
    from mindspore.ops.operations.nn_ops import FlashAttentionScore
    # queries come pre-scaled (the plain path's rounding), so scale_value 1
    return FlashAttentionScore(head_num=config.num_attention_heads, scale_value=1.0, input_layout="BNSD")


def apply_sharding(model, parallel: ParallelConfig, batch_size: Optional[int] = None,
                   device_num: Optional[int] = None) -> dict:
    """Check ``parallel`` against ``model.config`` and set the strategies of :func:`sharding_plan` on the
    model's operators (they take effect under ``semi_auto_parallel``). Returns the plan."""
    from mindspore import ops

    check_parallel(model.config, parallel, batch_size, device_num)
    plan = sharding_plan(model.config, parallel)
    repeat = kv_repeat(model.config, parallel.model_parallel)
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
        attn.kv_repeat = repeat
        if attn.flash_attention is not None:
            attn.flash_attention.shard(plan["self_attention.flash_attention"])
    return plan


def apply_recompute(model, rc: RecomputeConfig) -> list:
    """``Cell.recompute`` on every GLMBlock when ``rc.recompute``: the backward pass recomputes a layer's
    activations instead of keeping them (GRAPH mode; any device). Without it, ``rc.select_recompute`` marks
    the cells of each layer whose names (relative to the layer, e.g. ``mlp``) match one of its patterns.
    Returns the cells marked."""
    import re
    kw = dict(mp_comm_recompute=rc.mp_comm_recompute,
              parallel_optimizer_comm_recompute=rc.parallel_optimizer_comm_recompute,
              recompute_slice_activation=rc.recompute_slice_activation)
    layers = list(model.transformer.encoder.layers)
    if rc.recompute:
        for layer in layers:
            layer.recompute(**kw)
        return layers
    marked = []
    for layer in layers if rc.select_recompute else ():
        names = [name for name, _ in layer.cells_and_names() if name]
        for p in rc.select_recompute:         # a name that matches nothing is a typo, not a choice
            if not any(re.fullmatch(p, name) for name in names):
                raise ParallelError(f"recompute_config.select_recompute: {p!r} matches no cell of a layer "
                                    f"(they are {', '.join(n for n in names if '.' not in n)}, and their cells)")
        for name, cell in layer.cells_and_names():
            if name and any(re.fullmatch(p, name) for p in rc.select_recompute):
                cell.recompute(**kw)
                marked.append(cell)
    return marked


def select_recompute_flags(model) -> list:
    """Paths of the cells inside the layers marked ``Cell.recompute`` by ``select_recompute`` (a layer
    recomputed whole marks all its cells: it is :func:`recompute_flags`' and is left out here)."""
    out = []
    for i, layer in enumerate(model.transformer.encoder.layers):
        if getattr(layer, "_has_config_recompute", False):
            continue
        top: list = []                     # a marked cell marks its own cells too: name the outermost
        for name, cell in layer.cells_and_names():
            if name and getattr(cell, "_has_config_recompute", False) and \
                    not any(name.startswith(t + ".") for t in top):
                top.append(name)
                out.append(f"transformer.encoder.layers.{i}.{name}")
    return out


def apply_layer_settings(model, parallel: ParallelConfig, rc: RecomputeConfig) -> None:
    """Each layer's ``pipeline_stage`` and optimizer communication-fusion group (mindformers' layer settings),
    the model ends' stages, and per-layer recompute."""
    t = model.transformer
    n, pp = model.config.num_layers, parallel.pipeline_stage
    stages = layer_stages(n, pp)
    group_len = max((n + 1) // parallel.gradient_aggregation_group, 1)
    for i, layer in enumerate(t.encoder.layers):
        layer.pipeline_stage = stages[i]
        layer.set_comm_fusion(2 if pp > 1 else i // group_len + 1)
    t.embedding.pipeline_stage = 0
    t.encoder.final_layernorm.pipeline_stage = pp - 1
    t.output_layer.pipeline_stage = pp - 1
    if getattr(model, "pre_seq_len", 0):
        model.prefix_encoder.pipeline_stage = 0
    apply_recompute(model, rc)


def recompute_flags(model) -> dict:
    """``{layer name: bool}``: whether MindSpore will recompute the layer (``Cell.recompute`` was set)."""
    return {f"transformer.encoder.layers.{i}": bool(getattr(layer, "_has_config_recompute", False))
            for i, layer in enumerate(model.transformer.encoder.layers)}


def pipeline_stage_map(model) -> dict:
    """``{cell name: pipeline stage}`` as MindSpore will read them."""
    t = model.transformer
    out = {"transformer.embedding": t.embedding.pipeline_stage}
    out.update({f"transformer.encoder.layers.{i}": layer.pipeline_stage for i, layer in enumerate(t.encoder.layers)})
    out["transformer.encoder.final_layernorm"] = t.encoder.final_layernorm.pipeline_stage
    out["transformer.output_layer"] = t.output_layer.pipeline_stage
    return out


def operator_strategies(model) -> dict:
    """``{operator path: in_strategy}`` of every operator of the model that has a strategy set."""
    from mindspore.ops.primitive import Primitive
    out = {}
    for name, cell in model.cells_and_names():
        for attr, value in vars(cell).items():
            if isinstance(value, Primitive) and value.in_strategy is not None:
                out[f"{name}.{attr}" if name else attr] = value.in_strategy
        for attr, value in getattr(cell, "_primitives", {}).items():
            if value is not None and getattr(value, "in_strategy", None) is not None:
                out[f"{name}.{attr}" if name else attr] = value.in_strategy
    return out


# ---------------------------------------------------------------------------------------- run settings
def semi_auto(s) -> bool:
    """Whether ``s`` runs semi-auto parallel (``use_parallel`` with ``parallel.parallel_mode: 1``)."""
    return bool(s.use_parallel) and s.parallel_mode == 1


def strategy_file(s, rank: int) -> str:
    """Where this rank's strategy file goes: ``<output_dir>/strategy/ckpt_strategy_rank_<rank>.ckpt``
    (mindformers' place; ``convert/merge_shards.py --strategy <output_dir>/strategy`` reads the folder)."""
    return os.path.join(s.output_dir, "strategy", f"ckpt_strategy_rank_{rank}.ckpt")


def _global_batch(s) -> int:
    micro = s.micro_batch_num if s.pipeline_stage > 1 else 1
    return s.batch_size * s.data_parallel * micro


def check_scaleout(s, world: Optional[int] = None) -> None:
    """Every scale-out key of ``s`` checked before anything is built (one line naming the key). ``world``:
    the number of ranks (default: the launcher's ``RANK_SIZE``, when set)."""
    src = s.source
    if world is None and os.environ.get("RANK_SIZE", "").isdigit():
        world = int(os.environ["RANK_SIZE"])
    sc = s.scaleout or {}
    if not semi_auto(s):
        if s.use_parallel and (s.model_parallel > 1 or s.pipeline_stage > 1):
            raise ParallelError(f"{src}: parallel.parallel_mode: 0 (data parallel) cannot run parallel_config."
                                f"{'model_parallel' if s.model_parallel > 1 else 'pipeline_stage'} > 1; use 1 "
                                "(semi-auto)")
        return
    if s.device_target == "CPU":
        raise ParallelError(f"{src}: parallel.parallel_mode: 1 (semi-auto parallel) needs Ascend devices "
                            "(context.device_target: Ascend, the Ascend software stack and a rank table); on "
                            "CPU set use_parallel: False to train the same YAML on one device")
    parallel = ParallelConfig.from_settings(s)
    if (parallel.model_parallel > 1 or parallel.pipeline_stage > 1) and not sc.get("full_batch", False):
        raise ParallelError(f"{src}: parallel.full_batch: must be True with model_parallel or pipeline_stage > 1 "
                            "(every rank reads the whole batch; the strategies split it)")
    if parallel.pipeline_stage > 1 and s.grad_accum > 1:
        raise ParallelError(f"{src}: runner_config.gradient_accumulation_steps: {s.grad_accum} with pipeline_stage "
                            f"{parallel.pipeline_stage}; use parallel_config.micro_batch_num instead")
    if s.grad_accum > 1:
        # the accumulation buffers are full-shape host arrays outside MindSpore's layouts, and the Add that
        # accumulates is not on the path MindSpore's grad_scale search follows: each rank would clip and
        # check overflow on its own slices' norm
        raise ParallelError(f"{src}: runner_config.gradient_accumulation_steps: {s.grad_accum} is not available "
                            "with parallel.parallel_mode: 1 (semi-auto); raise runner_config.batch_size, or use "
                            "pipeline_stage > 1 with parallel_config.micro_batch_num")
    batch = _global_batch(s) if sc.get("full_batch", False) else None
    try:
        check_parallel(s.config, parallel, batch, world, source=f"{src}: parallel_config")
    except ParallelError as e:
        if "does not divide batch_size" in str(e):
            raise ParallelError(f"{e} (runner_config.batch_size {s.batch_size} per replica)") from None
        raise


def dataset_split(s, rank: int, world: int) -> tuple:
    """``(shard index, shard count, batch size)`` of the dataset a rank reads: with ``full_batch`` every rank
    reads the whole global batch (``batch_size x data_parallel x micro_batch_num``) and the strategies split it;
    otherwise each rank its own ``batch_size`` rows."""
    if semi_auto(s) and (s.scaleout or {}).get("full_batch", False):
        return 0, 1, _global_batch(s)
    return rank, world, s.batch_size


def context_kwargs(s, world: int, rank: int = 0) -> dict:
    """The ``mindspore.set_auto_parallel_context`` arguments of a run (``use_parallel`` only)."""
    sc = s.scaleout or {}
    kw = dict(parallel_mode=_MODES[s.parallel_mode], device_num=world, gradients_mean=s.gradients_mean)
    if s.parallel_mode == 1:
        kw.update(full_batch=sc.get("full_batch", False), search_mode=sc.get("search_mode", "sharding_propagation"),
                  loss_repeated_mean=sc.get("loss_repeated_mean", True), pipeline_stages=s.pipeline_stage,
                  strategy_ckpt_config={"save_file": strategy_file(s, rank),
                                        "only_trainable_params": sc.get("only_trainable_params", True)})
    if sc.get("enable_parallel_optimizer", False) and s.device_target != "CPU":
        kw["enable_parallel_optimizer"] = True
        kw["parallel_optimizer_config"] = {
            "gradient_accumulation_shard": sc.get("gradient_accumulation_shard", False),
            "parallel_optimizer_threshold": sc.get("parallel_optimizer_threshold", 64),
            "optimizer_weight_shard_size": sc.get("optimizer_weight_shard_size", -1)}
    return kw


def init_parallel(s, world: int, rank: int = 0) -> dict:
    """Set MindSpore's auto-parallel context for ``s`` (after ``mindspore.communication.init``); return it."""
    import mindspore as ms
    check_scaleout(s, world)
    kw = context_kwargs(s, world, rank)
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(**kw)
    return kw


def configure_model(model, s) -> dict:
    """Put the run's scale-out on a built model: fused attention (Ascend), and under semi-auto parallel the
    sharding strategies and pipeline stages; per-layer recompute in every mode. Returns what was done."""
    done = {"recompute": [], "select_recompute": [], "plan": None, "flash_attention": False}
    soc = ascend_soc() if s.options.use_flash_attention and s.device_target == "Ascend" else ""
    if soc and not soc.startswith(FLASH_ATTENTION_SOCS):
        warnings.warn(f"{s.source}: model.model_config.use_flash_attention: True, but FlashAttentionScore needs an "
                      f"Atlas A2/A3 chip (this is {soc}, e.g. a 910A): attention runs unfused", RuntimeWarning)
    elif s.options.use_flash_attention and s.device_target == "Ascend":
        for layer in model.transformer.encoder.layers:
            layer.self_attention.flash_attention = _flash_op(model.config)
            layer.self_attention.use_flash_attention = True
        done["flash_attention"] = True
    parallel = ParallelConfig.from_settings(s)
    rc = RecomputeConfig.from_settings(s)
    if semi_auto(s):
        done["plan"] = apply_sharding(model, parallel)
        apply_layer_settings(model, parallel, rc)
    else:
        apply_recompute(model, rc)
    done["recompute"] = [n for n, on in recompute_flags(model).items() if on]
    done["select_recompute"] = select_recompute_flags(model)
    return done


class _MicroMean:
    """Builds the cell that divides each micro-batch's loss by their number, so the pipeline's sum is the mean."""

    @staticmethod
    def wrap(network, micro: int):
        from mindspore import nn

        class MicroMean(nn.Cell):
            def __init__(self, net):
                super().__init__(auto_prefix=False)
                self.network = net
                self.inv = 1.0 / micro

            def construct(self, *args):
                return self.network(*args) * self.inv

        return MicroMean(network)


def pipeline_network(network, weights, s):
    """``(network, grad reducer)``: with ``pipeline_stage > 1`` the loss network runs ``micro_batch_num``
    micro-batches through ``PipelineCell`` (their mean loss) and ``PipelineGradReducer`` accumulates the
    gradients over them; otherwise ``(network, None)``."""
    if not (semi_auto(s) and s.pipeline_stage > 1):
        return network, None
    from mindspore.parallel.nn import PipelineCell
    cell = PipelineCell(_MicroMean.wrap(network, s.micro_batch_num), s.micro_batch_num)
    return cell, _pipeline_grad_reducer(weights)


def _pipeline_grad_reducer(weights):
    """MindSpore's ``PipelineGradReducer`` over ``weights``. Its ``construct`` in MindSpore 2.9 reads an undefined
    ``grads`` without the optimizer shard (the compile stops: "The name 'grads' is not defined"); this subclass
    takes the gradients by name and does the same in both cases."""
    from mindspore.ops import functional as F
    from mindspore.parallel.nn import PipelineGradReducer
    from mindspore.parallel.nn.parallel_grad_reducer import grad_scale, shard_grad_scale

    class _Reducer(PipelineGradReducer):
        def construct(self, grads):
            if self.opt_shard:
                grads = self.grad_reducer(grads)
                return self.hyper_map(F.partial(shard_grad_scale, self.scale_sense * self.degree), grads,
                                      self.accu_grads)
            accu_grads = self.grad_reducer(self.accu_grads)
            return self.hyper_map(F.partial(grad_scale, self.scale_sense * self.degree), grads, accu_grads)

    return _Reducer(weights)
