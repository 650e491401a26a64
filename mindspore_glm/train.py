"""Fine-tuning in MindSpore: a GRAPH-mode train step driven by the mindformers-shaped run YAML.

The twin of ``torch_glm/train.py``; settings, schedules and the loss log are shared
(:mod:`glm_common.run_config`, :mod:`glm_common.schedules`, :mod:`glm_common.train_log`).

One optimizer update is one call of :class:`TrainOneStepCell` (compiled once per batch shape):
forward and loss, gradients of the trainable parameters scaled by the loss scale, the data-parallel
gradient mean (``use_parallel``), unscaling, an overflow check, clipping by global norm, and
``nn.AdamWeightDecay`` with the learning-rate array of :func:`glm_common.schedules.learning_rates`
(indexed by the optimizer's ``global_step``: skipped updates do not advance it). With a dynamic loss
scale an overflow skips the update and halves the scale (mindformers' ``DynamicLossScaleUpdateCell``);
with a fixed scale a NaN/Inf loss stops the run with its step number. With
``runner_config.gradient_accumulation_steps`` N an update takes N micro-batches of ``batch_size``
(:class:`AccumulateCell` for the first N-1), the loss and gradients being their mean. ``do_eval`` adds
the eval loss and rouge/bleu rows (``{"step", "eval_loss", "rouge-1", ...}``) to the loss log every
``eval_step_interval`` updates and after the last one.

What trains (``pet_config``): LoRA matrices (:mod:`mindspore_glm.lora`), the P-tuning v2 prefix encoder
(:mod:`mindspore_glm.prefix`) or, without ``pet_config``, every weight. Checkpoints go where mindformers
puts them, ``<output_dir>/checkpoint/rank_<N>/<prefix>-<epoch>_<step in epoch>.ckpt``: the trainable
weights (all weights with ``save_full_weights`` or full fine-tuning), the optimizer moments
(``adam_m.*``, ``adam_v.*``) and ``epoch_num``, ``step_num``, ``global_step``, ``loss_scale``,
``loss_scale_good_steps``; ``resume_training`` continues from the latest one on the same loss
trajectory (with dropout 0: MindSpore's dropout kernels keep their random state to themselves).
``<output_dir>/loss_log.jsonl`` gets one row a step (loss, lr, loss scale, tokens/s) and
``loss_curve.png`` the curve.
"""
from __future__ import annotations

import os
import re
import sys
import time
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from glm_common.run_config import RunConfigError, TrainSettings
from glm_common.schedules import decays, learning_rates, schedule_total
from glm_common.train_log import LossLog, plot_losses, summary_line

__all__ = ["TrainingError", "set_context", "init_ranks", "build_model", "is_adapter_checkpoint", "init_weights",
           "apply_pet", "eval_loss", "eval_perplexity", "make_optimizer", "sum_squares", "TrainOneStepCell",
           "AccumulateCell",
           "save_checkpoint", "find_checkpoints", "load_checkpoint", "train"]


class TrainingError(RuntimeError):
    """A run that cannot go on (NaN/Inf loss under a fixed loss scale, ...); one line with the step."""


# ---------------------------------------------------------------------------------------- setup
def set_context(s: TrainSettings, device_id: Optional[int] = None) -> None:
    """``mindspore.set_context`` from the YAML's ``context`` (mode, device_target, device_id, memory)."""
    kw = dict(mode=ms.GRAPH_MODE if s.context_mode == 0 else ms.PYNATIVE_MODE, device_target=s.device_target)
    if s.device_target != "CPU":
        kw["device_id"] = s.device_id if device_id is None else device_id
        if s.max_device_memory:
            kw["max_device_memory"] = s.max_device_memory
    ms.set_context(**kw)


def init_weights(model, seed: int = 0) -> None:
    """Random initialisation for a run without ``load_checkpoint``: norms 1, biases 0, other weights
    N(0, 0.02), drawn with numpy from ``seed`` in parameter order."""
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if "mindpet_delta" in p.name or p.name.startswith("prefix_encoder."):
            continue
        if "layernorm" in p.name:
            value = np.ones(p.shape, np.float32)
        elif p.name.endswith("bias"):
            value = np.zeros(p.shape, np.float32)
        else:
            value = rng.normal(0.0, 0.02, p.shape).astype(np.float32)
        p.set_data(Tensor(value, p.dtype))


