"""Resuming a (data-parallel) training run: which checkpoint every rank starts from.

Both backends' checkpoints record the run that wrote them: its world size, the writing rank and the
global step (:data:`RUN_RECORD`; the MindSpore runner stores them as the ``world_size`` / ``rank_id`` /
``step_num`` scalars written last in its ``.ckpt``, torch_glm in ``trainer_state.json``). On resume:

1. each rank lists its candidate checkpoints (newest first) and verifies each with the backend's check
   (:func:`verify_candidates`): a file that is empty, cut short, unreadable, of another rank or another
   world size is skipped with one line naming it and why;
2. the ranks exchange the steps they hold complete (the backend gathers a small JSON-able object from
   every rank: MindSpore ``AllGather``, torch ``all_gather_object``) and every rank takes the same
   decision from the same data (:func:`agree`): the newest step every rank holds complete. When ranks
   differ, one line says which step was chosen and which ranks lack the newer ones.

Without any checkpoint on any rank the run starts at step 0 (a fresh ``output_dir``), saying so in one
line; when there are
checkpoints but none verifies, or no step is held complete by all ranks, :class:`ResumeError` stops every
rank with one line rather than starting over from step 0 (and pruning the checkpoints that exist).

Nothing here imports torch or MindSpore; the check of one checkpoint and the gather are the backends'.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from glm_common.run_config import RunConfigError

__all__ = ["RUN_RECORD", "ResumeError", "CheckpointInvalid", "Verified", "Decision", "run_record", "check_record",
           "verify_candidates", "agree", "choose_resume"]

#: the run record every training checkpoint holds (beside the step counters): world size and writing rank.
RUN_RECORD = ("world_size", "rank_id")


class ResumeError(RunConfigError):
    """The ranks cannot resume from one common step; one line naming the checkpoints or ranks."""


class CheckpointInvalid(ValueError):
    """A checkpoint that does not verify; the message says why (the caller adds the path)."""


def run_record(world_size: int, rank: int, step: int) -> dict:
    """``{"world_size", "rank_id", "step"}``: what a checkpoint records about the run that wrote it."""
    return {"world_size": int(world_size), "rank_id": int(rank), "step": int(step)}


def check_record(record: dict, world_size: int, rank: Optional[int], step: Optional[int]) -> None:
    """Raise :class:`CheckpointInvalid` unless ``record`` (from :func:`run_record`) matches this run.

    ``rank`` None: any writing rank will do (torch_glm's checkpoints are written by rank 0 for all);
    ``step`` None: the step is not known from elsewhere (the file name).
    """
    missing = [k for k in ("world_size", "rank_id", "step") if k not in record]
    if missing:
        raise CheckpointInvalid(f"no {', '.join(missing)} recorded (incomplete, or written before checkpoints "
                                f"recorded their run)")
    if int(record["world_size"]) != int(world_size):
        raise CheckpointInvalid(f"written by a run of {record['world_size']} rank(s), this run has {world_size}")
    if rank is not None and int(record["rank_id"]) != int(rank):
        raise CheckpointInvalid(f"written by rank {record['rank_id']}, not rank {rank}")
    if step is not None and int(record["step"]) != int(step):
        raise CheckpointInvalid(f"records step {record['step']}, its name says {step}")


@dataclass
class Verified:
    """One rank's verified checkpoints: ``{step: path}`` and the lines saying what was skipped."""
    paths: dict = field(default_factory=dict)
    skipped: list = field(default_factory=list)
    foreign: list = field(default_factory=list)       # world sizes of checkpoints of a run of another size


def verify_candidates(candidates: Iterable[tuple[int, str]], verify: Callable[[str, int], object]) -> Verified:
    """Check every ``(step, path)`` candidate with ``verify(path, step)`` (raises on a bad checkpoint:
    :class:`CheckpointInvalid`, ``OSError`` or the backend's reader error); return what verified."""
    out = Verified()
    for step, path in sorted(candidates, reverse=True):
        try:
            if os.path.isfile(path) and os.path.getsize(path) == 0:
                raise CheckpointInvalid("empty file (0 bytes)")
            verify(path, step)
        except CheckpointInvalid as e:
            msg = str(e)
            if msg.startswith("written by a run of"):
                out.foreign.append(msg)
        except (OSError, ValueError, KeyError, TypeError) as e:
            msg = str(e) or type(e).__name__
        else:
            out.paths[int(step)] = path
            continue
        if msg.startswith(path):                      # reader errors name the file already
            msg = msg[len(path):].lstrip(": ")
        out.skipped.append(f"skipping checkpoint {path}: {msg}")
    return out


@dataclass
class Decision:
    """What every rank resumes from: ``step`` (0: from scratch), this rank's ``path`` (None at step 0),
    and ``line``: one line for the log (None when nothing needs saying)."""
    step: int
    path: Optional[str]
    line: Optional[str]


def _steps_text(steps: list) -> str:
    return ", ".join(map(str, steps[:4])) + (" ..." if len(steps) > 4 else "") if steps else "none"


def agree(per_rank: list, where: str = "the checkpoint directory") -> int:
    """The newest step every rank holds complete, from each rank's payload (``{"steps": [...], "foreign":
    [...]}``, in rank order); 0 when no rank holds any checkpoint. Raises :class:`ResumeError` when some
    do but no step is common to all (or all there is belongs to a run of another world size)."""
    sets = [set(int(x) for x in p["steps"]) for p in per_rank]
    common = set.intersection(*sets) if sets else set()
    if common:
        return max(common)
    if not any(sets):
        foreign = next((f for p in per_rank for f in p.get("foreign", [])), None)
        if foreign:
            raise ResumeError(f"resume_training: the checkpoints in {where} were {foreign}; resume with the "
                              f"same number of ranks, or start without resume_training in a new output_dir")
        bad = [f"rank {r}: {p['skipped']}" for r, p in enumerate(per_rank) if p.get("skipped")]
        if bad:
            raise ResumeError(f"resume_training: no checkpoint in {where} verifies ({'; '.join(bad)} skipped, "
                              f"said above); restore one or start without resume_training in a new output_dir")
        return 0
    held = "; ".join(f"rank {r}: {_steps_text(sorted(s, reverse=True))}" for r, s in enumerate(sets))
    raise ResumeError(f"resume_training: no step is held complete by every rank ({held}) in {where}; "
                      f"restore the missing checkpoints or start without resume_training in a new output_dir")


def choose_resume(verified: Verified, gather: Callable[[object], list], rank: int, world: int,
                  where: str = "the checkpoint directory") -> Decision:
    """Agree with the other ranks on the step to resume from (:func:`agree`) and return this rank's part.

    ``gather(obj)``: every rank's ``obj`` in rank order, on every rank (``[obj]`` for one process). Every
    rank calls this at the same point, before it trains, so all get the same step or the same error.
    """
    mine = {"steps": sorted(verified.paths, reverse=True), "foreign": verified.foreign[:1],
            "skipped": len(verified.skipped)}
    per_rank = gather(mine) if world > 1 else [mine]
    step = agree(per_rank, where)
    if not step:  # asked to resume, nothing to resume from: a fresh output_dir (said, not silent)
        return Decision(0, None, f"resume_training: no checkpoint in {where}; starting from step 0")
    path = verified.paths[step]
    newest = max(max(p["steps"]) for p in per_rank)
    if world == 1:
        line = f"resuming from {path} at step {step}"
    else:
        line = f"resuming all {world} ranks at step {step} (the newest step every rank holds complete)"
        if newest != step:
            lacking = [f"rank {r} has no complete step {newest}" for r, p in enumerate(per_rank)
                       if newest not in p["steps"]]
            line += f"; newer steps skipped: {', '.join(lacking)}"
    return Decision(step, path, line)
