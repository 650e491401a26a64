"""Fine-tuning entry point: ``python -m torch_glm.train --config RUN.yaml [overrides]``.

Reads the mindformers-shaped run YAML the MindSpore runner reads (:mod:`glm_common.run_config`), where the
keys mean the same thing:

* ``model.model_config`` (:meth:`ChatGLM2Config.from_model_config`) and its ``pet_config``
  (``pet_type: lora|ptuning2|qlora``; none = full fine-tuning); a top-level ``pet_config`` also works;
* ``load_checkpoint``: the HF directory of the base weights (empty: random initialisation);
* ``train_dataset`` / ``eval_dataset``: ``data_loader.dataset_dir``, ``data_loader.shuffle``,
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
RNG, data position: resuming continues the same loss trajectory) and the result: ``adapter/`` (LoRA,
a peft adapter directory), ``prefix/`` (P-tuning: ``prefix_encoder.safetensors`` + ``config.json``)
or ``model/`` (full: HF layout). Under ``torchrun`` it trains with DDP (gloo on CPU, nccl on CUDA);
rank 0 writes. On CUDA, ``model_config.compute_dtype`` float16/bfloat16 turns on autocast.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from typing import Optional

import numpy as np
import torch

from glm_common.config import ConfigError
from glm_common.run_config import RunConfigError, TrainSettings, load_run_config, settings_from_config
from glm_common.schedules import decays, learning_rates, lr_at, schedule_total
from glm_common.train_log import LossLog, plot_losses, summary_line

__all__ = ["TrainSettings", "RunConfigError", "load_run_config", "settings_from_config", "lr_at", "AdamWeightDecay",
           "make_optimizer", "build_model", "train", "main"]



class AdamWeightDecay(torch.optim.Optimizer):
    """MindSpore's ``nn.AdamWeightDecay`` (mindformers' AdamWeightDecay family) in torch: Adam without
    bias correction and decoupled weight decay, in float32 (see :mod:`glm_common.schedules`)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr * (m / (sqrt(v) + eps) + wd * p)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                pf = p.float()
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * pf
                p.copy_(pf - group["lr"] * update)


def make_optimizer(model, s: TrainSettings) -> torch.optim.Optimizer:
    """``torch.optim.AdamW`` for ``optimizer.type: AdamW`` (bias-corrected), else :class:`AdamWeightDecay`."""
    groups = _param_groups(model, s.weight_decay)
    if s.bias_correction:
        return torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)
    return AdamWeightDecay(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)


# ---------------------------------------------------------------------------------------- model
def build_model(s: TrainSettings, device="cpu"):
    """Base model (from ``load_checkpoint`` or random) with the PET method of ``s.pet`` applied."""
    from torch_glm.lora import apply_pet
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    torch.manual_seed(s.seed)
    if s.load_checkpoint:
        model = ChatGLM2ForConditionalGeneration.from_pretrained(s.load_checkpoint, config=s.config)
    else:
        model = ChatGLM2ForConditionalGeneration(s.config)
    if s.pet["pet_type"] != "qlora":
        model.to(device)
    model = apply_pet(model, s.pet)
    if s.gradient_checkpointing:
        base = _base(model)
        base.gradient_checkpointing_enable()
        if s.pet["pet_type"] != "full":
            base.enable_input_require_grads()
    return model


def _base(model):
    """The ChatGLM2ForConditionalGeneration inside a peft and/or DDP wrapper."""
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    for m in model.modules():
        if isinstance(m, ChatGLM2ForConditionalGeneration):
            return m
    raise TypeError("no ChatGLM2ForConditionalGeneration inside the model")


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _param_groups(model, weight_decay: float):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if decays(n, p.dim()) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


