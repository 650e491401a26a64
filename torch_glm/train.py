"""Fine-tuning in PyTorch, driven by the mindformers-shaped run YAML (command: ``python -m torch_glm.run``,
``python -m torch_glm.train`` or ``glm2-train``; see :mod:`torch_glm.run`).

The twin of ``mindspore_glm/train.py``: the features, batches, step budget and eval set come from the
same :mod:`glm_common.training` functions, so the same YAML trains both backends on the same batches.

Reads the mindformers-shaped run YAML the MindSpore runner reads (:mod:`glm_common.run_config`), where the
keys mean the same thing:

* ``model.model_config`` (:meth:`ChatGLM2Config.from_model_config`) and its ``pet_config``
  (``pet_type: lora|ptuning2|qlora``; none = full fine-tuning); a top-level ``pet_config`` also works;
* ``load_checkpoint``: the HF directory of the base weights (empty: random initialisation);
* ``train_dataset`` / ``eval_dataset``: ``data_loader.dataset_dir``, ``data_loader.format``,
  ``data_loader.mode`` (feature mode), ``padding``, ``data_loader.shuffle``,
  ``tokenizer.vocab_file``, ``max_source_length``, ``max_target_length``, ``batch_size``,
  ``drop_remainder``; ``do_eval``, ``eval_step_interval``; ``eval_dataset.num_samples`` bounds the
  generation metrics (rouge-1/2/l, bleu-4 of :mod:`glm_common.metrics`);
* ``runner_config``: ``epochs``, ``batch_size``, ``gradient_accumulation_steps`` (``max_steps`` caps
  the optimizer steps); ``runner_wrapper``: ``use_clip_grad``, ``max_grad_norm``;
* ``optimizer``: ``type`` AdamWeightDecay / FusedAdamWeightDecay / FP32StateAdamWeightDecay (MindSpore's
  formula, no bias correction: :class:`AdamWeightDecay`) or AdamW (``torch.optim.AdamW``), ``beta1``,
  ``beta2``, ``eps``, ``weight_decay`` (not on norms and biases), ``learning_rate``;
* ``lr_schedule``: ``type`` linear / cosine / polynomial / constant (or mindformers' class names),
  ``learning_rate``, ``lr_end``, ``warmup_steps`` or ``warmup_ratio``, ``total_steps`` (-1: all),
  ``power``;
* ``callbacks``: ``MFLossMonitor`` (``per_print_times``), ``CheckpointMonitor`` (``prefix``,
  ``save_checkpoint_steps``, ``keep_checkpoint_max``);
* ``seed``, ``output_dir``, ``resume_training``.

Writes into ``output_dir``: ``loss_log.jsonl`` (one JSON object a step, eval rows too),
``loss_curve.png``, ``checkpoint/<prefix>_step_<N>/`` (weights that train, optimizer, scheduler,
RNG, data position, world size, rank and step, in safetensors + JSON, no pickle: resuming continues the
same loss trajectory from the newest step every rank holds complete, :mod:`torch_glm.resume`) and the
result: ``adapter/`` (LoRA, a peft adapter directory), ``prefix/`` (P-tuning:
``prefix_encoder.safetensors`` + ``config.json``) or ``model/`` (full: HF layout). Under ``torchrun`` it trains with DDP (gloo on CPU, nccl on CUDA);
rank 0 writes. On CUDA, ``model_config.compute_dtype`` float16/bfloat16 turns on autocast. Weights are kept
in ``model_config.param_init_type``, the optimizer's states and master weights in float32
(:func:`torch_glm.train_step.make_optimizer`); float16 gradients take the YAML's dynamic loss scale
(``torch.amp.GradScaler``), an update with a non-finite gradient or loss is skipped and logged as an
overflow, and ``runner_wrapper.max_consecutive_overflows`` of them in a row stop the run.
One run per ``output_dir``: the run holds its lock (:mod:`glm_common.run_lock`; a second run there is refused
in one line naming the first, a lock left by a dead run is taken over with a note).
With ``parallel.enable_parallel_optimizer: True`` under ``torchrun`` it shards parameters, gradients and
optimizer states with FSDP2 instead (:mod:`torch_glm.parallel`: DCP checkpoints, streamed ``model/``);
then every rank takes part in checkpoints, evaluation and the result (collectives), rank 0 writes the log.
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from typing import Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from glm_common.run_config import RunConfigError, TrainSettings, load_run_config, settings_from_config
from glm_common.run_lock import output_lock
from glm_common.schedules import learning_rates, lr_at, schedule_total
from glm_common.tokenizer import ChatGLM2Tokenizer
from glm_common.train_log import LossLog, plot_losses, summary_line
from glm_common.training import (OverflowStreak, TrainingError, check_output_dir, dataset_kwargs, eval_samples,
                                 total_updates, train_features, updates_per_epoch)
from torch_glm.checkpointing import base_model, checkpoint_dir, load_checkpoint, save_checkpoint, save_result
from torch_glm.data import make_dataloader
from torch_glm.evaluate import eval_loss, eval_perplexity, evaluate
from torch_glm import parallel as _parallel
from torch_glm.lora import apply_pet
from torch_glm.model import ChatGLM2ForConditionalGeneration
from torch_glm.resume import resume_checkpoint
from torch_glm.train_step import AdamWeightDecay, make_optimizer, master_grads, master_weights_to_model

__all__ = ["TrainingError", "init_ranks", "build_model", "train_data", "train"]

#: names this module exported before the split (``from torch_glm.train import ...`` keeps working)
_REEXPORTED = (RunConfigError, TrainSettings, load_run_config, settings_from_config, lr_at, AdamWeightDecay,
               make_optimizer)


# ---------------------------------------------------------------------------------------- model
def build_model(s: TrainSettings, device="cpu") -> tuple:
    """The model of ``s`` (weights from ``load_checkpoint``, an HF directory, or random) with the PET method
    of ``s.pet`` applied, on ``device``. Returns ``(model, trainable parameters)``; the model is the peft
    wrapper for (Q)LoRA."""
    torch.manual_seed(s.seed)
    if s.load_checkpoint:
        model = ChatGLM2ForConditionalGeneration.from_pretrained(s.load_checkpoint, config=s.config)
    else:
        model = ChatGLM2ForConditionalGeneration(s.config)
    if s.pet["pet_type"] != "qlora":
        # model_config.param_init_type: the dtype the weights are kept in (float32 masters in the optimizer)
        model.to(device=device, dtype=getattr(torch, s.options.param_init_type))
    model, params = apply_pet(model, s.pet)
    if s.gradient_checkpointing:
        base = base_model(model)
        base.gradient_checkpointing_enable()
        if s.pet["pet_type"] != "full":
            base.enable_input_require_grads()
    return model, params


# ---------------------------------------------------------------------------------------- training
def init_ranks(s: TrainSettings) -> tuple:
    """``(rank, world size)``: ``(0, 1)`` unless started by ``torchrun`` with ``WORLD_SIZE > 1``, in which
    case the process group is initialised here (nccl on CUDA, gloo on CPU). ``s`` is not read: torchrun's
    environment decides (MindSpore's twin reads ``use_parallel``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def train_data(s: TrainSettings, tokenizer, rank: int = 0, world: int = 1, progress: bool = False):
    """The training batches of ``s`` for this rank: a ``DataLoader`` (:func:`torch_glm.data.make_dataloader`)
    over :func:`glm_common.training.train_features` with :func:`glm_common.training.dataset_kwargs` (the
    YAML's ``data_format``, ``feature_mode``, ``padding``, seeds and sharding), ``num_workers`` workers."""
    feats = train_features(s, tokenizer, progress)
    try:
        loader = make_dataloader(feats, s.batch_size, **dataset_kwargs(s, rank, world), num_workers=s.num_workers)
    except ValueError as e:
        raise RunConfigError(f"{s.source}: runner_config.batch_size: {e}") from None
    # DataLoader draws a base seed from the global RNG at every iter(); a private generator keeps the
    # global RNG (dropout) on the same sequence whether a run is resumed or not
    loader.generator = torch.Generator().manual_seed(s.seed)
    return loader


def train(s: TrainSettings, model=None, params=None, device: Optional[str] = None) -> dict:
    """Run the training loop of ``s``; return a summary (steps, first/last loss, tokens/s, paths).

    ``model``/``params``: an already built model and its trainable parameters (:func:`build_model`), e.g.
    one whose LoRA matrices were set (``params`` None: the parameters that require grad). ``device``:
    cpu, cuda, cuda:1 ... (default: this rank's GPU when there is one).
    """
    rank, world = init_ranks(s)
    with output_lock(s.output_dir, rank):  # one run per output_dir (glm_common.run_lock)
        return _train_locked(s, model, params, device, rank, world)


def _train_locked(s: TrainSettings, model, params, device: Optional[str], rank: int, world: int) -> dict:
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if not s.vocab_file:
        raise RunConfigError("train_dataset.tokenizer.vocab_file: missing (path to the tokenizer.model)")
    check_output_dir(s)
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(s.vocab_file)
    loader = train_data(s, tokenizer, rank, world, s.progress and rank == 0)
    per_epoch = updates_per_epoch(s, len(loader))
    total = total_updates(s, per_epoch)
    lrs = learning_rates(s, schedule_total(s, per_epoch))

    if model is None:
        model, params = build_model(s, device)
    model.train()
    train_model = model
    fsdp = _parallel.fsdp_requested(s, world)
    if fsdp:
        _parallel.shard_model(model, s, device)
    elif world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.startswith("cuda") else None)
    optimizer = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], s, lrs)
    scheduler = optimizer.lr_scheduler
    step, start_epoch, skip = 0, 0, 0
    os.makedirs(s.output_dir, exist_ok=True)
    log_path = os.path.join(s.output_dir, "loss_log.jsonl")
    if s.resume:  # the newest step every rank holds complete (glm_common.resume), said in one line
        path = resume_checkpoint(checkpoint_dir(s, rank), s.ckpt_prefix, rank, world)
        if path:
            state = (_parallel.load_checkpoint if fsdp else load_checkpoint)(path, model, optimizer, scheduler)
            step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
    log = LossLog(log_path, enabled=rank == 0)
    log.truncate(step)  # keep the log consistent with the step we (re)start from

    use_amp = device.startswith("cuda") and s.compute_dtype in ("float16", "bfloat16")
    amp_dtype = getattr(torch, s.compute_dtype) if use_amp else None
    fp16 = (use_amp and s.compute_dtype == "float16") or any(
        p.dtype == torch.float16 for p in model.parameters() if p.requires_grad)
    # float16 gradients: the YAML's loss scale (runner_wrapper.scale_sense), dynamic as MindSpore's
    scaler = None
    if fp16 and s.loss_scale_dynamic:
        scaler = torch.amp.GradScaler(device.split(":")[0], init_scale=s.loss_scale_value,
                                      growth_factor=s.loss_scale_factor, backoff_factor=1.0 / s.loss_scale_factor,
                                      growth_interval=s.loss_scale_window)
    elif use_amp and s.compute_dtype == "float16":
        scaler = torch.amp.GradScaler("cuda")
    streak = OverflowStreak(s.max_consecutive_overflows)
    bar = tqdm(total=total, initial=step, desc="train", disable=not (s.progress and rank == 0), dynamic_ncols=True)
    _parallel.reset_peak_memory(device)  # summary["memory"]: the training loop's peak
    state_mem = None
    first_loss = last_loss = None
    tokens_done, t0 = 0, time.perf_counter()
    losses: list[float] = []
    epoch = start_epoch
    while step < total and epoch < s.epochs:
        loader.sampler.set_epoch(epoch)
        micro, acc_loss = 0, 0.0
        for k, batch in enumerate(loader):
            if epoch == start_epoch and k < skip:
                continue
            if k >= per_epoch * s.grad_accum or step >= total:
                break
            batch = {n: v.to(device) for n, v in batch.items()}
            sync = (micro + 1) == s.grad_accum
            ctx = train_model.no_sync() if world > 1 and not sync and not fsdp else _null()
            with ctx, torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=use_amp):
                loss = train_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            scaled = loss / s.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            acc_loss += loss.item() / s.grad_accum
            tokens_done += batch["input_ids"].numel()
            micro += 1
            if not sync:
                continue
            master_grads(optimizer)         # float16/bfloat16 weights: float32 gradients of the masters
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.clip_grad else float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            scale = scaler.get_scale() if scaler else None
            if scaler:
                scaler.step(optimizer)      # skipped when a gradient is not finite; the scale then drops
                scaler.update()
                overflow = scaler.get_scale() < scale
            else:
                overflow = not (math.isfinite(acc_loss) and math.isfinite(_parallel.grad_norm_value(grad_norm)))
                if not overflow:
                    optimizer.step()
            if not overflow:
                master_weights_to_model(optimizer)
            state_mem = state_mem or _parallel.state_bytes(model, optimizer)
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            step += 1
            micro = 0
            step_loss = acc_loss
            if world > 1:
                t = torch.tensor([step_loss], device=device)
                torch.distributed.all_reduce(t)
                step_loss = t.item() / world
            acc_loss = 0.0
            if math.isfinite(step_loss):
                first_loss = step_loss if first_loss is None else first_loss
                last_loss = step_loss
            losses.append(step_loss)
            if rank == 0:
                finite = math.isfinite(step_loss)
                row = {"step": step, "epoch": epoch, "loss": round(step_loss, 6) if finite else None, "lr": lr,
                       "overflow": overflow, "grad_norm": None if overflow else
                       round(_parallel.grad_norm_value(grad_norm), 6), "tokens": tokens_done * world,
                       "time": round(time.perf_counter() - t0, 3)}
                if scale is not None:
                    row["loss_scale"] = scale
                log.write(row)
                bar.update(1)
                if step % max(1, s.print_every) == 0:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if s.save_steps and step % s.save_steps == 0 and not fsdp:
                    save_checkpoint(model, optimizer, scheduler, s, step, epoch, k + 1)
                if s.do_eval and s.eval_step_interval > 0 and step % s.eval_step_interval == 0 and not fsdp:
                    _log_eval(model, s, tokenizer, step, log)
            try:
                streak.update(step, overflow, scale)
            except TrainingError:
                bar.close()
                raise
            if fsdp and s.save_steps and step % s.save_steps == 0:  # collective: every rank writes its shards
                _parallel.save_checkpoint(model, optimizer, scheduler, s, step, epoch, k + 1)
            if fsdp and s.do_eval and s.eval_step_interval > 0 and step % s.eval_step_interval == 0:
                _log_eval(model, s, tokenizer, step, log)  # collective; the log writes on rank 0 only
        epoch += 1
        skip = 0
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "losses": losses,
               "tokens_per_s": tokens_done * world / elapsed if elapsed > 0 else 0.0, "log": log_path}
    summary["memory"] = _parallel.memory_report(state_mem, device)
    if fsdp:  # collective: every rank evaluates and gathers, rank 0 writes
        if s.do_eval:
            summary["eval"] = _log_eval(model, s, tokenizer, step, log)
        summary["result"] = _parallel.save_result(model, s, s.output_dir)
    if rank == 0:
        if s.do_eval and not fsdp:
            summary["eval"] = _log_eval(model, s, tokenizer, step, log)
        if not fsdp:
            summary["result"] = save_result(model, s, s.output_dir)
        summary["plot"] = plot_losses(log_path, os.path.join(s.output_dir, "loss_curve.png"))
        print(summary_line(step, first_loss, last_loss, summary["tokens_per_s"], elapsed,
                           result=summary["result"]), file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
    summary["model"] = model
    return summary


def _log_eval(model, s: TrainSettings, tokenizer, step: int, log) -> dict:
    """``do_eval``: eval loss and the generation metrics of the model as it is at ``step``; a
    ``{"step", "eval_loss", "rouge-1", ...}`` row in the loss log."""
    was_training = model.training
    model.eval()
    try:
        samples = eval_samples(s)
        result = {"eval_loss": eval_loss(model, s, tokenizer, samples)}
        if "PerplexityMetric" in s.metrics:
            result.update(eval_perplexity(model, s, tokenizer, samples))
        if "ADGENMetric" in s.metrics:
            result.update(evaluate(model, s, tokenizer, 0, 1, samples)[0])
    finally:
        model.train(was_training)
    log.write({"step": step, **{k: round(float(v), 6) for k, v in result.items()}})
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":          # python -m torch_glm.train: the command of torch_glm.run
    import runpy
    runpy.run_module("torch_glm.run", run_name="__main__", alter_sys=True)
