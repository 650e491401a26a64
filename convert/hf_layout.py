"""HF checkpoint directories in every layout ChatGLM2 ships in: read lazily, write atomically.

Layouts:
- ``single``: ``model.safetensors``
- ``sharded-safetensors``: ``model-0000N-of-0000M.safetensors`` + ``model.safetensors.index.json``
- ``sharded-bin``: ``pytorch_model-0000N-of-0000M.bin`` + ``pytorch_model.bin.index.json`` (the 6B release)
- ``single-bin``: ``pytorch_model.bin``

:class:`HFCheckpoint` reads one tensor at a time: safetensors through our own header parser and a
memory map (bfloat16 comes back as an ``ml_dtypes.bfloat16`` array, no torch needed), ``.bin`` shards
with ``torch.load(mmap=True, weights_only=True)`` one shard at a time. Safetensors headers are
validated as the ``safetensors`` library validates them (and then opened by it, see
:mod:`convert.safetensors_io`); ``.bin`` shards must hold a flat ``{str: Tensor}`` dict (torch checks
every storage against its zip record). An index's shard names must be plain strings that stay inside the
directory. :func:`write_hf_checkpoint` writes shards plus index into a staging folder
(:func:`glm_common.fsutil.atomic_dir`) and moves them in place only when everything is written.

CLI (the tiny model in any layout, for tests and the demo)::

    python -m convert.hf_layout tiny --layout sharded-bin --out /tmp/tiny_glm2 [--dtype bf16]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Iterable, Iterator, Optional

import numpy as np

from convert.safetensors_io import (NP_DTYPES, CheckpointError, SafetensorsFile, bf16, dtype_name,
                                     format_mismatch, output_error, read_safetensors_header, save_safetensors, to_dtype,
                                     torch_load_refusal)
from glm_common.fsutil import atomic_dir, atomic_file, check_output
from glm_common.cli import one_line_errors

__all__ = ["CheckpointError", "HFCheckpoint", "write_hf_checkpoint", "write_tiny_hf_dir", "LAYOUTS",
           "read_safetensors_header", "save_safetensors", "parse_size", "dtype_name", "to_dtype", "remove_stale_weights", "NP_DTYPES", "torch_to_numpy",
           "numpy_to_torch"]

LAYOUTS = ("single", "sharded-safetensors", "sharded-bin", "single-bin")
SAFE_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


# ---------------------------------------------------------------------- reading
class _DuplicateKey(ValueError):
    pass


def _no_duplicate_keys(pairs):
    """``json`` object hook: a key given twice is an error (``json`` keeps the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class HFCheckpoint:
    """Lazy view of an HF checkpoint directory: names, shapes, dtypes; one tensor read at a time.

    >>> ckpt = HFCheckpoint("chatglm2-6b")
    >>> for name, array in ckpt.items():    # numpy arrays, shard by shard
    ...     ...
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise CheckpointError(f"{self.path}: not a directory (expected an HF checkpoint directory)")
        self._st_files: dict[str, SafetensorsFile] = {}
        self._bin_cache: tuple[Optional[str], Optional[dict]] = (None, None)
        self.layout, self.weight_map = self._discover()

    # .................................................................. discovery
    def _discover(self) -> tuple[str, dict[str, str]]:
        p = self.path
        for index_name, layout, ext in ((SAFE_INDEX, "sharded-safetensors", ".safetensors"),
                                        (BIN_INDEX, "sharded-bin", ".bin")):
            index = os.path.join(p, index_name)
            if os.path.isfile(index):
                try:
                    with open(index, encoding="utf-8") as f:
                        data = json.load(f, object_pairs_hook=_no_duplicate_keys)
                except _DuplicateKey as e:
                    raise CheckpointError(f"{index}: {e.args[0]}: listed twice (one copy would be chosen "
                                          f"silently)") from None
                except json.JSONDecodeError as e:
                    raise CheckpointError(f"{index}:{e.lineno}: not valid JSON: {e.msg}") from None
                except (UnicodeDecodeError, RecursionError):
                    raise CheckpointError(f"{index}: not valid UTF-8 JSON") from None
                except OSError as e:
                    raise CheckpointError(f"{index}: cannot read: {e.strerror or e}") from None
                wm = data.get("weight_map") if isinstance(data, dict) else None
                if not isinstance(wm, dict) or not wm:
                    raise CheckpointError(f"{index}: weight_map: missing or empty")
                root = os.path.realpath(p)
                for name, shard in wm.items():
                    if not isinstance(shard, str) or not shard:
                        raise CheckpointError(f"{index}: weight_map: {name}: expected a shard file name, "
                                              f"got {shard!r}")
                    real = os.path.realpath(os.path.join(p, shard))
                    if os.path.isabs(shard) or not real.startswith(root + os.sep):
                        raise CheckpointError(f"{index}: weight_map: {name}: shard {shard!r} lies outside "
                                              f"the model directory {p}")
                    if not shard.endswith(ext):
                        raise CheckpointError(f"{index}: weight_map: {name}: shard {shard!r} is not a {ext} file")
                for shard in sorted(set(wm.values())):
                    if not os.path.isfile(os.path.join(p, shard)):
                        raise CheckpointError(f"{index}: shard {shard} is named in weight_map but missing")
                for single_name in ("model.safetensors", "pytorch_model.bin"):
                    if os.path.isfile(os.path.join(p, single_name)) and single_name not in wm.values():
                        raise CheckpointError(f"{p}: holds both {single_name} and the sharded checkpoint of "
                                              f"{index_name} (which one is meant? remove the other)")
                self._check_shards_disjoint(index, wm)
                return layout, dict(wm)
        single = os.path.join(p, "model.safetensors")
        if os.path.isfile(single):
            return "single", {name: "model.safetensors" for name in self._st(single).names}
        single_bin = os.path.join(p, "pytorch_model.bin")
        if os.path.isfile(single_bin):
            sd = self._load_bin(single_bin)
            return "single-bin", {name: "pytorch_model.bin" for name in sd}
        raise CheckpointError(f"{p}: no weights found (expected model.safetensors, {SAFE_INDEX}, "
                              f"{BIN_INDEX} or pytorch_model.bin)")

    def _check_shards_disjoint(self, index: str, wm: dict) -> None:
        """Every tensor in exactly the shard the index names: the same tensor in two shards is refused."""
        from glm_common.names import is_derived_buffer
        for shard in sorted(set(wm.values())):
            file = os.path.join(self.path, shard)
            names = self._st(file).names if shard.endswith(".safetensors") else list(self._load_bin(file))
            for name in names:
                if is_derived_buffer(name):  # (rotary inv_freq: recomputed, never read; old releases repeat it)
                    continue
                if name in wm and wm[name] != shard:
                    raise CheckpointError(f"{file}: {name}: also in {wm[name]} (the same tensor in two shards; "
                                          f"{os.path.basename(index)} names {wm[name]})")
        self._bin_cache = (None, None)

    def _st(self, file: str) -> SafetensorsFile:
        if file not in self._st_files:
            self._st_files[file] = SafetensorsFile(file)
        return self._st_files[file]

    def _load_bin(self, file: str) -> dict:
        if self._bin_cache[0] != file:
            import torch
            self._bin_cache = (None, None)
            mismatch = format_mismatch(file, "torch-zip")
            if mismatch:
                raise CheckpointError(mismatch)
            try:
                sd = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except Exception as e:  # torch raises RuntimeError, EOFError, zipfile errors, UnpicklingError ...
                raise CheckpointError(torch_load_refusal(file, e, ".bin checkpoint")) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{file}: expected a state dict, got {type(sd).__name__}")
            for key, value in sd.items():
                if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                    raise CheckpointError(f"{file}: {key!r}: expected a tensor under a string name, got "
                                          f"{type(value).__name__}")
            self._bin_cache = (file, sd)
        return self._bin_cache[1]

    # .................................................................. queries
    @property
    def names(self) -> list[str]:
        return list(self.weight_map)

    @property
    def shards(self) -> list[str]:
        """Shard file names in order of first appearance."""
        return list(dict.fromkeys(self.weight_map.values()))

    def file_of(self, name: str) -> str:
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        return os.path.join(self.path, self.weight_map[name])

    def _st_file(self, file: str, name: str) -> SafetensorsFile:
        """The safetensors shard ``file``, which must hold ``name``."""
        st = self._st(file)
        if name not in st:
            raise CheckpointError(f"{file}: {name} is in the index but not in the shard")
        return st

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, dtype name)`` without reading the data (for .bin shards, mmap'ed)."""
        file = self.file_of(name)
        if file.endswith(".safetensors"):
            return self._st_file(file, name).info(name)
        t = self._bin_tensor(file, name)
        return tuple(t.shape), str(t.dtype).replace("torch.", "")

    def _bin_tensor(self, file: str, name: str):
        sd = self._load_bin(file)
        if name not in sd:
            raise CheckpointError(f"{file}: {name} is in the index but not in the shard")
        return sd[name]

    def read(self, name: str, copy: bool = True) -> np.ndarray:
        """The tensor as a numpy array (bfloat16 as ``ml_dtypes.bfloat16``), a copy owned by the caller.

        ``copy=False`` saves a copy: a read-only array over the bytes read (safetensors) or over the
        memory-mapped shard (``.bin``; valid while the shard is the one mapped, see :meth:`release`).
        """
        file = self.file_of(name)
        if file.endswith(".safetensors"):
            return self._st_file(file, name).read(name, copy=copy)
        return torch_to_numpy(self._bin_tensor(file, name), copy=copy)

    def release(self, name: str) -> None:
        """Drop the memory-mapped pages of a ``.bin`` tensor already read (no-op for safetensors).

        ``.bin`` shards are mapped privately and read-only, so the kernel re-reads a dropped page from
        the file if it is touched again; dropping keeps the resident set near one tensor, not a shard.
        """
        file = self.file_of(name)
        if file.endswith(".safetensors") or self._bin_cache[0] != file:
            return
        t = self._bin_cache[1].get(name)
        if t is None or t.numel() == 0:
            return
        _drop_pages(t.data_ptr(), t.numel() * t.element_size())

    def byte_range(self, name: str) -> Optional[tuple[str, int, int]]:
        """``(file, offset, nbytes)``: where the tensor's bytes lie, in row-major order, in its file; ``None``
        when that cannot be told (a non-contiguous view in a ``.bin``). Lets a caller copy them in the kernel."""
        file = self.file_of(name)
        if file.endswith(".safetensors"):
            return self._st_file(file, name).byte_range(name)
        t = self._bin_tensor(file, name)
        base = self._bin_base(file)
        if base is None or not t.is_contiguous():
            return None
        return file, t.data_ptr() - base, t.numel() * t.element_size()

    def _bin_base(self, file: str) -> Optional[int]:
        """Address of byte 0 of the mapped ``.bin`` shard: ``torch.load(mmap=True)`` maps the whole file
        and each storage is a slice of it at its zip record's offset. Checked on every storage."""
        cache = getattr(self, "_bin_bases", None)
        if cache is None:
            cache = self._bin_bases = {}
        if file not in cache:
            import torch
            sd = self._load_bin(file)
            try:
                reader = torch._C.PyTorchFileReader(file)
                offsets = {reader.get_record_offset(r) for r in reader.get_all_records()
                           if r.rsplit("/", 2)[-2:-1] == ["data"]}
                ptrs = {t.untyped_storage().data_ptr() for t in sd.values() if t.numel()}
                base = min(ptrs) - min(offsets) if ptrs and offsets else None
                if base is not None and not {p - base for p in ptrs} <= offsets:
                    base = None
            except (AttributeError, RuntimeError):
                base = None
            cache.clear()  # one shard is mapped at a time
            cache[file] = base
        return cache[file]

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading a tensor's bytes now (asynchronous readahead; a hint only).

        For ``.bin`` tensors this acts only on the shard currently mapped (the one last read from).
        """
        file = self.file_of(name)
        if file.endswith(".safetensors"):
            if name not in self._st(file) or not hasattr(os, "posix_fadvise"):
                return
            _, offset, nbytes = self._st(file).byte_range(name)
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
            return
        if self._bin_cache[0] != file:
            return
        t = self._bin_cache[1].get(name)
        if t is not None and t.numel():
            _advise(t.data_ptr(), t.numel() * t.element_size(), 3, inner=False)  # 3 = MADV_WILLNEED

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        """``(name, array)`` shard by shard, so at most one .bin shard is mapped at a time."""
        by_shard: dict[str, list[str]] = {}
        for name, shard in self.weight_map.items():
            by_shard.setdefault(shard, []).append(name)
        for shard, names in by_shard.items():
            for name in names:
                yield name, self.read(name)
        self._bin_cache = (None, None)

    def total_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.path, s)) for s in self.shards)


def _drop_pages(address: int, nbytes: int) -> None:
    """``madvise(MADV_DONTNEED)`` the whole pages inside ``[address, address + nbytes)`` (Linux; else no-op)."""
    _advise(address, nbytes, 4, inner=True)  # 4 = MADV_DONTNEED


def _advise(address: int, nbytes: int, advice: int, inner: bool) -> None:
    """``madvise`` on the pages wholly inside the range (``inner``) or touching it (Linux; else no-op)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import mmap
    page = mmap.PAGESIZE
    if inner:
        start, end = -(-address // page) * page, (address + nbytes) // page * page
    else:
        start, end = address // page * page, -(-(address + nbytes) // page) * page
    if end <= start:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


def torch_to_numpy(t, copy: bool = True) -> np.ndarray:
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        array = t.contiguous().view(torch.int16).numpy().view(bf16())
    else:
        array = t.contiguous().numpy()
    if copy:
        return array.copy()
    array.flags.writeable = False
    return array


def numpy_to_torch(a: np.ndarray):
    import torch
    if a.dtype == bf16():
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(a))


# ---------------------------------------------------------------------- writing
def parse_size(text: str | int | None) -> Optional[int]:
    """``"2GB"`` / ``"500MB"`` / ``"10KB"`` / bytes -> bytes (decimal units as HF uses them)."""
    if text is None or isinstance(text, int):
        return text
    s = str(text).strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                       ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            try:
                value = int(float(s[: -len(unit)]) * mult)
            except (ValueError, OverflowError):
                break
            if value > 0:
                return value
            break
    else:
        try:
            value = int(s)
        except ValueError:
            value = None
        if value is not None and value > 0:
            return value
    raise CheckpointError(f"max-shard-size: expected a positive size such as 2GB or 500MB, got {text!r}")


def shard_groups(sizes: list[int], num_shards: int, where: str = "shards") -> list[int]:
    """The shard (0..num_shards-1) of each of the tensors of byte sizes ``sizes``, in order: exactly
    ``num_shards`` consecutive groups of about equal bytes, none empty."""
    if num_shards < 1:
        raise CheckpointError(f"{where}: expected at least 1 shard, got {num_shards}")
    if num_shards > len(sizes):
        raise CheckpointError(f"{where}: {num_shards} shards for {len(sizes)} tensors (at most one shard a tensor)")
    out, group, cur = [], 0, 0
    remaining = sum(sizes)
    for i, nbytes in enumerate(sizes):
        left_groups = num_shards - group
        if cur and left_groups > 1:
            target = remaining / left_groups
            # close the group when it is full enough, or when every tensor left must open a group of its own
            if cur + nbytes / 2 > target or len(sizes) - i == left_groups - 1:
                remaining -= cur
                group, cur = group + 1, 0
        out.append(group)
        cur += nbytes
    return out


def write_hf_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], out_dir: str, fmt: str = "safetensors",
                        max_shard_size: int | str | None = None, num_shards: Optional[int] = None) -> list[str]:
    """Write ``(name, array)`` pairs as an HF checkpoint into ``out_dir``; return the files written.

    ``fmt``: ``safetensors`` or ``bin``. Without ``max_shard_size`` one file (``model.safetensors`` /
    ``pytorch_model.bin``); with it, ``*-0000N-of-0000M.*`` shards plus the index json; with ``num_shards``
    exactly that many shards of about equal bytes (:func:`shard_groups`; the tensors are listed first). Tensors are
    consumed one at a time; a shard is written when it is full. Nothing appears in ``out_dir`` until
    every file is complete; then weight files of another layout (``model.safetensors``,
    ``pytorch_model.bin`` and the index files) that would shadow the new ones are removed.
    """
    if fmt not in ("safetensors", "bin"):
        raise CheckpointError(f"format: expected safetensors or bin, got {fmt!r}")
    limit = parse_size(max_shard_size)
    group_of: dict[str, int] = {}
    if num_shards is not None:
        tensors = list(tensors)
        group_of = dict(zip((n for n, _ in tensors),
                            shard_groups([a.size * a.dtype.itemsize for _, a in tensors], num_shards)))
        limit = None
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise output_error(out_dir, e) from None
    base, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    with atomic_dir(out_dir, merge=True) as stage:
        shards: list[list[str]] = []
        weight_map: dict[str, int] = {}
        current: list[tuple[str, np.ndarray]] = []
        size = total = 0

        def flush():
            nonlocal current, size
            if not current:
                return
            idx = len(shards)
            tmp_name = os.path.join(stage, f"shard{idx}")
            if fmt == "safetensors":
                save_safetensors(current, tmp_name, metadata={"format": "pt"})
            else:
                import torch
                try:
                    torch.save({n: numpy_to_torch(a) for n, a in current}, tmp_name)
                except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as RuntimeError
                    raise output_error(os.path.join(out_dir, f"{base}.{ext}"),
                                       e if isinstance(e, OSError) else OSError(str(e).splitlines()[0])) from None
            shards.append([n for n, _ in current])
            for n, _ in current:
                weight_map[n] = idx
            current, size = [], 0

        for name, arr in tensors:
            if name in weight_map or any(name == n for n, _ in current):
                raise CheckpointError(f"{out_dir}: tensor {name} written twice")
            nbytes = arr.size * arr.dtype.itemsize
            if (limit and current and size + nbytes > limit) or \
                    (group_of and current and group_of[name] != group_of[current[-1][0]]):
                flush()
            current.append((name, arr))
            size += nbytes
            total += nbytes
        flush()
        n = len(shards)
        if limit is None and num_shards is None:
            final = [f"{base}.{ext}"]
        else:
            final = [f"{base}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
        for i, fname in enumerate(final):
            os.replace(os.path.join(stage, f"shard{i}"), os.path.join(stage, fname))
        if limit is not None or num_shards is not None:
            index = {"metadata": {"total_size": total},
                     "weight_map": {name: final[i] for name, i in weight_map.items()}}
            index_name = SAFE_INDEX if fmt == "safetensors" else BIN_INDEX
            with atomic_file(os.path.join(stage, index_name), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
                f.write("\n")
            final = final + [index_name]
    remove_stale_weights(out_dir, final)
    return [os.path.join(out_dir, fname) for fname in final]


_WEIGHT_FILE = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)")


def remove_stale_weights(out_dir: str, keep: Iterable[str]) -> None:
    """Remove weight files and indexes of another layout (or shard count) than ``keep`` from ``out_dir``:
    left in the folder they would shadow the new ones when it is loaded."""
    keep = {os.path.basename(k) for k in keep}
    for old in os.listdir(out_dir):
        if old not in keep and (old in (SAFE_INDEX, BIN_INDEX) or _WEIGHT_FILE.fullmatch(old)):
            os.remove(os.path.join(out_dir, old))


# ---------------------------------------------------------------------- the built-in tiny model
def _fixtures_dir() -> str:
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "fixtures")