def apply_pet(model, pet: dict, seed: int = 0) -> list:
    """Make what ``pet`` names trainable (LoRA, P-tuning v2 or everything); return the trainable parameters."""
    kind = pet["pet_type"]
    if kind == "lora":
        from mindspore_glm.lora import apply_lora
        return apply_lora(model, r=pet["r"], lora_alpha=pet["lora_alpha"], lora_dropout=pet["lora_dropout"],
                          target_modules=pet["target_modules"], seed=seed)
    if kind == "ptuning2":
        from mindspore_glm.prefix import freeze_base
        enc = model.prefix_encoder
        p = pet.get("dropout_prob", 0.1)
        enc.dropout = nn.Dropout(p=p) if p > 0 else nn.Identity()
        return freeze_base(model)
    if kind == "full":
        for p in model.get_parameters():
            p.requires_grad = True
        return list(model.get_parameters())
    raise RunConfigError(f"pet_config.pet_type: {kind!r} is not available in the MindSpore runner (lora, ptuning2)")


_TRAIN_STATE = ("adam_m.", "adam_v.", "global_step", "epoch_num", "step_num", "loss_scale", "scale_sense",
                "current_iterator_step", "last_overflow_iterator_step", "learning_rate")


def _pet_name(name: str) -> bool:
    return "mindpet_delta" in name or name.startswith("prefix_encoder.")


def is_adapter_checkpoint(path: str) -> bool:
    """Whether ``path`` is a ``.ckpt`` holding LoRA/prefix weights (and training state) but no base weight."""
    from convert.ms_ckpt import MSCheckpoint
    if not (str(path).endswith(".ckpt") and os.path.isfile(path)):
        return False
    names = [n for n in MSCheckpoint(path).names if not n.startswith(_TRAIN_STATE)]
    return bool(names) and all(_pet_name(n) for n in names)


def _load_ckpt(model, path: str, strict: bool) -> set:
    """Load the model weights of a MindSpore ``.ckpt`` (training state in it is skipped); return the names."""
    from convert.ms_ckpt import MSCheckpoint, MSCheckpointError
    try:
        ck = MSCheckpoint(path)
        names = [n for n in ck.names if not n.startswith(_TRAIN_STATE)]
        return model.load_weights(((n, ck.read(n)) for n in names), source=path, strict=strict)
    except MSCheckpointError as e:
        raise RunConfigError(str(e)) from None


def build_model(s: TrainSettings, adapter: str = ""):
    """The model of ``s`` with ``pet_config`` applied: weights from ``s.load_checkpoint`` (an HF directory or
    a ``.ckpt``, which may hold LoRA/prefix weights too; random when empty), then ``adapter`` (a checkpoint
    holding only LoRA/prefix weights, e.g. of a LoRA run) over them. Returns ``(model, trainable params)``."""
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    if s.pet["pet_type"] == "qlora":
        raise RunConfigError(f"{s.source}: pet_config.pet_type: qlora needs CUDA (torch_glm); use lora here")
    path = s.load_checkpoint
    if path and not os.path.exists(path):
        raise RunConfigError(f"{s.source}: load_checkpoint: {path}: no such file or directory")
    if path and os.path.isdir(path):
        model = ChatGLM2ForConditionalGeneration.from_pretrained(path, config=s.config, options=s.options)
        params = apply_pet(model, s.pet, s.seed)
    else:
        model = ChatGLM2ForConditionalGeneration(s.config, s.options)
        params = apply_pet(model, s.pet, s.seed)
        if path:
            _load_ckpt(model, path, strict=True)
        else:
            init_weights(model, s.seed)
    if adapter:
        _load_ckpt(model, adapter, strict=False)
    return model, params


