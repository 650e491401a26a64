"""The converters' leaf module: the one dtype table, the one bfloat16 helper, safetensors files read
and written one tensor at a time, and the atomic writer base the ``.ckpt`` writer shares.

Reading: :func:`read_safetensors_header` checks exactly what the ``safetensors`` library checks when it
opens a file (header length within the file and under 100 MB, a UTF-8 JSON object, every entry with a
known ``dtype``, a ``shape`` of non-negative integers and ``data_offsets`` ``[begin, end]`` with
``end - begin == numel * itemsize``, the entries contiguous and non-overlapping from byte 0, and the data
exactly filling the file), naming the file and tensor on the first failure, and then opens the file
with the library's ``safe_open`` (which maps it lazily, reading nothing) as a second opinion. Tensors
are then read (or copied by the kernel) from their validated byte ranges, so memory stays at one
tensor. bfloat16 is ``ml_dtypes.bfloat16`` in numpy; torch is never needed.

Writing: :class:`SafetensorsWriter` writes the header from a plan known up front and then one tensor
at a time into ``<path>.partial`` (through :func:`glm_common.fsutil.atomic_file`), renamed on success.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
from typing import Iterable, Optional, Sequence

import numpy as np

from glm_common.fsutil import OutputError, atomic_file

__all__ = ["CheckpointError", "DTYPES", "NP_DTYPES", "bf16", "numpy_dtype", "dtype_name", "to_dtype",
           "st_dtype", "st_tag", "ms_dtype", "ms_type", "read_safetensors_header", "SafetensorsFile",
           "AtomicWriter", "SafetensorsWriter", "save_safetensors", "copy_bytes", "read_range", "output_error",
           "MAX_HEADER_BYTES", "sniff_format", "format_mismatch", "torch_load_refusal", "FORMAT_NAMES"]


class CheckpointError(ValueError):
    """A checkpoint file or directory that cannot be read; one line naming the file."""


#: the one dtype table: numpy name, safetensors tag, MindSpore ``tensor_type``.
DTYPES = (
    ("float64", "F64", "Float64"), ("float32", "F32", "Float32"), ("float16", "F16", "Float16"),
    ("bfloat16", "BF16", "BFloat16"), ("int64", "I64", "Int64"), ("int32", "I32", "Int32"),
    ("int16", "I16", "Int16"), ("int8", "I8", "Int8"), ("uint64", "U64", "UInt64"), ("uint32", "U32", "UInt32"),
    ("uint16", "U16", "UInt16"), ("uint8", "U8", "UInt8"), ("bool", "BOOL", "Bool"),
)
_BY_TAG = {tag: np_name for np_name, tag, _ in DTYPES}
_BY_MS = {ms: np_name for np_name, _, ms in DTYPES}
_TAG_OF = {np_name: tag for np_name, tag, _ in DTYPES}
_MS_OF = {np_name: ms for np_name, _, ms in DTYPES}
#: dtype names used on the command line and in configs -> numpy dtype name.
NP_DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
             "bf16": "bfloat16", "bfloat16": "bfloat16"}
#: the safetensors library refuses larger headers.
MAX_HEADER_BYTES = 100_000_000


def bf16() -> np.dtype:
    """numpy's bfloat16 (``ml_dtypes.bfloat16``)."""
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(name: str) -> np.dtype:
    """numpy dtype of a name of :data:`DTYPES` (or ``fp32|fp16|bf16``)."""
    name = NP_DTYPES.get(name, name)
    return bf16() if name == "bfloat16" else np.dtype(name)


def dtype_name(dtype) -> str:
    """``float32`` / ``float16`` / ``bfloat16`` / numpy's name for others."""
    dtype = np.dtype(dtype)
    return "bfloat16" if dtype == bf16() else dtype.name


def to_dtype(array: np.ndarray, name: str) -> np.ndarray:
    """Cast to a dtype named ``float32|float16|bfloat16`` (or ``fp32|fp16|bf16``)."""
    want = numpy_dtype(name)
    if array.dtype == want:
        return array
    with np.errstate(over="ignore"):  # values beyond the range: convert.tensor_checks.check_cast names them
        return array.astype(want)


def st_dtype(tag, where: str) -> np.dtype:
    """numpy dtype of a safetensors dtype tag; :class:`CheckpointError` naming ``where`` otherwise."""
    if not isinstance(tag, str) or tag not in _BY_TAG:
        raise CheckpointError(f"{where}: unsupported safetensors dtype {tag!r}")
    return numpy_dtype(_BY_TAG[tag])


def st_tag(dtype) -> str:
    name = dtype_name(dtype)
    if name not in _TAG_OF:
        raise CheckpointError(f"safetensors: cannot store dtype {name}")
    return _TAG_OF[name]


