"""Sharded data parallel training for torch_glm: FSDP2, its mixed precision, checkpoints and memory figures.

The twin of ``mindspore_glm/parallel.py`` (MindSpore's sharding plan). Under ``torchrun``, a run YAML with
``parallel.enable_parallel_optimizer: True`` (the key the MindSpore side uses for its optimizer-state
sharding) trains with PyTorch's own FSDP2 (:func:`torch.distributed.fsdp.fully_shard`) instead of DDP:

* every ``GLMBlock`` is its own FSDP unit; the embedding, the final norm, the output layer and the
  P-tuning prefix encoder belong to the root unit (the ``ChatGLM2ForConditionalGeneration``, also under
  a peft wrapper), so parameters, gradients and optimizer states are sharded over the ranks (each rank
  keeps ``1/world`` of every tensor: dim 0, padded);
* ``recompute_config.recompute`` recomputes each block in the backward pass (the model's own per-block
  ``torch.utils.checkpoint``, non-reentrant, around each FSDP unit);
* mixed precision (:func:`mixed_precision_policy`): on CUDA, ``compute_dtype`` float16/bfloat16 is the
  dtype blocks compute in (FSDP casts the gathered parameters); ``param_init_type`` float32 keeps float32
  master weights and optimizer states and reduces gradients in float32. On CPU everything is float32
  (as the data parallel trainer does: autocast is CUDA only there too);
* only trainable parameters exist in the optimizer (LoRA matrices, the prefix encoder), so frozen
  weights carry no optimizer state.

Checkpoints (:func:`save_checkpoint` / :func:`load_checkpoint`): ``torch.distributed.checkpoint`` (DCP)
writes every rank's shards of the trainable weights and their optimizer states in parallel
(``__R_0.distcp`` + ``.metadata``), plus ``trainer_state.safetensors`` + ``trainer_state.json`` (step,
data position, scheduler, every rank's RNG, the run record: world size, rank, step; no pickle,
:mod:`torch_glm.resume`, which also reads DCP's files without running a pickle's code). A checkpoint resumes onto the same number of ranks (the same loss trajectory); another
rank count is refused with one line (the data position and RNG streams are per rank).

The result of a full fine-tuning run (:func:`write_consolidated`) is an HF directory (safetensors
shards + ``model.safetensors.index.json``, what ``from_pretrained`` and ``convert/hf_to_ms.py`` read),
gathered tensor by tensor (``DTensor.full_tensor``) and streamed by rank 0 into shards of at most
``max_shard_size``: no rank ever holds the whole model. LoRA and P-tuning results (small) are gathered
and written as the data parallel trainer writes them (peft adapter, prefix directory).

Libraries: ``torch.distributed.fsdp`` (FSDP2), ``torch.distributed.checkpoint`` (+ its ``state_dict``
helpers), safetensors through ``convert.hf_layout.write_hf_checkpoint``.
"""
from __future__ import annotations

import os
import resource
import shutil
import sys
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from glm_common.fsutil import atomic_dir
from glm_common.run_config import RunConfigError, TrainSettings
from torch_glm.checkpointing import DCP_METADATA, base_model, checkpoint_dir, find_checkpoints
from glm_common.resume import CheckpointInvalid
from torch_glm.resume import (STATE_JSON, SafeLoadPlanner, SafeReader, _read_json, check_dcp, load_trainer_state,
                              rng_state, save_trainer_state)

