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

A sharded (FSDP2) checkpoint of :mod:`torch_glm.parallel` holds the shards ``torch.distributed.checkpoint``
(DCP) writes (``.metadata`` + ``__<rank>_0.distcp``: weights and optimizer states) and the same two
trainer-state files, whose RNG states are every rank's (``rng.<rank>.torch`` / ``rng.<rank>.numpy``
tensors, ``rng`` in the JSON). DCP's own reader unpickles ``.metadata`` and the non-tensor items of its
shards; here ``.metadata`` is read by :class:`SafeReader` (an unpickler that builds only DCP's metadata
classes, torch dtypes/sizes and paths) and those items by :class:`SafeLoadPlanner` (``torch.load`` with
``weights_only=True``), so a planted pickle runs nothing there either. Verification of such a directory:
``.metadata`` readable, every shard file at least as long as the metadata says, the trainer state as
above, and one RNG record per rank of this run.
"""
from __future__ import annotations

import io
import json
import os
import pickle
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

__all__ = ["STATE_JSON", "STATE_TENSORS", "WEIGHTS", "DCP_METADATA", "rng_state", "set_rng_state",
           "save_trainer_state", "load_trainer_state", "SafeReader", "SafeLoadPlanner", "check_dcp",
           "candidates", "verify_checkpoint", "resume_checkpoint"]

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
WEIGHTS = "trainable.safetensors"
#: the file ``torch.distributed.checkpoint`` writes beside its shards: marks a sharded (FSDP2) checkpoint
DCP_METADATA = ".metadata"
_DIR_NAME = re.compile(r"^(?P<prefix>.+)_step_(?P<step>\d+)$")


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def rng_state() -> tuple[dict, dict]:
    """This process's RNG states: ``({"torch", "numpy"}: tensors, {"numpy_rng", "python_rng"}: JSON-able)``."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch": torch.get_rng_state(),
               "numpy": torch.from_numpy(np.asarray(np_state[1], np.uint32).view(np.int32).copy())}
    meta = {"numpy_rng": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python_rng": [py_state[0], list(py_state[1]), py_state[2]]}
    return tensors, meta


def set_rng_state(tensors: dict, meta: dict) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(tensors["torch"])
    name, pos, has_gauss, cached = meta["numpy_rng"]
    np.random.set_state((name, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python_rng"]
    random.setstate((version, tuple(internal), gauss))


def save_trainer_state(directory: str, optimizer, scheduler, step: int, rngs: Optional[list] = None,
                       **extra) -> None:
    """Write ``trainer_state.safetensors`` + ``trainer_state.json`` into ``directory``: optimizer and
    scheduler state, RNG states, ``step``, the run record and the JSON-able ``extra`` (epoch, data position).

    ``optimizer`` None: its state is elsewhere (the DCP shards of a sharded checkpoint). ``rngs``: every
    rank's :func:`rng_state` in rank order (stored per rank); None: this process's only.
    """
    world, rank = _world()
    tensors = {}
    meta = {**extra, **run_record(world, rank, step), "scheduler": scheduler.state_dict()}
    if rngs is None:
        mine, plain = rng_state()
        tensors.update({f"rng.{k}": v for k, v in mine.items()})
        meta.update(plain)
    else:
        meta["rng"] = []
        for r, (mine, plain) in enumerate(rngs):
            tensors.update({f"rng.{r}.{k}": v for k, v in mine.items()})
            meta["rng"].append(plain)
    if optimizer is not None:
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
        meta["optimizer"] = {"param_groups": opt["param_groups"], "state": opt_state}
        # the float32 master copies of float16/bfloat16 weights (torch_glm.train_step.make_optimizer): the
        # optimizer updates them, not the model's rounded copies
        for i, (_, master) in enumerate(getattr(optimizer, "master_pairs", ())):
            tensors[f"optimizer.master.{i}"] = master.detach().cpu().contiguous()
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


def load_trainer_state(directory: str, optimizer, scheduler, rank: Optional[int] = None) -> dict:
    """Restore what :func:`save_trainer_state` wrote (optimizer unless None, scheduler, RNG: rank
    ``rank``'s when every rank's was stored, default this process's rank); return the JSON record
    (``step``, ``epoch``, ``batch_in_epoch`` ...). Reads safetensors and JSON only."""
    meta = _read_json(os.path.join(directory, STATE_JSON))
    tensors = load_file(os.path.join(directory, STATE_TENSORS))
    if optimizer is not None:
        state = {}
        for idx, plain in meta["optimizer"]["state"].items():
            st = dict(plain)
            head = f"optimizer.state.{idx}."
            st.update({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)})
            state[int(idx)] = st
        optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
        pairs = getattr(optimizer, "master_pairs", ())
        stored = [k for k in tensors if k.startswith("optimizer.master.")]
        if stored and len(stored) != len(pairs):
            raise CheckpointInvalid(f"{STATE_TENSORS}: {len(stored)} float32 master weights, the run has "
                                    f"{len(pairs)} (a different param_init_type or pet_config)")
        for i, (_, master) in enumerate(pairs if stored else ()):
            value = tensors[f"optimizer.master.{i}"]
            if value.shape != master.shape:
                raise CheckpointInvalid(f"{STATE_TENSORS}: optimizer.master.{i} has shape {tuple(value.shape)}, "
                                        f"the run's weight {tuple(master.shape)}")
            with torch.no_grad():
                master.copy_(value)
    scheduler.load_state_dict(meta["scheduler"])
    if "rng" in meta:
        r = _world()[1] if rank is None else rank
        head = f"rng.{r}."
        set_rng_state({k[len(head):]: v for k, v in tensors.items() if k.startswith(head)}, meta["rng"][r])
    else:
        set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}, meta)
    return meta


