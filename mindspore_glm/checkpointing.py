"""Training checkpoints in MindSpore: mindformers' ``.ckpt`` files with the optimizer and loss-scale state.

The twin of ``torch_glm/checkpointing.py`` (the formats differ: mindformers' ``.ckpt`` here, a folder
with ``trainable.safetensors`` and ``trainer_state.safetensors`` + ``.json`` there). Files go where mindformers puts them,
``<output_dir>/checkpoint/rank_<N>/<prefix>-<epoch>_<step in epoch>.ckpt``: the trainable weights (all
weights with ``save_full_weights`` or full fine-tuning), the float32 master copies of weights kept in
float16/bfloat16 (``master_weights.<param>``), the optimizer moments and the training-state
scalars of :data:`glm_common.names.TRAIN_STATE_SCALARS` (``epoch_num``, ``step_num``, ``global_step``,
``loss_scale``, ``loss_scale_good_steps``) and, last, the run record ``world_size`` / ``rank_id`` that
resuming checks (:mod:`mindspore_glm.resume`). Reading and writing go through :mod:`convert.ms_ckpt`.
"""
from __future__ import annotations

import os
import re

import numpy as np
from mindspore import Tensor
from mindspore.communication import get_group_size

from convert.ms_ckpt import MSCheckpoint, MSCheckpointError, save_ms_checkpoint
from glm_common.names import MS_ADAM_MOMENTS, is_pet_name, is_train_state
from glm_common.resume import RUN_RECORD
from glm_common.run_config import RunConfigError, TrainSettings
from mindspore_glm.resume import record_tensors
from mindspore_glm.train_step import TrainOneStepCell

__all__ = ["checkpoint_dir", "find_checkpoints", "save_checkpoint", "load_checkpoint", "is_adapter_checkpoint",
           "load_weights"]


def is_adapter_checkpoint(path: str) -> bool:
    """Whether ``path`` is a ``.ckpt`` holding LoRA/prefix weights (and training state) but no base weight."""
    if not (str(path).endswith(".ckpt") and os.path.isfile(path)):
        return False
    names = [n for n in MSCheckpoint(path).names if not is_train_state(n)]
    return bool(names) and all(is_pet_name(n) for n in names)


def load_weights(model, path: str, strict: bool) -> set:
    """Load the model weights of a MindSpore ``.ckpt`` (training state in it is skipped); return the names."""
    try:
        ck = MSCheckpoint(path)
        names = [n for n in ck.names if not is_train_state(n)]
        return model.load_weights(((n, ck.read(n)) for n in names), source=path, strict=strict)
    except MSCheckpointError as e:
        raise RunConfigError(str(e)) from None


_CKPT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


def checkpoint_dir(s: TrainSettings, rank: int = 0) -> str:
    """``<output_dir>/checkpoint/rank_<rank>`` (mindformers' place)."""
    return os.path.join(s.output_dir, "checkpoint", f"rank_{rank}")


def find_checkpoints(directory: str, prefix: str) -> list:
    """``[(global step, path), ...]`` of ``<prefix>-<epoch>_<step>.ckpt`` files in ``directory``, oldest first."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _CKPT_NAME.match(name)
        if not m or m["prefix"] != prefix:
            continue
        path = os.path.join(directory, name)
        try:  # a file that does not read (cut short by a kill) is skipped, not fatal to pruning
            ck = MSCheckpoint(path)
            step = int(ck.read("step_num").reshape(-1)[0]) if "step_num" in ck else int(m["step"])
        except ValueError:
            continue
        found.append((step, path))
    return sorted(found)


def save_checkpoint(step_cell: TrainOneStepCell, s: TrainSettings, rank: int, step: int, per_epoch: int) -> str:
    """Write ``<prefix>-<epoch>_<step in epoch>.ckpt`` atomically; drop the oldest beyond ``keep_checkpoint_max``."""
    directory = checkpoint_dir(s, rank)
    epoch, in_epoch = (step - 1) // per_epoch + 1, (step - 1) % per_epoch + 1
    path = os.path.join(directory, f"{s.ckpt_prefix}-{epoch}_{in_epoch}.ckpt")
    opt = step_cell.optimizer
    model = step_cell.network.model
    full = s.save_full_weights or s.pet["pet_type"] == "full"

    def tensors():
        for p in model.get_parameters():
            if full or p.requires_grad:
                yield p.name, p.asnumpy()
        for m in list(opt.masters) + list(opt.moments1) + list(opt.moments2):
            yield m.name, m.asnumpy()
        yield "epoch_num", np.array([epoch], np.int32)
        yield "step_num", np.array([step], np.int32)
        yield "global_step", opt.global_step.asnumpy().astype(np.int32).reshape(1)
        yield "loss_scale", np.array([step_cell.loss_scale.asnumpy()], np.float32).reshape(1)
        yield "loss_scale_good_steps", np.array([step_cell.good_steps.asnumpy()], np.int32).reshape(1)
        yield from record_tensors(get_group_size() if s.use_parallel else 1, rank)  # the run record, last

    save_ms_checkpoint(tensors(), path)
    for _, old in find_checkpoints(directory, s.ckpt_prefix)[:-max(1, s.keep_max)]:
        os.remove(old)
    return path


def load_checkpoint(path: str, step_cell: TrainOneStepCell) -> int:
    """Load weights, optimizer moments and loss-scale state of ``path`` into ``step_cell``; return the
    global step the checkpoint was written at."""
    ck = MSCheckpoint(path)
    opt = step_cell.optimizer
    targets = step_cell.network.model.param_dict()
    targets.update({m.name: m for m in list(opt.masters) + list(opt.moments1) + list(opt.moments2)})
    targets.update({"global_step": opt.global_step, "loss_scale": step_cell.loss_scale,
                    "loss_scale_good_steps": step_cell.good_steps})
    for p in step_cell.weights:
        for prefix in MS_ADAM_MOMENTS:
            if prefix + p.name not in ck:
                raise RunConfigError(f"{path}: {prefix}{p.name}: missing (a checkpoint of another run?)")
    for name in ck.names:
        if name in ("epoch_num", "step_num") + RUN_RECORD:  # the run record is checked on resume, not loaded
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
    for p, m in zip(opt.low_weights, opt.masters):     # a checkpoint without float32 masters: from the weights
        if m.name not in ck:
            m.set_data(Tensor(p.asnumpy().astype(np.float32)))
    return int(ck.read("step_num").reshape(-1)[0])
