"""convert/ms_to_hf.py: checkpoints written by mindspore.save_checkpoint (concat and split layouts, training
checkpoints with optimizer state) -> HF directories that torch_glm and transformers load (golden logits)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file as st_load_numpy

from convert import ms_to_hf
from glm_common import names as N
from glm_common.config import ChatGLM2Config, RunOptions
from tests.conftest import ROOT, TINY_MODEL, TINY_PTUNING_MODEL, TOKENIZER_MODEL

GOLDEN = {k: v for k, v in st_load_numpy(str(TINY_MODEL / "model.safetensors")).items() if not N.is_derived_buffer(k)}
CFG = ChatGLM2Config.from_hf(TINY_MODEL)
CONFIG_JSON = str(TINY_MODEL / "config.json")


def _ms_save(tensors: dict, path):
    """Write with MindSpore itself (the independent writer)."""
    import mindspore as ms
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in tensors.items()], str(path))
    return str(path)


def _ms_layout(golden: dict, split: bool, naming="mindformers") -> dict:
    q, kv, F = CFG.projection_size, CFG.kv_groups * CFG.kv_channels, CFG.ffn_hidden_size
    out = {}
    for name, v in golden.items():
        ms_name = N.hf_to_ms(name, naming)
        if split and ".query_key_value." in name:
            out.update(zip(N.split_qkv_names(ms_name), (v[:q], v[q:q + kv], v[q + kv:])))
        elif split and ".dense_h_to_4h." in name:
            out.update(zip(N.split_mlp_names(ms_name), (v[:F], v[F:])))
        else:
            out[ms_name] = v
    return out


def _golden_logits(model_dir, golden_dir=TINY_MODEL):
    from torch_glm import ChatGLM2ForConditionalGeneration
    g = np.load(golden_dir / "golden.npz")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(model_dir).eval()
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(g["batch_input_ids"]),
                    attention_mask=torch.from_numpy(g["batch_attention_mask"]),
                    position_ids=torch.from_numpy(g["batch_position_ids"]))
    mask = torch.from_numpy(g["batch_attention_mask"]).bool()
    return (out.logits - torch.from_numpy(g["batch_logits"])).abs()[mask].max().item()


@pytest.mark.parametrize("split,naming", [(False, "mindformers"), (True, "legacy")], ids=["concat", "split-legacy"])
def test_training_checkpoint_to_hf_dir_gives_golden_logits(tmp_path, split, naming):
    tensors = _ms_layout(GOLDEN, split, naming)
    # what a mindformers training checkpoint holds beside the weights
    tensors.update({"adam_m." + k: np.zeros_like(v) for k, v in list(tensors.items())[:3]})
    tensors.update({"adam_v." + k: np.zeros_like(v) for k, v in list(tensors.items())[:3]})
    tensors["global_step"] = np.array([100], dtype=np.int32)
    tensors["transformer.encoder.layers.0.self_attention.key_cache"] = np.zeros((1, 2), np.float32)
    ckpt = _ms_save(tensors, tmp_path / "train.ckpt")
    out = tmp_path / "hf"
    s = ms_to_hf.convert_ms_to_hf(ckpt, CONFIG_JSON, str(out), tokenizer=str(TOKENIZER_MODEL), progress=False)
    assert s["notes"]["optimizer"] == 7 and s["notes"]["derived"] == 1
    assert {"config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(s["files"])
    got = st_load_numpy(str(out / "model.safetensors"))
    assert sorted(got) == sorted(GOLDEN)
    for k, v in GOLDEN.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    assert _golden_logits(out) <= 1e-4
    import glm_common.hf_tokenizer  # noqa: F401  (registers ChatGLMTokenizer)
    from transformers import AutoTokenizer
    from glm_common.tokenizer import ChatGLM2Tokenizer
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("广告文案")["input_ids"][-3:] == ChatGLM2Tokenizer(str(TOKENIZER_MODEL))("广告文案")["input_ids"][-3:]


def test_bin_shards_with_index_and_dtype(tmp_path):
    ckpt = _ms_save(_ms_layout(GOLDEN, True), tmp_path / "m.ckpt")
    out = tmp_path / "hf"
    rc = ms_to_hf.main(["--ckpt", ckpt, "--config", str(TINY_MODEL), "--output", str(out), "--format", "bin",
                        "--max-shard-size", "300KB", "--dtype", "bf16", "--no-progress"])
    assert rc == 0
    index = json.load(open(out / "pytorch_model.bin.index.json"))
    assert sorted(index["weight_map"]) == sorted(GOLDEN)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(os.path.getsize(out / f) < 400_000 for f in shards)
    assert json.load(open(out / "config.json"))["torch_dtype"] == "bfloat16"
    for f in shards:
        for k, t in torch.load(out / f, weights_only=True).items():
            assert t.dtype == torch.bfloat16
            torch.testing.assert_close(t, torch.from_numpy(GOLDEN[k]).to(torch.bfloat16), rtol=0, atol=0)


def test_ptuning_prefix_and_yaml_config(tmp_path):
    golden = {k: v for k, v in st_load_numpy(str(TINY_PTUNING_MODEL / "model.safetensors")).items()
              if not N.is_derived_buffer(k)}
    cfg = ChatGLM2Config.from_hf(TINY_PTUNING_MODEL)
    ms_tensors = {N.hf_to_ms(k): v for k, v in golden.items()}
    assert N.MS_PREFIX_EMBEDDING in ms_tensors
    ckpt = _ms_save(ms_tensors, tmp_path / "p.ckpt")
    run_yaml = tmp_path / "run_glm2.yaml"
    yaml.safe_dump({"model": {"model_config": cfg.to_model_config(RunOptions(param_init_type="float32"))}},
                   open(run_yaml, "w"))
    out = tmp_path / "hf"
    ms_to_hf.convert_ms_to_hf(ckpt, str(run_yaml), str(out), progress=False)
    got = st_load_numpy(str(out / "model.safetensors"))
    np.testing.assert_array_equal(got[N.HF_PREFIX_EMBEDDING], golden[N.HF_PREFIX_EMBEDDING])
    assert json.load(open(out / "config.json"))["pre_seq_len"] == cfg.pre_seq_len
    assert _golden_logits(out, TINY_PTUNING_MODEL) <= 1e-4


def test_mindspore_safetensors_input(tmp_path):
    import mindspore as ms
    path = tmp_path / "m.safetensors"
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in _ms_layout(GOLDEN, False).items()], str(path),
                       format="safetensors")
    ms_to_hf.convert_ms_to_hf(str(path), CONFIG_JSON, str(tmp_path / "hf"), progress=False)
    got = st_load_numpy(str(tmp_path / "hf" / "model.safetensors"))
    for k, v in GOLDEN.items():
        np.testing.assert_array_equal(got[k], v)


# ----------------------------------------------------------------------------- bad input
def _fail(capsys, argv, out, *words):
    rc = ms_to_hf.main(argv + ["--output", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0
    assert len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


def test_bad_inputs(tmp_path, capsys):
    out = tmp_path / "hf"
    good = _ms_layout(GOLDEN, False)
    ckpt = _ms_save(good, tmp_path / "m.ckpt")
    _fail(capsys, ["--ckpt", ckpt, "--config", str(tmp_path / "none.json")], out, "none.json")
    trunc = tmp_path / "trunc.ckpt"
    trunc.write_bytes(open(ckpt, "rb").read()[: os.path.getsize(ckpt) // 2])
    _fail(capsys, ["--ckpt", str(trunc), "--config", CONFIG_JSON], out, "trunc.ckpt", "truncated")
    wrong = dict(good)
    wrong["transformer.output_layer.weight"] = good["transformer.output_layer.weight"][:, :32]
    _fail(capsys, ["--ckpt", _ms_save(wrong, tmp_path / "w.ckpt"), "--config", CONFIG_JSON], out,
          "w.ckpt", "transformer.output_layer.weight", "[3072, 32]", "contradicts", "[3072, 64]")
    extra = dict(good, **{"transformer.vision.weight": np.ones((2, 2), np.float32)})
    xckpt = _ms_save(extra, tmp_path / "x.ckpt")
    _fail(capsys, ["--ckpt", xckpt, "--config", CONFIG_JSON], out, "transformer.vision.weight", "--allow-extra")
    missing = {k: v for k, v in good.items() if not k.endswith("final_layernorm.weight")}
    _fail(capsys, ["--ckpt", _ms_save(missing, tmp_path / "mi.ckpt"), "--config", CONFIG_JSON], out,
          "final_layernorm.weight", "missing")
    half_split = _ms_layout(GOLDEN, True)
    del half_split["transformer.encoder.layers.1.self_attention.wk.weight"]
    _fail(capsys, ["--ckpt", _ms_save(half_split, tmp_path / "hs.ckpt"), "--config", CONFIG_JSON], out,
          "layers.1.self_attention", "incomplete")
    lora = dict(good, **{"transformer.encoder.layers.0.self_attention.query_key_value.mindpet_delta_lora_a":
                         np.ones((2, 64), np.float32)})
    _fail(capsys, ["--ckpt", _ms_save(lora, tmp_path / "l.ckpt"), "--config", CONFIG_JSON], out,
          "mindpet_delta_lora_a", "adapters.py")
    assert ms_to_hf.main(["--ckpt", xckpt, "--config", CONFIG_JSON, "--output", str(out), "--allow-extra",
                          "--no-progress"]) == 0
    np.testing.assert_array_equal(st_load_numpy(str(out / "model.safetensors"))["transformer.vision.weight"],
                                  np.ones((2, 2), np.float32))


def test_script_help():
    helptext = subprocess.run([sys.executable, str(ROOT / "convert" / "ms_to_hf.py"), "--help"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout
    for opt in ("--ckpt", "--config", "--output", "--dtype", "--max-shard-size", "--format", "--tokenizer",
                "--allow-extra", "--no-progress"):
        assert opt in helptext