def write_tiny_hf_dir(out_dir: str, layout: str = "single", model: str = "tiny_glm2",
                      dtype: Optional[str] = None, shards: int = 3, overwrite: bool = True) -> str:
    """Write the golden tiny ChatGLM2 (``tiny_glm2`` or ``tiny_glm2_ptuning``) as an HF directory.

    ``layout`` is one of :data:`LAYOUTS`; sharded layouts get exactly ``shards`` files (about equal bytes).
    ``dtype`` casts the weights (``float32|float16|bfloat16``); ``config.json`` says the dtype.
    ``tokenizer.model`` and ``tokenizer_config.json`` are written beside the weights. A non-empty
    ``out_dir`` is refused unless ``overwrite`` (then only the files written here are replaced).
    """
    from glm_common.config import ChatGLM2Config
    from glm_common.tokenizer import ChatGLM2Tokenizer

    if layout not in LAYOUTS:
        raise CheckpointError(f"layout: expected one of {', '.join(LAYOUTS)}, got {layout!r}")
    src = os.path.join(_fixtures_dir(), "model", model)
    if not os.path.isdir(src):
        raise CheckpointError(f"{src}: no such built-in model")
    check_output(out_dir, [src], "--out", overwrite=overwrite)
    config = ChatGLM2Config.from_hf(src)
    ckpt = HFCheckpoint(src)
    tensors = [(n, a if dtype is None else to_dtype(a, dtype)) for n, a in ckpt.items()]
    fmt = "bin" if layout.endswith("bin") else "safetensors"
    num_shards = None if layout in ("single", "single-bin") else shards
    if num_shards is not None:
        shard_groups([a.nbytes for _, a in tensors], num_shards, "--shards")   # refused before anything is written
    try:
        os.makedirs(os.path.dirname(os.path.abspath(out_dir)), exist_ok=True)
    except OSError as e:
        raise output_error(out_dir, e) from None
    with atomic_dir(out_dir, merge=True) as stage:
        write_hf_checkpoint(tensors, stage, fmt=fmt, num_shards=num_shards)
        if dtype is not None:
            config.torch_dtype = NP_DTYPES.get(dtype, dtype)
        config.save_hf(stage)
        ChatGLM2Tokenizer(os.path.join(_fixtures_dir(), "tokenizer", "tiny_glm2_sp.model")).save_pretrained(stage)
    return out_dir


