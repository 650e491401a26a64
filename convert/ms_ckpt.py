"""MindSpore ``.ckpt`` files read and written one tensor at a time, without MindSpore.

A ``.ckpt`` is the protobuf message ``Checkpoint { repeated Value value = 1; }`` with
``Value { string tag = 1; TensorProto tensor = 2; }`` and
``TensorProto { repeated int64 dims = 1; string tensor_type = 2; bytes tensor_content = 3; }``
(``mindspore/train/checkpoint.proto``). Values serialized back to back are one valid checkpoint, so:

- :class:`CheckpointWriter` appends one value at a time, writing the tensor bytes straight from the
  array (peak memory: nothing beyond the caller's array), into a temp file renamed on success;
- :class:`MSCheckpoint` scans the file once, keeping only names, shapes, dtypes and byte offsets;
  :meth:`MSCheckpoint.read` then reads one tensor.

``mindspore.load_checkpoint`` / ``mindspore.save_checkpoint`` are the independent implementation the
tests hold these to.
"""
from __future__ import annotations

import os
from typing import Iterable, Iterator, Optional

import numpy as np

__all__ = ["MSCheckpointError", "MSCheckpoint", "AtomicWriter", "CheckpointWriter", "save_ms_checkpoint", "MS_DTYPES"]


class MSCheckpointError(ValueError):
    """A .ckpt file that cannot be read or written; one line naming the file."""


def _bf16():
    import ml_dtypes
    return np.dtype(ml_dtypes.bfloat16)


#: MindSpore tensor_type strings <-> numpy dtype names
MS_DTYPES = {"Float32": "float32", "Float16": "float16", "BFloat16": "bfloat16", "Float64": "float64",
             "Int8": "int8", "Int16": "int16", "Int32": "int32", "Int64": "int64", "UInt8": "uint8",
             "UInt16": "uint16", "UInt32": "uint32", "UInt64": "uint64", "Bool": "bool"}
_NP_TO_MS = {v: k for k, v in MS_DTYPES.items()}


def _np_dtype(ms_type: str, where: str) -> np.dtype:
    if ms_type not in MS_DTYPES:
        raise MSCheckpointError(f"{where}: unsupported tensor type {ms_type!r}")
    name = MS_DTYPES[ms_type]
    return _bf16() if name == "bfloat16" else np.dtype(name)


def _ms_type(dtype) -> str:
    dtype = np.dtype(dtype)
    name = "bfloat16" if dtype == _bf16() else dtype.name
    if name not in _NP_TO_MS:
        raise MSCheckpointError(f"cannot store dtype {dtype} in a MindSpore checkpoint")
    return _NP_TO_MS[name]


# ---------------------------------------------------------------------- protobuf wire helpers
def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _read_varint(f, where: str) -> Optional[int]:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            if shift == 0:
                return None
            raise MSCheckpointError(f"{where}: truncated checkpoint (inside a length field)")
        result |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return result
        shift += 7
        if shift > 63:
            raise MSCheckpointError(f"{where}: corrupt checkpoint (bad varint)")


def _field(num: int, wire: int) -> bytes:
    return _varint((num << 3) | wire)


def _value_header(name: str, shape: tuple[int, ...], ms_type: str, nbytes: int) -> bytes:
    """Bytes of ``Checkpoint.value`` up to (not including) the tensor content."""
    tensor_head = b"".join(_field(1, 0) + _varint(d) for d in shape)
    t = ms_type.encode()
    tensor_head += _field(2, 2) + _varint(len(t)) + t
    tensor_head += _field(3, 2) + _varint(nbytes)
    tensor_len = len(tensor_head) + nbytes
    tag = name.encode("utf-8")
    value_head = _field(1, 2) + _varint(len(tag)) + tag + _field(2, 2) + _varint(tensor_len)
    value_len = len(value_head) + tensor_len
    return _field(1, 2) + _varint(value_len) + value_head + tensor_head


# ---------------------------------------------------------------------- writing
class AtomicWriter:
    """Base of the writers that fill ``<path>.partial`` (``self.tmp``, open as ``self._f``) and rename it
    in :meth:`close`: used as a context manager, an exception aborts and removes the partial file."""

    path: str
    tmp: str

    def close(self) -> str:
        raise NotImplementedError

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.abort()
        return False


class CheckpointWriter(AtomicWriter):
    """Append tensors to a new ``.ckpt``; the file appears at ``path`` only when :meth:`close` succeeds.

    >>> with CheckpointWriter("model.ckpt") as w:
    ...     w.write("transformer.output_layer.weight", array)
    """

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        self.tmp = self.path + ".partial"
        self._f = open(self.tmp, "wb")
        self.names: list[str] = []
        self._seen: set[str] = set()
        self.bytes_written = 0

    def write(self, name: str, array: np.ndarray) -> None:
        if name in self._seen:
            raise MSCheckpointError(f"{self.path}: tensor {name} written twice")
        array = np.asarray(array)
        if not array.flags.c_contiguous:  # (np.ascontiguousarray would turn a scalar into shape (1,))
            array = array.copy(order="C")
        head = _value_header(name, tuple(int(d) for d in array.shape), _ms_type(array.dtype), array.nbytes)
        self._f.write(head)
        self._f.write(memoryview(array.reshape(-1).view(np.uint8)))
        self._seen.add(name)
        self.names.append(name)
        self.bytes_written += len(head) + array.nbytes

    def write_from_file(self, name: str, shape: tuple[int, ...], dtype, src: str, offset: int, nbytes: int) -> None:
        """Append a tensor whose row-major bytes are ``nbytes`` at ``offset`` in file ``src``; the kernel
        copies them (``os.copy_file_range``) without passing through this process where it can."""
        if name in self._seen:
            raise MSCheckpointError(f"{self.path}: tensor {name} written twice")
        shape = tuple(int(d) for d in shape)
        dtype = np.dtype(dtype)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes:
            raise MSCheckpointError(f"{self.path}: {name}: {nbytes} bytes do not hold shape {list(shape)} of {dtype}")
        head = _value_header(name, shape, _ms_type(dtype), nbytes)
        self._f.write(head)
        self._f.flush()
        copy_bytes(src, offset, nbytes, self._f)
        self._seen.add(name)
        self.names.append(name)
        self.bytes_written += len(head) + nbytes

    def close(self) -> str:
        self._f.close()
        os.replace(self.tmp, self.path)
        return self.path


