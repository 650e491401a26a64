"""Bad bytes and bad places: every one refused with one line naming the file (and tensor), nothing left.

Reproductions of the faults a demanding user met: safetensors headers with negative, overlapping or
shifted ``data_offsets`` (the ``safetensors`` library refuses each file, and so must we), header entries
without ``data_offsets`` or a header that is a list, index entries that are not strings or that climb out
of the model directory, corrupt ``.ckpt`` lengths, ``.bin`` files that are not state dicts, a missing or
lagging rank in a merge, a full disk, an existing directory given as the output file, and a real
MindSpore training checkpoint whose loss-scale state must not become a weight.
"""
import json
import os
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

from convert.hf_layout import HFCheckpoint, write_tiny_hf_dir
from convert.ms_ckpt import MSCheckpoint, MSCheckpointError, save_ms_checkpoint
from convert.safetensors_io import CheckpointError
from tests.conftest import ROOT

PY = sys.executable
QKV0 = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
QKV1 = "transformer.encoder.layers.1.self_attention.query_key_value.weight"


def cli(*args, cwd=None, env=None):
    return subprocess.run([PY, *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env)


def assert_refused(res, *words, leftovers=()):
    """Non-zero exit, exactly one line on stderr (no traceback) holding ``words``, and no ``leftovers``."""
    assert res.returncode not in (0, None), res.stdout + res.stderr
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for w in words:
        assert str(w) in lines[0], lines[0]
    for p in leftovers:
        assert not os.path.exists(p), p
    return lines[0]


def read_header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    return header, data


def write_header(path, header, data):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob + data)


def library_refuses(path) -> bool:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="numpy"):
            return False
    except Exception:
        return True


@pytest.fixture(scope="module")
def tiny_single(tmp_path_factory):
    return write_tiny_hf_dir(str(tmp_path_factory.mktemp("tiny") / "m"), "single")


def corrupt_copy(tiny_single, tmp_path, mutate):
    d = tmp_path / "hf"
    shutil.copytree(tiny_single, d)
    path = d / "model.safetensors"
    header, data = read_header(path)
    mutate(header)
    write_header(path, header, data)
    return d, path


def _negative(h):
    h[QKV0]["data_offsets"][0] = -8


def _overlap(h):  # layer 1's qkv given layer 0's bytes; the range layer 1 had becomes a gap
    h[QKV1]["data_offsets"] = list(h[QKV0]["data_offsets"])


def _shifted(h):  # every tensor one element later; the last one runs past the data
    meta = h.pop("__metadata__", None)
    for v in h.values():
        v["data_offsets"] = [v["data_offsets"][0] + 4, v["data_offsets"][1] + 4]
    if meta is not None:
        h["__metadata__"] = meta


def _no_offsets(h):
    del h[QKV0]["data_offsets"]


def _bad_dtype(h):
    h[QKV0]["dtype"] = "F12"


def _size_mismatch(h):
    h[QKV0]["shape"] = [h[QKV0]["shape"][0] - 1, h[QKV0]["shape"][1]]


@pytest.mark.parametrize("mutate,words", [
    (_negative, [QKV0, "data_offsets"]), (_overlap, ["data_offsets"]), (_shifted, ["data_offsets"]),
    (_no_offsets, [QKV0, "data_offsets"]), (_bad_dtype, [QKV0, "F12"]), (_size_mismatch, [QKV0, "bytes"]),
], ids=["negative", "overlapping", "shifted", "no-data_offsets", "unknown-dtype", "size-mismatch"])
def test_bad_safetensors_headers_are_refused_naming_the_input(tiny_single, tmp_path, mutate, words):
    d, path = corrupt_copy(tiny_single, tmp_path, mutate)
    assert library_refuses(path)  # the independent implementation agrees the file is bad
    with pytest.raises(CheckpointError, match="model.safetensors"):
        HFCheckpoint(str(d))
    out = tmp_path / "out.ckpt"
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", out, "--no-progress")
    line = assert_refused(res, "model.safetensors", *words, leftovers=[out, f"{out}.partial"])
    assert "out.ckpt" not in line


