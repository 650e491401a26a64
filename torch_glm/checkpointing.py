"""Training checkpoints in PyTorch, and the run's result folders.

The twin of ``mindspore_glm/checkpointing.py`` (the formats differ: here a folder
``<output_dir>/checkpoint/<prefix>_step_<N>/`` holding ``trainable.safetensors`` (safetensors) and
``trainer_state.safetensors`` + ``trainer_state.json`` (optimizer, scheduler, RNG, data position and the
run record: world size, rank, step; no pickle, :mod:`torch_glm.resume`), so resuming continues the same
loss trajectory; there mindformers' ``.ckpt``). The result of a run is ``adapter/`` (LoRA, a peft adapter
directory), ``prefix/`` (P-tuning: ``prefix_encoder.safetensors`` + ``config.json``) or ``model/`` (full:
HF layout). Every folder is written through :func:`glm_common.fsutil.atomic_dir`: nothing half-written.
"""
from __future__ import annotations

import os
import shutil

import torch
from safetensors.torch import load_file, save_file

from glm_common.fsutil import atomic_dir
from glm_common.run_config import RunConfigError, TrainSettings
from torch_glm.lora import save_lora
from torch_glm.model import ChatGLM2ForConditionalGeneration
from torch_glm.prefix import prefix_state_dict
from torch_glm.resume import DCP_METADATA, STATE_JSON, load_trainer_state, save_trainer_state

__all__ = ["checkpoint_dir", "find_checkpoints", "save_checkpoint", "load_checkpoint", "save_result",
           "trainable_state", "base_model"]


def base_model(model) -> ChatGLM2ForConditionalGeneration:
    """The ChatGLM2ForConditionalGeneration inside a peft and/or DDP wrapper."""
    for m in model.modules():
        if isinstance(m, ChatGLM2ForConditionalGeneration):
            return m
    raise TypeError("no ChatGLM2ForConditionalGeneration inside the model")


def trainable_state(model) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` (CPU copies) of the parameters that train."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_dir(s: TrainSettings, rank: int = 0) -> str:
    """``<output_dir>/checkpoint`` (rank 0 writes; every rank reads)."""
    return os.path.join(s.output_dir, "checkpoint")


def find_checkpoints(directory: str, prefix: str) -> list:
    """``[(global step, path), ...]`` of the complete ``<prefix>_step_<N>`` folders in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        if name.startswith(prefix + "_step_") and os.path.isfile(os.path.join(directory, name, STATE_JSON)):
            try:
                found.append((int(name.rsplit("_", 1)[1]), os.path.join(directory, name)))
            except ValueError:
                continue
    return sorted(found)


def save_checkpoint(model, optimizer, scheduler, s: TrainSettings, step: int, epoch: int, batch_in_epoch: int) -> str:
    """Write ``<prefix>_step_<step>/`` atomically; drop the oldest beyond ``keep_checkpoint_max``."""
    root = checkpoint_dir(s)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"{s.ckpt_prefix}_step_{step}")
    with atomic_dir(final) as tmp:
        save_file({k: v.contiguous() for k, v in trainable_state(model).items()},
                  os.path.join(tmp, "trainable.safetensors"))
        save_trainer_state(tmp, optimizer, scheduler, step, epoch=epoch, batch_in_epoch=batch_in_epoch, pet=s.pet)
    for _, old in find_checkpoints(root, s.ckpt_prefix)[:-max(1, s.keep_max)]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Load the trainable weights, optimizer, scheduler and RNG states of ``path``; return its trainer state.
    A sharded checkpoint (FSDP2, :data:`DCP_METADATA`) is refused with one line."""
    if os.path.isfile(os.path.join(path, DCP_METADATA)):
        raise RunConfigError(f"{path}: a sharded checkpoint: resume it under torchrun with "
                             f"parallel.enable_parallel_optimizer")
    weights = load_file(os.path.join(path, "trainable.safetensors"))
    params = dict(model.named_parameters())
    for name, value in weights.items():
        if name not in params:
            raise RunConfigError(f"{path}/trainable.safetensors: {name}: not a parameter of this run's model")
        with torch.no_grad():
            params[name].copy_(value)
    return load_trainer_state(path, optimizer, scheduler)  # safetensors + JSON, never a pickle


def save_result(model, s: TrainSettings, out_dir: str) -> str:
    """Write what the run produced (adapter / prefix / HF model directory) atomically; return its path."""
    kind = s.pet["pet_type"]
    if kind in ("lora", "qlora"):
        path = os.path.join(out_dir, "adapter")
        with atomic_dir(path) as tmp:
            save_lora(model, tmp)
        return path
    base = base_model(model)
    if kind == "ptuning2":
        path = os.path.join(out_dir, "prefix")
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous().cpu() for k, v in prefix_state_dict(base).items()},
                      os.path.join(tmp, "prefix_encoder.safetensors"), metadata={"format": "pt"})
            base.config.save_hf(tmp)
        return path
    path = os.path.join(out_dir, "model")
    with atomic_dir(path) as tmp:
        base.save_pretrained(tmp)
    return path
