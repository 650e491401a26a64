"""One optimizer update in MindSpore: the optimizer and the GRAPH-mode train-step cells.

The twin of ``torch_glm/train_step.py``. :func:`make_optimizer` is ``nn.AdamWeightDecay`` with the
per-update learning rates of :func:`glm_common.schedules.learning_rates`. :class:`TrainOneStepCell` (and
:class:`AccumulateCell` for gradient accumulation) are MindSpore-only: the loss scale, the overflow
check, the data-parallel reduction (under a pipeline the micro-batches' gradient accumulation,
:func:`mindspore_glm.parallel.pipeline_network`) and clipping run inside one compiled graph (torch's step
is eager autograd in ``torch_glm.train``).
"""
from __future__ import annotations

import os

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops
from mindspore.common.initializer import initializer

from glm_common.run_config import RunConfigError, TrainSettings
from glm_common.schedules import decays
from mindspore_glm.parallel import pipeline_network, semi_auto

__all__ = ["MASTER_PREFIX", "make_optimizer", "sum_squares", "saturation_mode", "FloatStatus", "TrainOneStepCell",
           "AccumulateCell"]


#: the name prefix of the float32 master copies of weights kept in a lower precision (``master_weights.<param>``)
MASTER_PREFIX = "master_weights"


def make_optimizer(params: list, s: TrainSettings, lrs: np.ndarray) -> nn.AdamWeightDecay:
    """``nn.AdamWeightDecay`` over ``params`` (weight decay on :func:`glm_common.schedules.decays` ones)
    with the per-update learning rates ``lrs [n]``; its moments and the weights it updates are float32
    whatever ``param_init_type`` says.

    MindSpore's optimizer creates its moments at the dtype of the parameters it updates (float16 moments
    underflow, and ``eps`` 1e-8 is 0 in float16), so a parameter kept in float16/bfloat16 is updated
    through a float32 master copy (``Parameter.clone``, which keeps the parameter's parallel layout;
    named ``master_weights.<param>``): the optimizer and its moments (``adam_m.<param>``,
    ``adam_v.<param>``, named after the model's parameter) are float32 and the step cell casts the
    updated master into the model's copy (mixed precision; mindformers' FP32StateAdamWeightDecay keeps
    float32 moments the same way). ``optimizer.model_weights``: the model's parameters in the optimizer's
    order (what the gradients are taken of); ``optimizer.low_weights`` / ``optimizer.masters``: the pairs
    cast after each update (empty when every parameter is float32).

    ``optimizer.type: AdamW`` (bias-corrected) folds ``sqrt(1 - b2^t) / (1 - b1^t)`` into the learning
    rate and divides the weight decay by it, which is AdamW up to ``eps`` scaling (``eps`` acts as
    ``eps * sqrt(1 - b2^t)``).
    """
    decay = [p for p in params if decays(p.name, len(p.shape))]
    rest = [p for p in params if not decays(p.name, len(p.shape))]
    ordered = decay + rest
    master = {}
    for p in ordered:
        if p.dtype != ms.float32:
            m = p.clone()
            m.name = f"{MASTER_PREFIX}.{p.name}"
            if m.has_init and getattr(m.init_mode, "init", None) is not None:
                # a lazy weight (mindspore_glm.dryrun): the clone shares the original's pending initializer,
                # which MindSpore consumes when it slices the original; the master needs its own
                m.init_mode = initializer(p.init_mode.init, p.shape, ms.float32)
            m.set_dtype(ms.float32)         # exact: float16/bfloat16 values are float32 values
            master[p.name] = m
    groups = [{"params": [master.get(p.name, p) for p in decay], "weight_decay": s.weight_decay}] if decay else []
    if rest:
        groups.append({"params": [master.get(p.name, p) for p in rest], "weight_decay": 0.0})
    lrs = np.asarray(lrs, np.float32)
    if s.bias_correction:
        t = np.arange(1, len(lrs) + 1, dtype=np.float64)
        lrs = (lrs * np.sqrt(1 - s.beta2 ** t) / (1 - s.beta1 ** t)).astype(np.float32)
        if s.weight_decay:
            raise RunConfigError(f"{s.source}: optimizer.type: AdamW with weight_decay > 0 is not available in "
                                 "the MindSpore runner; use AdamWeightDecay (mindformers' default)")
    opt = nn.AdamWeightDecay(groups, Tensor(lrs), beta1=s.beta1, beta2=s.beta2, eps=s.eps)
    if master:
        # the moments: float32 zeros cloned from the model's parameter, not from its master: a clone takes its
        # original's parallel layout (optimizer shard, model parallel) when MindSpore slices the original,
        # and a master is in no forward operator (cloned from it, the moments stayed whole on every rank)
        opt.moments1 = ParameterTuple(_float32_state(p) for p in ordered)
        opt.moments2 = ParameterTuple(_float32_state(p) for p in ordered)
    for p, m, v in zip(ordered, opt.moments1, opt.moments2):    # named after the model's parameter
        m.name, v.name = f"adam_m.{p.name}", f"adam_v.{p.name}"
    opt.model_weights = ParameterTuple(ordered)
    opt.low_weights = ParameterTuple(p for p in ordered if p.name in master)
    opt.masters = ParameterTuple(master[p.name] for p in ordered if p.name in master)
    return opt