def ms_dtype(ms_type_name, where: str, error=CheckpointError) -> np.dtype:
    """numpy dtype of a MindSpore ``tensor_type`` string."""
    if not isinstance(ms_type_name, str) or ms_type_name not in _BY_MS:
        raise error(f"{where}: unsupported tensor type {ms_type_name!r}")
    return numpy_dtype(_BY_MS[ms_type_name])


def ms_type(dtype, error=CheckpointError) -> str:
    name = dtype_name(dtype)
    if name not in _MS_OF:
        raise error(f"cannot store dtype {name} in a MindSpore checkpoint")
    return _MS_OF[name]


def output_error(path: str, e: OSError) -> OutputError:
    """An :class:`OutputError` naming the output ``path`` for an ``OSError`` met writing it (disk full ...)."""
    if isinstance(e, OutputError):
        return e
    code = f"[Errno {e.errno}] " if e.errno else ""
    return OutputError(f"{path}: cannot write: {code}{e.strerror or e}")


# ---------------------------------------------------------------------- reading
# ---------------------------------------------------------------------- what a file is, by its first bytes
#: what each sniffed format is called in messages
FORMAT_NAMES = {"safetensors": "a safetensors file", "mindspore": "a MindSpore checkpoint",
                "torch-zip": "a zip archive (as torch.save writes)", "torch-pickle": "a pickle (an old torch.save)"}
#: the formats an extension promises
EXTENSION_FORMATS = {".safetensors": ("safetensors",), ".ckpt": ("mindspore",),
                     ".bin": ("torch-zip", "torch-pickle"), ".pt": ("torch-zip", "torch-pickle"),
                     ".pth": ("torch-zip", "torch-pickle")}


