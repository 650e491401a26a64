"""Resume for the MindSpore runner: list and verify this rank's ``.ckpt`` files, agree on one step with the
other ranks (:mod:`glm_common.resume`), and the run record every checkpoint ends with.

A checkpoint ``<output_dir>/checkpoint/rank_<N>/<prefix>-<epoch>_<step in epoch>.ckpt`` verifies when
:class:`convert.ms_ckpt.MSCheckpoint` indexes it (every value record inside the file, every byte count
matching its shape and dtype), it holds ``step_num`` and the run record ``world_size`` / ``rank_id``
(written last, so a file cut at a record boundary lacks them), and the record names this rank, this
world size and the step its name gives. The steps each rank holds complete travel to every rank
through ``AllGather`` (:func:`mindspore_glm.evaluate.gather_rows`), so ranks need no shared file system.
"""
from __future__ import annotations

import os
import re
import sys
from typing import Optional

import numpy as np

from convert.ms_ckpt import MSCheckpoint
from glm_common.resume import (RUN_RECORD, CheckpointInvalid, check_record, choose_resume,
                               verify_candidates)
from mindspore_glm.evaluate import gather_rows

__all__ = ["record_tensors", "candidates", "verify_checkpoint", "resume_checkpoint"]

_CKPT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<epoch>\d+)_(?P<step>\d+)\.ckpt$")


def record_tensors(world_size: int, rank: int) -> list:
    """``[("world_size", int32 [1]), ("rank_id", int32 [1])]``: the run record a checkpoint ends with."""
    return [("world_size", np.array([world_size], np.int32)), ("rank_id", np.array([rank], np.int32))]


def candidates(directory: str, prefix: str, per_epoch: int) -> list:
    """``[(global step, path), ...]`` of every ``<prefix>-<epoch>_<step>.ckpt`` in ``directory`` (from the
    name alone: ``(epoch - 1) * per_epoch + step``, so unreadable files are listed too)."""
    if not os.path.isdir(directory):
        return []
    found = []
    for name in os.listdir(directory):
        m = _CKPT_NAME.match(name)
        if m and m["prefix"] == prefix:
            found.append(((int(m["epoch"]) - 1) * per_epoch + int(m["step"]), os.path.join(directory, name)))
    return sorted(found)


def verify_checkpoint(path: str, step: Optional[int], world_size: int, rank: Optional[int] = None) -> dict:
    """The run record of ``path`` (``{"world_size", "rank_id", "step"}``) after checking the whole file
    structure; raises :class:`glm_common.resume.CheckpointInvalid` or ``MSCheckpointError`` (a ValueError).
    ``rank`` None: any writing rank."""
    ck = MSCheckpoint(path)
    if not ck.names:
        raise CheckpointInvalid("holds no tensor")
    record = {k: int(ck.read(k).reshape(-1)[0]) for k in RUN_RECORD if k in ck}
    if "step_num" in ck:
        record["step"] = int(ck.read("step_num").reshape(-1)[0])
    check_record(record, world_size, rank, step)
    return record


def resume_checkpoint(directory: str, prefix: str, per_epoch: int, rank: int, world: int) -> Optional[str]:
    """The checkpoint this rank resumes from (None: start at step 0), the same step on every rank.

    Every rank must call this at the same point (it gathers over the ranks). Skipped files are reported
    by the rank that holds them, the agreed step by rank 0, one line each, on stderr.
    """
    verified = verify_candidates(candidates(directory, prefix, per_epoch),
                                 lambda path, step: verify_checkpoint(path, step, world, rank))
    for line in verified.skipped:
        print(f"rank {rank}: {line}" if world > 1 else line, file=sys.stderr)
    where = os.path.dirname(directory) if world > 1 else directory
    decision = choose_resume(verified, lambda obj: gather_rows(obj, world), rank, world, where=where)
    if decision.line and rank == 0:
        print(decision.line, file=sys.stderr)
    return decision.path
