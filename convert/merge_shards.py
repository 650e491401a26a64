"""Merge the per-rank checkpoint shards of a distributed run into one checkpoint, or split one back.

Merge (the default command)::

    python convert/merge_shards.py --src output/checkpoint --strategy output/strategy \\
        --output glm2_merged.ckpt [--params all|trainable|lora] [--keep-optimizer] [--step N] \\
        [--to-hf DIR --config CONFIG]

``--src`` holds ``rank_N/<prefix>-<epoch>_<step>.ckpt`` (the newest step all ranks have, or ``--step``);
``--strategy`` is the strategy file, or a folder of them (pipeline parallel writes one per stage).
Model-parallel splits on any axis, data-parallel replicas, optimizer-parallel shards and pipeline stages
are all read from the strategy (see ``convert/strategy.py``). Each parameter is assembled from the
slices of the ranks that hold it, checking that the slices cover it completely and that replicas of a
slice are bit-identical, then written and freed: peak memory is one full parameter plus one slice.
The shards are checked against the strategy by their content too: slices said to be different parts of a
tensor that hold the same (non-constant) values are whole replicas, e.g. of a data-parallel run, and are
refused. Rank files that are empty (0 bytes) or unreadable are refused, and so are rank folders holding
checkpoints of more than one prefix (``--prefix`` picks one).

Split (the inverse)::

    python convert/merge_shards.py split --src full.ckpt --strategy FILE_or_DIR --output DIR [--prefix P]

writes ``DIR/rank_N/<P>N.ckpt`` for every rank of the strategy, so that a run can start on N devices
from one (e.g. HF-converted) checkpoint.

Errors are one line on stderr naming the file/rank and parameter; the exit status is 1 and no output
file or folder is left behind.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from convert.ms_ckpt import CheckpointWriter, MSCheckpoint, MSCheckpointError
from convert.safetensors_io import CheckpointError
from convert.strategy import Layout, Strategy, StrategyError, load_strategy
from glm_common.fsutil import atomic_dir, check_output
from glm_common.names import TRAIN_STATE_PREFIXES, TRAIN_STATE_SCALARS, is_train_state
from glm_common.cli import one_line_errors

__all__ = ["MergeError", "merge_shards", "split_checkpoint", "find_rank_files", "select_params", "main"]

_CKPT_NAME = re.compile(r"-(\d+)_(\d+)(?:_breakpoint)?\.ckpt$")


class MergeError(ValueError):
    """Shards that cannot be merged; one line naming the rank file and parameter."""


def _is_lora(name: str) -> bool:
    return "mindpet_delta_lora_" in name


def _is_prefix(name: str) -> bool:
    return name.startswith("prefix_encoder.") or "mindpet_delta_prefixtuning" in name


def select_params(names: list[str], params: str = "all", keep_optimizer: bool = False) -> list[str]:
    """The names to keep, in order.

    ``params``: ``all`` every weight; ``lora`` only LoRA matrices (``*.mindpet_delta_lora_a/b``);
    ``trainable`` LoRA and P-tuning prefix weights when the run has any, else every weight (a full
    fine-tune). Optimizer state is dropped unless ``keep_optimizer``, which keeps the moments of the
    kept weights and the step counters.
    """
    weights = [n for n in names if not is_train_state(n)]
    if params == "all":
        kept = weights
    elif params == "lora":
        kept = [n for n in weights if _is_lora(n)]
        if not kept:
            raise MergeError("--params lora: the checkpoint holds no LoRA parameters (*.mindpet_delta_lora_a/b)")
    elif params == "trainable":
        kept = [n for n in weights if _is_lora(n) or _is_prefix(n)] or weights
    else:
        raise MergeError(f"--params: expected all, trainable or lora, got {params!r}")
    keep = set(kept)
    if keep_optimizer:
        for n in names:
            if n in TRAIN_STATE_SCALARS:
                keep.add(n)
            for pre in TRAIN_STATE_PREFIXES:
                if n.startswith(pre) and n[len(pre):] in kept:
                    keep.add(n)
    return [n for n in names if n in keep]


# ---------------------------------------------------------------------- finding the rank files
def _step_key(path: str) -> Optional[tuple[int, int]]:
    m = _CKPT_NAME.search(os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else None


def _prefix_of(path: str, rank: int) -> Optional[str]:
    """The checkpoint prefix of ``<prefix>-<epoch>_<step>.ckpt``, with this rank's own number (mindformers
    names files ``<prefix>_rank_<N>-...``) written ``{rank}`` so that the ranks' prefixes compare; None for
    a file without a step in its name."""
    name = os.path.basename(path)
    m = _CKPT_NAME.search(name)
    if not m:
        return None
    return re.sub(rf"(rank_?){rank}(?![0-9])", r"\1{rank}", name[:m.start()])


def _check_files(files: dict[int, list[str]], src: str, prefix: Optional[str]) -> dict[int, list[str]]:
    """The rank folders' files of one checkpoint prefix: several prefixes (files of different runs) are an
    error unless ``prefix`` picks one (as shown in the error: the rank's number written ``N``)."""
    def shown(f: str, r: int) -> Optional[str]:
        p = _prefix_of(f, r)
        return None if p is None else p.replace("{rank}", "N")

    if prefix is not None:
        def match(f: str, r: int) -> bool:
            raw = os.path.basename(f)[:_CKPT_NAME.search(os.path.basename(f)).start()] \
                if _CKPT_NAME.search(os.path.basename(f)) else None
            return raw is not None and prefix in (shown(f, r), raw, raw.replace(f"_rank_{r}", ""))
        keep = {r: [f for f in fs if match(f, r)] for r, fs in files.items()}
        if not any(keep.values()):
            found = sorted({q for r, fs in files.items() for f in fs if (q := shown(f, r)) is not None})
            raise MergeError(f"{src}: --prefix {prefix}: no checkpoint of that prefix in the rank folders "
                             f"(prefixes found: {', '.join(found) or 'none'})")
        return keep
    first: dict[str, str] = {}
    for r, fs in files.items():
        for f in fs:
            q = shown(f, r)
            if q is not None:
                first.setdefault(q, f)
    if len(first) > 1:
        names = sorted(first)
        raise MergeError(f"{src}: checkpoints of {len(names)} prefixes in the rank folders ({', '.join(names)}; "
                         f"e.g. {os.path.relpath(first[names[0]], src)} and {os.path.relpath(first[names[1]], src)}): "
                         f"files of different runs; pick one with --prefix {names[0]} or move the others away")
    return files


def _check_readable(path: str) -> None:
    """A rank checkpoint must be a file with content: a 0-byte ``.ckpt`` (a save cut short by a full disk or
    a kill) holds no parameter, and skipping it would merge the other ranks without their replica check."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb"):
            pass
    except OSError as e:
        raise MergeError(f"{path}: cannot read: {e.strerror or e}") from None
    if size == 0:
        raise MergeError(f"{path}: empty file (0 bytes): a checkpoint cut short (full disk, or the run killed "
                         f"while saving?); pass --step with an older step every rank holds")


def _rank_dirs(src: str) -> dict[int, str]:
    if not os.path.isdir(src):
        raise MergeError(f"{src}: no such checkpoint folder")
    return {int(m.group(1)): os.path.join(src, d) for d in os.listdir(src)
            if (m := re.fullmatch(r"rank_(\d+)", d)) and os.path.isdir(os.path.join(src, d))}


def find_rank_files(src: str, num_ranks: int, step: Optional[int] = None,
                    prefix: Optional[str] = None) -> dict[int, str]:
    """``{rank: checkpoint file}`` for ranks ``0 .. num_ranks-1`` of ``src/rank_N/``.

    Files are named ``<prefix>-<epoch>_<step>.ckpt``. Without ``step`` every rank's newest checkpoint is
    taken, and they must be of the same step: ranks that disagree (one lacks the newest step, e.g. killed
    while saving) are an error naming them, and ``--step`` picks an older step every rank has. A rank
    folder holding a single ``.ckpt`` needs no step in its name. A missing rank folder is an error. The
    folders must hold one checkpoint prefix (``prefix`` picks one), and the files taken must be readable and
    not empty.
    """
    out = _find_rank_files(src, num_ranks, step, prefix)
    for r in sorted(out):
        _check_readable(out[r])
    return out


def _find_rank_files(src: str, num_ranks: int, step: Optional[int], prefix: Optional[str]) -> dict[int, str]:
    found = _rank_dirs(src)
    extra = sorted(r for r in found if r >= num_ranks)
    if extra:
        raise MergeError(f"{src}: has rank_{extra[-1]}, but the run has {num_ranks} ranks "
                         f"(rank_0..rank_{num_ranks - 1}): strategy and shards do not match")
    missing = [r for r in range(num_ranks) if r not in found]
    if missing:
        more = f" (and {', '.join(f'rank_{r}' for r in missing[1:])})" if len(missing) > 1 else ""
        raise MergeError(f"{os.path.join(src, f'rank_{missing[0]}')}: missing{more}: the run has {num_ranks} "
                         f"ranks (rank_0..rank_{num_ranks - 1})")
    files: dict[int, list[str]] = {}
    for r in range(num_ranks):
        d = found[r]
        ckpts = sorted(f for f in os.listdir(d) if f.endswith(".ckpt"))
        if not ckpts:
            raise MergeError(f"{d}: missing: no checkpoint for rank {r} (the run has {num_ranks} ranks)")
        files[r] = [os.path.join(d, f) for f in ckpts]
    files = _check_files(files, src, prefix)
    for r, fs in files.items():
        if not fs:
            raise MergeError(f"{found[r]}: no checkpoint of prefix {prefix} for rank {r}")
    out: dict[int, str] = {}
    if step is not None:
        for r, fs in files.items():
            hits = [f for f in fs if (k := _step_key(f)) is not None and k[1] == step]
            if len(hits) != 1:
                what = "no" if not hits else f"{len(hits)}"
                raise MergeError(f"{os.path.join(src, f'rank_{r}')}: {what} checkpoint of step {step} "
                                 f"(files: {', '.join(os.path.basename(f) for f in fs)})")
            out[r] = hits[0]
        return out
    if all(len(fs) == 1 for fs in files.values()) and all(_step_key(fs[0]) is None for fs in files.values()):
        return {r: fs[0] for r, fs in files.items()}
    keyed = {r: {_step_key(f): f for f in fs if _step_key(f) is not None} for r, fs in files.items()}
    for r, k in keyed.items():
        if not k:
            raise MergeError(f"{os.path.join(src, f'rank_{r}')}: no checkpoint named <prefix>-<epoch>_<step>.ckpt "
                             f"(files: {', '.join(os.path.basename(f) for f in files[r])})")
    newest = {r: max(k) for r, k in keyed.items()}
    top = max(newest.values())
    behind = [r for r in sorted(newest) if newest[r] != top]
    if behind:
        r = behind[0]
        ahead = next(q for q in sorted(newest) if newest[q] == top)
        common = set.intersection(*(set(k) for k in keyed.values()))
        hint = f"; pass --step {max(common)[1]} to merge the newest step every rank has" if common else ""
        more = f" (and {len(behind) - 1} more rank(s))" if len(behind) > 1 else ""
        raise MergeError(f"{os.path.join(src, f'rank_{r}')}: lacks step {top[1]}, the newest of rank {ahead} "
                         f"(its newest is step {newest[r][1]}){more}: the ranks disagree on the latest "
                         f"checkpoint{hint}")
    return {r: keyed[r][top] for r in keyed}


def _recorded_scalar(ckpt: MSCheckpoint, name: str) -> Optional[int]:
    """An integer scalar the training loop recorded in a checkpoint (``world_size``, ``rank_id``), else None."""
    if name not in ckpt:
        return None
    a = ckpt.read(name)
    if a.size != 1:
        raise MergeError(f"{ckpt.path}: {name}: expected a scalar, got shape {list(a.shape)}")
    return int(a.reshape(-1)[0])


def _check_recorded_ranks(ckpts: dict[int, MSCheckpoint], num_ranks: int) -> None:
    """Each checkpoint that records ``rank_id`` / ``world_size`` must agree with its folder and the run."""
    for r, c in ckpts.items():
        rank_id = _recorded_scalar(c, "rank_id")
        if rank_id is not None and rank_id != r:
            raise MergeError(f"{c.path}: rank_id: the checkpoint records rank {rank_id}, its folder is rank_{r}")
        world = _recorded_scalar(c, "world_size")
        if world is not None and world != num_ranks:
            raise MergeError(f"{c.path}: world_size: the checkpoint records {world} ranks, the run merged has "
                             f"{num_ranks}")


# ---------------------------------------------------------------------- planning
@dataclass
class _Plan:
    name: str
    layout: Optional[Layout]          # None: not in the strategy, replicated on the ranks that hold it
    ranks: list[int]                  # global ranks holding a slice (or a replica)
    full_shape: tuple[int, ...]
    dtype: str


def _plan(name: str, strategy: Strategy, ckpts: dict[int, MSCheckpoint]) -> _Plan:
    lay = strategy.layout(name)
    if lay is None:
        holders = [r for r, c in ckpts.items() if name in c]
        shapes = {ckpts[r].info(name) for r in holders}
        if len(shapes) > 1:
            r0 = holders[0]
            other = next(r for r in holders if ckpts[r].info(name) != ckpts[r0].info(name))
            raise MergeError(f"{ckpts[other].path}: {name}: shape/dtype {ckpts[other].info(name)} differs from "
                             f"{ckpts[r0].info(name)} in rank {r0}, and the strategy has no layout for it: "
                             f"strategy and shards do not match")
        shape, dtype = ckpts[holders[0]].info(name)
        return _Plan(name, None, holders, tuple(shape), dtype)
    ranks = list(strategy.stage_ranks(lay.stage))
    present = [r for r in ranks if name in ckpts[r]]
    if not present:
        raise MergeError(f"{ckpts[ranks[0]].path}: {name}: listed in stage {lay.stage} of the strategy but "
                         f"absent from all its ranks ({ranks[0]}..{ranks[-1]})")
    shape0, dtype = ckpts[present[0]].info(name)
    if len(shape0) != len(lay.tensor_map):
        raise MergeError(f"{ckpts[present[0]].path}: {name}: shape {list(shape0)} has {len(shape0)} dims, the "
                         f"strategy's tensor_map {len(lay.tensor_map)}: strategy and shards do not match")
    full = lay.full_shape(shape0)
    for r in present:
        s, dt = ckpts[r].info(name)
        if tuple(s) != tuple(shape0) or dt != dtype:
            raise MergeError(f"{ckpts[r].path}: {name}: holds {list(s)} {dt}, rank {present[0]} holds "
                             f"{list(shape0)} {dtype}; with {lay.describe()} every rank holds an equal slice: "
                             f"strategy and shards do not match")
    covered = {lay.slice_index(r - ranks[0]) for r in present}
    if len(covered) < lay.num_slices():
        missing = [r for r in ranks if r not in present and lay.slice_index(r - ranks[0]) not in covered]
        raise MergeError(f"{ckpts[missing[0]].path}: {name}: incomplete coverage: {len(covered)} of "
                         f"{lay.num_slices()} slices present ({lay.describe()}); rank(s) "
                         f"{', '.join(map(str, missing))} lack it")
    return _Plan(name, lay, present, full, dtype)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit equality (NaN payloads and -0.0 included) without copying either array."""
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize:
        return False
    bits = np.dtype(f"u{a.dtype.itemsize}")
    return bool(np.array_equal(a.view(bits), b.view(bits)))


def _assemble(plan: _Plan, ckpts: dict[int, MSCheckpoint], base_rank: int) -> np.ndarray:
    """The full tensor of one parameter ``plan.full_shape``, replicas checked bit for bit."""
    if plan.layout is None:
        first = ckpts[plan.ranks[0]].read(plan.name)
        for r in plan.ranks[1:]:
            if not _same_bits(first, ckpts[r].read(plan.name)):
                raise MergeError(f"{ckpts[r].path}: {plan.name}: replica differs from rank {plan.ranks[0]}'s "
                                 f"(replicas must be bit-identical)")
        return first
    lay = plan.layout
    full = None
    source: dict[tuple[int, ...], int] = {}
    for r in plan.ranks:
        piece = ckpts[r].read(plan.name)
        if full is None:
            full = np.empty(plan.full_shape, dtype=piece.dtype)
        idx = lay.slice_index(r - base_rank)
        region = lay.region(idx, plan.full_shape)
        if idx in source:
            if not _same_bits(full[region], piece):
                raise MergeError(f"{ckpts[r].path}: {plan.name}: data-parallel replica of slice {list(idx)} "
                                 f"differs from rank {source[idx]}'s (replicas must be bit-identical)")
        else:
            full[region] = piece
            source[idx] = r
        del piece
    _check_slices_differ(plan, ckpts, source, full)
    return full


def _check_slices_differ(plan: _Plan, ckpts: dict[int, MSCheckpoint], source: dict, full: np.ndarray) -> None:
    """The shards' real content against the strategy: slices the strategy says are different parts of a
    tensor, found bit-identical (and not a constant, like a zero-initialised LoRA B), are whole replicas of a
    run that did not split it (data parallel): concatenating them would give a tensor of the wrong shape."""
    if len(source) < 2:
        return
    lay = plan.layout
    (i0, r0), *rest = sorted(source.items())
    first = full[lay.region(i0, plan.full_shape)]
    flat = first.reshape(-1)
    if flat.size < 2 or _same_bits(flat, np.full_like(flat, flat[0])):
        return
    for idx, r in rest:
        if not _same_bits(full[lay.region(idx, plan.full_shape)], first):
            return
    raise MergeError(f"{ckpts[rest[0][1]].path}: {plan.name}: holds {list(first.shape)}, the same values as rank "
                     f"{r0}, but the strategy splits it into {lay.num_slices()} different slices ({lay.describe()}) "
                     f"of a {list(plan.full_shape)} tensor: these are whole replicas (a run that did not split it, "
                     f"e.g. data parallel, which needs no --strategy): strategy and shards do not match")


# ---------------------------------------------------------------------- merge
class _DataParallel:
    """Pure data parallel, which writes no strategy file: every rank holds every parameter whole."""

    num_stages = 1

    def __init__(self, device_num: int):
        self.device_num = device_num

    def layout(self, name: str) -> None:
        return None

    def names(self) -> list[str]:
        return []


def _count_ranks(src: str, world_size: Optional[int] = None) -> int:
    """Number of ranks of a pure data-parallel run: ``world_size`` when given, else what the checkpoints
    record (``world_size``), else the rank folders found, which must be numbered without gaps."""
    found = _rank_dirs(src)
    if not found:
        raise MergeError(f"{src}: no rank_N folders (expected the checkpoint folder of a run)")
    if world_size is not None:
        return world_size
    for r in sorted(found):
        # the newest file with content (an empty or unreadable one is refused by find_rank_files when it is used)
        ckpts = [f for f in sorted(f for f in os.listdir(found[r]) if f.endswith(".ckpt"))
                 if os.path.isfile(os.path.join(found[r], f)) and os.path.getsize(os.path.join(found[r], f))]
        if ckpts:
            recorded = _recorded_scalar(MSCheckpoint(os.path.join(found[r], ckpts[-1])), "world_size")
            if recorded is not None:
                if recorded < 1:
                    raise MergeError(f"{os.path.join(found[r], ckpts[-1])}: world_size: {recorded} is not a rank "
                                     f"count")
                return recorded
            break
    return max(found) + 1


def merge_shards(src: str, strategy: Optional[str], output: str, params: str = "all", keep_optimizer: bool = False,
                 step: Optional[int] = None, progress: bool = True, world_size: Optional[int] = None,
                 prefix: Optional[str] = None, overwrite: bool = False) -> dict:
    """Merge ``src/rank_N/*.ckpt`` laid out by ``strategy`` into the single checkpoint ``output``
    (an existing ``output`` file is refused unless ``overwrite``).

    ``strategy=None`` is a pure data-parallel run: every rank holds full replicas, checked bit for bit;
    its rank count is ``world_size``, or what the checkpoints record, or the rank folders (no gaps).
    Every rank must be present, and hold the same (newest, or ``step``) step of one checkpoint prefix
    (``prefix`` picks one where the rank folders hold several).

    Returns a summary ``{"params", "bytes", "ranks", "stages", "dropped", "seconds"}``.
    """
    t0 = time.time()
    if strategy is None:
        strat = _DataParallel(_count_ranks(src, world_size))
    else:
        try:
            strat = load_strategy(strategy)
        except StrategyError as e:
            raise MergeError(str(e)) from None
        if world_size is not None and world_size != strat.device_num:
            raise MergeError(f"{strategy}: describes {strat.device_num} ranks, --world-size says {world_size}")
    files = find_rank_files(src, strat.device_num, step, prefix)
    check_output(output, [strategy] + sorted({os.path.dirname(f) for f in files.values()}), "--output",
                 overwrite=overwrite)
    ckpts = {r: MSCheckpoint(f) for r, f in files.items()}
    _check_recorded_ranks(ckpts, strat.device_num)
    # every name once, stage by stage, in the order the ranks hold them
    order: dict[str, None] = {}
    for r in sorted(ckpts):
        for n in ckpts[r].names:
            order.setdefault(n, None)
    names = list(order)
    for n in strat.names():
        if n not in order and not is_train_state(n):
            st = strat.layout(n).stage
            raise MergeError(f"{ckpts[strat.stage_ranks(st)[0]].path}: {n}: in the strategy "
                             f"({strat.sources[st]}) but in no shard: strategy and shards do not match")
    kept = select_params(names, params, keep_optimizer)
    plans = [_plan(n, strat, ckpts) for n in kept]
    out_dir = os.path.dirname(os.path.abspath(output))
    made_dir = not os.path.isdir(out_dir)
    writer = CheckpointWriter(output)
    try:
        bar = _progress(len(plans), "merge", progress)
        for p in plans:
            base = strat.stage_ranks(p.layout.stage)[0] if p.layout is not None else 0
            writer.write(p.name, _assemble(p, ckpts, base))
            bar.update(1)
        bar.close()
        writer.close()
    except BaseException:
        writer.abort()
        if made_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
        raise
    return {"params": len(plans), "bytes": writer.bytes_written, "ranks": strat.device_num,
            "stages": strat.num_stages, "dropped": len(names) - len(kept), "seconds": time.time() - t0}


# ---------------------------------------------------------------------- split
def split_checkpoint(full_ckpt: str, strategy: str, output_dir: str, prefix: str = "checkpoint_",
                     progress: bool = True) -> dict:
    """Cut the full checkpoint ``full_ckpt`` into ``output_dir/rank_N/<prefix>N.ckpt`` for ``strategy``.

    Parameters in the strategy go to the ranks of their (lowest) stage, cut by their layout; the others
    (step counters, ...) are copied to every rank. ``output_dir`` must not exist or be empty; it appears
    complete or not at all.
    """
    t0 = time.time()
    check_output(output_dir, [full_ckpt, strategy], "--output", overwrite=False)
    try:
        strat = load_strategy(strategy)
    except StrategyError as e:
        raise MergeError(str(e)) from None
    full = MSCheckpoint(full_ckpt)
    missing = [n for n in strat.names() if n not in full and not is_train_state(n)]
    if missing:
        raise MergeError(f"{full_ckpt}: {missing[0]}: in the strategy but not in the checkpoint "
                         f"({len(missing)} such parameters)")
    plans = []
    for n in full.names:
        lay = strat.layout(n)
        shape, _ = full.info(n)
        if lay is not None:
            if len(shape) != len(lay.tensor_map):
                raise MergeError(f"{full_ckpt}: {n}: shape {list(shape)} does not fit tensor_map of "
                                 f"{lay.describe()}")
            try:
                lay.slice_shape(shape, f"{full_ckpt}: {n}")
            except StrategyError as e:
                raise MergeError(str(e)) from None
        plans.append((n, lay))
    if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
        raise MergeError(f"{output_dir}: exists and is not an empty folder")
    os.makedirs(os.path.dirname(os.path.abspath(output_dir)), exist_ok=True)
    writers: dict[int, CheckpointWriter] = {}
    with atomic_dir(output_dir) as tmp:
        try:
            writers = {r: CheckpointWriter(os.path.join(tmp, f"rank_{r}", f"{prefix}{r}.ckpt"))
                       for r in range(strat.device_num)}
            bar = _progress(len(plans), "split", progress)
            for n, lay in plans:
                array = full.read(n)
                if lay is None:
                    for w in writers.values():
                        w.write(n, array)
                else:
                    ranks = strat.stage_ranks(lay.stage)
                    for r in ranks:
                        region = lay.region(lay.slice_index(r - ranks[0]), array.shape)
                        writers[r].write(n, array[region])
                del array
                bar.update(1)
            bar.close()
            for w in writers.values():
                w.close()
        except BaseException:
            for w in writers.values():
                w.abort()
            raise
    return {"params": len(plans), "ranks": strat.device_num, "stages": strat.num_stages,
            "seconds": time.time() - t0}


def _progress(total: int, desc: str, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm
            return tqdm(total=total, desc=desc, unit="param", file=sys.stderr)
        except ImportError:
            pass

    class _Null:
        def update(self, n):
            pass

        def close(self):
            pass
    return _Null()


# ---------------------------------------------------------------------- CLI
def _to_hf(merged: str, out_dir: str, config: str, progress: bool) -> str:
    """Convert the merged checkpoint to an HF folder with ``convert/ms_to_hf.py``; returns its summary."""
    from convert import ms_to_hf
    from convert._cli import KNOWN_ERRORS
    try:
        return ms_to_hf.convert_ms_to_hf(merged, config, out_dir, progress=progress)["line"]
    except KNOWN_ERRORS as e:
        raise MergeError(f"--to-hf: {e}") from None


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_shards.py",
        usage="%(prog)s --src DIR [--strategy FILE_or_DIR] --output FILE.ckpt [--params all|trainable|lora]\n"
              "                       [--keep-optimizer] [--step N] [--to-hf DIR --config CONFIG] [--quiet]\n"
              "       %(prog)s split --src FULL.ckpt --strategy FILE_or_DIR --output DIR [--prefix P]",
        description="Merge the per-rank checkpoint shards of a distributed MindSpore run into one checkpoint. "
                    "Run 'merge_shards.py split --help' for the inverse (one checkpoint cut into per-rank files).",
        epilog="Example: python convert/merge_shards.py --src output/checkpoint --strategy output/strategy "
               "--output glm2_lora.ckpt --params lora")
    p.add_argument("--src", required=True,
                   help="checkpoint folder of the run, holding rank_0/, rank_1/, ... with <prefix>-<epoch>_<step>.ckpt")
    p.add_argument("--strategy", default=None,
                   help="strategy file (strategy_ckpt_save_file), or a folder of them: pipeline-parallel runs "
                        "write one per stage; files of the same stage are deduplicated. Omit it for a pure "
                        "data-parallel run (no strategy file): every rank then holds full replicas, which are "
                        "checked to be bit-identical")
    p.add_argument("--output", required=True, help="merged checkpoint to write (.ckpt); written atomically")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file (refused otherwise)")
    p.add_argument("--params", default="all", choices=("all", "trainable", "lora"),
                   help="all: every weight (default); trainable: LoRA and P-tuning prefix weights if the run "
                        "has any, else every weight; lora: only *.mindpet_delta_lora_a/b")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="also keep optimizer state (adam_m./adam_v. moments of the kept weights, global_step, "
                        "learning_rate, ...); dropped by default")
    p.add_argument("--step", type=int, default=None,
                   help="merge the checkpoints of this step (default: every rank's newest, which must be the same "
                        "step: ranks that disagree are an error naming them)")
    p.add_argument("--prefix", default=None,
                   help="merge the checkpoints of this prefix (<prefix>-<epoch>_<step>.ckpt; a rank's own number in "
                        "it written N) where the rank folders hold several (default: they must hold one)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks of the run (default: the strategy's device count; without a strategy, "
                        "the world_size the checkpoints record, else the rank_N folders, which must have no gaps)")
    p.add_argument("--to-hf", metavar="DIR", default=None,
                   help="also convert the merged checkpoint to an HF model folder DIR (needs --config)")
    p.add_argument("--config", default=None, help="HF config.json (or its folder) of the model, for --to-hf")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _split_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="merge_shards.py split",
        description="Cut one full checkpoint into per-rank checkpoints for a strategy: writes "
                    "OUTPUT/rank_N/<prefix>N.ckpt for every rank, so a distributed run can start from it.")
    p.add_argument("--src", required=True, help="the full checkpoint (.ckpt)")
    p.add_argument("--strategy", required=True, help="strategy file of the target run, or a folder of them "
                                                     "(one per pipeline stage)")
    p.add_argument("--output", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--prefix", default="checkpoint_", help="file name prefix (default: checkpoint_)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@one_line_errors
def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "split":
            a = _split_parser().parse_args(argv[1:])
            s = split_checkpoint(a.src, a.strategy, a.output, a.prefix, progress=not a.quiet)
            print(f"split {a.src} into {s['ranks']} ranks ({s['stages']} stage(s)), {s['params']} parameters "
                  f"-> {a.output} in {s['seconds']:.1f}s")
            return 0
        a = _merge_parser().parse_args(argv)
        if a.to_hf and not a.config:
            raise MergeError("--to-hf needs --config (the HF config.json of the model)")
        if a.to_hf and a.params == "lora":
            raise MergeError("--to-hf needs the full model; --params lora keeps only the LoRA matrices")
        if a.world_size is not None and a.world_size < 1:
            raise MergeError(f"--world-size: {a.world_size} must be at least 1")
        s = merge_shards(a.src, a.strategy, a.output, a.params, a.keep_optimizer, a.step, progress=not a.quiet,
                         world_size=a.world_size, prefix=a.prefix, overwrite=a.overwrite)
        print(f"merged {s['ranks']} ranks ({s['stages']} stage(s)): {s['params']} parameters, "
              f"{s['bytes'] / 2**20:.1f} MiB -> {a.output} ({s['dropped']} dropped) in {s['seconds']:.1f}s")
        if a.to_hf:
            print(_to_hf(a.output, a.to_hf, a.config, progress=not a.quiet))
        return 0
    except (MergeError, StrategyError, MSCheckpointError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # OutputError names the output; others name their file
        msg = f"{e.filename}: {e.strerror or e}" if e.filename else str(e)
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