def sniff_format(path: str) -> Optional[str]:
    """The format of ``path`` by its first bytes: ``safetensors`` (an 8-byte header length that fits the
    file, then ``{``), ``mindspore`` (the protobuf ``Checkpoint``: field 1 holding a ``Value`` whose field 1 is
    its name), ``torch-zip`` (``torch.save``'s zip), ``torch-pickle`` (a pickle protocol 2-5 header); None for
    anything else (empty, corrupt, unknown: the reader of the expected format says what is wrong)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return "torch-zip"
    # safetensors first: its 8-byte little-endian header length can start with the bytes of a pickle header
    # (a length of 0x380 is 80 03 ...), while a pickle never has a '{' at byte 8 after a length that fits
    if len(head) >= 9 and head[8:9] == b"{" and 2 <= struct.unpack("<Q", head[:8])[0] <= size - 8:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "torch-pickle"
    if len(head) >= 3 and head[0] == 0x0A:  # tag of field 1, length-delimited; then a varint length
        i = 1
        while i < len(head) and head[i] & 0x80:
            i += 1
        if i + 1 < len(head) and head[i + 1] == 0x0A:
            return "mindspore"
    return None


def format_mismatch(path: str, expected: str) -> Optional[str]:
    """One line when ``path`` is, by its content, a known format other than ``expected`` (a key of
    :data:`FORMAT_NAMES`): the extension (or the tool's choice) and the content disagree. None otherwise."""
    found = sniff_format(path)
    if found is None or found == expected or (found.startswith("torch") and expected.startswith("torch")):
        return None
    ext = os.path.splitext(path)[1].lower()
    said = f"the extension {ext} says {FORMAT_NAMES[expected]}" if ext in EXTENSION_FORMATS \
        else f"{FORMAT_NAMES[expected]} was expected"
    rename = next((e for e, fs in EXTENSION_FORMATS.items() if found in fs), None)
    return (f"{path}: format does not match the extension: the file is {FORMAT_NAMES[found]}, {said}"
            + (f" (named {rename} it would be read as what it is)" if rename else ""))


def torch_load_refusal(path: str, e: BaseException, what: str = ".bin file") -> str:
    """The one line for a ``torch.load(weights_only=True)`` failure: a pickle that wants more than tensors
    is refused as such (torch's own text, which advises retrying with ``weights_only=False``, is not
    repeated: that would run the file's code); anything else is a truncated or corrupt file."""
    text = str(e)
    if "Weights only load failed" in text or "weights_only" in text:
        import re
        m = re.search(r"GLOBAL ([\w.]+)", text)
        detail = f"it calls {m.group(1)}" if m else "objects other than tensors"
        return (f"{path}: refused: the pickle holds more than tensors ({detail}); a {what} is loaded without "
                f"running code, so only plain tensors are accepted")
    msg = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return f"{path}: truncated or corrupt {what} ({msg})"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """``(header without __metadata__, data offset)`` of a safetensors file, validated as the library does."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n > size - 8:
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, "
                                      f"file of {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not UTF-8 JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                              f"expected an object)")
    meta = header.pop("__metadata__", None)
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__: expected an object of strings")
    entries = []
    for name, info in header.items():
        where = f"{path}: {name}"
        if not isinstance(info, dict):
            raise CheckpointError(f"{where}: header entry is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in info:
                raise CheckpointError(f"{where}: header entry has no {key}")
        dtype = st_dtype(info["dtype"], where)
        shape, offs = info["shape"], info["data_offsets"]
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_int(o) and o >= 0 for o in offs)):
            raise CheckpointError(f"{where}: data_offsets {offs!r} is not [begin, end] of non-negative integers")
        begin, end = offs
        if end < begin:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] hold {end - begin} bytes, shape "
                                  f"{shape} of {info['dtype']} needs {nbytes}")
        entries.append((begin, end, name))
    pos = 0
    for begin, end, name in sorted(entries):
        if begin != pos:
            what = "overlap the previous tensor" if begin < pos else f"leave a gap after byte {pos}"
            raise CheckpointError(f"{path}: {name}: data_offsets [{begin}, {end}] {what} (tensors must be "
                                  f"contiguous and not overlap)")
        pos = end
    data_len = size - 8 - n
    if pos > data_len:
        last = max(entries)[2]
        raise CheckpointError(f"{path}: truncated safetensors file ({last} ends at data byte {pos}, the file "
                              f"holds {data_len})")
    if pos < data_len:
        raise CheckpointError(f"{path}: corrupt safetensors file ({data_len - pos} bytes after the last tensor; "
                              f"the header does not cover the file)")
    try:  # the library's own verdict (it maps the file lazily; nothing is read here)
        from safetensors import safe_open
        with safe_open(path, framework="numpy"):
            pass
    except ImportError:
        pass
    except Exception as e:  # SafetensorError
        raise CheckpointError(f"{path}: refused by the safetensors library: {str(e).strip()}") from None
    return header, 8 + n


class SafetensorsFile:
    """One safetensors file: ``names`` / ``info`` / ``read`` / ``byte_range`` of its validated header."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise CheckpointError(f"{self.path}: no such file")
        mismatch = format_mismatch(self.path, "safetensors")
        if mismatch:
            raise CheckpointError(mismatch)
        self.header, self.offset = read_safetensors_header(self.path)

    @property
    def names(self) -> list[str]:
        return list(self.header)

    def __contains__(self, name: str) -> bool:
        return name in self.header

    def _meta(self, name: str) -> dict:
        if name not in self.header:
            raise CheckpointError(f"{self.path}: no tensor named {name}")
        return self.header[name]

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        meta = self._meta(name)
        return tuple(meta["shape"]), dtype_name(st_dtype(meta["dtype"], self.path))

    def byte_range(self, name: str) -> tuple[str, int, int]:
        begin, end = self._meta(name)["data_offsets"]
        return self.path, self.offset + begin, end - begin

    def read(self, name: str, copy: bool = True) -> np.ndarray:
        meta = self._meta(name)
        dtype = st_dtype(meta["dtype"], f"{self.path}: {name}")
        _, offset, nbytes = self.byte_range(name)
        try:
            buf = read_range(self.path, offset, nbytes)
        except OSError as e:
            raise CheckpointError(f"{self.path}: {name}: cannot read: {e.strerror or e}") from None
        if len(buf) != nbytes:
            raise CheckpointError(f"{self.path}: {name}: truncated safetensors file (the file shrank while read)")
        array = np.frombuffer(buf, dtype=dtype).reshape(meta["shape"])
        return array.copy() if copy else array


def read_range(path: str, offset: int, nbytes: int) -> bytes:
    """The ``nbytes`` bytes at ``offset`` of ``path`` (fewer when the file is shorter; the caller checks)."""
    with open(path, "rb") as f:
        return os.pread(f.fileno(), nbytes, offset) if nbytes else b""


# ---------------------------------------------------------------------- writing
def copy_bytes(src: str, offset: int, nbytes: int, out) -> None:
    """Append ``nbytes`` of file ``src`` from ``offset`` to the open (flushed) binary file ``out``:
    ``os.copy_file_range`` where the system has it, else reads of 64 MiB. A short input is a
    :class:`CheckpointError` naming ``src``; write errors propagate as ``OSError``."""
    done = 0
    with open(src, "rb") as f:
        fd_in, fd_out = f.fileno(), out.fileno()
        if hasattr(os, "copy_file_range"):
            try:
                while done < nbytes:
                    n = os.copy_file_range(fd_in, fd_out, nbytes - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
                    raise
                # EXDEV / ENOSYS / EINVAL: fall back to plain reads
        while done < nbytes:
            buf = os.pread(fd_in, min(nbytes - done, 64 << 20), offset + done)
            if not buf:
                raise CheckpointError(f"{src}: truncated: {nbytes - done} bytes missing at byte {offset + done}")
            out.write(buf)
            out.flush()
            done += len(buf)
    out.seek(0, os.SEEK_END)


class AtomicWriter:
    """Base of the writers that fill ``<path>.partial`` through :func:`glm_common.fsutil.atomic_file` (open as
    ``self._f``) and rename it in :meth:`close`. Used as a context manager, an exception aborts and removes
    the partial file. An ``OSError`` while writing (disk full ...) becomes an ``OutputError`` naming ``path``."""

    path: str

    def _open(self, path: str) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(parent, exist_ok=True)
        except OSError as e:
            raise output_error(self.path, e) from None
        self._cm = atomic_file(self.path, "wb")
        self._f = self._cm.__enter__()
        self.tmp = self._f.name

    @contextlib.contextmanager
    def _writing(self):
        try:
            yield
        except OSError as e:
            if isinstance(e, OutputError):
                raise
            raise output_error(self.path, e) from None

    def _finish(self) -> str:
        try:
            self._cm.__exit__(None, None, None)
        except OSError as e:
            raise output_error(self.path, e) from None
        return self.path

    def close(self) -> str:
        return self._finish()

    def abort(self) -> None:
        with contextlib.suppress(BaseException):
            self._cm.__exit__(CheckpointError, CheckpointError("aborted"), None)
        with contextlib.suppress(OSError):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class SafetensorsWriter(AtomicWriter):
    """Write a safetensors file one tensor at a time from a plan known up front (the header comes first).

    ``plan``: ``(name, shape, dtype)`` in the order tensors will be written. ``metadata`` goes to
    ``__metadata__`` (MindSpore writes ``{"format": "ms"}``). The file is written to ``path + ".partial"``
    and renamed by :meth:`close`; :meth:`abort` removes it.
    """

    def __init__(self, path: str, plan: Sequence[tuple[str, tuple[int, ...], np.dtype]],
                 metadata: Optional[dict] = None):
        header, offset = {}, 0
        self._expect = []
        for name, shape, dtype in plan:
            dtype = np.dtype(dtype)
            nbytes = math.prod(int(d) for d in shape) * dtype.itemsize
            header[name] = {"dtype": st_tag(dtype), "shape": [int(d) for d in shape],
                            "data_offsets": [offset, offset + nbytes]}
            self._expect.append((name, tuple(int(d) for d in shape), dtype))
            offset += nbytes
        if metadata:
            header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._open(path)
        with self._writing():
            self._f.write(struct.pack("<Q", len(blob)))
            self._f.write(blob)
        self._next = 0

    def _check(self, name, shape, dtype) -> tuple:
        if self._next >= len(self._expect):
            raise CheckpointError(f"{self.path}: {name}: more tensors than planned")
        want = self._expect[self._next]
        if (name, tuple(shape), np.dtype(dtype)) != want:
            raise CheckpointError(f"{self.path}: {name}: {list(shape)} {dtype} written where the header holds "
                                  f"{want[0]} {list(want[1])} {want[2]}")
        return want

    def write(self, name: str, array: np.ndarray) -> None:
        self._check(name, array.shape, array.dtype)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        with self._writing():
            self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._next += 1

    def write_from_file(self, name: str, shape, dtype, src: str, offset: int, nbytes: int) -> None:
        """Append the next planned tensor from ``nbytes`` at ``offset`` of file ``src`` (copied by the kernel)."""
        want = self._check(name, shape, dtype)
        if math.prod(want[1]) * want[2].itemsize != nbytes:
            raise CheckpointError(f"{src}: {name}: {nbytes} bytes do not hold {list(want[1])} of {want[2]}")
        with self._writing():
            self._f.flush()
            copy_bytes(src, offset, nbytes, self._f)
        self._next += 1

    def close(self) -> str:
        if self._next != len(self._expect):
            self.abort()
            raise CheckpointError(f"{self.path}: {len(self._expect) - self._next} planned tensors never written")
        return self._finish()


def save_safetensors(tensors: Iterable[tuple[str, np.ndarray]], path: str, metadata: Optional[dict] = None):
    """Write a safetensors file from ``(name, array)`` pairs (arrays are written one at a time, atomically)."""
    items = list(tensors)
    with SafetensorsWriter(path, [(n, a.shape, a.dtype) for n, a in items], metadata) as writer:
        for name, array in items:
            writer.write(name, array)
