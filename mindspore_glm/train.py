"""Fine-tuning in MindSpore: a GRAPH-mode train step driven by the mindformers-shaped run YAML.

The twin of ``torch_glm/train.py``; settings, schedules and the loss log are shared
(:mod:`glm_common.run_config`, :mod:`glm_common.schedules`, :mod:`glm_common.train_log`).

One optimizer update is one call of :class:`mindspore_glm.train_step.TrainOneStepCell` (compiled once per batch shape):
forward and loss, gradients of the trainable parameters scaled by the loss scale, the data-parallel
gradient mean (``use_parallel``), unscaling, an overflow check, clipping by global norm, and
``nn.AdamWeightDecay`` with the learning-rate array of :func:`glm_common.schedules.learning_rates`
(indexed by the optimizer's ``global_step``: skipped updates do not advance it). With a dynamic loss
scale an overflow skips the update and halves the scale (mindformers' ``DynamicLossScaleUpdateCell``);
with a fixed scale a NaN/Inf loss stops the run with its step number, and
``runner_wrapper.max_consecutive_overflows`` (default 20) overflows in a row stop it too
(:class:`glm_common.training.OverflowStreak`). Moments and the weights the optimizer updates are float32
whatever ``param_init_type`` (:func:`mindspore_glm.train_step.make_optimizer`). With
``runner_config.gradient_accumulation_steps`` N an update takes N micro-batches of ``batch_size``
(:class:`AccumulateCell` for the first N-1), the loss and gradients being their mean. ``do_eval`` adds
the eval loss and rouge/bleu rows (``{"step", "eval_loss", "rouge-1", ...}``) to the loss log every
``eval_step_interval`` updates and after the last one.

What trains (``pet_config``): LoRA matrices (:mod:`mindspore_glm.lora`), the P-tuning v2 prefix encoder
(:mod:`mindspore_glm.prefix`) or, without ``pet_config``, every weight. Checkpoints go where mindformers
puts them, ``<output_dir>/checkpoint/rank_<N>/<prefix>-<epoch>_<step in epoch>.ckpt``: the trainable
weights (all weights with ``save_full_weights`` or full fine-tuning), the optimizer moments
(``adam_m.*``, ``adam_v.*``) and ``epoch_num``, ``step_num``, ``global_step``, ``loss_scale``,
``loss_scale_good_steps`` and, last, the run record ``world_size`` / ``rank_id``; ``resume_training``
continues on the same loss trajectory (with dropout 0: MindSpore's dropout kernels keep their random state
to themselves) from the newest step every rank holds complete, files that do not verify skipped with a
line saying so (:mod:`mindspore_glm.resume`).
``<output_dir>/loss_log.jsonl`` gets one row a step (loss, lr, loss scale, tokens/s) and
``loss_curve.png`` the curve.
One run per ``output_dir``: the run holds its lock (:mod:`glm_common.run_lock`; a second run there is refused
in one line naming the first, a lock left by a dead run is taken over with a note).
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional

import numpy as np
import mindspore as ms
from mindspore import Tensor
from tqdm.auto import tqdm

from glm_common.names import is_pet_name
from glm_common.run_config import RunConfigError, TrainSettings
from glm_common.run_lock import output_lock
from glm_common.schedules import learning_rates, schedule_total
from glm_common.tokenizer import ChatGLM2Tokenizer
from glm_common.train_log import LossLog, plot_losses, summary_line
from glm_common.training import (OverflowStreak, TrainingError, check_output_dir, dataset_kwargs, eval_samples, loss_rank,
                                 total_updates, train_features, updates_per_epoch)
from mindspore_glm.checkpointing import checkpoint_dir, load_checkpoint, load_weights, save_checkpoint
from mindspore_glm.data import make_dataset
from mindspore_glm.evaluate import eval_loss, eval_perplexity, evaluate
from mindspore_glm.lora import apply_pet
from mindspore_glm.model import ChatGLM2ForConditionalGeneration
from mindspore_glm.parallel import check_scaleout, configure_model, dataset_split, init_parallel, semi_auto
from mindspore_glm.resume import resume_checkpoint
from mindspore_glm.train_step import TrainOneStepCell, make_optimizer

__all__ = ["TrainingError", "init_ranks", "build_model", "build_step", "train_data", "train", "set_context", "init_weights"]


# ---------------------------------------------------------------------------------------- setup
def set_context(s: TrainSettings, device_id: Optional[int] = None) -> None:
    """``mindspore.set_context`` from the YAML's ``context`` (mode, device_target, device_id, memory)."""
    kw = dict(mode=ms.GRAPH_MODE if s.context_mode == 0 else ms.PYNATIVE_MODE, device_target=s.device_target)
    if s.device_target != "CPU":
        kw["device_id"] = s.device_id if device_id is None else device_id
        if s.max_device_memory:
            kw["max_device_memory"] = s.max_device_memory
    try:
        ms.set_context(**kw)
    except (RuntimeError, ValueError) as e:  # e.g. GPU on a MindSpore build without it
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunConfigError(f"{s.source}: context.device_target: {s.device_target}: this MindSpore cannot use it "
                             f"({first[:200]})") from None