def test_header_that_is_a_list_and_good_files_still_accepted(tiny_single, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(tiny_single, d)
    path = d / "model.safetensors"
    _, data = read_header(path)
    blob = b"[1, 2]  "
    open(path, "wb").write(struct.pack("<Q", len(blob)) + blob + data)
    assert library_refuses(path)
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    assert_refused(res, "model.safetensors", "list")
    # the untouched file: the library and we accept it, and we read what the library reads
    from safetensors.numpy import load_file
    assert not library_refuses(os.path.join(tiny_single, "model.safetensors"))
    ckpt = HFCheckpoint(tiny_single)
    want = load_file(os.path.join(tiny_single, "model.safetensors"))
    for name in list(want)[:5]:
        np.testing.assert_array_equal(ckpt.read(name), want[name])


def _sharded(tmp_path):
    d = tmp_path / "sharded"
    write_tiny_hf_dir(str(d), "sharded-safetensors")
    index = d / "model.safetensors.index.json"
    return d, index, json.loads(index.read_text())


def test_index_value_not_a_string(tmp_path):
    d, index, data = _sharded(tmp_path)
    data["weight_map"][QKV0] = 3
    index.write_text(json.dumps(data))
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    assert_refused(res, "model.safetensors.index.json", QKV0, leftovers=[tmp_path / "o.ckpt"])


def test_index_entry_outside_the_model_directory_is_refused(tmp_path):
    d, index, data = _sharded(tmp_path)
    shard = data["weight_map"][QKV0]
    os.makedirs(tmp_path / "elsewhere")
    shutil.copy(d / shard, tmp_path / "elsewhere" / "x.safetensors")
    for name, s in data["weight_map"].items():
        if s == shard:
            data["weight_map"][name] = "../elsewhere/x.safetensors"
    os.remove(d / shard)
    index.write_text(json.dumps(data))
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    assert_refused(res, "model.safetensors.index.json", "outside", leftovers=[tmp_path / "o.ckpt"])


def test_bin_that_is_not_a_state_dict(tmp_path):
    import torch
    d = tmp_path / "bin"
    write_tiny_hf_dir(str(d), "single-bin")
    sd = torch.load(d / "pytorch_model.bin", weights_only=True)
    sd[QKV0] = [1, 2, 3]
    torch.save(sd, d / "pytorch_model.bin")
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    assert_refused(res, "pytorch_model.bin", QKV0, leftovers=[tmp_path / "o.ckpt"])


class _Planted:
    """A pickle that would run a command when loaded the unsafe way."""

    def __reduce__(self):
        return (os.system, ("true",))


def test_format_that_does_not_match_the_extension(tiny_single, tmp_path):
    """A safetensors file named .ckpt, a MindSpore .ckpt named .safetensors, a safetensors file named .bin:
    said as such, not as an encrypted, truncated or corrupt file."""
    fake_ckpt = tmp_path / "model.ckpt"
    shutil.copy(os.path.join(tiny_single, "model.safetensors"), fake_ckpt)
    res = cli(ROOT / "convert" / "ms_to_hf.py", "--ckpt", fake_ckpt, "--config", tiny_single,
              "--output", tmp_path / "o", "--no-progress")
    line = assert_refused(res, fake_ckpt, "format does not match the extension", "is a safetensors file",
                          "extension .ckpt", leftovers=[tmp_path / "o"])
    assert "encrypted" not in line and "truncated" not in line
    ms = save_ms_checkpoint([("w", np.ones((2, 2), np.float32))], tmp_path / "real.ckpt")
    fake_st = tmp_path / "x.safetensors"
    shutil.copy(ms, fake_st)
    res = cli(ROOT / "convert" / "ms_to_hf.py", "--ckpt", fake_st, "--config", tiny_single,
              "--output", tmp_path / "o", "--no-progress")
    line = assert_refused(res, fake_st, "format does not match the extension", "is a MindSpore checkpoint",
                          "extension .safetensors", leftovers=[tmp_path / "o"])
    assert "truncated" not in line
    d = tmp_path / "hf"
    shutil.copytree(tiny_single, d)
    os.replace(d / "model.safetensors", d / "pytorch_model.bin")
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    assert_refused(res, "pytorch_model.bin", "format does not match the extension", "is a safetensors file",
                   leftovers=[tmp_path / "o.ckpt"])


def test_malicious_pickle_bin_is_refused_without_torchs_unsafe_advice(tiny_single, tmp_path):
    import torch
    d = tmp_path / "hf"
    shutil.copytree(tiny_single, d)
    os.remove(d / "model.safetensors")
    torch.save({QKV0: _Planted()}, d / "pytorch_model.bin")
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", d, "--output", tmp_path / "o.ckpt", "--no-progress")
    line = assert_refused(res, "pytorch_model.bin", "refused", "more than tensors", "system",
                          leftovers=[tmp_path / "o.ckpt"])
    assert "weights_only" not in line and "False" not in line and "corrupt" not in line


def test_ckpt_lengths_checked(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    path = save_ms_checkpoint([("w", a), ("v", a + 1)], tmp_path / "t.ckpt")
    good = open(path, "rb").read()
    # the name length of the first value claims more bytes than its record holds
    i = good.index(b"w") - 1
    bad = good[:i] + bytes([0x7F]) + good[i + 1:]
    open(path, "wb").write(bad)
    with pytest.raises(MSCheckpointError, match="t.ckpt"):
        MSCheckpoint(path)
    # a dimension that does not fit the bytes
    j = good.index(b"\x08\x03")  # dims field 1, value 3
    open(path, "wb").write(good[:j] + b"\x08\x04" + good[j + 2:])
    with pytest.raises(MSCheckpointError, match=r"t.ckpt: w: 48 bytes do not hold shape \[4, 4\]"):
        MSCheckpoint(path)
    # the tensor type is not UTF-8
    k = good.index(b"Float32")
    open(path, "wb").write(good[:k] + b"\xff" + good[k + 1:])
    with pytest.raises(MSCheckpointError, match="t.ckpt"):
        MSCheckpoint(path)


def test_existing_directory_as_output(tiny_single, tmp_path):
    out = tmp_path / "X"
    out.mkdir()
    res = cli(ROOT / "convert" / "hf_to_ms.py", "--hf-dir", tiny_single, "--output", out, "--no-progress")
    line = assert_refused(res, str(out), leftovers=[f"{out}.partial"])
    assert ".partial" not in line and os.listdir(out) == []


def _unshare_ok() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


needs_unshare = pytest.mark.skipif(not _unshare_ok(), reason="needs user namespaces (unshare -rm) to mount a tmpfs")


@needs_unshare
def test_disk_full_names_the_output_file(tiny_single, tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    out = mnt / "out.ckpt"
    script = (f"mount -t tmpfs -o size=256k tmpfs {mnt} && {PY} {ROOT / 'convert' / 'hf_to_ms.py'} "
              f"--hf-dir {tiny_single} --output {out} --no-progress; rc=$?; ls -A {mnt} >&2; exit $rc")
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    # one error line naming the output, and `ls` of the mount printing nothing: no partial file left
    assert_refused(res, str(out), "No space left on device")


@needs_unshare
@pytest.mark.parametrize("tool", ["hccl_tools", "merge_hccl"])
def test_read_only_output_directory_for_rank_tables(tmp_path, tool):
    from tests.hccl.conftest import seed_table, write_conf
    ro = tmp_path / "ro"
    ro.mkdir()
    conf = tmp_path / "hccn.conf"
    write_conf(conf, [f"192.168.100.{i + 1}" for i in range(8)])
    if tool == "hccl_tools":
        cmd = (f"{PY} {ROOT / 'hccl' / 'hccl_tools.py'} --device_num '[0,8)' --server_ip 10.0.0.1 "
               f"--hccn_conf {conf} --output {ro}")
    else:
        table = tmp_path / "a.json"
        table.write_text(json.dumps(seed_table()))
        cmd = f"{PY} {ROOT / 'hccl' / 'merge_hccl.py'} {table} -o {ro / 'merged.json'}"
    script = f"mount -t tmpfs -o ro,size=64k tmpfs {ro} && PATH=/nonexistent:$PATH {cmd}"
    res = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True)
    assert_refused(res, str(ro))


def test_output_directory_that_is_a_file_for_rank_tables(tmp_path):
    from tests.hccl.conftest import seed_table
    blocker = tmp_path / "file"
    blocker.write_text("x")
    table = tmp_path / "a.json"
    table.write_text(json.dumps(seed_table()))
    res = cli(ROOT / "hccl" / "merge_hccl.py", table, "-o", blocker / "merged.json")
    assert_refused(res, "merged.json")


# ---------------------------------------------------------------------- merge_shards: ranks and steps
def _dp_run(root, ranks=(0, 1, 2), steps=(10,), world_size=None):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8)).astype(np.float32)
    for r in ranks:
        for s in steps:
            tensors = [("transformer.encoder.final_layernorm.weight", w), ("global_step", np.array([s], np.int32))]
            if world_size is not None:
                tensors += [("world_size", np.array(world_size, np.int32)), ("rank_id", np.array(r, np.int32))]
            save_ms_checkpoint(tensors, root / "ckpt" / f"rank_{r}" / f"glm2-1_{s}.ckpt")
    return w