def make_optimizer(params: list, s: TrainSettings, lrs: np.ndarray) -> nn.AdamWeightDecay:
    """``nn.AdamWeightDecay`` over ``params`` (weight decay on :func:`glm_common.schedules.decays` ones)
    with the per-update learning rates ``lrs [n]``.

    ``optimizer.type: AdamW`` (bias-corrected) folds ``sqrt(1 - b2^t) / (1 - b1^t)`` into the learning
    rate and divides the weight decay by it, which is AdamW up to ``eps`` scaling (``eps`` acts as
    ``eps * sqrt(1 - b2^t)``).
    """
    decay = [p for p in params if decays(p.name, len(p.shape))]
    rest = [p for p in params if not decays(p.name, len(p.shape))]
    groups = [{"params": decay, "weight_decay": s.weight_decay}] if decay else []
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    lrs = np.asarray(lrs, np.float32)
    if s.bias_correction:
        t = np.arange(1, len(lrs) + 1, dtype=np.float64)
        lrs = (lrs * np.sqrt(1 - s.beta2 ** t) / (1 - s.beta1 ** t)).astype(np.float32)
        if s.weight_decay:
            raise RunConfigError(f"{s.source}: optimizer.type: AdamW with weight_decay > 0 is not available in "
                                 "the MindSpore runner; use AdamWeightDecay (mindformers' default)")
    return nn.AdamWeightDecay(groups, Tensor(lrs), beta1=s.beta1, beta2=s.beta2, eps=s.eps)


# ---------------------------------------------------------------------------------------- train step
def sum_squares(tensors):
    """Sum of the squares of every element of ``tensors`` (float32), as a scalar.

    Each tensor is reduced as 2-D rows first: MindSpore's CPU ReduceSum over a whole tensor, or over the
    last axis of a 3-D/4-D one, is several times slower than over the rows of a 2-D one.
    """
    rows = []
    for t in tensors:
        t2 = ops.reshape(t, (-1, t.shape[-1]))
        rows.append(ops.reshape(ops.ReduceSum()(t2 * t2, 1), (-1,)))
    return ops.concat(rows).sum()


class _LossCell(nn.Cell):
    """``(input_ids [B,S], labels [B,S]) -> float32 loss``."""

    def __init__(self, model):
        super().__init__(auto_prefix=False)
        self.model = model

    def construct(self, input_ids, labels):
        return self.model(input_ids, None, None, labels)[0]


class TrainOneStepCell(nn.Cell):
    """One optimizer update. ``construct(input_ids [B,S], labels [B,S])`` -> ``(loss, overflow,
    loss_scale, grad_norm)``: float32 loss (the data-parallel mean), bool overflow (update skipped),
    the loss scale the step used, the global gradient norm before clipping.

    With ``gradient_accumulation_steps`` N > 1 an update takes N micro-batches: the first N-1 go through
    :attr:`accumulate` (an :class:`AccumulateCell`: loss and scaled gradients added to float32 buffers, no
    update, no communication), the last through this cell, which adds its own, takes the mean over the
    N micro-batches (loss and gradients, as one batch N times larger with equal label counts would give),
    reduces over the ranks once, updates and empties the buffers.
    """

    def __init__(self, model, optimizer: nn.AdamWeightDecay, s: TrainSettings, parallel: bool = False):
        super().__init__(auto_prefix=False)
        self.network = _LossCell(model)
        self.optimizer = optimizer
        self.weights = optimizer.parameters
        self.grad = ops.GradOperation(get_by_list=True, sens_param=True)
        self.loss_scale = Parameter(Tensor(np.float32(s.loss_scale_value)), name="loss_scale")
        self.good_steps = Parameter(Tensor(np.int32(0)), name="loss_scale_good_steps")
        self.dynamic = s.loss_scale_dynamic
        self.factor = float(s.loss_scale_factor)
        self.window = int(s.loss_scale_window)
        self.clip = s.clip_grad
        self.max_norm = float(s.max_grad_norm)
        self.parallel = parallel
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
            self.accumulate = AccumulateCell(self)

    def construct(self, input_ids, labels):
        scale = self.loss_scale * 1.0
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale)
        if self.accum_steps > 1:
            grads = tuple(ops.cast(g, ms.float32) + a for g, a in zip(grads, self.accu_grads))
            loss = (loss + self.accu_loss) / self.accum_steps
            for a in self.accu_grads:
                grads = ops.depend(grads, ops.assign(a, ops.zeros_like(a)))
            loss = ops.depend(loss, ops.assign(self.accu_loss, ops.zeros_like(self.accu_loss)))
        if self.parallel:
            grads = self.reducer(grads)
            loss = self.allreduce(loss) / self.degree
        grads = tuple(ops.cast(g, ms.float32) for g in grads)
        # the norm of the scaled gradients divided by the scale, then one multiply per gradient that unscales
        # and clips together (a float32 overflow of the scaled squares needs an unscaled norm near
        # 1.8e19 / scale, and is handled like any overflow); accumulated gradients are sums: / N as well
        norm = ops.sqrt(sum_squares(grads)) / (scale * self.accum_steps)
        overflow = ops.logical_not(ops.isfinite(norm))
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
        if not overflow:
            loss = ops.depend(loss, self.optimizer(grads))
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

    def construct(self, input_ids, labels):
        scale = self.loss_scale * 1.0
        loss = self.network(input_ids, labels)
        grads = self.grad(self.network, self.weights)(input_ids, labels, scale)
        for a, g in zip(self.accu_grads, grads):
            loss = ops.depend(loss, ops.assign_add(a, ops.cast(g, ms.float32)))
        return ops.depend(loss, ops.assign_add(self.accu_loss, loss))


