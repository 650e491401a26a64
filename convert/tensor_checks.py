"""What every weight is checked for on its way in (converters, the merger, both backends' loaders).

- dtype: ChatGLM2's weights are floating point (``float32``, ``float16``, ``bfloat16``); an integer,
  boolean or ``float64`` tensor under a weight's name is refused, naming the tensor
  (:func:`check_dtype`).
- values: NaN and Inf are refused with the tensor's name and how many there are (:func:`check_finite`;
  the converters' ``--allow-nonfinite`` lets them through).
- casting: a value beyond the target dtype's range (fp32 -> fp16 of 1e5) would become Inf; refused with
  the tensor's name and its largest magnitude (:func:`check_cast`).

Fast: the finite check counts the all-ones exponents on the raw bits (``float16``/``bfloat16``/``float32``
viewed as unsigned integers), chunk by chunk, so memory stays at one chunk and a checkpoint is checked
at memory bandwidth; ``numpy`` does the work (no hand-written loops).
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from convert.safetensors_io import CheckpointError, dtype_name

__all__ = ["FLOAT_DTYPES", "WeightValueError", "check_dtype", "count_nonfinite", "check_finite", "check_file_range", "check_cast",
           "check_tensor", "max_abs"]

#: the dtypes a ChatGLM2 weight may be stored in.
FLOAT_DTYPES = ("float32", "float16", "bfloat16")

#: exponent mask and unsigned view per float dtype: a value is NaN/Inf when its exponent bits are all ones.
_EXPONENT = {"float32": (np.uint32, 0x7F800000), "float16": (np.uint16, 0x7C00), "bfloat16": (np.uint16, 0x7F80),
             "float64": (np.uint64, 0x7FF0000000000000)}
_CHUNK = 1 << 22  # elements per chunk (16 MiB of float32)


class WeightValueError(CheckpointError):
    """A weight whose dtype or values cannot be used; one line naming the file and the tensor."""


def check_dtype(name: str, dtype, where: str) -> None:
    """Refuse a weight stored in a dtype other than :data:`FLOAT_DTYPES`."""
    dt = dtype if isinstance(dtype, str) else dtype_name(dtype)
    if dt not in FLOAT_DTYPES:
        raise WeightValueError(f"{where}: {name}: dtype {dt} is not one ChatGLM2 weights use "
                               f"({', '.join(FLOAT_DTYPES)})")


def count_nonfinite(array: np.ndarray, dtype: Optional[str] = None) -> int:
    """How many NaN/Inf values ``array`` holds (0 for non-float arrays); ``dtype``: the float dtype whose
    bits an unsigned ``array`` holds."""
    name = dtype or dtype_name(array.dtype)
    if name not in _EXPONENT:
        return 0
    utype, mask = _EXPONENT[name]
    flat = np.ascontiguousarray(array).reshape(-1).view(utype)
    bad = 0
    buf = np.empty(min(flat.size, _CHUNK), dtype=utype)
    for start in range(0, flat.size, _CHUNK):
        part = flat[start:start + _CHUNK]
        out = buf[:part.size]
        np.bitwise_and(part, utype(mask), out=out)
        bad += int(np.count_nonzero(out == utype(mask)))
    return bad


def check_file_range(name: str, file: str, offset: int, nbytes: int, dtype: str, where: str,
                     allow: bool = False) -> int:
    """:func:`check_finite` of a tensor's bytes in a file, read through a memory map (no copy)."""
    if dtype not in _EXPONENT or nbytes == 0:
        return 0
    utype, _ = _EXPONENT[dtype]
    view = np.memmap(file, dtype=utype, mode="r", offset=offset, shape=(nbytes // np.dtype(utype).itemsize,))
    try:
        return check_finite(name, view, where, allow, dtype)
    finally:
        del view


def check_finite(name: str, array: np.ndarray, where: str, allow: bool = False, dtype: Optional[str] = None) -> int:
    """Refuse NaN/Inf in ``array`` (unless ``allow``); return how many there are. ``dtype``: the float
    dtype whose bits ``array`` (an unsigned view) holds."""
    bad = count_nonfinite(array, dtype)
    if bad and not allow:
        raise WeightValueError(f"{where}: {name}: {bad} NaN/Inf values of {array.size} (--allow-nonfinite "
                               f"converts them anyway)")
    return bad


def max_abs(array: np.ndarray) -> float:
    """The largest finite magnitude in ``array`` (0.0 when there is none)."""
    a = np.asarray(array, dtype=np.float64 if dtype_name(array.dtype) == "float64" else np.float32)
    a = np.abs(a[np.isfinite(a)])
    return float(a.max()) if a.size else 0.0


def check_cast(name: str, source: np.ndarray, cast: np.ndarray, where: str,
               source_bad: Optional[int] = None) -> None:
    """Refuse a cast that turned finite values into Inf (beyond the target's range), naming the largest
    magnitude. ``source_bad``: the NaN/Inf count of ``source`` when already known."""
    if cast is source or dtype_name(cast.dtype) == dtype_name(source.dtype):
        return
    before = count_nonfinite(source) if source_bad is None else source_bad
    after = count_nonfinite(cast)
    if after > before:
        target = dtype_name(cast.dtype)
        limit = float(np.finfo(np.float16).max) if target == "float16" else float(np.finfo(np.float32).max)
        raise WeightValueError(f"{where}: {name}: max |value| {max_abs(source):.6g} is beyond the range of {target} "
                               f"(largest {limit:.6g}); {after - before} values would become Inf")


def check_tensor(name: str, array: np.ndarray, where: str, allow_nonfinite: bool = False) -> None:
    """dtype and finite checks of one weight as a loader receives it."""
    check_dtype(name, array.dtype, where)
    check_finite(name, array, where, allow_nonfinite)