# ------------------------------------------------------------------------- sharded (DCP) checkpoints
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_PATHS = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's ``.metadata`` holds: its metadata classes, torch dtypes, ``torch.Size``,
    layouts and paths; any other global (``exec``, ``os.system`` ...) is refused before it is looked up."""

    def find_class(self, module, name):
        obj = None
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if not isinstance(obj, type):
                obj = None
        elif module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            obj = super().find_class(module, name)
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj = super().find_class(module, name)
        elif module == "pathlib" and name in _PATHS:
            obj = super().find_class(module, name)
        if obj is None:
            raise CheckpointInvalid(f"{DCP_METADATA}: refers to {module}.{name}, not DCP metadata (never loaded: "
                                    f"pickles can run code)")
        return obj


def _safe_reader_class():
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        """DCP's ``FileSystemReader`` whose ``read_metadata`` unpickles with :class:`_MetadataUnpickler`."""

        def read_metadata(self, *args, **kwargs):
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata
    return SafeReader


def SafeReader(path: str):  # noqa: N802 (a class factory: torch is imported late)
    """A ``torch.distributed.checkpoint.FileSystemReader`` for ``path`` that never runs a pickle's code in
    ``.metadata``."""
    return _safe_reader_class()(path)


def SafeLoadPlanner():  # noqa: N802
    """DCP's ``DefaultLoadPlanner`` whose non-tensor items load with ``torch.load(weights_only=True)``."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint._nested_dict import unflatten_state_dict  # noqa: F401 (DCP's own)

    class _Planner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj
    return _Planner()


def check_dcp(path: str):
    """The DCP ``Metadata`` of sharded checkpoint ``path`` after checking ``.metadata`` (read through
    :func:`SafeReader`) and that every shard file it names is at least as long as it says; raises
    :class:`glm_common.resume.CheckpointInvalid` naming the file."""
    meta_path = os.path.join(path, DCP_METADATA)
    if not os.path.isfile(meta_path):
        raise CheckpointInvalid(f"no {DCP_METADATA}")
    if os.path.getsize(meta_path) == 0:
        raise CheckpointInvalid(f"{DCP_METADATA}: empty file (0 bytes)")
    try:
        metadata = SafeReader(path).read_metadata()
    except CheckpointInvalid:
        raise
    except Exception as e:  # a cut or foreign pickle: EOFError, UnpicklingError, AttributeError ...
        raise CheckpointInvalid(f"{DCP_METADATA}: unreadable ({type(e).__name__}: {e})") from None
    need = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = str(info.relative_path)
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        shard = os.path.join(path, rel)
        if not os.path.isfile(shard):
            raise CheckpointInvalid(f"no {rel} (named in {DCP_METADATA})")
        have = os.path.getsize(shard)
        if have < size:
            raise CheckpointInvalid(f"{rel}: cut short ({have} bytes, {DCP_METADATA} says {size})")
    return metadata


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
    sharded = os.path.isfile(os.path.join(directory, DCP_METADATA))
    if sharded:
        check_dcp(directory)
    for name in ((STATE_TENSORS,) if sharded else (WEIGHTS, STATE_TENSORS)):
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
    keys = ("rng",) if sharded else ("optimizer", "numpy_rng", "python_rng")
    for key in ("epoch", "batch_in_epoch", "scheduler") + keys:
        if key not in meta:
            raise CheckpointInvalid(f"{STATE_JSON}: no {key!r}")
    if sharded:
        if not isinstance(meta["rng"], list) or len(meta["rng"]) != int(world_size):
            raise CheckpointInvalid(f"{STATE_JSON}: 'rng' does not hold one RNG state per rank ({world_size})")
        with safe_open(os.path.join(directory, STATE_TENSORS), "pt") as f:
            keys = set(f.keys())
        lacking = [r for r in range(int(world_size)) if {f"rng.{r}.torch", f"rng.{r}.numpy"} - keys]
        if lacking:
            raise CheckpointInvalid(f"{STATE_TENSORS}: no RNG state of rank {lacking[0]}")
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