# ---------------------------------------------------------------------------------------- checkpoints
_CKPT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


def _ckpt_dir(s: TrainSettings, rank: int) -> str:
    return os.path.join(s.output_dir, "checkpoint", f"rank_{rank}")


def find_checkpoints(directory: str, prefix: str) -> list:
    """``[(global step, path), ...]`` of ``<prefix>-<epoch>_<step>.ckpt`` files in ``directory``, oldest first."""
    from convert.ms_ckpt import MSCheckpoint
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _CKPT_NAME.match(name)
        if not m or m["prefix"] != prefix:
            continue
        path = os.path.join(directory, name)
        ck = MSCheckpoint(path)
        step = int(ck.read("step_num").reshape(-1)[0]) if "step_num" in ck else int(m["step"])
        found.append((step, path))
    return sorted(found)


def save_checkpoint(step_cell: TrainOneStepCell, s: TrainSettings, rank: int, step: int, per_epoch: int) -> str:
    """Write ``<prefix>-<epoch>_<step in epoch>.ckpt`` atomically; drop the oldest beyond ``keep_checkpoint_max``."""
    from convert.ms_ckpt import save_ms_checkpoint
    directory = _ckpt_dir(s, rank)
    epoch, in_epoch = (step - 1) // per_epoch + 1, (step - 1) % per_epoch + 1
    path = os.path.join(directory, f"{s.ckpt_prefix}-{epoch}_{in_epoch}.ckpt")
    opt = step_cell.optimizer
    model = step_cell.network.model
    full = s.save_full_weights or s.pet["pet_type"] == "full"

    def tensors():
        for p in model.get_parameters():
            if full or p.requires_grad:
                yield p.name, p.asnumpy()
        for m in list(opt.moments1) + list(opt.moments2):
            yield m.name, m.asnumpy()
        yield "epoch_num", np.array([epoch], np.int32)
        yield "step_num", np.array([step], np.int32)
        yield "global_step", opt.global_step.asnumpy().astype(np.int32).reshape(1)
        yield "loss_scale", np.array([step_cell.loss_scale.asnumpy()], np.float32).reshape(1)
        yield "loss_scale_good_steps", np.array([step_cell.good_steps.asnumpy()], np.int32).reshape(1)

    save_ms_checkpoint(tensors(), path)
    for _, old in find_checkpoints(directory, s.ckpt_prefix)[:-max(1, s.keep_max)]:
        os.remove(old)
    return path


