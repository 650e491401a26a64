"""convert/hf_to_ms.py: HF -> MindSpore, checked with mindspore.load_checkpoint, mindformers' own ChatGLM2 class,
the safetensors library and torch.load (never with our own readers), and HF -> MS -> HF bit-exact."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as st_load_numpy
from safetensors.torch import load_file as st_load_torch

from convert import hf_to_ms, ms_to_hf
from convert.hf_layout import write_hf_checkpoint, write_tiny_hf_dir
from glm_common import names as N
from glm_common.config import ChatGLM2Config
from tests.conftest import ROOT, TINY_MODEL

GOLDEN = {k: v for k, v in st_load_numpy(str(TINY_MODEL / "model.safetensors")).items() if not N.is_derived_buffer(k)}
CFG = ChatGLM2Config.from_hf(TINY_MODEL)
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PY = sys.executable


def _read_hf_dir_independently(path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF directory via the safetensors library / torch.load (not our reader)."""
    files = [f for f in os.listdir(path) if f.endswith((".safetensors", ".bin"))]
    out = {}
    for f in files:
        full = os.path.join(path, f)
        sd = st_load_torch(full) if f.endswith(".safetensors") else torch.load(full, map_location="cpu",
                                                                              weights_only=True)
        out.update(sd)
    return {k: v for k, v in out.items() if not N.is_derived_buffer(k)}


def _bits(t: torch.Tensor) -> np.ndarray:
    view = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view).numpy()


def _convert(hf_dir, out, **kw):
    kw.setdefault("progress", False)
    return hf_to_ms.convert_hf_to_ms(str(hf_dir), str(out), **kw)


# ----------------------------------------------------------------------------- round trip
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("layout", ["single", "sharded-safetensors", "sharded-bin"])
def test_hf_ms_hf_bit_exact(tmp_path, layout, dtype):
    src = write_tiny_hf_dir(str(tmp_path / "hf"), layout, dtype=dtype)
    split = layout == "sharded-bin"  # the split layouts round trip too
    kw = {"qkv": "split", "mlp": "split"} if split else {}
    summary = _convert(src, tmp_path / "m.ckpt", **kw)
    assert summary["dtypes"] == {dtype: summary["tensors"]}
    assert summary["tensors"] == len(GOLDEN) + ((2 + 2 + 1) * CFG.num_layers if split else 0)  # qkv w+b: 3 parts, mlp: 2
    ms_to_hf.convert_ms_to_hf(str(tmp_path / "m.ckpt"), str(tmp_path / "hf"), str(tmp_path / "back"),
                              fmt="bin" if layout == "single" else "safetensors", max_shard_size="200KB",
                              progress=False)
    before, after = _read_hf_dir_independently(src), _read_hf_dir_independently(tmp_path / "back")
    assert sorted(before) == sorted(after) == sorted(GOLDEN)
    for name, t in before.items():
        assert after[name].dtype == t.dtype == TORCH_DTYPES[dtype], name
        assert after[name].shape == t.shape, name
        np.testing.assert_array_equal(_bits(after[name]), _bits(t), err_msg=name)
    assert json.load(open(tmp_path / "back" / "config.json"))["torch_dtype"] == dtype


@pytest.mark.parametrize("layout", ["single", "sharded-bin"])
def test_dtype_cast(tmp_path, layout):
    """The read-cast-write path (the kernel-copy path serves tensors that keep their dtype)."""
    src = write_tiny_hf_dir(str(tmp_path / "hf"), layout)
    _convert(src, tmp_path / "m.ckpt", dtype="fp16", qkv="split")
    import mindspore as ms
    got = ms.load_checkpoint(str(tmp_path / "m.ckpt"))
    q, kv = CFG.projection_size, CFG.kv_groups * CFG.kv_channels
    for name, ref in GOLDEN.items():
        ref = ref.astype(np.float16)
        if ".query_key_value." in name:
            parts = dict(zip(N.split_qkv_names(name), (ref[:q], ref[q:q + kv], ref[q + kv:])))
        else:
            parts = {N.hf_to_ms(name): ref}
        for ms_name, want in parts.items():
            assert got[ms_name].dtype == ms.float16
            np.testing.assert_array_equal(got[ms_name].asnumpy(), want, err_msg=ms_name)