def init_weights(model, seed: int = 0) -> None:
    """Random initialisation for a run without ``load_checkpoint``: norms 1, biases 0, other weights
    N(0, 0.02), drawn with numpy from ``seed`` in parameter order."""
    rng = np.random.default_rng(seed)
    for p in model.get_parameters():
        if is_pet_name(p.name):
            continue
        if "layernorm" in p.name:
            value = np.ones(p.shape, np.float32)
        elif p.name.endswith("bias"):
            value = np.zeros(p.shape, np.float32)
        else:
            value = rng.normal(0.0, 0.02, p.shape).astype(np.float32)
        p.set_data(Tensor(value, p.dtype))


def build_model(s: TrainSettings, adapter: str = "", weights: bool = True):
    """The model of ``s`` with ``pet_config`` applied: weights from ``s.load_checkpoint`` (an HF directory or
    a ``.ckpt``, which may hold LoRA/prefix weights too; random when empty), then ``adapter`` (a checkpoint
    holding only LoRA/prefix weights, e.g. of a LoRA run) over them. Returns ``(model, trainable params)``.

    ``weights=False``: the same cells with their parameters left uninitialised (MindSpore's lazy
    ``initializer``, no host memory): for a compile that never runs the step (:mod:`mindspore_glm.dryrun`)."""
    if s.pet["pet_type"] == "qlora":
        raise RunConfigError(f"{s.source}: pet_config.pet_type: qlora needs CUDA (torch_glm); use lora here")
    # MindSpore's nn.Dropout takes its kernel seeds from the global seed when it is constructed (no global
    # seed: (0, 0), a random seed every run); seeded here, the dropout masks repeat from run to run (the twin
    # seeds torch here too)
    ms.set_seed(s.seed)
    if not weights:
        from mindspore_glm.model import lazy_parameters
        with lazy_parameters():
            model, params = apply_pet(ChatGLM2ForConditionalGeneration(s.config, s.options), s.pet, s.seed)
        configure_model(model, s)
        return model, params
    path = s.load_checkpoint
    if path and not os.path.exists(path):
        raise RunConfigError(f"{s.source}: load_checkpoint: {path}: no such file or directory")
    if path and os.path.isdir(path):
        model = ChatGLM2ForConditionalGeneration.from_pretrained(path, config=s.config, options=s.options)
        model, params = apply_pet(model, s.pet, s.seed)
    else:
        model = ChatGLM2ForConditionalGeneration(s.config, s.options)
        model, params = apply_pet(model, s.pet, s.seed)
        if path:
            load_weights(model, path, strict=True)
        else:
            init_weights(model, s.seed)
    if adapter:
        load_weights(model, adapter, strict=False)
    configure_model(model, s)
    return model, params



# ---------------------------------------------------------------------------------------- training
def build_step(model, params, s: TrainSettings, lrs, world: int) -> tuple:
    """``(optimizer, train-step cell)`` of a run of ``world`` ranks: what :func:`train` calls each update
    (and :mod:`mindspore_glm.dryrun` compiles)."""
    optimizer = make_optimizer(params, s, lrs)
    step_cell = TrainOneStepCell(model, optimizer, s, parallel=world > 1 and not semi_auto(s))
    step_cell.set_train(True)
    return optimizer, step_cell


def init_ranks(s: TrainSettings) -> tuple:
    """``(rank, world size)``: ``(0, 1)`` without ``use_parallel``, else from ``mindspore.communication``
    (initialised here: the launcher's dynamic cluster, msrun or the Ascend rank table)."""
    if not s.use_parallel:
        return 0, 1
    from mindspore.communication import get_group_size, get_rank, init
    try:
        init()
    except RuntimeError as e:  # no launcher: MindSpore finds no cluster environment
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunConfigError(f"{s.source}: use_parallel: True needs a launcher (bash scripts/run_distribute.sh, "
                             f"msrun or mpirun); for one device pass --use_parallel False ({first[:160]})") from None
    return get_rank(), get_group_size()


def _parallel_init(s: TrainSettings) -> tuple:
    """``(rank, world size)``; with ``use_parallel`` initialise mindspore.communication and the parallel
    context of the YAML (data parallel or semi-auto, :func:`mindspore_glm.parallel.init_parallel`)."""
    if not s.use_parallel:
        return 0, 1
    check_scaleout(s)
    rank, world = init_ranks(s)
    init_parallel(s, world, rank)
    return rank, world


def train_data(s: TrainSettings, tokenizer, rank: int = 0, world: int = 1, progress: bool = False):
    """The training batches of ``s`` for this rank: a ``GeneratorDataset`` (:func:`mindspore_glm.data.make_dataset`)
    over :func:`glm_common.training.train_features` with :func:`glm_common.training.dataset_kwargs` (the
    YAML's ``data_format``, ``feature_mode``, ``padding``, seeds and sharding; with ``parallel.full_batch``
    every rank reads the whole global batch, :func:`mindspore_glm.parallel.dataset_split`)."""
    feats = train_features(s, tokenizer, progress)
    ds_rank, ds_world, ds_batch = dataset_split(s, rank, world)
    try:
        return make_dataset(feats, ds_batch, **dataset_kwargs(s, ds_rank, ds_world))
    except ValueError as e:
        raise RunConfigError(f"{s.source}: runner_config.batch_size: {e}") from None