def load_checkpoint(path: str, step_cell: TrainOneStepCell) -> int:
    """Load weights, optimizer moments and loss-scale state of ``path`` into ``step_cell``; return the
    global step the checkpoint was written at."""
    from convert.ms_ckpt import MSCheckpoint
    ck = MSCheckpoint(path)
    opt = step_cell.optimizer
    targets = step_cell.network.model.param_dict()
    targets.update({m.name: m for m in list(opt.moments1) + list(opt.moments2)})
    targets.update({"global_step": opt.global_step, "loss_scale": step_cell.loss_scale,
                    "loss_scale_good_steps": step_cell.good_steps})
    for p in step_cell.weights:
        for prefix in ("adam_m.", "adam_v."):
            if prefix + p.name not in ck:
                raise RunConfigError(f"{path}: {prefix}{p.name}: missing (a checkpoint of another run?)")
    for name in ck.names:
        if name in ("epoch_num", "step_num"):
            continue
        if name not in targets:
            raise RunConfigError(f"{path}: {name}: not a parameter of this run's model")
        p = targets[name]
        value = ck.read(name)
        if p.shape == () or tuple(p.shape) != tuple(value.shape):
            if value.size != int(np.prod(p.shape)):
                raise RunConfigError(f"{path}: {name}: shape {value.shape} does not match {tuple(p.shape)}")
            value = value.reshape(p.shape)
        p.set_data(Tensor(np.ascontiguousarray(value), p.dtype))
    return int(ck.read("step_num").reshape(-1)[0])


# ---------------------------------------------------------------------------------------- training
def init_ranks(s: TrainSettings) -> tuple:
    """``(rank, world size)``: ``(0, 1)`` without ``use_parallel``, else from ``mindspore.communication``
    (initialised here: the launcher's dynamic cluster, msrun or the Ascend rank table)."""
    if not s.use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    init()
    return get_rank(), get_group_size()


def _parallel_init(s: TrainSettings) -> tuple:
    """``(rank, world size)``; with ``use_parallel`` initialise mindspore.communication and data parallel."""
    if not s.use_parallel:
        return 0, 1
    from mindspore.context import ParallelMode
    rank, world = init_ranks(s)
    if s.parallel_mode != 0:
        raise RunConfigError(f"{s.source}: parallel.parallel_mode: only 0 (data parallel) is run by this runner")
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=s.gradients_mean,
                                 device_num=world)
    return rank, world


def eval_loss(model, s: TrainSettings, tokenizer, samples) -> float:
    """Teacher-forced loss over ``samples`` (:func:`mindspore_glm.run.eval_samples`), the mean over their
    label tokens, in batches of ``eval_dataset.batch_size`` (torch_glm's ``eval_loss`` of ``evaluate``)."""
    from glm_common.data import build_train_features
    feats = build_train_features(samples, tokenizer, mode=s.feature_mode, max_source_length=s.eval_max_source_length,
                                 max_target_length=s.eval_max_target_length)
    total, count = 0.0, 0
    for lo in range(0, len(samples), s.eval_batch_size):
        ids = feats["input_ids"][lo:lo + s.eval_batch_size].astype(np.int32)
        labels = feats["labels"][lo:lo + s.eval_batch_size].astype(np.int32)
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(Tensor(ids), None, None, Tensor(labels))[0].asnumpy()) * n
        count += n
    return total / max(1, count)


def eval_perplexity(model, s: TrainSettings, tokenizer, samples) -> dict:
    """``metric.type: PerplexityMetric``: ``{"loss", "PPL"}`` over ``samples`` as mindformers computes it
    (:func:`glm_common.metrics.perplexity`: the mean of the batches' mean token losses)."""
    from glm_common.data import build_train_features
    from glm_common.metrics import perplexity
    feats = build_train_features(samples, tokenizer, mode=s.feature_mode, max_source_length=s.eval_max_source_length,
                                 max_target_length=s.eval_max_target_length)
    return perplexity(lambda ids, labels: float(model(Tensor(ids.astype(np.int32)), None, None,
                                                      Tensor(labels.astype(np.int32)))[0].asnumpy()),
                      feats, s.eval_batch_size)


