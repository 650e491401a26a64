"""Our streaming .ckpt writer/reader against mindspore.save_checkpoint / load_checkpoint."""
import os

import ml_dtypes
import numpy as np
import pytest

from convert.ms_ckpt import CheckpointWriter, MSCheckpoint, MSCheckpointError, save_ms_checkpoint

RNG = np.random.default_rng(0)
TENSORS = [
    ("transformer.embedding.embedding_weight", RNG.standard_normal((300, 17)).astype(np.float32)),
    ("h16", RNG.standard_normal((5, 3)).astype(np.float16)),
    ("b16", RNG.standard_normal((4, 9)).astype(ml_dtypes.bfloat16)),
    ("steps", np.array([7, 8, 9], dtype=np.int32)),
    ("global_step", np.array(12, dtype=np.int64)),       # scalar, as optimizers save it
    ("big.with.utf8.名字", RNG.standard_normal(70000).astype(np.float32)),  # multi-byte length varints
]


def _ms_arrays(path):
    import mindspore as ms
    return {k: v.asnumpy() for k, v in ms.load_checkpoint(str(path)).items()}


def test_our_writer_loads_in_mindspore(tmp_path):
    path = save_ms_checkpoint(iter(TENSORS), tmp_path / "ours.ckpt")
    loaded = _ms_arrays(path)
    assert list(loaded) == [n for n, _ in TENSORS]
    for name, arr in TENSORS:
        got = loaded[name]
        # MindSpore returns bfloat16 as its own numpy dtype: compare names and raw bits
        assert str(got.dtype) == str(arr.dtype) and got.shape == arr.shape, name
        assert got.tobytes() == arr.tobytes(), name
    assert not os.path.exists(str(path) + ".partial")


def test_our_reader_reads_mindspore_files(tmp_path):
    import mindspore as ms
    path = str(tmp_path / "theirs.ckpt")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in TENSORS], path)
    ckpt = MSCheckpoint(path)
    assert ckpt.names == [n for n, _ in TENSORS]
    for name, arr in TENSORS:
        assert ckpt.info(name) == (arr.shape, "bfloat16" if arr.dtype == ml_dtypes.bfloat16 else arr.dtype.name)
        got = ckpt.read(name)
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(got, arr)


def test_byte_identical_to_mindspore(tmp_path):
    import mindspore as ms
    theirs = str(tmp_path / "theirs.ckpt")
    ms.save_checkpoint([{"name": n, "data": ms.Tensor(a)} for n, a in TENSORS], theirs)
    ours = save_ms_checkpoint(TENSORS, tmp_path / "ours.ckpt")
    assert open(ours, "rb").read() == open(theirs, "rb").read()


def test_failure_leaves_nothing(tmp_path):
    path = tmp_path / "x.ckpt"
    with pytest.raises(MSCheckpointError, match="written twice"):
        with CheckpointWriter(path) as w:
            w.write("a", np.zeros(3, np.float32))
            w.write("a", np.zeros(3, np.float32))
    assert os.listdir(tmp_path) == []


def test_truncated_and_foreign_files(tmp_path):
    path = save_ms_checkpoint(TENSORS, tmp_path / "t.ckpt")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    with pytest.raises(MSCheckpointError, match=r"t.ckpt: truncated checkpoint"):
        MSCheckpoint(path)
    open(path, "wb").write(b"PK\x03\x04 not a checkpoint")
    with pytest.raises(MSCheckpointError, match="t.ckpt: format does not match the extension: the file is a zip archive"):
        MSCheckpoint(path)
    with pytest.raises(MSCheckpointError, match="no such file"):
        MSCheckpoint(tmp_path / "absent.ckpt")