def test_without_copy_file_range(tmp_path, monkeypatch):
    """Where the kernel cannot copy between the files (EXDEV, old kernels) plain reads give the same bytes."""
    import errno
    import mindspore as ms

    def refuse(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")
    monkeypatch.setattr(os, "copy_file_range", refuse)
    _convert(write_tiny_hf_dir(str(tmp_path / "hf"), "sharded-bin"), tmp_path / "m.ckpt", mlp="split")
    got = ms.load_checkpoint(str(tmp_path / "m.ckpt"))
    F = CFG.ffn_hidden_size
    for name, ref in GOLDEN.items():
        if ".dense_h_to_4h." in name:
            left, right = N.split_mlp_names(name)
            np.testing.assert_array_equal(got[left].asnumpy(), ref[:F])
            np.testing.assert_array_equal(got[right].asnumpy(), ref[F:])
        else:
            np.testing.assert_array_equal(got[N.hf_to_ms(name)].asnumpy(), ref, err_msg=name)


# ----------------------------------------------------------------------------- MindSpore reads it
@pytest.mark.parametrize("naming", ["mindformers", "legacy"])
def test_mindspore_load_checkpoint_reads_it(tmp_path, naming):
    import mindspore as ms
    out = tmp_path / "m.ckpt"
    _convert(TINY_MODEL, out, naming=naming)
    got = ms.load_checkpoint(str(out))
    emb = N.MS_EMBEDDING if naming == "mindformers" else N.MS_EMBEDDING_LEGACY
    assert emb in got and N.HF_EMBEDDING not in got
    assert sorted(got) == sorted(N.hf_to_ms(n, naming) for n in GOLDEN)
    for name, ref in GOLDEN.items():
        np.testing.assert_array_equal(got[N.hf_to_ms(name, naming)].asnumpy(), ref, err_msg=name)


def test_safetensors_format_loads_in_mindspore(tmp_path):
    """mindspore.load_checkpoint(path, format="safetensors") reads our streaming safetensors output."""
    import mindspore as ms
    out = tmp_path / "m.safetensors"
    _convert(write_tiny_hf_dir(str(tmp_path / "hf"), "sharded-bin", dtype="bfloat16"), out, qkv="split")
    assert not os.path.exists(str(out) + ".partial")
    got = ms.load_checkpoint(str(out), format="safetensors")
    q, kv = CFG.projection_size, CFG.kv_groups * CFG.kv_channels
    for name, ref in GOLDEN.items():
        ref = ref.astype(np.float32)
        if ".query_key_value." in name:
            parts = dict(zip(N.split_qkv_names(name), (ref[:q], ref[q:q + kv], ref[q + kv:])))
        else:
            parts = {N.hf_to_ms(name): ref}
        for ms_name, want in parts.items():
            assert got[ms_name].dtype == ms.bfloat16
            np.testing.assert_array_equal(got[ms_name].astype(ms.float32).asnumpy(), _bf16_round(want),
                                          err_msg=ms_name)


def _bf16_round(a: np.ndarray) -> np.ndarray:
    return torch.from_numpy(a).to(torch.bfloat16).float().numpy()


@pytest.mark.mindformers
@pytest.mark.parametrize("concat", [True, False], ids=["concat", "split"])
def test_loads_into_mindformers_chatglm2(tmp_path, concat):
    """No missing or unexpected weights in mindformers' ChatGLM2ForConditionalGeneration; values land in place."""
    import mindspore as ms
    from mindformers.models.glm2 import ChatGLM2Config as MFConfig, ChatGLM2ForConditionalGeneration as MFModel

    c = CFG
    net = MFModel(MFConfig(num_layers=c.num_layers, padded_vocab_size=c.padded_vocab_size, hidden_size=c.hidden_size,
                           ffn_hidden_size=c.ffn_hidden_size, kv_channels=c.kv_channels,
                           num_attention_heads=c.num_attention_heads, seq_length=64, add_qkv_bias=c.add_qkv_bias,
                           multi_query_group_num=c.multi_query_group_num, param_init_type="float32",
                           compute_dtype="float32", qkv_concat=concat, mlp_concat=concat))
    layout = "concat" if concat else "split"
    out = tmp_path / "m.ckpt"
    _convert(write_tiny_hf_dir(str(tmp_path / "hf"), "sharded-safetensors"), out, qkv=layout, mlp=layout)
    param_dict = ms.load_checkpoint(str(out))
    params = {p.name: p for p in net.get_parameters()}
    for name, value in param_dict.items():
        assert tuple(value.shape) == tuple(params[name].shape), name
    not_loaded, ckpt_not_loaded = ms.load_param_into_net(net, param_dict)
    assert ckpt_not_loaded == []
    assert all(N.is_derived_buffer(n) for n in not_loaded), not_loaded
    q, kv, F = c.projection_size, c.kv_groups * c.kv_channels, c.ffn_hidden_size
    for name, ref in GOLDEN.items():
        ms_name = N.hf_to_ms(name)
        if not concat and ".query_key_value." in name:
            expect = dict(zip(N.split_qkv_names(ms_name), (ref[:q], ref[q:q + kv], ref[q + kv:])))
        elif not concat and ".dense_h_to_4h." in name:
            expect = dict(zip(N.split_mlp_names(ms_name), (ref[:F], ref[F:])))
        else:
            expect = {ms_name: ref}
        for n, want in expect.items():
            np.testing.assert_array_equal(params[n].asnumpy(), want, err_msg=n)


# ----------------------------------------------------------------------------- bad input
def _run_main(capsys, argv):
    rc = hf_to_ms.main(argv + ["--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_clean_failure(rc, err, out, *words):
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_missing_config_json(tmp_path, capsys):
    src = write_tiny_hf_dir(str(tmp_path / "hf"), "single")
    os.remove(os.path.join(src, "config.json"))
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out, "config.json")


def test_missing_shard(tmp_path, capsys):
    src = write_tiny_hf_dir(str(tmp_path / "hf"), "sharded-bin")
    shard = _shards(src)[1]
    os.remove(os.path.join(src, shard))
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out, shard, "missing")


def _shards(path):
    return sorted(f for f in os.listdir(path) if f.endswith((".bin", ".safetensors")))


@pytest.mark.parametrize("layout,which", [("single", 0), ("sharded-bin", 2), ("sharded-safetensors", 1)])
def test_truncated_weights(tmp_path, capsys, layout, which):
    src = write_tiny_hf_dir(str(tmp_path / "hf"), layout)
    shard = _shards(src)[which]
    path = os.path.join(src, shard)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out, shard, "truncated")