def _float32_state(p: Parameter) -> Parameter:
    """An optimizer state of ``p``: float32 zeros of its shape, a clone of ``p`` (its parallel layout); named
    by the caller."""
    st = p.clone(init="zeros")
    st.set_dtype(ms.float32)
    st.set_data(initializer("zeros", p.shape, ms.float32))
    return st


# ExpandDims marked ``grad_scale``: under semi-auto parallel MindSpore aggregates the local square sum of a
# sliced gradient over the devices that hold its slices (an AllReduce its parallel pass inserts; the
# mechanism of mindspore.ops.clip_by_global_norm and mindformers' ClipGradNorm)
_expand_grad_scale = ops.ExpandDims().add_prim_attr("grad_scale", True)


def sum_squares(tensors, sliced: bool = False):
    """Sum of the squares of every element of ``tensors`` (float32), as a scalar.

    ``sliced``: the tensors are gradients of a semi-auto parallel run, each device holding slices (model
    parallel, optimizer shard): each square sum goes through ``ExpandDims`` marked ``grad_scale``, so
    MindSpore adds the slices' sums over the devices and every device gets the whole model's sum (the
    same number on every rank, as the clip and the overflow check need). Otherwise each tensor is reduced
    as 2-D rows first: MindSpore's CPU ReduceSum over a whole tensor, or over the last axis of a 3-D/4-D
    one, is several times slower than over the rows of a 2-D one.
    """
    if sliced:
        return ops.concat([_expand_grad_scale(ops.ReduceSum()(t * t, ()), 0) for t in tensors]).sum()
    rows = []
    for t in tensors:
        t2 = ops.reshape(t, (-1, t.shape[-1]))
        rows.append(ops.reshape(ops.ReduceSum()(t2 * t2, 1), (-1,)))
    return ops.concat(rows).sum()


def saturation_mode() -> bool:
    """Whether this device reports float overflow only through its float-status register (Ascend
    saturation mode: inf becomes the largest finite value and NaN 0, so gradients stay finite): the Atlas
    training series (910A, ``ascend910``), and 910B/910_93 with ``MS_ASCEND_CHECK_OVERFLOW_MODE=SATURATION_MODE``;
    the rule of MindSpore's ``nn.TrainOneStepWithLossScaleCell``. Elsewhere (CPU, GPU, 910B in INF/NaN
    mode) an overflow shows as a non-finite gradient norm."""
    if ms.get_context("device_target") != "Ascend":
        return False
    from mindspore._c_expression import MSContext
    soc = MSContext.get_instance().get_ascend_soc_version()
    return soc == "ascend910" or (soc in ("ascend910b", "ascend910_93", "ascend950") and
                                  os.environ.get("MS_ASCEND_CHECK_OVERFLOW_MODE") == "SATURATION_MODE")