def copy_bytes(src: str, offset: int, nbytes: int, out) -> None:
    """Append ``nbytes`` of file ``src`` from ``offset`` to the open (flushed) binary file ``out``:
    ``os.copy_file_range`` where the system has it, else reads of 64 MiB."""
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
            except OSError:  # EXDEV / ENOSYS / EINVAL: fall back to plain reads
                pass
        while done < nbytes:
            buf = os.pread(fd_in, min(nbytes - done, 64 << 20), offset + done)
            if not buf:
                raise MSCheckpointError(f"{src}: truncated: {nbytes - done} bytes missing at byte {offset + done}")
            out.write(buf)
            out.flush()
            done += len(buf)
    out.seek(0, os.SEEK_END)


def save_ms_checkpoint(tensors: Iterable[tuple[str, np.ndarray]], path: str | os.PathLike) -> str:
    """Write ``(name, array)`` pairs as a MindSpore checkpoint, one at a time, atomically."""
    with CheckpointWriter(path) as w:
        for name, array in tensors:
            w.write(name, array)
    return os.fspath(path)


# ---------------------------------------------------------------------- reading
class MSCheckpoint:
    """A ``.ckpt`` indexed without loading: names, shapes and dtypes; tensors read one at a time."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise MSCheckpointError(f"{self.path}: no such file")
        # name -> (shape, tensor_type, content offset, content length)
        self.index: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        self._scan()

    def _scan(self):
        where = self.path
        size = os.path.getsize(where)
        with open(where, "rb") as f:
            while True:
                key = _read_varint(f, where)
                if key is None:
                    break
                if key != 0x0A:
                    raise MSCheckpointError(f"{where}: not a MindSpore checkpoint (unexpected field {key >> 3} "
                                            f"at byte {f.tell()}); encrypted checkpoints are not supported")
                length = _read_varint(f, where)
                end = f.tell() + length
                if end > size:
                    raise MSCheckpointError(f"{where}: truncated checkpoint (a value ends at byte {end} of {size})")
                name, shape, ms_type, offset, nbytes = None, [], None, None, 0
                while f.tell() < end:
                    k = _read_varint(f, where)
                    num, wire = k >> 3, k & 7
                    if num == 1 and wire == 2:
                        n = _read_varint(f, where)
                        name = f.read(n).decode("utf-8")
                    elif num == 2 and wire == 2:
                        t_len = _read_varint(f, where)
                        t_end = f.tell() + t_len
                        while f.tell() < t_end:
                            tk = _read_varint(f, where)
                            tnum, twire = tk >> 3, tk & 7
                            if tnum == 1 and twire == 0:
                                shape.append(_read_varint(f, where))
                            elif tnum == 1 and twire == 2:  # packed dims
                                p_end = f.tell() + _read_varint(f, where)
                                while f.tell() < p_end:
                                    shape.append(_read_varint(f, where))
                            elif tnum == 2 and twire == 2:
                                ms_type = f.read(_read_varint(f, where)).decode()
                            elif tnum == 3 and twire == 2:
                                nbytes = _read_varint(f, where)
                                offset = f.tell()
                                f.seek(nbytes, 1)
                            else:
                                raise MSCheckpointError(f"{where}: corrupt tensor record near byte {f.tell()}")
                    elif num == 3:
                        raise MSCheckpointError(f"{where}: {name}: map tensors are not supported")
                    else:
                        raise MSCheckpointError(f"{where}: corrupt value record near byte {f.tell()}")
                if name is None or ms_type is None:
                    raise MSCheckpointError(f"{where}: corrupt value record ending at byte {end}")
                if offset is None:
                    offset = end
                dtype = _np_dtype(ms_type, f"{where}: {name}")
                count = int(np.prod(shape, dtype=np.int64)) if shape else 1
                if nbytes != count * dtype.itemsize:
                    raise MSCheckpointError(f"{where}: {name}: {nbytes} bytes do not hold shape {shape} of {ms_type}")
                if name in self.index:
                    raise MSCheckpointError(f"{where}: tensor {name} appears twice")
                self.index[name] = (tuple(shape), ms_type, offset, nbytes)
                f.seek(end)

    @property
    def names(self) -> list[str]:
        return list(self.index)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """``(shape, numpy dtype name)``."""
        shape, ms_type, _, _ = self._entry(name)
        return shape, MS_DTYPES[ms_type]

    def _entry(self, name):
        if name not in self.index:
            raise MSCheckpointError(f"{self.path}: no tensor named {name}")
        return self.index[name]

    def read(self, name: str) -> np.ndarray:
        shape, ms_type, offset, nbytes = self._entry(name)
        dtype = _np_dtype(ms_type, self.path)
        with open(self.path, "rb") as f:
            f.seek(offset)
            buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise MSCheckpointError(f"{self.path}: truncated checkpoint while reading {name}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.index:
            yield name, self.read(name)

    def total_bytes(self) -> int:
        return sum(v[3] for v in self.index.values())