def _merge(root, *extra):
    out = root / "merged.ckpt"
    return cli(ROOT / "convert" / "merge_shards.py", "--src", root / "ckpt", "--output", out, "--quiet", *extra), out


def test_merge_refuses_a_gap_in_the_rank_folders(tmp_path):
    _dp_run(tmp_path, ranks=(0, 2))
    res, out = _merge(tmp_path)
    assert_refused(res, "rank_1", "missing", leftovers=[out])


def test_merge_refuses_the_highest_rank_missing_by_recorded_world_size(tmp_path):
    _dp_run(tmp_path, ranks=(0, 1), world_size=3)
    res, out = _merge(tmp_path)
    assert_refused(res, "rank_2", "missing", leftovers=[out])
    res, out = _merge(tmp_path, "--world-size", "2")  # the user says it was two ranks: the record disagrees
    assert_refused(res, "world_size", leftovers=[out])


def test_merge_refuses_the_highest_rank_missing_by_strategy(tmp_path):
    from tests.convert.test_merge_shards import build_run, strategy_arg
    build_run(tmp_path, dp=2, mp=2)
    shutil.rmtree(tmp_path / "ckpt" / "rank_3")
    res, out = _merge(tmp_path, "--strategy", strategy_arg(tmp_path, 1))
    assert_refused(res, "rank_3", "missing", leftovers=[out])


