"""Weights checked on the way in: a float dtype, finite values, casts that stay in range, one copy of each
tensor, one layout per directory. Each refusal: non-zero exit, one line naming the file and the tensor,
nothing written, the input unchanged (hashed before and after)."""
import json
import os

import numpy as np
import pytest

from convert import hf_to_ms, ms_to_hf
from convert.hf_layout import HFCheckpoint, write_tiny_hf_dir
from convert.ms_ckpt import MSCheckpoint, save_ms_checkpoint
from convert.safetensors_io import CheckpointError, save_safetensors
from convert.tensor_checks import count_nonfinite
from tests.convert.test_outputs import refused, tree_hash

QKV0 = "transformer.encoder.layers.0.self_attention.query_key_value.weight"
LN0 = "transformer.encoder.layers.0.input_layernorm.weight"


def tiny_with(tmp_path, change, name="m"):
    """The tiny HF model (single safetensors) with ``change(tensors)`` applied to its tensors dict."""
    d = write_tiny_hf_dir(str(tmp_path / name))
    tensors = dict(HFCheckpoint(d).items())
    change(tensors)
    os.remove(os.path.join(d, "model.safetensors"))
    save_safetensors(list(tensors.items()), os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    return d


def hf_to_ms_refuses(capsys, d, tmp_path, *words, extra=()):
    out = tmp_path / "out.ckpt"
    before = tree_hash(d)
    line = refused(capsys, hf_to_ms.main(["--hf-dir", d, "--output", str(out), "--no-progress", *extra]), *words)
    assert not out.exists() and not os.path.exists(str(out) + ".partial")
    assert tree_hash(d) == before
    return line


@pytest.mark.parametrize("dtype", ["int64", "bool", "float64", "int8"])
def test_hf_to_ms_refuses_non_float_weights(tmp_path, capsys, dtype):
    d = tiny_with(tmp_path, lambda t: t.__setitem__(QKV0, t[QKV0].astype(dtype)))
    hf_to_ms_refuses(capsys, d, tmp_path, "model.safetensors", QKV0, f"dtype {dtype}")


@pytest.mark.parametrize("dtype", [None, "fp16", "bf16"])
def test_hf_to_ms_refuses_nan_and_inf_with_their_count(tmp_path, capsys, dtype):
    def poison(t):
        t[LN0] = t[LN0].copy()
        t[LN0][:3] = [np.nan, np.inf, -np.inf]
    d = tiny_with(tmp_path, poison)
    extra = ("--dtype", dtype) if dtype else ()
    hf_to_ms_refuses(capsys, d, tmp_path, LN0, "3 NaN/Inf", "--allow-nonfinite", extra=extra)
    out = tmp_path / "forced.ckpt"
    assert hf_to_ms.main(["--hf-dir", d, "--output", str(out), "--no-progress", "--allow-nonfinite", *extra]) == 0
    assert count_nonfinite(MSCheckpoint(str(out)).read(
        "transformer.encoder.layers.0.input_layernorm.weight")) == 3


def test_cast_out_of_range_refused_naming_the_max(tmp_path, capsys):
    def big(t):
        t[QKV0] = t[QKV0].copy()
        t[QKV0][0, 0] = 1e5
    d = tiny_with(tmp_path, big)
    line = hf_to_ms_refuses(capsys, d, tmp_path, QKV0, "100000", "float16", extra=("--dtype", "fp16"))
    assert "Inf" in line
    for split in ("--qkv=split", "--mlp=split"):   # the split paths are checked too
        hf_to_ms_refuses(capsys, d, tmp_path, QKV0, "float16", extra=("--dtype", "fp16", split))
    out = tmp_path / "bf16.ckpt"                    # bfloat16 holds 1e5
    assert hf_to_ms.main(["--hf-dir", d, "--output", str(out), "--no-progress", "--dtype", "bf16"]) == 0


def test_ms_to_hf_checks_dtype_values_and_cast(tmp_path, capsys):
    src = write_tiny_hf_dir(str(tmp_path / "hf"))
    tensors = dict(HFCheckpoint(src).items())
    from glm_common.names import hf_to_ms as ms_name
    cases = {"int": lambda t: t.__setitem__(QKV0, t[QKV0].astype(np.int32)),
             "nan": lambda t: t[LN0].__setitem__(0, np.nan),
             "big": lambda t: t[QKV0].__setitem__((0, 0), -7e4)}
    for case, change in cases.items():
        t = {k: v.copy() for k, v in tensors.items()}
        change(t)
        ckpt = str(tmp_path / f"{case}.ckpt")
        save_ms_checkpoint([(ms_name(k), v) for k, v in t.items()], ckpt)
        out = tmp_path / f"out_{case}"
        before = tree_hash(ckpt)
        words = {"int": ("int32", ms_name(QKV0)), "nan": ("1 NaN/Inf", ms_name(LN0)),
                 "big": ("70000", "float16")}[case]
        refused(capsys, ms_to_hf.main(["--ckpt", ckpt, "--config", src, "--output", str(out), "--no-progress",
                                       "--dtype", "fp16"]), ckpt, *words)
        assert not out.exists() and tree_hash(ckpt) == before


def _sharded(tmp_path):
    return write_tiny_hf_dir(str(tmp_path / "sharded"), "sharded-safetensors")


def test_same_tensor_in_two_shards_refused(tmp_path, capsys):
    d = _sharded(tmp_path)
    index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    wm = index["weight_map"]
    name = next(iter(wm))
    other = next(s for s in sorted(set(wm.values())) if s != wm[name])
    path = os.path.join(d, other)
    ckpt = HFCheckpoint(d)
    tensors = [(n, ckpt.read(n)) for n in ckpt.names if wm[n] == other] + [(name, ckpt.read(name))]
    os.remove(path)
    save_safetensors(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{name}: also in"):
        HFCheckpoint(d)
    hf_to_ms_refuses(capsys, d, tmp_path, name, "two shards")


def test_duplicate_key_in_the_index_refused(tmp_path, capsys):
    d = _sharded(tmp_path)
    path = os.path.join(d, "model.safetensors.index.json")
    text = open(path).read()
    first = text.index('"transformer.')
    line = text[first:text.index("\n", first)].rstrip(",")
    open(path, "w").write(text.replace(line, line + ",\n    " + line, 1))
    hf_to_ms_refuses(capsys, d, tmp_path, "model.safetensors.index.json", "listed twice",
                     line.split('"')[1])


def test_single_and_sharded_in_one_folder_refused(tmp_path, capsys):
    d = _sharded(tmp_path)
    single = write_tiny_hf_dir(str(tmp_path / "single"))
    os.link(os.path.join(single, "model.safetensors"), os.path.join(d, "model.safetensors"))
    hf_to_ms_refuses(capsys, d, tmp_path, "model.safetensors", "sharded")


def test_torch_loader_refuses_nan_and_int_weights(tmp_path):
    from torch_glm.model import ChatGLM2ForConditionalGeneration, WeightError
    d = tiny_with(tmp_path, lambda t: t[LN0].__setitem__(1, np.inf), "nan")
    with pytest.raises(WeightError, match=f"{LN0}: 1 NaN/Inf"):
        ChatGLM2ForConditionalGeneration.from_pretrained(d)
    d = tiny_with(tmp_path, lambda t: t.__setitem__(LN0, t[LN0].astype(np.float64)), "f64")
    with pytest.raises(WeightError, match=f"{LN0}: dtype float64"):
        ChatGLM2ForConditionalGeneration.from_pretrained(d)


def test_mindspore_loader_refuses_nan_weights(tmp_path):
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration, WeightError
    d = tiny_with(tmp_path, lambda t: t[LN0].__setitem__(1, np.nan), "nan")
    with pytest.raises(WeightError, match=f"{LN0}: 1 NaN/Inf"):
        ChatGLM2ForConditionalGeneration.from_pretrained(d)


def test_count_nonfinite_agrees_with_numpy():
    rng = np.random.default_rng(0)
    a = rng.standard_normal(10_000).astype(np.float32)
    a[rng.integers(0, a.size, 37)] = np.nan
    a[:5] = np.inf
    from convert.safetensors_io import bf16
    for dt in (np.float32, np.float16, bf16(), np.float64):
        b = a.astype(dt)
        assert count_nonfinite(b) == int((~np.isfinite(b.astype(np.float32))).sum())
