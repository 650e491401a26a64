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

import math
import os
from typing import Iterable, Iterator, Optional

import numpy as np

from convert.safetensors_io import DTYPES, AtomicWriter, copy_bytes, format_mismatch, ms_dtype, ms_type, read_range

__all__ = ["MSCheckpointError", "MSCheckpoint", "AtomicWriter", "CheckpointWriter", "save_ms_checkpoint", "MS_DTYPES",
           "copy_bytes"]


class MSCheckpointError(ValueError):
    """A .ckpt file that cannot be read or written; one line naming the file."""


#: MindSpore tensor_type strings <-> numpy dtype names (a view of :data:`convert.safetensors_io.DTYPES`)
MS_DTYPES = {ms: np_name for np_name, _, ms in DTYPES}


def _np_dtype(ms_type_name: str, where: str) -> np.dtype:
    return ms_dtype(ms_type_name, where, MSCheckpointError)


def _ms_type(dtype) -> str:
    return ms_type(dtype, MSCheckpointError)


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
class CheckpointWriter(AtomicWriter):
    """Append tensors to a new ``.ckpt``; the file appears at ``path`` only when :meth:`close` succeeds.

    >>> with CheckpointWriter("model.ckpt") as w:
    ...     w.write("transformer.output_layer.weight", array)
    """

    def __init__(self, path: str | os.PathLike):
        self._open(path)
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
        with self._writing():
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
            raise MSCheckpointError(f"{src}: {name}: {nbytes} bytes do not hold shape {list(shape)} of {dtype}")
        head = _value_header(name, shape, _ms_type(dtype), nbytes)
        with self._writing():
            self._f.write(head)
            self._f.flush()
            copy_bytes(src, offset, nbytes, self._f)
        self._seen.add(name)
        self.names.append(name)
        self.bytes_written += len(head) + nbytes

    def close(self) -> str:
        return self._finish()


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
        mismatch = format_mismatch(self.path, "mindspore")
        if mismatch:
            raise MSCheckpointError(mismatch)
        # name -> (shape, tensor_type, content offset, content length)
        self.index: dict[str, tuple[tuple[int, ...], str, int, int]] = {}
        self._scan()

    def _scan(self):
        """Index every value; every length is checked against the record that holds it and the file's
        size, every shape against its byte count, before anything is used."""
        where = self.path
        try:
            size = os.path.getsize(where)
            f = open(where, "rb")
        except OSError as e:
            raise MSCheckpointError(f"{where}: cannot read: {e.strerror or e}") from None

        def length(limit: int, what: str) -> int:
            n = _read_varint(f, where)
            if n is None or f.tell() + n > limit:
                if limit == size:
                    raise MSCheckpointError(f"{where}: truncated checkpoint ({what} of {n} bytes at byte {f.tell()} "
                                            f"runs past the end of the file, {size} bytes)")
                raise MSCheckpointError(f"{where}: corrupt checkpoint ({what} of {n} bytes at byte {f.tell()} runs "
                                        f"past its record, which ends at byte {limit})")
            return n

        def text(limit: int, what: str) -> str:
            n = length(limit, what)
            raw = f.read(n)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MSCheckpointError(f"{where}: corrupt checkpoint ({what} near byte {f.tell()} is not "
                                        f"UTF-8)") from None

        def varint(limit: int, what: str) -> int:
            v = _read_varint(f, where)
            if v is None or f.tell() > limit:
                raise MSCheckpointError(f"{where}: truncated or corrupt checkpoint ({what} near byte {f.tell()})")
            return v

        with f:
            while True:
                key = _read_varint(f, where)
                if key is None:
                    break
                if key != 0x0A:
                    raise MSCheckpointError(f"{where}: not a MindSpore checkpoint (unexpected field {key >> 3} "
                                            f"at byte {f.tell()}); encrypted checkpoints are not supported")
                n = length(size, "a value")
                end = f.tell() + n
                name, shape, ms_type_name, offset, nbytes = None, [], None, None, 0
                while f.tell() < end:
                    k = varint(end, "a field key")
                    num, wire = k >> 3, k & 7
                    if num == 1 and wire == 2:
                        name = text(end, "a tensor name")
                    elif num == 2 and wire == 2:
                        n = length(end, f"the tensor record of {name}")
                        t_end = f.tell() + n
                        while f.tell() < t_end:
                            tk = varint(t_end, f"a field key of {name}")
                            tnum, twire = tk >> 3, tk & 7
                            if tnum == 1 and twire == 0:
                                shape.append(varint(t_end, f"a dimension of {name}"))
                            elif tnum == 1 and twire == 2:  # packed dims
                                n = length(t_end, f"the dimensions of {name}")
                                p_end = f.tell() + n
                                while f.tell() < p_end:
                                    shape.append(varint(p_end, f"a dimension of {name}"))
                            elif tnum == 2 and twire == 2:
                                ms_type_name = text(t_end, f"the tensor type of {name}")
                            elif tnum == 3 and twire == 2:
                                nbytes = length(t_end, f"the data of {name}")
                                offset = f.tell()
                                f.seek(nbytes, 1)
                            else:
                                raise MSCheckpointError(f"{where}: {name}: corrupt tensor record near byte {f.tell()}")
                    elif num == 3:
                        raise MSCheckpointError(f"{where}: {name}: map tensors are not supported")
                    else:
                        raise MSCheckpointError(f"{where}: corrupt value record near byte {f.tell()}")
                if f.tell() != end:
                    raise MSCheckpointError(f"{where}: {name}: corrupt value record (its fields run past byte {end})")
                if name is None or ms_type_name is None:
                    raise MSCheckpointError(f"{where}: corrupt value record ending at byte {end} (no name or type)")
                if offset is None:
                    offset = end
                dtype = _np_dtype(ms_type_name, f"{where}: {name}")
                if any(d >= 2 ** 63 for d in shape):
                    raise MSCheckpointError(f"{where}: {name}: corrupt shape {shape}")
                count = math.prod(shape)
                if nbytes != count * dtype.itemsize:
                    raise MSCheckpointError(f"{where}: {name}: {nbytes} bytes do not hold shape {shape} of "
                                            f"{ms_type_name}")
                if name in self.index:
                    raise MSCheckpointError(f"{where}: tensor {name} appears twice")
                self.index[name] = (tuple(shape), ms_type_name, offset, nbytes)
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
        try:
            buf = read_range(self.path, offset, nbytes)
        except OSError as e:
            raise MSCheckpointError(f"{self.path}: {name}: cannot read: {e.strerror or e}") from None
        if len(buf) != nbytes:
            raise MSCheckpointError(f"{self.path}: truncated checkpoint while reading {name}")
        return np.frombuffer(buf, dtype=dtype).reshape(shape).copy()

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for name in self.index:
            yield name, self.read(name)

    def total_bytes(self) -> int:
        return sum(v[3] for v in self.index.values())