def _log_eval(model, s: TrainSettings, tokenizer, step: int, log, rank: int, world: int) -> dict:
    """``do_eval``: eval loss and the generation metrics (:func:`mindspore_glm.run.evaluate`, shared over the
    ranks) of the model as it is at ``step``; a ``{"step", "eval_loss", "rouge-1", ...}`` row in the loss log."""
    from tqdm.auto import tqdm
    from mindspore_glm.run import eval_samples, evaluate
    samples = eval_samples(s)
    model.set_train(False)
    try:
        result = {"eval_loss": eval_loss(model, s, tokenizer, samples)}
        if "PerplexityMetric" in s.metrics:
            result.update(eval_perplexity(model, s, tokenizer, samples))
        if "ADGENMetric" in s.metrics:
            result.update(evaluate(model, s, tokenizer, rank, world, samples)[0])
    finally:
        model.set_train(True)
    log.write({"step": step, **{k: round(float(v), 6) for k, v in result.items()}})
    if rank == 0:
        tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()), file=sys.stderr)
    return result


def _features(s: TrainSettings, tokenizer, progress: bool) -> dict:
    from glm_common.data import build_train_features, load_samples
    if not s.train_file:
        raise RunConfigError(f"{s.source}: train_dataset.data_loader.dataset_dir: missing (path to the training data)")
    return build_train_features(load_samples(s.train_file, s.data_format), tokenizer, mode=s.feature_mode,
                                max_source_length=s.max_source_length, max_target_length=s.max_target_length,
                                progress=progress)


def train(s: TrainSettings, model=None, params=None) -> dict:
    """Run the training of ``s``; return a summary (``steps``, ``losses``, ``first_loss``, ``last_loss``,
    ``skipped``, ``tokens_per_s``, ``log``, ``plot``, ``result`` (the last checkpoint), ``model``).

    ``model``/``params``: an already built model and its trainable parameters (:func:`build_model`).
    """
    if not s.vocab_file:
        raise RunConfigError(f"{s.source}: train_dataset.tokenizer.vocab_file: missing (path to tokenizer.model)")
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if s.context_mode == 0 else ms.PYNATIVE_MODE)
    try:
        return _train(s, model, params)
    finally:
        ms.set_context(mode=mode)