@one_line_errors
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m convert.hf_layout",
                                 description="Inspect HF ChatGLM2 checkpoints, or write the built-in tiny model.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tiny", help="write the built-in tiny ChatGLM2 as an HF directory")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--layout", default="single", choices=LAYOUTS)
    t.add_argument("--model", default="tiny_glm2", choices=("tiny_glm2", "tiny_glm2_ptuning"))
    t.add_argument("--dtype", default=None, choices=sorted(NP_DTYPES), help="cast weights (default: keep fp32)")
    t.add_argument("--shards", type=int, default=3, help="number of shards for sharded layouts")
    t.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out (replaces the files written here, keeps the others)")
    i = sub.add_parser("info", help="list the tensors of an HF checkpoint directory")
    i.add_argument("dir")
    args = ap.parse_args(argv)
    try:
        if args.cmd == "tiny":
            if args.shards < 1:
                raise CheckpointError(f"--shards: expected at least 1, got {args.shards}")
            out = write_tiny_hf_dir(args.out, args.layout, args.model, args.dtype, args.shards, args.overwrite)
            print(f"wrote {args.model} ({args.layout}) to {out}")
        else:
            ckpt = HFCheckpoint(args.dir)
            for name in ckpt.names:
                shape, dt = ckpt.info(name)
                print(f"{name}\t{list(shape)}\t{dt}\t{ckpt.weight_map[name]}")
            print(f"{len(ckpt.names)} tensors, {ckpt.total_bytes()} bytes, layout {ckpt.layout}")
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
