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
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

if __package__ in (None, ""):  # run as a script: make ``convert`` and ``glm_common`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from convert.ms_ckpt import CheckpointWriter, MSCheckpoint, MSCheckpointError  # noqa: E402
from glm_common.names import is_train_state  # noqa: E402  (world_size / rank_id differ between ranks)
from convert.strategy import (OPTIMIZER_PREFIXES, Layout, Strategy, StrategyError,  # noqa: E402
                              load_strategy)

__all__ = ["MergeError", "merge_shards", "split_checkpoint", "find_rank_files", "is_optimizer_state",
           "select_params", "main"]

#: scalars optimizers, loss scaling and the training loop save next to the weights
OPTIMIZER_SCALARS = ("global_step", "learning_rate", "scale_sense", "current_iterator_step",
                     "last_overflow_iterator_step", "epoch_num", "step_num", "beta1_power", "beta2_power",
                     "loss_scale")
_CKPT_NAME = re.compile(r"-(\d+)_(\d+)(?:_breakpoint)?\.ckpt$")


class MergeError(ValueError):
    """Shards that cannot be merged; one line naming the rank file and parameter."""


def is_optimizer_state(name: str) -> bool:
    """Optimizer moments (``adam_m.X``, ``adam_v.X``, ...), gradient accumulators and step counters."""
    return name.startswith(OPTIMIZER_PREFIXES) or name in OPTIMIZER_SCALARS or is_train_state(name)


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
    weights = [n for n in names if not is_optimizer_state(n)]
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
            if n in OPTIMIZER_SCALARS:
                keep.add(n)
            for pre in OPTIMIZER_PREFIXES:
                if n.startswith(pre) and n[len(pre):] in kept:
                    keep.add(n)
    return [n for n in names if n in keep]


# ---------------------------------------------------------------------- finding the rank files
def _step_key(path: str) -> Optional[tuple[int, int]]:
    m = _CKPT_NAME.search(os.path.basename(path))
    return (int(m.group(1)), int(m.group(2))) if m else None


def find_rank_files(src: str, num_ranks: int, step: Optional[int] = None) -> dict[int, str]:
    """``{rank: checkpoint file}`` for ranks ``0 .. num_ranks-1`` of ``src/rank_N/``.

    Files are named ``<prefix>-<epoch>_<step>.ckpt``; without ``step`` the newest (epoch, step) that every
    rank has is taken; a rank folder holding a single ``.ckpt`` needs no step in its name.
    """
    if not os.path.isdir(src):
        raise MergeError(f"{src}: no such checkpoint folder")
    found = {int(m.group(1)): os.path.join(src, d) for d in os.listdir(src)
             if (m := re.fullmatch(r"rank_(\d+)", d)) and os.path.isdir(os.path.join(src, d))}
    extra = sorted(r for r in found if r >= num_ranks)
    if extra:
        raise MergeError(f"{src}: has rank_{extra[-1]}, but the strategy describes {num_ranks} ranks "
                         f"(rank_0..rank_{num_ranks - 1}): strategy and shards do not match")
    files: dict[int, list[str]] = {}
    for r in range(num_ranks):
        d = os.path.join(src, f"rank_{r}")
        ckpts = sorted(f for f in (os.listdir(d) if r in found else []) if f.endswith(".ckpt"))
        if not ckpts:
            raise MergeError(f"{d}: missing: no checkpoint for rank {r} (the strategy has {num_ranks} ranks)")
        files[r] = [os.path.join(d, f) for f in ckpts]
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
    if all(len(fs) == 1 for fs in files.values()):
        return {r: fs[0] for r, fs in files.items()}
    keyed = {r: {_step_key(f): f for f in fs if _step_key(f) is not None} for r, fs in files.items()}
    common = set.intersection(*(set(k) for k in keyed.values()))
    if not common:
        raise MergeError(f"{src}: no step whose checkpoint every rank has; pass --step")
    newest = max(common)
    return {r: keyed[r][newest] for r in keyed}


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
    return full


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


def _count_ranks(src: str) -> int:
    if not os.path.isdir(src):
        raise MergeError(f"{src}: no such checkpoint folder")
    ranks = [int(m.group(1)) for d in os.listdir(src) if (m := re.fullmatch(r"rank_(\d+)", d))]
    if not ranks:
        raise MergeError(f"{src}: no rank_N folders (expected the checkpoint folder of a run)")
    return max(ranks) + 1


def merge_shards(src: str, strategy: Optional[str], output: str, params: str = "all", keep_optimizer: bool = False,
                 step: Optional[int] = None, progress: bool = True) -> dict:
    """Merge ``src/rank_N/*.ckpt`` laid out by ``strategy`` into the single checkpoint ``output``.

    ``strategy=None`` is a pure data-parallel run: every rank holds full replicas, checked bit for bit.

    Returns a summary ``{"params", "bytes", "ranks", "stages", "dropped", "seconds"}``.
    """
    t0 = time.time()
    if strategy is None:
        strat = _DataParallel(_count_ranks(src))
    else:
        try:
            strat = load_strategy(strategy)
        except StrategyError as e:
            raise MergeError(str(e)) from None
    files = find_rank_files(src, strat.device_num, step)
    ckpts = {r: MSCheckpoint(f) for r, f in files.items()}
    # every name once, stage by stage, in the order the ranks hold them
    order: dict[str, None] = {}
    for r in sorted(ckpts):
        for n in ckpts[r].names:
            order.setdefault(n, None)
    names = list(order)
    for n in strat.names():
        if n not in order and not is_optimizer_state(n):
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
    try:
        strat = load_strategy(strategy)
    except StrategyError as e:
        raise MergeError(str(e)) from None
    full = MSCheckpoint(full_ckpt)
    missing = [n for n in strat.names() if n not in full and not is_optimizer_state(n)]
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
    parent = os.path.dirname(os.path.abspath(output_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".split-", dir=parent)
    writers: dict[int, CheckpointWriter] = {}
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
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)
        os.replace(tmp, output_dir)
    except BaseException:
        for w in writers.values():
            w.abort()
        shutil.rmtree(tmp, ignore_errors=True)
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
    p.add_argument("--params", default="all", choices=("all", "trainable", "lora"),
                   help="all: every weight (default); trainable: LoRA and P-tuning prefix weights if the run "
                        "has any, else every weight; lora: only *.mindpet_delta_lora_a/b")
    p.add_argument("--keep-optimizer", action="store_true",
                   help="also keep optimizer state (adam_m./adam_v. moments of the kept weights, global_step, "
                        "learning_rate, ...); dropped by default")
    p.add_argument("--step", type=int, default=None,
                   help="merge the checkpoints of this step (default: the newest step every rank has)")
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
        s = merge_shards(a.src, a.strategy, a.output, a.params, a.keep_optimizer, a.step, progress=not a.quiet)
        print(f"merged {s['ranks']} ranks ({s['stages']} stage(s)): {s['params']} parameters, "
              f"{s['bytes'] / 2**20:.1f} MiB -> {a.output} ({s['dropped']} dropped) in {s['seconds']:.1f}s")
        if a.to_hf:
            print(_to_hf(a.output, a.to_hf, a.config, progress=not a.quiet))
        return 0
    except (MergeError, StrategyError, MSCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
