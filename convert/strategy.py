"""MindSpore parallel strategy files: which slice of each parameter every rank holds.

A strategy file (``strategy_ckpt_save_file``, mindformers' ``strategy/ckpt_strategy_rank_N.ckpt``) is the
protobuf ``ParallelStrategyMap`` of ``mindspore/train/node_strategy.proto``. For each parameter it stores
a ``ParallelLayouts``:

- ``dev_matrix`` ``D = [d_0, ..., d_{n-1}]``: the devices of one pipeline stage arranged as an n-d grid;
  local rank ``r`` has coordinate ``c`` (row-major, ``d_{n-1}`` varies fastest);
- ``tensor_map`` ``T`` (one entry per tensor dim): ``T[i] = k`` splits tensor dim ``i`` into ``D[n-1-k]``
  equal slices (k counts device-matrix axes *from the right*), slice index ``c[n-1-k]``; ``-1`` = not split.
  A tuple entry ``(k1, k2)`` splits dim ``i`` over several axes, ``k1`` the most significant;
- ``opt_weight_shard_size`` ``s`` / ``opt_weight_shard_step``: optimizer parallel. The model-parallel
  slice is cut again along dim 0 into ``s`` pieces, over the device axes the tensor is replicated on
  (those with ``d > 1`` not named in ``T``), taken from the right; an axis larger than what is left of
  ``s`` contributes only its fast part (``c % left``). ``s = -1`` means all replicated axes; 0 or 1 none;
- ``field``: the field size of sparse wide-and-deep embeddings (not supported, must be 0).

Pipeline parallel runs write one file per stage (``parallel_strategy_item[*].parallel_strategys.stage``);
stage ``p`` holds global ranks ``p * prod(D) ... (p + 1) * prod(D) - 1``.
:func:`mindspore.merge_pipeline_strategys` instead writes one file whose parameter names are
``"<stage>-<name>"``; both forms are read here.

This interpretation is the one ``mindspore.transform_checkpoints`` applies; ``tests/convert`` holds the
two to the same results.
"""
from __future__ import annotations

import glob
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass, field as dc_field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from glm_common.fsutil import atomic_file
from glm_common.names import TRAIN_STATE_PREFIXES

__all__ = ["StrategyError", "Layout", "Strategy", "load_strategy", "read_strategy_file", "write_strategy_file",
           "strategy_pb2"]

_PB2 = "mindspore.train.node_strategy_pb2"
_LOADED = None


class StrategyError(ValueError):
    """A strategy file that cannot be used; one line naming the file and the parameter."""


def strategy_pb2():
    """``mindspore.train.node_strategy_pb2``, loaded without importing all of MindSpore when possible.

    The generated module only needs protobuf; importing the ``mindspore`` package costs seconds and
    hundreds of MB. The same protobuf file loaded by MindSpore later registers without conflict.
    """
    global _LOADED
    if _PB2 in sys.modules:
        return sys.modules[_PB2]
    if _LOADED is not None:
        return _LOADED
    if "google.protobuf" not in sys.modules:
        spec = importlib.util.find_spec("mindspore")
        if spec is not None and spec.submodule_search_locations:
            path = os.path.join(list(spec.submodule_search_locations)[0], "train", "node_strategy_pb2.py")
            if os.path.isfile(path):
                # the generated code predates protobuf 4's C descriptors; MindSpore runs it the same way
                os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
                try:
                    mspec = importlib.util.spec_from_file_location("_convert_node_strategy_pb2", path)
                    module = importlib.util.module_from_spec(mspec)
                    mspec.loader.exec_module(module)
                    _LOADED = module
                    return module
                except Exception:  # fall back to the regular import below
                    pass
    return importlib.import_module(_PB2)


TensorMapEntry = Union[int, tuple]