def test_merge_refuses_ranks_that_disagree_on_the_latest_step(tmp_path):
    _dp_run(tmp_path, ranks=(0, 1), steps=(5, 10))
    os.remove(tmp_path / "ckpt" / "rank_1" / "glm2-1_10.ckpt")  # rank 1 died while saving step 10
    res, out = _merge(tmp_path)
    assert_refused(res, "rank_1", "step 10", "--step 5", leftovers=[out])
    res, out = _merge(tmp_path, "--step", "5")
    assert res.returncode == 0, res.stderr
    assert MSCheckpoint(out).names == ["transformer.encoder.final_layernorm.weight"]


def test_merge_output_that_is_a_directory_names_it(tmp_path):
    _dp_run(tmp_path, ranks=(0, 1))
    out = tmp_path / "X"
    out.mkdir()
    res = cli(ROOT / "convert" / "merge_shards.py", "--src", tmp_path / "ckpt", "--output", out, "--quiet")
    line = assert_refused(res, str(out), leftovers=[f"{out}.partial"])
    assert ".partial" not in line


# ---------------------------------------------------------------------- a real MindSpore training checkpoint
@pytest.fixture(scope="module")
def ms_training_checkpoint(tmp_path_factory):
    """Two updates of the tiny full fine-tune (dynamic loss scaling) through mindspore_glm's trainer."""
    pytest.importorskip("mindspore")
    from mindspore_glm.train import train
    from tests.mindspore_glm.test_train import run_config, settings
    tmp = tmp_path_factory.mktemp("mstrain")
    out = train(settings(run_config(tmp, "full", 1e-3, rows=4, epochs=1, batch=2)))
    return out["result"]