# ---------------------------------------------------------------------------------------- outputs
def save_result(model, s: TrainSettings, out_dir: str) -> str:
    """Write what the run produced (adapter / prefix / HF model directory); return its path."""
    from safetensors.torch import save_file
    from torch_glm.lora import save_lora
    from torch_glm.prefix import prefix_state_dict
    kind = s.pet["pet_type"]
    if kind in ("lora", "qlora"):
        path = os.path.join(out_dir, "adapter")
        save_lora(model, path)
        return path
    base = _base(model)
    if kind == "ptuning2":
        path = os.path.join(out_dir, "prefix")
        os.makedirs(path, exist_ok=True)
        tmp = os.path.join(path, "prefix_encoder.safetensors.tmp")
        save_file({k: v.contiguous().cpu() for k, v in prefix_state_dict(base).items()}, tmp, metadata={"format": "pt"})
        os.replace(tmp, os.path.join(path, "prefix_encoder.safetensors"))
        base.config.save_hf(path)
        return path
    path = os.path.join(out_dir, "model")
    base.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------------------- checkpoints
def _ckpt_dirs(out_dir: str, prefix: str) -> list[tuple[int, str]]:
    root = os.path.join(out_dir, "checkpoint")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        if name.startswith(prefix + "_step_") and os.path.isfile(os.path.join(root, name, "trainer_state.pt")):
            try:
                found.append((int(name.rsplit("_", 1)[1]), os.path.join(root, name)))
            except ValueError:
                continue
    return sorted(found)