def test_shape_contradicts_config(tmp_path, capsys):
    src = write_tiny_hf_dir(str(tmp_path / "hf"), "sharded-safetensors")
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["ffn_hidden_size"] = 128
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out,
                          "mlp.dense_", "160", "config.json", "contradicts", "128")


def test_unknown_parameter_error_or_allow_extra(tmp_path, capsys):
    src = str(tmp_path / "hf")
    extra = np.arange(6, dtype=np.float32).reshape(2, 3)
    write_hf_checkpoint(list(GOLDEN.items()) + [("transformer.vision.proj.weight", extra)], src)
    CFG.save_hf(src)
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out,
                          "transformer.vision.proj.weight", "unknown parameter", "--allow-extra")
    rc, err = _run_main(capsys, ["--hf-dir", src, "--output", str(out), "--allow-extra"])
    assert rc == 0 and err == []
    import mindspore as ms
    np.testing.assert_array_equal(ms.load_checkpoint(str(out))["transformer.vision.proj.weight"].asnumpy(), extra)


def test_missing_weight(tmp_path, capsys):
    src = str(tmp_path / "hf")
    write_hf_checkpoint([(k, v) for k, v in GOLDEN.items() if k != "transformer.output_layer.weight"], src)
    CFG.save_hf(src)
    out = tmp_path / "m.ckpt"
    _assert_clean_failure(*_run_main(capsys, ["--hf-dir", src, "--output", str(out)]), out,
                          "transformer.output_layer.weight", "missing")


# ----------------------------------------------------------------------------- the script itself
def test_script_help_and_exit_codes(tmp_path):
    script = str(ROOT / "convert" / "hf_to_ms.py")
    helptext = subprocess.run([PY, script, "--help"], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    for opt in ("--hf-dir", "--output", "--dtype", "--naming", "--qkv", "--mlp", "--format", "--config",
                "--allow-extra", "--no-progress"):
        assert opt in helptext
    out = tmp_path / "m.ckpt"
    ok = subprocess.run([PY, script, "--hf-dir", str(TINY_MODEL), "--output", str(out), "--dtype", "bf16"],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    line = ok.stdout.strip().splitlines()[-1]
    assert line.startswith(f"hf_to_ms: {len(GOLDEN)} tensors") and "bfloat16" in line and " s -> " in line
    assert "hf_to_ms" in ok.stderr  # the progress bar
    bad = subprocess.run([PY, script, "--hf-dir", str(tmp_path / "nope"), "--output", str(tmp_path / "x.ckpt")],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr


def test_ptuning_checkpoint_prefix_gets_mindpet_names(tmp_path):
    import mindspore as ms
    from tests.conftest import TINY_PTUNING_MODEL
    golden = st_load_numpy(str(TINY_PTUNING_MODEL / "model.safetensors"))
    _convert(TINY_PTUNING_MODEL, tmp_path / "p.ckpt")
    got = ms.load_checkpoint(str(tmp_path / "p.ckpt"))
    assert N.HF_PREFIX_EMBEDDING not in got
    np.testing.assert_array_equal(got[N.MS_PREFIX_EMBEDDING].asnumpy(), golden[N.HF_PREFIX_EMBEDDING])
