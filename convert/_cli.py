"""Pieces the converter scripts share: error reporting, byte progress, summary line, dtype options.
(:class:`SafetensorsWriter` lives in :mod:`convert.safetensors_io` and is re-exported here.)"""
from __future__ import annotations

import sys
import time
from typing import Optional

import numpy as np

from convert.ms_ckpt import MSCheckpointError
from convert.safetensors_io import NP_DTYPES, CheckpointError, SafetensorsWriter, dtype_name, to_dtype
from glm_common.config import ConfigError
from glm_common.names import NamingError

__all__ = ["ConversionError", "DTYPE_CHOICES", "cast", "Progress", "report_error", "run_main", "KNOWN_ERRORS",
           "SafetensorsWriter", "fmt_bytes"]

#: ``--dtype`` values: ``keep`` leaves every tensor in the dtype it was stored in.
DTYPE_CHOICES = ("keep", "fp32", "fp16", "bf16", "float32", "float16", "bfloat16")


class ConversionError(ValueError):
    """Input a converter cannot turn into output; the message is one line naming the file and parameter."""


#: the errors a converter CLI reports as one line (OSError: an input that cannot be read, an output location
#: that cannot be written, named by the message).
KNOWN_ERRORS = (ConversionError, CheckpointError, MSCheckpointError, ConfigError, NamingError, OSError)


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