def save_checkpoint(model, optimizer, scheduler, s: TrainSettings, step: int, epoch: int, batch_in_epoch: int) -> str:
    from safetensors.torch import save_file
    root = os.path.join(s.output_dir, "checkpoint")
    final = os.path.join(root, f"{s.ckpt_prefix}_step_{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_file({k: v.contiguous() for k, v in trainable_state(model).items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"step": step, "epoch": epoch, "batch_in_epoch": batch_in_epoch, "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
                "numpy_rng": np.random.get_state(), "python_rng": random.getstate(),
                "pet": s.pet}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in _ckpt_dirs(s.output_dir, s.ckpt_prefix)[:-max(1, s.keep_max)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    from safetensors.torch import load_file
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise RunConfigError(f"{path}/trainable.safetensors: {name}: not a parameter of this run's model")
        with torch.no_grad():
            params[name].copy_(value)
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return state


# ---------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model, s: TrainSettings, tokenizer, device) -> dict:
    """Eval loss over the eval file and rouge/bleu of greedy answers for up to ``eval_num_samples`` prompts."""
    from glm_common.data import build_eval_features, build_train_features, load_samples
    from glm_common.metrics import compute_metrics
    base = _base(model)
    was_training = model.training
    model.eval()
    samples = load_samples(s.eval_file)
    if s.eval_num_samples:
        samples = samples[:s.eval_num_samples]
    feats = build_train_features(samples, tokenizer, max_source_length=s.eval_max_source_length,
                                 max_target_length=s.eval_max_target_length)
    total, count = 0.0, 0
    for lo in range(0, len(samples), s.eval_batch_size):
        ids = torch.from_numpy(feats["input_ids"][lo:lo + s.eval_batch_size]).to(device)
        labels = torch.from_numpy(feats["labels"][lo:lo + s.eval_batch_size]).to(device)
        n = int((labels[:, 1:] != -100).sum())
        total += model(input_ids=ids, labels=labels).loss.item() * n
        count += n
    result = {"eval_loss": total / max(1, count)}
    if "PerplexityMetric" in s.metrics:
        from glm_common.metrics import perplexity
        result.update(perplexity(lambda i, lab: model(input_ids=torch.from_numpy(i).to(device),
                                                      labels=torch.from_numpy(lab).to(device)).loss.item(),
                                 feats, s.eval_batch_size))
    if "ADGENMetric" in s.metrics:
        from glm_common.budget import budget_groups, plan_eval_prompts
        ev = build_eval_features(samples, tokenizer, max_source_length=s.eval_max_source_length)
        ev, plan = plan_eval_prompts(ev, s.config.seq_length, s.options.max_decode_length, tokenizer.pad_token_id,
                                     report=lambda m: print(f"warning: {m}", file=sys.stderr),
                                     max_new_tokens=s.eval_max_target_length)
        preds = {}
        for lo in range(0, len(samples), s.eval_batch_size):
            rows = np.arange(lo, min(lo + s.eval_batch_size, len(samples)))
            for idx, new in budget_groups(plan.lengths[rows], plan.new_tokens[rows], s.config.seq_length):
                sel = rows[idx]
                prompt = torch.from_numpy(ev["input_ids"][sel]).to(device)
                out = base.generate(prompt, attention_mask=torch.from_numpy(ev["attention_mask"][sel]).to(device),
                                    position_ids=torch.from_numpy(ev["position_ids"][sel]).to(device),
                                    max_new_tokens=new)
                for r, row in zip(sel, out[:, prompt.shape[1]:].tolist()):
                    row = [t for t in row[:int(plan.new_tokens[r])]
                           if t not in (tokenizer.eos_token_id, tokenizer.pad_token_id)]
                    preds[int(r)] = tokenizer.decode(row)
        result.update(compute_metrics([preds[i] for i in range(len(samples))], ev["answers"]))
    model.train(was_training)
    return result


# ---------------------------------------------------------------------------------------- training
def _dist():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world


def train(s: TrainSettings, device: Optional[str] = None, model=None) -> dict:
    """Run the training loop of ``s``; return a summary (steps, first/last loss, tokens/s, paths).

    ``model``: an already built model (:func:`build_model`), e.g. one whose LoRA matrices were set.
    """
    from glm_common.data import build_train_features, load_samples
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from torch_glm.data import make_dataloader
    rank, world = _dist()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = device or (f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if not s.vocab_file:
        raise RunConfigError("train_dataset.tokenizer.vocab_file: missing (path to the tokenizer.model)")
    if not s.train_file:
        raise RunConfigError("train_dataset.data_loader.dataset_dir: missing (path to the training data)")
    random.seed(s.seed)
    np.random.seed(s.seed)
    torch.manual_seed(s.seed)
    tokenizer = ChatGLM2Tokenizer.from_pretrained(s.vocab_file)
    feats = build_train_features(load_samples(s.train_file), tokenizer, max_source_length=s.max_source_length,
                                 max_target_length=s.max_target_length, progress=s.progress and rank == 0)
    loader = make_dataloader(feats, s.batch_size, shuffle=s.shuffle, seed=s.data_seed, rank=rank, world_size=world,
                             drop_remainder=s.drop_remainder, num_workers=s.num_workers)
    # DataLoader draws a base seed from the global RNG at every iter(); a private generator keeps the
    # global RNG (dropout) on the same sequence whether a run is resumed or not
    loader.generator = torch.Generator().manual_seed(s.seed)
    per_epoch = len(loader) // s.grad_accum
    if per_epoch == 0:
        raise RunConfigError(f"runner_config.gradient_accumulation_steps: {s.grad_accum} is more than the "
                             f"{len(loader)} batches of an epoch")
    total = per_epoch * s.epochs
    if s.max_steps > 0:
        total = min(total, s.max_steps)
    lrs = learning_rates(s, schedule_total(s, per_epoch))

    model = build_model(s, device) if model is None else model
    model.train()
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local] if device.startswith("cuda") else None)
    optimizer = make_optimizer(model, s)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: float(lrs[min(k, len(lrs) - 1)]) / s.learning_rate if s.learning_rate else 0.0)
    step, start_epoch, skip = 0, 0, 0
    os.makedirs(s.output_dir, exist_ok=True)
    log_path = os.path.join(s.output_dir, "loss_log.jsonl")
    if s.resume:
        found = _ckpt_dirs(s.output_dir, s.ckpt_prefix)
        if found:
            state = load_checkpoint(found[-1][1], model, optimizer, scheduler)
            step, start_epoch, skip = state["step"], state["epoch"], state["batch_in_epoch"]
            if rank == 0:
                print(f"resumed from {found[-1][1]} at step {step}", file=sys.stderr)
    log = LossLog(log_path, enabled=rank == 0)
    log.truncate(step)  # keep the log consistent with the step we (re)start from

    use_amp = device.startswith("cuda") and s.compute_dtype in ("float16", "bfloat16")
    amp_dtype = getattr(torch, s.compute_dtype) if use_amp else None
    scaler = torch.amp.GradScaler("cuda") if use_amp and s.compute_dtype == "float16" else None
    from tqdm.auto import tqdm
    bar = tqdm(total=total, initial=step, desc="train", disable=not (s.progress and rank == 0), dynamic_ncols=True)
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
            ctx = train_model.no_sync() if world > 1 and not sync else _null()
            with ctx, torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=use_amp):
                loss = train_model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            scaled = loss / s.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
            acc_loss += loss.item() / s.grad_accum
            tokens_done += batch["input_ids"].numel()
            micro += 1
            if not sync:
                continue
            if scaler:
                scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm if s.clip_grad else float("inf"))
            lr = optimizer.param_groups[0]["lr"]
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
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
            first_loss = step_loss if first_loss is None else first_loss
            last_loss = step_loss
            losses.append(step_loss)
            if rank == 0:
                row = {"step": step, "epoch": epoch, "loss": round(step_loss, 6), "lr": lr,
                       "grad_norm": round(float(grad_norm), 6), "tokens": tokens_done * world,
                       "time": round(time.perf_counter() - t0, 3)}
                log.write(row)
                bar.update(1)
                if step % max(1, s.print_every) == 0:
                    bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                if s.save_steps and step % s.save_steps == 0:
                    save_checkpoint(model, optimizer, scheduler, s, step, epoch, k + 1)
                if s.do_eval and s.eval_step_interval > 0 and step % s.eval_step_interval == 0:
                    _log_eval(model, s, tokenizer, device, step, log_path)
        epoch += 1
        skip = 0
    bar.close()
    elapsed = time.perf_counter() - t0
    summary = {"steps": step, "first_loss": first_loss, "last_loss": last_loss, "losses": losses,
               "tokens_per_s": tokens_done * world / elapsed if elapsed > 0 else 0.0, "log": log_path}
    if rank == 0:
        if s.do_eval:
            summary["eval"] = _log_eval(model, s, tokenizer, device, step, log_path)
        summary["result"] = save_result(model, s, s.output_dir)
        summary["plot"] = plot_losses(log_path, os.path.join(s.output_dir, "loss_curve.png"))
        print(summary_line(step, first_loss, last_loss, summary["tokens_per_s"], elapsed,
                           result=summary["result"]), file=sys.stderr)
    if world > 1:
        torch.distributed.barrier()
    summary["model"] = model
    return summary


