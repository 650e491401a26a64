"""Resume for torch_glm: trainer state without pickles, checkpoint verification, one step on every rank.

A checkpoint ``<output_dir>/checkpoint/<prefix>_step_<N>/`` holds ``trainable.safetensors`` (the weights
that train), ``trainer_state.safetensors`` (optimizer tensors, torch and numpy RNG states) and
``trainer_state.json`` (step, epoch, data position, the run record ``world_size`` / ``rank_id`` /
``step``, optimizer param groups and non-tensor state, the LR scheduler's ``state_dict``, Python's RNG
state). Both files are read with the ``safetensors`` library and ``json``: nothing in a checkpoint is
unpickled, so a planted ``trainer_state.pt`` (or any pickle) is never loaded. A checkpoint directory
verifies when both ``.safetensors`` files open with ``safetensors.safe_open`` (header and file length
checked by the library) and the JSON parses and records this run's world size and the step of its
name. The ranks exchange the steps they hold complete with ``torch.distributed.all_gather_object``
(pickled in memory between this run's own processes, never from disk) and agree on the newest step
every rank holds (:mod:`glm_common.resume`).
"""
from __future__ import annotations

import json
import os
import random
import re
import sys
from typing import Optional

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from glm_common.fsutil import atomic_file
from glm_common.resume import CheckpointInvalid, check_record, choose_resume, run_record, verify_candidates

__all__ = ["STATE_JSON", "STATE_TENSORS", "WEIGHTS", "save_trainer_state", "load_trainer_state", "candidates",
           "verify_checkpoint", "resume_checkpoint"]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
WEIGHTS = "trainable.safetensors"
_DIR_NAME = re.compile(r"^(?P<prefix>.+)_step_(?P<step>\d+)$")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def save_trainer_state(directory: str, optimizer, scheduler, step: int, **extra) -> None:
    """Write ``trainer_state.safetensors`` + ``trainer_state.json`` into ``directory``: optimizer and
    scheduler state, RNG states, ``step``, the run record and the JSON-able ``extra`` (epoch, data position)."""
    world, rank = _world()
    tensors = {"rng.torch": torch.get_rng_state()}
    np_state = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(np_state[1], np.uint32).view(np.int32).copy())
    opt = optimizer.state_dict()
    opt_state = {}
    for idx, st in opt["state"].items():
        plain = {}
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                plain[key] = value
        opt_state[str(idx)] = plain
    py_state = random.getstate()
    meta = {**extra, **run_record(world, rank, step),
            "optimizer": {"param_groups": opt["param_groups"], "state": opt_state},
            "scheduler": scheduler.state_dict(),
            "numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    save_file(tensors, os.path.join(directory, STATE_TENSORS))
    with atomic_file(os.path.join(directory, STATE_JSON), encoding="utf-8") as f:
        json.dump(meta, f)


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise CheckpointInvalid(f"no {os.path.basename(path)}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointInvalid(f"{os.path.basename(path)}: unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointInvalid(f"{os.path.basename(path)}: not a JSON object")
    return meta


def load_trainer_state(directory: str, optimizer, scheduler) -> dict:
    """Restore what :func:`save_trainer_state` wrote (optimizer, scheduler, RNG); return the JSON record
    (``step``, ``epoch``, ``batch_in_epoch`` ...). Reads safetensors and JSON only."""
    meta = _read_json(os.path.join(directory, STATE_JSON))
    tensors = load_file(os.path.join(directory, STATE_TENSORS))
    state = {}
    for idx, plain in meta["optimizer"]["state"].items():
        st = dict(plain)
        head = f"optimizer.state.{idx}."
        st.update({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
        state[int(idx)] = st
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    return meta


def candidates(directory: str, prefix: str) -> list:
    """``[(step, checkpoint directory), ...]`` of every ``<prefix>_step_<N>`` folder in ``directory``
    (staging ``.tmp`` / ``.partial`` folders are not candidates)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _DIR_NAME.match(name)
        if m and m["prefix"] == prefix and os.path.isdir(os.path.join(directory, name)):
            found.append((int(m["step"]), os.path.join(directory, name)))
    return sorted(found)


def verify_checkpoint(path: str, step: Optional[int], world_size: int, rank: Optional[int] = None) -> dict:
    """The JSON record of checkpoint directory ``path`` after checking its files; raises
    :class:`glm_common.resume.CheckpointInvalid` naming the file that does not verify. ``rank`` None: any
    writing rank (rank 0 writes for all)."""
    directory = path
    if not os.path.isfile(os.path.join(directory, STATE_JSON)) and \
            os.path.isfile(os.path.join(directory, "trainer_state.pt")):
        raise CheckpointInvalid(f"no {STATE_JSON}; its trainer_state.pt is a pickle, which is never loaded "
                                f"(pickles can run code)")
    for name in (WEIGHTS, STATE_TENSORS):
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            raise CheckpointInvalid(f"no {name}")
        if os.path.getsize(path) == 0:
            raise CheckpointInvalid(f"{name}: empty file (0 bytes)")
        try:
            with safe_open(path, "pt") as f:
                f.keys()
        except Exception as e:  # safetensors' SafetensorError derives from Exception only
            raise CheckpointInvalid(f"{name}: {e}") from None
    meta = _read_json(os.path.join(directory, STATE_JSON))
    check_record(meta, world_size, rank, step)
    for key in ("epoch", "batch_in_epoch", "optimizer", "scheduler", "numpy_rng", "python_rng"):
        if key not in meta:
            raise CheckpointInvalid(f"{STATE_JSON}: no {key!r}")
    return meta


def resume_checkpoint(directory: str, prefix: str, rank: int, world: int) -> Optional[str]:
    """The checkpoint directory every rank resumes from (None: start at step 0), the same step on all.

    Every rank calls this at the same point (it gathers over the ranks). Skipped directories are reported
    by the rank that sees them, the agreed step by rank 0, one line each, on stderr.
    """
    verified = verify_candidates(candidates(directory, prefix),
                                 lambda path, step: verify_checkpoint(path, step, world))
    for line in verified.skipped:
        print(f"rank {rank}: {line}" if world > 1 else line, file=sys.stderr)

    def gather(obj):
        if torch.distributed.get_backend() == "nccl":   # all_gather_object stages through the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        out = [None] * world
        torch.distributed.all_gather_object(out, obj)
        return out

    decision = choose_resume(verified, gather, rank, world, where=directory)
    if decision.line and rank == 0:
        print(decision.line, file=sys.stderr)
    return decision.path