__all__ = ["fsdp_requested", "mixed_precision_policy", "shard_model", "is_sharded", "state_bytes",
           "peak_memory_bytes", "reset_peak_memory", "memory_report", "gather_trainable", "iter_full_state",
           "write_consolidated", "save_result", "save_checkpoint", "load_checkpoint", "grad_norm_value",
           "DCP_METADATA"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def fsdp_requested(s: TrainSettings, world: int) -> bool:
    """True when this run shards with FSDP2: ``parallel.enable_parallel_optimizer`` and more than one rank."""
    return bool(getattr(s, "enable_parallel_optimizer", False)) and world > 1


def mixed_precision_policy(s: TrainSettings, device: str):
    """FSDP2's ``MixedPrecisionPolicy`` for the YAML's ``compute_dtype`` / ``param_init_type`` on ``device``.

    CUDA with ``compute_dtype`` float16/bfloat16: parameters are gathered in that dtype for compute;
    gradients are reduced in float32 when ``param_init_type`` is float32 (the master weights), else in
    the compute dtype. CPU, or float32 compute: no casting (None).
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy
    compute = _DTYPES.get(s.compute_dtype, torch.float32)
    if not str(device).startswith("cuda") or compute == torch.float32:
        return None
    master = getattr(s.options, "param_init_type", "float32") if getattr(s, "options", None) else "float32"
    reduce = torch.float32 if master == "float32" else compute
    return MixedPrecisionPolicy(param_dtype=compute, reduce_dtype=reduce, output_dtype=None, cast_forward_inputs=True)


def shard_model(model, s: TrainSettings, device: str, mesh=None):
    """Shard ``model`` (built, PET applied, on ``device``) in place with FSDP2; return it.

    Each ``GLMBlock`` is one unit, the ``ChatGLM2ForConditionalGeneration`` (embedding, final norm,
    output layer, prefix encoder) the root. Float32 master weights: the parameters are cast to float32
    first when ``param_init_type`` is float32 and the model was loaded in another dtype.
    """
    from torch.distributed.fsdp import fully_shard
    if s.pet["pet_type"] == "qlora":
        raise RunConfigError(f"{s.source}: parallel.enable_parallel_optimizer: qlora's 4-bit weights are not "
                             f"sharded; use pet_type lora, or data parallel (enable_parallel_optimizer: False)")
    base = base_model(model)
    if str(device).startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh(str(device).split(":")[0], (dist.get_world_size(),))
    policy = mixed_precision_policy(s, device)
    kw = {"mesh": mesh}
    if policy is not None:
        kw["mp_policy"] = policy
    master = getattr(getattr(s, "options", None), "param_init_type", None)
    if master == "float32" and any(p.dtype != torch.float32 for p in base.parameters()):
        base.float()
    for block in base.transformer.encoder.layers:
        fully_shard(block, **kw)
    fully_shard(base, **kw)
    if s.gradient_checkpointing:
        base.gradient_checkpointing_enable()
    return model


def is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def state_bytes(model, optimizer=None) -> dict:
    """Bytes this rank holds (local shards) of parameters, gradients and optimizer states."""
    params = sum(_local(p).numel() * _local(p).element_size() for p in model.parameters())
    grads = sum(_local(p.grad).numel() * _local(p.grad).element_size() for p in model.parameters()
                if p.grad is not None)
    opt = 0
    if optimizer is not None:
        for st in optimizer.state.values():
            for v in st.values():
                if isinstance(v, torch.Tensor):
                    opt += _local(v).numel() * _local(v).element_size()
    return {"params": params, "grads": grads, "optimizer": opt, "total": params + grads + opt}


def reset_peak_memory(device: str = "cpu") -> None:
    """Start a new peak for :func:`peak_memory_bytes` (CUDA's counters; on Linux, the process's resident
    high-water mark through ``/proc/self/clear_refs``)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_bytes(device: str = "cpu") -> int:
    """Peak memory of this process since :func:`reset_peak_memory` (or its start): CUDA's max allocated
    bytes, or the peak resident set size on CPU (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def memory_report(state: Optional[dict], device: str = "cpu") -> list:
    """Every rank's ``{"rank", "state_bytes" (:func:`state_bytes` after the first update), "peak_bytes"}``
    (collective when a process group is up)."""
    mine = {"rank": dist.get_rank() if dist.is_initialized() else 0, "state_bytes": state,
            "peak_bytes": peak_memory_bytes(device)}
    if not dist.is_initialized():
        return [mine]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def grad_norm_value(norm) -> float:
    """``clip_grad_norm_``'s result as a float (a replicated DTensor under FSDP)."""
    from torch.distributed.tensor import DTensor
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


# ---------------------------------------------------------------------------------------- results
def gather_trainable(model) -> dict[str, torch.Tensor]:
    """``{name: full tensor on CPU}`` of the trainable parameters (collective: every rank calls it)."""
    from torch.distributed.tensor import DTensor
    out = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            full = p.full_tensor() if isinstance(p, DTensor) else p
            out[n] = full.detach().cpu().clone()
    return out


def iter_full_state(model) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, full CPU tensor)`` of the base model, one tensor gathered at a time (collective)."""
    from torch.distributed.tensor import DTensor
    for name, t in base_model(model).state_dict().items():
        full = t.full_tensor() if isinstance(t, DTensor) else t
        yield name, full.detach().cpu()
        del full


class _Streamed(dict):
    """A state-dict stand-in whose ``items()`` gathers lazily (for ``save_pretrained(state_dict=...)``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def items(self):
        return iter_full_state(self.model)


def write_consolidated(model, out_dir: str, max_shard_size="2GB") -> str:
    """Write the full model as an HF directory (safetensors shards + index, ``config.json``).

    Collective: every rank gathers each tensor in turn; rank 0 writes shards of at most ``max_shard_size``
    as they fill (peak: one shard + one tensor), into a staging directory renamed when complete.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        with atomic_dir(out_dir) as tmp:
            base_model(model).save_pretrained(tmp, max_shard_size=max_shard_size, state_dict=_Streamed(model))
    else:
        for _ in iter_full_state(model):
            pass
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def save_result(model, s: TrainSettings, out_dir: str, max_shard_size="2GB") -> Optional[str]:
    """The run's result from a sharded model (collective): ``model/`` (full, streamed), ``adapter/``
    (LoRA) or ``prefix/`` (P-tuning), as the data parallel trainer writes them. Returns the path."""
    kind = s.pet["pet_type"]
    rank = dist.get_rank()
    if kind == "full":
        return write_consolidated(model, os.path.join(out_dir, "model"), max_shard_size)
    state = gather_trainable(model)
    path = None
    if rank == 0:
        if kind in ("lora", "qlora"):
            path = os.path.join(out_dir, "adapter")
            with atomic_dir(path) as tmp:
                model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        else:
            from safetensors.torch import save_file
            from torch_glm.prefix import PREFIX_MODULE
            path = os.path.join(out_dir, "prefix")
            prefix = {}
            for n, v in state.items():
                key = n.split(PREFIX_MODULE + ".", 1)
                if len(key) == 2:
                    prefix[f"{PREFIX_MODULE}.{key[1]}"] = v.contiguous()
            with atomic_dir(path) as tmp:
                save_file(prefix, os.path.join(tmp, "prefix_encoder.safetensors"), metadata={"format": "pt"})
                base_model(model).config.save_hf(tmp)
    dist.barrier()
    return path


# ---------------------------------------------------------------------------------------- checkpoints
def _state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(ignore_frozen_params=True, strict=False)


def save_checkpoint(model, optimizer, scheduler, s: TrainSettings, step: int, epoch: int,
                    batch_in_epoch: int) -> str:
    """Write ``checkpoint/<prefix>_step_<step>/`` with DCP (collective); keep ``keep_checkpoint_max``.

    Every rank writes its shards of the trainable weights and optimizer states; rank 0 adds
    ``trainer_state.safetensors`` + ``trainer_state.json`` (every rank's RNG) and renames the staging directory once all ranks are done.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    rank, world = dist.get_rank(), dist.get_world_size()
    root = checkpoint_dir(s, rank)
    final = os.path.join(root, f"{s.ckpt_prefix}_step_{step}")
    tmp = final + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
    rngs = [None] * world   # gathered in memory between this run's ranks, stored as safetensors + JSON
    dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        save_trainer_state(tmp, None, scheduler, step, rngs=rngs, epoch=epoch, batch_in_epoch=batch_in_epoch,
                           pet=s.pet, format="dcp")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for _, old in find_checkpoints(root, s.ckpt_prefix)[:-max(1, s.keep_max)]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Resume from a checkpoint of :func:`save_checkpoint` (collective); one-line refusal for a
    checkpoint of another rank count or of a data parallel (unsharded) run."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    rank, world = dist.get_rank(), dist.get_world_size()
    if not os.path.isfile(os.path.join(path, DCP_METADATA)):
        raise RunConfigError(f"{path}: not a sharded checkpoint (written by a data parallel run); resume it "
                             f"without parallel.enable_parallel_optimizer")
    try:
        state = _read_json(os.path.join(path, STATE_JSON))   # JSON: the trainer state is never a pickle
        check_dcp(path)
    except CheckpointInvalid as e:
        raise RunConfigError(f"{path}: {e}") from None
    if state.get("world_size") != world:
        raise RunConfigError(f"{path}: written by {state.get('world_size')} ranks, this run has {world}: resume "
                             f"with {state.get('world_size')} ranks (the data position and RNG streams are per rank)")
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_state_options())
    sd = {"model": model_sd, "optim": optim_sd}
    try:  # the shards' non-tensor items load as plain data only (never a pickle's code)
        dcp.load(sd, storage_reader=SafeReader(path), planner=SafeLoadPlanner())
    except dcp.api.CheckpointException as e:
        why = [ln.strip() for f in e.failures.values() for ln in str(f[0] if isinstance(f, tuple) else f).splitlines()
               if ln.strip()]
        why = why[0].split(". ")[0] if why else str(e).splitlines()[0]
        if why.startswith("Weights only load failed"):
            why += ": an item is a pickle of more than plain data, never run"
        raise RunConfigError(f"{path}: its DCP shards do not load ({why})") from None
    set_state_dict(model, optimizer, model_state_dict=sd["model"], optim_state_dict=sd["optim"],
                   options=_state_options())
    return load_trainer_state(path, None, scheduler, rank)