def _log_eval(model, s, tokenizer, device, step, log_path) -> dict:
    result = evaluate(model, s, tokenizer, device)
    with open(log_path, "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **{k: round(v, 6) for k, v in result.items()}}) + "\n")
    return result


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m torch_glm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="run YAML (mindformers-shaped)")
    ap.add_argument("--load_checkpoint", help="HF directory of the base weights (overrides the YAML)")
    ap.add_argument("--vocab_file", help="tokenizer.model (overrides the YAML)")
    ap.add_argument("--train_dataset", help="training data file (overrides the YAML)")
    ap.add_argument("--eval_dataset", help="eval data file (overrides the YAML)")
    ap.add_argument("--output_dir", help="output directory (overrides the YAML)")
    ap.add_argument("--max_steps", type=int, help="stop after this many optimizer steps")
    ap.add_argument("--epochs", type=int)
    ap.add_argument("--batch_size", type=int)
    ap.add_argument("--learning_rate", type=float)
    ap.add_argument("--seed", type=int)
    ap.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    ap.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    ap.add_argument("--no_progress", action="store_true")
    args = ap.parse_args(argv)
    try:
        s = settings_from_config(load_run_config(args.config), source=args.config)
    except (RunConfigError, ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for key, attr in (("load_checkpoint", "load_checkpoint"), ("vocab_file", "vocab_file"),
                      ("train_dataset", "train_file"), ("eval_dataset", "eval_file"), ("output_dir", "output_dir"),
                      ("max_steps", "max_steps"), ("epochs", "epochs"), ("batch_size", "batch_size"),
                      ("learning_rate", "learning_rate"), ("seed", "seed")):
        if getattr(args, key) is not None:
            setattr(s, attr, getattr(args, key))
    s.resume = s.resume or args.resume
    s.progress = not args.no_progress
    try:
        out = train(s, device=args.device)
    except (RunConfigError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: v for k, v in out.items() if k not in ("model", "losses")}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