def _train(s: TrainSettings, model, params) -> dict:
    from tqdm.auto import tqdm
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from mindspore_glm.data import make_dataset
    rank, world = _parallel_init(s)
    ms.set_seed(s.seed)
    np.random.seed(s.seed)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(s.vocab_file)
    feats = _features(s, tokenizer, s.progress and rank == 0)
    if feats["input_ids"].shape[1] > s.config.seq_length:
        raise RunConfigError(f"{s.source}: model.model_config.seq_length: {s.config.seq_length} is less than "
                             f"max_source_length + max_target_length + 1 = {feats['input_ids'].shape[1]}")
    try:
        ds = make_dataset(feats, s.batch_size, shuffle=s.shuffle, seed=s.data_seed, rank=rank, world_size=world,
                          drop_remainder=s.drop_remainder, padding=s.padding)
    except ValueError as e:
        raise RunConfigError(f"{s.source}: runner_config.batch_size: {e}") from None
    per_epoch = len(ds.source) // s.grad_accum          # optimizer updates per epoch
    if per_epoch == 0:
        raise RunConfigError(f"{s.source}: runner_config.gradient_accumulation_steps: {s.grad_accum} is more than "
                             f"the {len(ds.source)} batches of an epoch")
    total = per_epoch * s.epochs if s.max_steps <= 0 else min(per_epoch * s.epochs, s.max_steps)
    lrs = learning_rates(s, schedule_total(s, per_epoch), length=total + 1)
    if model is None:
        model, params = build_model(s)
    model.set_train(True)
    optimizer = make_optimizer(params, s, lrs)
    step_cell = TrainOneStepCell(model, optimizer, s, parallel=world > 1)
    step_cell.set_train(True)
    step_fn = step_cell

    ckpt_dir = _ckpt_dir(s, rank)
    step = 0
    if s.resume:
        found = find_checkpoints(ckpt_dir, s.ckpt_prefix)
        if found:
            step = load_checkpoint(found[-1][1], step_cell)
            if rank == 0:
                print(f"resumed from {found[-1][1]} at step {step}", file=sys.stderr)
    os.makedirs(s.output_dir, exist_ok=True)
    log_path = os.path.join(s.output_dir, "loss_log.jsonl")
    log = LossLog(log_path, enabled=rank == 0)
    log.truncate(step)

    bar = tqdm(total=total, initial=step, desc="train", disable=not (s.progress and rank == 0), dynamic_ncols=True)
    losses: list = []
    skipped, tokens_done, last_path = 0, 0, None
    print_every = s.sink_size if s.sink_mode else s.print_every
    t0 = time.perf_counter()
    epoch = step // per_epoch
    while step < total:
        skip = (step - epoch * per_epoch) * s.grad_accum       # batches of this epoch already trained on
        ds.source.set_epoch(epoch)
        micro = 0
        for k, (input_ids, labels) in enumerate(ds.create_tuple_iterator(num_epochs=1, output_numpy=True)):
            if k < skip:
                continue
            if step >= total or k >= per_epoch * s.grad_accum:
                break
            if micro == 0:
                t_step, n_tok = time.perf_counter(), 0
            n_tok += int(input_ids.size) * world
            batch = (Tensor(input_ids.astype(np.int32)), Tensor(labels.astype(np.int32)))
            micro += 1
            if micro < s.grad_accum:
                step_cell.accumulate(*batch)
                continue
            micro = 0
            applied = int(optimizer.global_step.asnumpy().reshape(-1)[0])
            lr = float(lrs[min(applied, len(lrs) - 1)])
            loss, overflow, scale, norm = step_fn(*batch)
            loss, overflow, scale = float(loss.asnumpy()), bool(overflow.asnumpy()), float(scale.asnumpy())
            step += 1
            if not np.isfinite(loss) and not s.loss_scale_dynamic:
                bar.close()
                raise TrainingError(f"step {step}: loss is {loss} under a fixed loss scale ({scale:g}); stopping "
                                    f"(lower lr_schedule.learning_rate or use DynamicLossScaleUpdateCell)")
            if overflow:
                skipped += 1
                if rank == 0:
                    tqdm.write(f"step {step}: gradient overflow at loss scale {scale:g}, update skipped", file=sys.stderr)
            tokens_done += n_tok
            dt = time.perf_counter() - t_step
            losses.append(loss)
            log.write({"step": step, "epoch": epoch, "loss": round(loss, 6) if np.isfinite(loss) else None,
                       "lr": lr, "loss_scale": scale, "overflow": overflow,
                       "grad_norm": round(float(norm.asnumpy()), 6) if not overflow else None,
                       "tokens_per_s": round(n_tok / dt, 1) if dt > 0 else None, "tokens": tokens_done,
                       "time": round(time.perf_counter() - t0, 3)})
            bar.update(1)
            if step % max(1, print_every) == 0:
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", scale=f"{scale:g}")
            if s.save_steps and step % s.save_steps == 0:
                last_path = save_checkpoint(step_cell, s, rank, step, per_epoch)
            if s.do_eval and s.eval_step_interval > 0 and step % s.eval_step_interval == 0 and step < total:
                _log_eval(model, s, tokenizer, step, log, rank, world)
        epoch += 1
    bar.close()
    elapsed = time.perf_counter() - t0
    eval_result = _log_eval(model, s, tokenizer, step, log, rank, world) if s.do_eval and step else None
    if step and (last_path is None or not last_path.endswith(_name_for(s, step, per_epoch))):
        last_path = save_checkpoint(step_cell, s, rank, step, per_epoch)
    finite = [x for x in losses if np.isfinite(x)]
    summary = {"steps": step, "losses": losses, "first_loss": finite[0] if finite else None,
               "last_loss": finite[-1] if finite else None, "skipped": skipped,
               "tokens_per_s": tokens_done / elapsed if elapsed > 0 else 0.0, "log": log_path,
               "result": last_path, "plot": None, "model": model, "eval": eval_result}
    if rank == 0:
        if os.path.isfile(log_path):
            summary["plot"] = plot_losses(log_path, os.path.join(s.output_dir, "loss_curve.png"))
        print(summary_line(len(losses), summary["first_loss"], summary["last_loss"], summary["tokens_per_s"],
                           elapsed, skipped, last_path), file=sys.stderr)
    return summary


def _name_for(s: TrainSettings, step: int, per_epoch: int) -> str:
    return f"{s.ckpt_prefix}-{(step - 1) // per_epoch + 1}_{(step - 1) % per_epoch + 1}.ckpt"
