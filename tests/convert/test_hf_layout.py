"""HF checkpoint layouts: our writer/reader against the safetensors library and torch.load."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from convert.hf_layout import (LAYOUTS, CheckpointError, HFCheckpoint, numpy_to_torch, parse_size,
                               write_hf_checkpoint, write_tiny_hf_dir)
from glm_common.config import ChatGLM2Config
from glm_common.tokenizer import ChatGLM2Tokenizer
from tests.conftest import TINY_MODEL

TORCH_DTYPES = {None: torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE = load_file(str(TINY_MODEL / "model.safetensors"))


def _independent_read(ckpt, name):
    file = ckpt.file_of(name)
    if file.endswith(".safetensors"):
        with safe_open(file, "pt") as f:
            return f.get_tensor(name)
    return torch.load(file, map_location="cpu", weights_only=True)[name]


@pytest.mark.parametrize("dtype", [None, "float16", "bfloat16"], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_tiny_dir_in_every_layout(tmp_path, layout, dtype):
    out = write_tiny_hf_dir(str(tmp_path), layout, dtype=dtype)
    files = sorted(os.listdir(out))
    expected_weights = {
        "single": ["model.safetensors"],
        "single-bin": ["pytorch_model.bin"],
        "sharded-safetensors": ["model.safetensors.index.json"],
        "sharded-bin": ["pytorch_model.bin.index.json"],
    }[layout]
    assert set(expected_weights) <= set(files)
    assert {"config.json", "tokenizer.model", "tokenizer_config.json"} <= set(files)
    assert not [f for f in files if f.startswith(".partial")]
    ckpt = HFCheckpoint(out)
    assert ckpt.layout == layout
    if layout.startswith("sharded"):
        assert len(ckpt.shards) >= 2
        index = json.load(open(os.path.join(out, expected_weights[0])))
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in REFERENCE.values()) // (
            1 if dtype is None else 2)
    want = TORCH_DTYPES[dtype]
    assert sorted(ckpt.names) == sorted(REFERENCE)
    for name, array in ckpt.items():
        ref = REFERENCE[name].to(want)
        assert torch.equal(_independent_read(ckpt, name), ref), name      # what the libraries read
        assert torch.equal(numpy_to_torch(array), ref), name              # what we read
        assert ckpt.info(name)[0] == tuple(ref.shape)
    cfg = ChatGLM2Config.from_hf(out)
    assert cfg.torch_dtype == (dtype or "float32")
    assert ChatGLM2Tokenizer.from_pretrained(out).encode("你好") == [3001, 3003, 1260, 1389, 1357]


def test_sharding_respects_max_size(tmp_path):
    tensors = [(f"t{i}", np.full((10, 10), i, dtype=np.float32)) for i in range(6)]  # 400 bytes each
    written = write_hf_checkpoint(iter(tensors), str(tmp_path), fmt="safetensors", max_shard_size=800)
    shards = [w for w in written if w.endswith(".safetensors")]
    assert len(shards) == 3 and os.path.basename(shards[0]) == "model-00001-of-00003.safetensors"
    for f in shards:
        assert os.path.getsize(f) < 800 + 400
    ckpt = HFCheckpoint(str(tmp_path))
    for name, arr in tensors:
        np.testing.assert_array_equal(ckpt.read(name), arr)


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("1GiB") == 2**30
    assert parse_size(123) == 123 and parse_size(None) is None
    with pytest.raises(CheckpointError, match="max-shard-size"):
        parse_size("lots")


def test_truncated_safetensors(tmp_path):
    out = write_tiny_hf_dir(str(tmp_path / "m"), "single")
    path = os.path.join(out, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated safetensors file"):
        HFCheckpoint(out)
    open(path, "wb").write(data[:4])
    with pytest.raises(CheckpointError, match="no header"):
        HFCheckpoint(out)


def test_missing_shard_named_in_index(tmp_path):
    out = write_tiny_hf_dir(str(tmp_path / "m"), "sharded-bin")
    os.remove(os.path.join(out, "pytorch_model-00002-of-00003.bin"))
    with pytest.raises(CheckpointError) as e:
        HFCheckpoint(out)
    assert "pytorch_model.bin.index.json: shard pytorch_model-00002-of-00003.bin is named in weight_map but missing" in str(e.value)


def test_truncated_bin_shard(tmp_path):
    out = write_tiny_hf_dir(str(tmp_path / "m"), "sharded-bin")
    shard = os.path.join(out, "pytorch_model-00001-of-00003.bin")
    data = open(shard, "rb").read()
    open(shard, "wb").write(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="pytorch_model-00001-of-00003.bin: truncated or corrupt .bin"):
        for _ in HFCheckpoint(out).items():   # (every shard's names are read when the directory is opened)
            pass


def test_no_weights_and_bad_index(tmp_path):
    with pytest.raises(CheckpointError, match="no weights found"):
        HFCheckpoint(str(tmp_path))
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    with pytest.raises(CheckpointError, match="weight_map: missing or empty"):
        HFCheckpoint(str(tmp_path))


def test_failed_write_leaves_nothing(tmp_path):
    def tensors():
        yield "a", np.zeros(4, np.float32)
        raise RuntimeError("source failed mid-way")

    with pytest.raises(RuntimeError):
        write_hf_checkpoint(tensors(), str(tmp_path), max_shard_size=8)
    assert os.listdir(tmp_path) == []


def test_cli_writes_tiny(tmp_path, capsys):
    from convert.hf_layout import main
    assert main(["tiny", "--out", str(tmp_path / "x"), "--layout", "sharded-safetensors", "--dtype", "bf16"]) == 0
    assert HFCheckpoint(str(tmp_path / "x")).info("transformer.output_layer.weight")[1] == "bfloat16"
    assert main(["info", str(tmp_path / "nothing")]) == 1
    assert "not a directory" in capsys.readouterr().err


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_cli_shards_writes_exactly_that_many(tmp_path, shards):
    from convert.hf_layout import main
    out = tmp_path / "x"
    assert main(["tiny", "--out", str(out), "--layout", "sharded-safetensors", "--shards", str(shards)]) == 0
    ckpt = HFCheckpoint(str(out))
    assert len(ckpt.shards) == shards
    assert sorted(os.listdir(out)) == sorted([f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
                                             + ["model.safetensors.index.json", "config.json", "tokenizer.model",
                                                "tokenizer_config.json"])
    for name in REFERENCE:                      # every tensor once, readable by the safetensors library
        assert torch.equal(_independent_read(ckpt, name), REFERENCE[name]), name


@pytest.mark.parametrize("shards", ["0", "-2", "10000"])
def test_cli_refuses_a_shard_count_it_cannot_write(tmp_path, capsys, shards):
    from convert.hf_layout import main
    assert main(["tiny", "--out", str(tmp_path / "x"), "--layout", "sharded-bin", "--shards", shards]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --shards: ") and "Traceback" not in err[0]
    assert not (tmp_path / "x").exists()