@dataclass(frozen=True)
class Layout:
    """How one parameter is cut across the ranks of one pipeline stage (see the module docstring)."""

    dev_matrix: tuple[int, ...]
    tensor_map: tuple[TensorMapEntry, ...]
    opt_shard_size: int = 0
    opt_shard_step: int = 0
    field: int = 0
    stage: int = 0

    # ------------------------------------------------------------------ derived
    @property
    def device_num(self) -> int:
        return int(np.prod(self.dev_matrix, dtype=np.int64)) if self.dev_matrix else 1

    def _axes(self, entry: TensorMapEntry) -> tuple[int, ...]:
        """Device-matrix indices (from the left) a tensor_map entry splits over, most significant first."""
        ks = entry if isinstance(entry, tuple) else (entry,)
        n = len(self.dev_matrix)
        return tuple(n - 1 - k for k in ks if k != -1)

    def mp_splits(self) -> list[int]:
        """Model-parallel slices per tensor dim."""
        return [int(np.prod([self.dev_matrix[a] for a in self._axes(e)], dtype=np.int64)) for e in self.tensor_map]

    def _used_axes(self) -> set[int]:
        return {a for e in self.tensor_map for a in self._axes(e)}

    def opt_size(self) -> int:
        """Optimizer-parallel pieces of dim 0 (1 = none)."""
        s = self.opt_shard_size
        if s == -1:
            s = int(np.prod([d for i, d in enumerate(self.dev_matrix) if i not in self._used_axes()], dtype=np.int64))
        return int(s) if s > 1 else 1

    def splits(self) -> list[int]:
        """Total slices per tensor dim (optimizer pieces folded into dim 0)."""
        sp = self.mp_splits()
        if sp:
            sp[0] *= self.opt_size()
        return sp

    def num_slices(self) -> int:
        return int(np.prod(self.splits(), dtype=np.int64)) if self.tensor_map else 1

    def check(self, where: str) -> None:
        """Raise :class:`StrategyError` for layouts this module cannot interpret."""
        n = len(self.dev_matrix)
        if any(d < 1 for d in self.dev_matrix):
            raise StrategyError(f"{where}: dev_matrix {list(self.dev_matrix)} has a dimension < 1")
        for e in self.tensor_map:
            for k in (e if isinstance(e, tuple) else (e,)):
                if k < -1 or k >= n:
                    raise StrategyError(f"{where}: tensor_map {self._tm_str()} names device axis {k}, "
                                        f"dev_matrix {list(self.dev_matrix)} has {n}")
        used = [a for e in self.tensor_map for a in self._axes(e)]
        if len(used) != len(set(used)):
            raise StrategyError(f"{where}: tensor_map {self._tm_str()} uses a device axis twice")
        if self.field:
            raise StrategyError(f"{where}: field={self.field} (sparse field embeddings) is not supported")
        if self.opt_size() > 1:
            if not self.tensor_map:
                raise StrategyError(f"{where}: optimizer sharding of a scalar")
            self._opt_coordinate(0)  # raises on an impossible shard size

    def with_opt_shard(self, size: int) -> "Layout":
        """This layout with optimizer sharding of ``size`` pieces (``opt_shard_step`` computed as MindSpore
        writes it: the product of the device axes right of the fastest axis the pieces run over)."""
        used = self._used_axes()
        repeated = [a for a, d in enumerate(self.dev_matrix) if a not in used and d > 1]
        if size <= 1 or not repeated:
            return Layout(self.dev_matrix, self.tensor_map, 0, 0, self.field, self.stage)
        step = int(np.prod(self.dev_matrix[repeated[-1] + 1:], dtype=np.int64))
        lay = Layout(self.dev_matrix, self.tensor_map, int(size), step, self.field, self.stage)
        lay.check("with_opt_shard")
        return lay

    def _tm_str(self) -> str:
        return str([list(e) if isinstance(e, tuple) else e for e in self.tensor_map])

    def describe(self) -> str:
        s = f"dev_matrix {list(self.dev_matrix)} tensor_map {self._tm_str()}"
        if self.opt_size() > 1:
            s += f" opt_shard {self.opt_size()}"
        return s

    # ------------------------------------------------------------------ rank -> slice
    def coordinate(self, local_rank: int) -> list[int]:
        c = []
        for d in reversed(self.dev_matrix):
            c.append(local_rank % d)
            local_rank //= d
        return c[::-1]

    def _opt_coordinate(self, local_rank: int) -> int:
        size = self.opt_size()
        if size == 1:
            return 0
        c = self.coordinate(local_rank)
        used = self._used_axes()
        left, index, mult = size, 0, 1
        for axis in reversed(range(len(self.dev_matrix))):
            d = self.dev_matrix[axis]
            if axis in used or d == 1:
                continue
            if left < d:  # only the fast part of this axis
                if d % left:
                    raise StrategyError(f"optimizer shard size {size} does not divide device axis of size {d}")
                index += (c[axis] % left) * mult
                left = 1
            else:
                if left % d:
                    raise StrategyError(f"optimizer shard size {size} is not a product of the replicated "
                                        f"device axes of {list(self.dev_matrix)}")
                index += c[axis] * mult
                mult *= d
                left //= d
            if left == 1:
                return index
        raise StrategyError(f"optimizer shard size {size} exceeds the replicated devices of "
                            f"{self.describe()}")

    def slice_index(self, local_rank: int) -> tuple[int, ...]:
        """Index of the slice rank ``local_rank`` holds, one entry per dim (dim 0 counts optimizer pieces)."""
        c = self.coordinate(local_rank)
        idx = []
        for e in self.tensor_map:
            i = 0
            for a in self._axes(e):
                i = i * self.dev_matrix[a] + c[a]
            idx.append(i)
        if idx and self.opt_size() > 1:
            idx[0] = idx[0] * self.opt_size() + self._opt_coordinate(local_rank)
        return tuple(idx)

    def full_shape(self, slice_shape: Sequence[int]) -> tuple[int, ...]:
        return tuple(int(s) * k for s, k in zip(slice_shape, self.splits()))

    def slice_shape(self, full_shape: Sequence[int], where: str = "") -> tuple[int, ...]:
        out = []
        for i, (s, k) in enumerate(zip(full_shape, self.splits())):
            if s % k:
                raise StrategyError(f"{where}: dim {i} of shape {list(full_shape)} does not split into {k} "
                                    f"({self.describe()})")
            out.append(s // k)
        return tuple(out)

    def region(self, index: Sequence[int], full_shape: Sequence[int]) -> tuple[slice, ...]:
        """numpy index of slice ``index`` (from :meth:`slice_index`) in the full tensor."""
        sl = self.slice_shape(full_shape)
        return tuple(slice(i * s, (i + 1) * s) for i, s in zip(index, sl))


@dataclass
class Strategy:
    """All stages of a run: ``stages[p][name]`` is the :class:`Layout` of ``name`` in stage ``p``."""

    stages: dict[int, dict[str, Layout]]
    sources: dict[int, str] = dc_field(default_factory=dict)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def stage_device_num(self) -> int:
        return next(iter(next(iter(self.stages.values())).values())).device_num

    @property
    def device_num(self) -> int:
        return self.num_stages * self.stage_device_num

    def stage_ranks(self, stage: int) -> range:
        n = self.stage_device_num
        return range(stage * n, (stage + 1) * n)

    def layout(self, name: str) -> Optional[Layout]:
        """Layout of ``name`` in the lowest stage that lists it. Optimizer states (``adam_m.X``) not
        listed themselves take the layout of ``X``."""
        for p in sorted(self.stages):
            if name in self.stages[p]:
                return self.stages[p][name]
        for pre in TRAIN_STATE_PREFIXES:
            if name.startswith(pre):
                return self.layout(name[len(pre):])
        return None

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in sorted(self.stages):
            for n in self.stages[p]:
                seen.setdefault(n, None)
        return list(seen)


# ---------------------------------------------------------------------- file I/O
_MERGED = re.compile(r"^(\d+)-(.+)$")


def _layout_from_pb(pl, stage: int, where: str) -> Layout:
    if len(pl.dev_matrix) != 1:
        raise StrategyError(f"{where}: {len(pl.dev_matrix)} dev_matrix entries, expected 1")
    dev = tuple(int(d) for d in pl.dev_matrix[0].dim)
    if len(pl.tensor_map) > 1:  # one TensorMap per tensor dim, each a list of device axes
        tm = tuple(tuple(int(k) for k in t.dim) if len(t.dim) != 1 else int(t.dim[0])
                   for t in pl.tensor_map if list(t.dim))
    elif len(pl.tensor_map) == 1:
        tm = tuple(int(k) for k in pl.tensor_map[0].dim)
    else:
        tm = ()
    if any(list(p.dim) for p in pl.param_split_shape):
        raise StrategyError(f"{where}: uneven splits (param_split_shape) are not supported")
    lay = Layout(dev, tm, int(pl.opt_weight_shard_size), int(pl.opt_weight_shard_step), int(pl.field), stage)
    lay.check(where)
    return lay


def read_strategy_file(path: str) -> dict[int, dict[str, Layout]]:
    """``{stage: {name: Layout}}`` of one strategy file (one stage, or several for a merged file)."""
    pb2 = strategy_pb2()
    if not os.path.isfile(path):
        raise StrategyError(f"{path}: no such strategy file")
    with open(path, "rb") as f:
        data = f.read()
    msg = pb2.ParallelStrategyMap()
    try:
        msg.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError and friends
        raise StrategyError(f"{path}: not a MindSpore strategy file ({type(e).__name__})") from None
    if not msg.parallel_layout_item:
        raise StrategyError(f"{path}: strategy file lists no parameter layouts")
    stage = msg.parallel_strategy_item[0].parallel_strategys.stage if msg.parallel_strategy_item else 0
    names = [it.param_name for it in msg.parallel_layout_item]
    merged = all(_MERGED.match(n) for n in names)
    out: dict[int, dict[str, Layout]] = {}
    for it in msg.parallel_layout_item:
        name, st = it.param_name, int(stage)
        if merged:
            m = _MERGED.match(name)
            st, name = int(m.group(1)), m.group(2)
        out.setdefault(st, {})[name] = _layout_from_pb(it.parallel_layouts, st, f"{path}: {name}")
    return out


def load_strategy(path: str) -> Strategy:
    """A strategy file, or a folder of them (one per pipeline stage or per rank; duplicates collapse)."""
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.ckpt")) + glob.glob(os.path.join(path, "*.pb")))
        if not files:
            raise StrategyError(f"{path}: folder holds no strategy files (*.ckpt)")
    elif os.path.isfile(path):
        files = [path]
    else:
        raise StrategyError(f"{path}: no such strategy file or folder")
    stages: dict[int, dict[str, Layout]] = {}
    sources: dict[int, str] = {}
    for f in files:
        for st, layouts in read_strategy_file(f).items():
            if st in stages:
                if stages[st] != layouts:
                    raise StrategyError(f"{f}: stage {st} differs from the stage {st} of {sources[st]}")
                continue
            stages[st], sources[st] = layouts, f
    if sorted(stages) != list(range(len(stages))):
        raise StrategyError(f"{path}: pipeline stages {sorted(stages)} found, expected 0..{len(stages) - 1}")
    nums = {st: next(iter(l.values())).device_num for st, l in stages.items()}
    for st, layouts in stages.items():
        for name, lay in layouts.items():
            if lay.device_num != nums[0]:
                raise StrategyError(f"{sources[st]}: {name}: dev_matrix {list(lay.dev_matrix)} spans "
                                    f"{lay.device_num} devices, other parameters {nums[0]}")
    return Strategy(dict(sorted(stages.items())), sources)


def write_strategy_file(path: str, layouts: Mapping[str, Layout], stage: int = 0) -> str:
    """Write ``{name: Layout}`` as the strategy file of pipeline stage ``stage`` (atomically)."""
    pb2 = strategy_pb2()
    msg = pb2.ParallelStrategyMap()
    msg.current_stage = stage
    item = msg.parallel_strategy_item.add()
    item.node_name = "Default/network"
    item.parallel_strategys.stage = stage
    item.parallel_strategys.parallel_strategy.add().dim.extend([1])
    for name, lay in layouts.items():
        li = msg.parallel_layout_item.add()
        li.param_name = name
        pl = li.parallel_layouts
        pl.dev_matrix.add().dim.extend(lay.dev_matrix)
        if any(isinstance(e, tuple) for e in lay.tensor_map):
            for e in lay.tensor_map:
                pl.tensor_map.add().dim.extend(e if isinstance(e, tuple) else (e,))
        else:
            pl.tensor_map.add().dim.extend(lay.tensor_map)
        pl.param_split_shape.add()
        pl.indices_offset.add()
        pl.field = lay.field
        pl.opt_weight_shard_step = lay.opt_shard_step
        pl.opt_weight_shard_size = lay.opt_shard_size
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_file(path, "wb") as f:
        f.write(msg.SerializeToString())
    return path