class FloatStatus(nn.Cell):
    """The NPU float-status overflow check of ``nn.TrainOneStepWithLossScaleCell``
    (``start_overflow_check`` / ``get_overflow_status`` on saturation mode, MindSpore 2.9), for the step
    cells: :meth:`start` clears the register before the computation, :meth:`overflow` reads it after
    (summed over the devices under a parallel mode) and clears it. Off saturation mode both are no-ops
    and :meth:`overflow` is False (the caller's non-finite check decides)."""

    def __init__(self):
        super().__init__(auto_prefix=False)
        self.enabled = saturation_mode()
        self.distributed = ms.get_auto_parallel_context("parallel_mode") != "stand_alone"
        if self.enabled:
            from mindspore.ops.operations.math_ops import NPUClearFloatStatusV2, NPUGetFloatStatusV2
            self.clear_status = NPUClearFloatStatusV2()
            self.get_status = NPUGetFloatStatusV2()
            self.allreduce = ops.AllReduce()

    def start(self, pre_cond, compute_input):
        """``(status, compute_input)``: the register cleared after ``pre_cond`` and before ``compute_input``
        is used."""
        status = Tensor([0] * 8, ms.int32)
        if self.enabled:
            status = ops.depend(status, pre_cond)
            compute_input = ops.depend(compute_input, self.clear_status(status))
        return status, compute_input

    def overflow(self, status, compute_output):
        """bool: whether any float op since :meth:`start` overflowed (read after ``compute_output``)."""
        if not self.enabled:
            return ops.zeros((), ms.bool_)
        status = ops.depend(status, compute_output)
        got = self.get_status(status)
        if self.distributed:
            got = self.allreduce(got)
        status = ops.depend(status, got)
        got = ops.depend(got, self.clear_status(status))
        return ops.logical_not(ops.reduce_all(ops.equal(ops.zeros((), ms.int32), got)))


