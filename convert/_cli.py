"""Pieces the converter scripts share: error reporting, byte progress, summary line, dtype options,
and a streaming writer of MindSpore-flavoured safetensors files."""
from __future__ import annotations

import json
import os
import struct
import sys
import time
from typing import Optional, Sequence

import numpy as np

from convert.hf_layout import CheckpointError, NP_DTYPES, dtype_name, to_dtype, _st_tag
from convert.ms_ckpt import AtomicWriter

__all__ = ["ConversionError", "DTYPE_CHOICES", "cast", "Progress", "report_error", "run_main", "KNOWN_ERRORS",
           "SafetensorsWriter", "fmt_bytes"]

#: ``--dtype`` values: ``keep`` leaves every tensor in the dtype it was stored in.
DTYPE_CHOICES = ("keep", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


class ConversionError(ValueError):
    """Input a converter cannot turn into output; the message is one line naming the file and parameter."""


def _known_errors() -> tuple[type, ...]:
    from convert.ms_ckpt import MSCheckpointError
    from glm_common.config import ConfigError
    from glm_common.names import NamingError
    return (ConversionError, CheckpointError, MSCheckpointError, ConfigError, NamingError, OSError)


KNOWN_ERRORS = _known_errors()


def run_main(convert) -> int:
    """Run ``convert()`` for a CLI: print its summary line and return 0, or one error line and 1 (130 on
    Ctrl-C); nothing is left half-written either way (the writers are atomic)."""
    try:
        summary = convert()
    except KNOWN_ERRORS as e:
        return report_error(e)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 130
    print(summary["line"] if isinstance(summary, dict) else summary)
    return 0


def report_error(exc: BaseException) -> int:
    """Print ``error: <one line>`` to stderr and return the exit status 1."""
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and exc.filename not in msg:
        msg = f"{exc.filename}: {exc.strerror or msg}"
    print(f"error: {msg}", file=sys.stderr)
    return 1


def cast(array: np.ndarray, dtype: str) -> np.ndarray:
    """``array`` in ``dtype`` (``keep`` or a name of :data:`DTYPE_CHOICES`); floats only are cast."""
    is_float = array.dtype.kind == "f" or dtype_name(array.dtype) == "bfloat16"
    if dtype == "keep" or not is_float:
        return array
    return to_dtype(array, dtype)


def out_dtype_name(dtype: str) -> Optional[str]:
    """``float32|float16|bfloat16`` for a ``--dtype`` value, ``None`` for ``keep``."""
    return None if dtype == "keep" else NP_DTYPES[dtype]


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class Progress:
    """A tqdm bar counting bytes (to stderr) plus the numbers of the closing summary line."""

    def __init__(self, total_bytes: int, desc: str, enabled: bool = True):
        self.t0 = time.perf_counter()
        self.tensors = 0
        self.bytes = 0
        self.dtypes: dict[str, int] = {}
        self.bar = None
        if enabled:
            from tqdm import tqdm
            self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                            file=sys.stderr, dynamic_ncols=True, leave=False)

    def update(self, array: np.ndarray, read_bytes: Optional[int] = None) -> None:
        self.count(array.nbytes, dtype_name(array.dtype), read_bytes)

    def count(self, nbytes: int, dtype: str, read_bytes: Optional[int] = None) -> None:
        """One tensor of ``nbytes`` written in ``dtype``; the bar advances by ``read_bytes`` (default ``nbytes``)."""
        self.tensors += 1
        self.bytes += nbytes
        self.dtypes[dtype] = self.dtypes.get(dtype, 0) + 1
        if self.bar is not None:
            self.bar.update(nbytes if read_bytes is None else read_bytes)

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.perf_counter() - self.t0

    def summary(self, what: str, output: str, extra: str = "") -> str:
        seconds = self.close()
        dtypes = ", ".join(sorted(self.dtypes)) or "-"
        line = (f"{what}: {self.tensors} tensors, {fmt_bytes(self.bytes)}, dtype {dtypes}, "
                f"{seconds:.1f} s -> {output}")
        return line + (f" ({extra})" if extra else "")


class SafetensorsWriter(AtomicWriter):
    """Write a safetensors file one tensor at a time from a plan known up front (the header comes first).

    ``plan``: ``(name, shape, dtype)`` in the order tensors will be written. ``metadata`` goes to
    ``__metadata__`` (MindSpore writes ``{"format": "ms"}``). The file is written to ``path + ".partial"``
    and renamed by :meth:`close`; :meth:`abort` removes it.
    """

    def __init__(self, path: str, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                 metadata: Optional[dict] = None):
        self.path = os.fspath(path)
        header, offset = {}, 0
        self._expect = []
        for name, shape, dtype in plan:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            header[name] = {"dtype": _st_tag(dtype), "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._expect.append((name, tuple(int(d) for d in shape), dtype))
            offset += nbytes
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.tmp = self.path + ".partial"
        self._f = open(self.tmp, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._expect):
            raise ConversionError(f"{self.path}: {name}: more tensors than planned")
        want_name, want_shape, want_dtype = self._expect[self._next]
        if (name, tuple(array.shape), array.dtype) != (want_name, want_shape, want_dtype):
            raise ConversionError(f"{self.path}: {name}: {list(array.shape)} {array.dtype} written where the "
                                  f"header holds {want_name} {list(want_shape)} {want_dtype}")
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._next += 1

    def write_from_file(self, name: str, shape, dtype, src: str, offset: int, nbytes: int) -> None:
        """Append the next planned tensor from ``nbytes`` at ``offset`` of file ``src`` (copied by the kernel)."""
        from convert.ms_ckpt import copy_bytes
        if self._next >= len(self._expect):
            raise ConversionError(f"{self.path}: {name}: more tensors than planned")
        want = self._expect[self._next]
        if (name, tuple(shape), np.dtype(dtype)) != want:
            raise ConversionError(f"{self.path}: {name}: written where the header holds {want[0]}")
        if int(np.prod(want[1], dtype=np.int64)) * want[2].itemsize != nbytes:
            raise ConversionError(f"{self.path}: {name}: {nbytes} bytes do not hold {list(want[1])} of {want[2]}")
        self._f.flush()
        copy_bytes(src, offset, nbytes, self._f)
        self._next += 1

    def close(self) -> str:
        self._f.close()
        if self._next != len(self._expect):
            self.abort()
            raise ConversionError(f"{self.path}: {len(self._expect) - self._next} planned tensors never written")
        os.replace(self.tmp, self.path)
        return self.path