def _log_eval(model, s: TrainSettings, tokenizer, step: int, log, rank: int, world: int) -> dict:
    """``do_eval``: eval loss and the generation metrics (:func:`mindspore_glm.evaluate.evaluate`, shared over
    the ranks) of the model as it is at ``step``; a ``{"step", "eval_loss", "rouge-1", ...}`` row in the loss log."""
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


def train(s: TrainSettings, model=None, params=None) -> dict:
    """Run the training of ``s``; return a summary (``steps``, ``losses``, ``first_loss``, ``last_loss``,
    ``skipped``, ``tokens_per_s``, ``log``, ``plot``, ``result`` (the last checkpoint), ``model``).

    ``model``/``params``: an already built model and its trainable parameters (:func:`build_model`).
    """
    if not s.vocab_file:
        raise RunConfigError(f"{s.source}: train_dataset.tokenizer.vocab_file: missing (path to tokenizer.model)")
    check_output_dir(s)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE if s.context_mode == 0 else ms.PYNATIVE_MODE)
    try:
        return _train(s, model, params)
    finally:
        ms.set_context(mode=mode)


def _train(s: TrainSettings, model, params) -> dict:
    check_scaleout(s)
    rank, world = _parallel_init(s)
    with output_lock(s.output_dir, rank):  # one run per output_dir (glm_common.run_lock)
        return _train_locked(s, model, params, rank, world)


def _train_locked(s: TrainSettings, model, params, rank: int, world: int) -> dict:
    ds_world = dataset_split(s, rank, world)[1]               # ranks reading distinct rows
    ms.set_seed(s.seed)
    np.random.seed(s.seed)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(s.vocab_file)
    ds = train_data(s, tokenizer, rank, world, s.progress and rank == 0)
    per_epoch = updates_per_epoch(s, len(ds.source))          # optimizer updates per epoch
    total = total_updates(s, per_epoch)
    lrs = learning_rates(s, schedule_total(s, per_epoch), length=total + 1)
    if model is None:
        model, params = build_model(s)
    model.set_train(True)
    optimizer, step_cell = build_step(model, params, s, lrs, world)
    step_fn = step_cell

    ckpt_dir = checkpoint_dir(s, rank)
    step = 0
    if s.resume:  # the newest step every rank holds complete (glm_common.resume), said in one line
        path = resume_checkpoint(ckpt_dir, s.ckpt_prefix, per_epoch, rank, world)
        if path:
            step = load_checkpoint(path, step_cell)
    os.makedirs(s.output_dir, exist_ok=True)
    log_path = os.path.join(s.output_dir, "loss_log.jsonl")
    # the rank holding the loss: under pipeline stages MindSpore returns it on the last stage only
    writer = loss_rank(world, s.pipeline_stage if semi_auto(s) else 1)
    log = LossLog(log_path, enabled=rank == writer)
    log.truncate(step)

    bar = tqdm(total=total, initial=step, desc="train", disable=not (s.progress and rank == writer),
               dynamic_ncols=True)
    losses: list = []
    skipped, tokens_done, last_path = 0, 0, None
    streak = OverflowStreak(s.max_consecutive_overflows)
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
            n_tok += int(input_ids.size) * ds_world
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
                if rank == writer:
                    tqdm.write(f"step {step}: gradient overflow at loss scale {scale:g}, update skipped", file=sys.stderr)
            tokens_done += n_tok
            dt = time.perf_counter() - t_step
            losses.append(loss)
            log.write({"step": step, "epoch": epoch, "loss": round(loss, 6) if np.isfinite(loss) else None,
                       "lr": lr, "loss_scale": scale, "overflow": overflow,
                       "grad_norm": round(float(norm.asnumpy()), 6) if not overflow else None,
                       "tokens_per_s": round(n_tok / dt, 1) if dt > 0 else None, "tokens": tokens_done,
                       "time": round(time.perf_counter() - t0, 3)})
            try:
                streak.update(step, overflow, scale)
            except TrainingError:
                bar.close()
                raise
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
    if rank == writer:
        if os.path.isfile(log_path):
            summary["plot"] = plot_losses(log_path, os.path.join(s.output_dir, "loss_curve.png"))
        print(summary_line(len(losses), summary["first_loss"], summary["last_loss"], summary["tokens_per_s"],
                           elapsed, skipped, last_path), file=sys.stderr)
    return summary


def _name_for(s: TrainSettings, step: int, per_epoch: int) -> str:
    return f"{s.ckpt_prefix}-{(step - 1) // per_epoch + 1}_{(step - 1) % per_epoch + 1}.ckpt"