def test_training_checkpoint_converts_and_merges_without_training_state(ms_training_checkpoint, tmp_path):
    from glm_common.names import is_train_state
    from tests.conftest import TINY_MODEL
    ckpt = MSCheckpoint(ms_training_checkpoint)
    state = [n for n in ckpt.names if is_train_state(n)]
    assert "loss_scale_good_steps" in ckpt.names and any(n.startswith("adam_m.") for n in state)
    hf = tmp_path / "hf"
    res = cli(ROOT / "convert" / "ms_to_hf.py", "--ckpt", ms_training_checkpoint, "--config", TINY_MODEL,
              "--output", hf, "--no-progress")
    assert res.returncode == 0, res.stderr
    from safetensors.numpy import load_file
    got = load_file(str(hf / "model.safetensors"))
    assert not [n for n in got if is_train_state(n)] and "loss_scale_good_steps" not in got
    assert set(got) == set(HFCheckpoint(str(TINY_MODEL)).names) - {"transformer.rotary_pos_emb.inv_freq"}
    # the same checkpoint as the one rank of a data-parallel run
    run = tmp_path / "run"
    os.makedirs(run / "ckpt" / "rank_0")
    shutil.copy(ms_training_checkpoint, run / "ckpt" / "rank_0")
    res, out = _merge(run)
    assert res.returncode == 0, res.stderr
    merged = MSCheckpoint(out)
    assert not [n for n in merged.names if is_train_state(n)]
    assert set(merged.names) == {n for n in ckpt.names if not is_train_state(n)}
    res, out = _merge(run, "--keep-optimizer", "--overwrite")
    assert res.returncode == 0, res.stderr
    assert "loss_scale_good_steps" in MSCheckpoint(out).names


@pytest.mark.parametrize("header_len", [0x380, 0x480, 0x580, 0x280])
def test_a_safetensors_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path, header_len):
    """A safetensors header of 0x380 bytes is stored as ``80 03 00 ...``: the first two bytes of a pickle
    protocol 3 header. The file is safetensors all the same, and safetensors' own reader agrees."""
    from safetensors.numpy import load_file
    from convert.safetensors_io import save_safetensors, sniff_format
    path = str(tmp_path / "a.safetensors")
    meta = {"format": "pt", "pad": ""}
    save_safetensors([("w", np.zeros((2, 2), np.float32))], path, metadata=meta)
    n = struct.unpack("<Q", open(path, "rb").read(8))[0]
    meta["pad"] = "x" * (header_len - n)                     # the header grows to header_len bytes (+ alignment)
    save_safetensors([("w", np.zeros((2, 2), np.float32))], path, metadata=meta)
    head = open(path, "rb").read(8)
    assert struct.unpack("<Q", head)[0] in range(header_len, header_len + 8)
    assert head[0] == 0x80 and 2 <= head[1] <= 5             # looks like a pickle header
    assert sniff_format(path) == "safetensors"
    assert load_file(path)["w"].shape == (2, 2)