class _LossCell(nn.Cell):
    """``(input_ids [B,S], labels [B,S]) -> float32 loss``."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels):
        return self.model(input_ids, None, None, labels)[0]


class TrainOneStepCell(nn.Cell):
    """One optimizer update (MindSpore-only: a GRAPH-mode cell; torch_glm's step is eager autograd). ``construct(input_ids [B,S], labels [B,S])`` -> ``(loss, overflow,
    loss_scale, grad_norm)``: float32 loss (the data-parallel mean), bool overflow (update skipped),
    the loss scale the step used, the global gradient norm before clipping.

    With ``gradient_accumulation_steps`` N > 1 an update takes N micro-batches: the first N-1 go through
    :attr:`accumulate` (an :class:`AccumulateCell`: loss and scaled gradients added to float32 buffers, no
    update, no communication), the last through this cell, which adds its own, takes the mean over the
    N micro-batches (loss and gradients, as one batch N times larger with equal label counts would give),
    reduces over the ranks once, updates and empties the buffers.
    """

    #: True only for a compile that never trains (:mod:`mindspore_glm.dryrun`): the update is not inside
    #: ``if not overflow`` (MindSpore 2.9's simulated Ascend backend cannot build a graph holding that
    #: ConditionSwitch; the optimizer's buffers are the same either way)
    unconditional_update = False

    def __init__(self, model, optimizer: nn.AdamWeightDecay, s: TrainSettings, parallel: bool = False):
        super().__init__(auto_prefix=False)
        self.network = _LossCell(model)
        self.optimizer = optimizer
        self.weights = optimizer.model_weights
        self.low_weights, self.masters = optimizer.low_weights, optimizer.masters
        # pipeline_stage > 1 (semi-auto): micro-batches through PipelineCell, their gradients accumulated
        self.network, self.pipeline_reducer = pipeline_network(self.network, self.weights, s)
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.loss_scale = Parameter(Tensor(np.float32(s.loss_scale_value)), name="loss_scale")
        self.good_steps = Parameter(Tensor(np.int32(0)), name="loss_scale_good_steps")
        self.dynamic = s.loss_scale_dynamic
        self.factor = float(s.loss_scale_factor)
        self.window = int(s.loss_scale_window)
        self.clip = s.clip_grad
        self.max_norm = float(s.max_grad_norm)
        self.parallel = parallel
        self.sliced_grads = semi_auto(s)
        self.float_status = FloatStatus()
        if parallel:
            from mindspore.communication import get_group_size
            self.degree = get_group_size()
            self.reducer = nn.DistributedGradReducer(self.weights, mean=s.gradients_mean, degree=self.degree)
            self.allreduce = ops.AllReduce()
        self.accum_steps = int(s.grad_accum)
        if self.accum_steps > 1:
            self.accu_grads = ParameterTuple(
                Parameter(Tensor(np.zeros(p.shape, np.float32)), name=f"accu_grads.{p.name}", requires_grad=False)
                for p in self.weights)
            self.accu_loss = Parameter(Tensor(np.float32(0)), name="accu_loss", requires_grad=False)
            # saturation mode: the micro-batches' float-status overflows, counted (read with the last)
            self.accu_overflow = Parameter(Tensor(np.float32(0)), name="accu_overflow", requires_grad=False)
            self.accumulate = AccumulateCell(self)

    def construct(self, input_ids, labels):
        scale = self.loss_scale * 1.0
        status, input_ids = self.float_status.start(scale, input_ids)
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale)
        if self.accum_steps > 1:
            grads = tuple(ops.cast(g, ms.float32) + a for g, a in zip(grads, self.accu_grads))
            loss = (loss + self.accu_loss) / self.accum_steps
            for a in self.accu_grads:
                grads = ops.depend(grads, ops.assign(a, ops.zeros_like(a)))
            loss = ops.depend(loss, ops.assign(self.accu_loss, ops.zeros_like(self.accu_loss)))
        if self.pipeline_reducer is not None:
            grads = self.pipeline_reducer(grads)
        if self.parallel:
            grads = self.reducer(grads)
            loss = self.allreduce(loss) / self.degree
        grads = tuple(ops.cast(g, ms.float32) for g in grads)
        # the norm of the scaled gradients divided by the scale, then one multiply per gradient that unscales
        # and clips together (a float32 overflow of the scaled squares needs an unscaled norm near
        # 1.8e19 / scale, and is handled like any overflow); accumulated gradients are sums: / N as well
        norm = ops.sqrt(sum_squares(grads, self.sliced_grads)) / (scale * self.accum_steps)
        # a non-finite norm (INF/NaN mode, CPU, GPU) or, on Ascend saturation mode, the float-status register
        overflow = ops.logical_or(ops.logical_not(ops.isfinite(norm)), self.float_status.overflow(status, norm))
        if self.accum_steps > 1 and self.float_status.enabled:
            overflow = ops.logical_or(overflow, self.accu_overflow > 0)
            overflow = ops.depend(overflow, ops.assign(self.accu_overflow, ops.zeros_like(self.accu_overflow)))
        coef = 1.0 / (scale * self.accum_steps)
        if self.clip:
            coef = coef * (self.max_norm / ops.maximum(norm, self.max_norm))
        grads = tuple(g * coef for g in grads)
        if self.dynamic:
            ok = ops.cast(ops.logical_not(overflow), ms.int32)
            good = (self.good_steps + 1) * ok
            grow = good >= self.window
            down = ops.maximum(scale / self.factor, 1.0)
            new_scale = ops.select(overflow, down, ops.select(grow, scale * self.factor, scale))
            good = ops.select(grow, ops.zeros_like(good), good)
            loss = ops.depend(loss, ops.assign(self.loss_scale, new_scale))
            loss = ops.depend(loss, ops.assign(self.good_steps, good))
        if self.unconditional_update:  # a compile-only run: no ConditionSwitch (see the attribute)
            done = self.optimizer(grads)
            for p, m in zip(self.low_weights, self.masters):     # the model's copy of each float32 master
                done = ops.depend(done, ops.assign(p, ops.cast(ops.depend(m, done), p.dtype)))
            loss = ops.depend(loss, done)
        elif not overflow:
            done = self.optimizer(grads)
            for p, m in zip(self.low_weights, self.masters):     # the model's copy of each float32 master
                done = ops.depend(done, ops.assign(p, ops.cast(ops.depend(m, done), p.dtype)))
            loss = ops.depend(loss, done)
        return loss, overflow, scale, norm


class AccumulateCell(nn.Cell):
    """A micro-batch of gradient accumulation (see :class:`TrainOneStepCell`): ``construct(input_ids,
    labels)`` -> the micro-batch's loss; adds the loss and the gradients (scaled by the current loss
    scale) to the step cell's float32 buffers and updates nothing."""

    def __init__(self, step_cell: TrainOneStepCell):
        super().__init__(auto_prefix=False)
        self.network = step_cell.network
        self.weights = step_cell.weights
        self.grad = step_cell.grad
        self.loss_scale = step_cell.loss_scale
        self.accu_grads = step_cell.accu_grads
        self.accu_loss = step_cell.accu_loss
        self.accu_overflow = step_cell.accu_overflow
        self.float_status = step_cell.float_status

    def construct(self, input_ids, labels):
        scale = self.loss_scale * 1.0
        status, input_ids = self.float_status.start(scale, input_ids)
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale)
        for a, g in zip(self.accu_grads, grads):
            loss = ops.depend(loss, ops.assign_add(a, ops.cast(g, ms.float32)))
        if self.float_status.enabled:
            flag = ops.cast(self.float_status.overflow(status, loss), ms.float32)
            loss = ops.depend(loss, ops.assign_add(self.accu_overflow, flag))
        return ops.depend(loss, ops.assign_add(self.accu_loss, loss))
