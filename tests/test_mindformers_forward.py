"""mindformers' own ChatGLM2ForConditionalGeneration computes the reference numbers from our checkpoints.

mindformers' glm2 forward runs on CPU with two patches that change nothing it means:

1. its RMSNorm takes its own non-fused branch: ``glm2_modules.check_rmsnorm_big_kernel_valid`` -> False
   (the fused ``RmsNorm`` kernel is Ascend-only); that branch calls ``self.cast``, which mindformers 1.9
   creates only in the fused branch, so each ``ChatGLM2RMSNorm`` is given its ``Cast`` op;
2. its ``CoreAttention`` multiplies the attention mask by -10000 in float32: the mask is uint8, and on CPU
   ``uint8 x -10000`` wraps (to +240), so every position would attend to the future (logits ~8 away
   from the reference). The patch casts the mask to float32 before the multiplication.

Patched so, mindformers' forward on checkpoints written by ``convert/hf_to_ms.py`` (the concat layout and
``--qkv split --mlp split``) gives the golden reference logits (the public ChatGLM2 code), and on a LoRA
checkpoint written by our runner and merged by ``convert/adapters.py merge`` gives torch_glm + peft's
logits with the same adapter. mindformers 1.9 builds multi-query models only; the golden tiny model is one.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL

pytestmark = pytest.mark.mindformers
mf_glm2 = pytest.importorskip("mindformers.models.glm2")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)      # mindformers writes its log under ./output/log


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")


def _mf_logits(ckpt, input_ids, qkv_concat=True, mlp_concat=True, rope_ratio=1.0):
    """mindformers' model (PYNATIVE, float32) with the two CPU patches, weights from ``ckpt``."""
    import mindspore as ms
    from mindspore import Tensor, ops
    from mindformers.models.glm2 import glm2_modules, glm2_transformer
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    cfg = json.loads((TINY_MODEL / "config.json").read_text())
    saved = glm2_modules.check_rmsnorm_big_kernel_valid
    glm2_modules.check_rmsnorm_big_kernel_valid = lambda: False          # patch 1: non-fused RMSNorm
    try:
        mf_cfg = mf_glm2.ChatGLM2Config(
            num_layers=cfg["num_layers"], hidden_size=cfg["hidden_size"], ffn_hidden_size=cfg["ffn_hidden_size"],
            num_attention_heads=cfg["num_attention_heads"], kv_channels=cfg["kv_channels"],
            multi_query_attention=True, multi_query_group_num=cfg["multi_query_group_num"],
            padded_vocab_size=cfg["padded_vocab_size"], vocab_size=cfg["padded_vocab_size"],
            seq_length=input_ids.shape[1], add_qkv_bias=cfg["add_qkv_bias"], add_bias_linear=cfg["add_bias_linear"],
            layernorm_epsilon=cfg["layernorm_epsilon"], param_init_type="float32", compute_dtype="float32",
            layernorm_compute_type="float32", rotary_dtype="float32", batch_size=input_ids.shape[0],
            qkv_concat=qkv_concat, mlp_concat=mlp_concat, rope_ratio=rope_ratio, use_past=False)
        model = mf_glm2.ChatGLM2ForConditionalGeneration(mf_cfg)
    finally:
        glm2_modules.check_rmsnorm_big_kernel_valid = saved
    n = 0
    for _, cell in model.cells_and_names():
        if isinstance(cell, glm2_modules.ChatGLM2RMSNorm) and not hasattr(cell, "cast"):
            cell.cast = ops.Cast()                                    # patch 1: the branch's missing Cast
        if isinstance(cell, glm2_transformer.CoreAttention):         # patch 2: the mask x -10000 in float
            cell.mul_mask = lambda mask, value: ops.cast(mask, ms.float32) * value
            n += 1
    assert n == cfg["num_layers"]
    not_loaded, unexpected = ms.load_param_into_net(model, ms.load_checkpoint(str(ckpt)))
    assert [x for x in not_loaded if ".paged_attention_mgr." not in x] == [] and unexpected == []
    model.set_train(False)
    return model(Tensor(input_ids.astype(np.int32)))[0].asnumpy()


def _convert(tmp_path, *extra, name="tiny.ckpt", hf_dir=TINY_MODEL):
    out = tmp_path / name
    r = subprocess.run([sys.executable, "convert/hf_to_ms.py", "--hf-dir", str(hf_dir), "--output", str(out),
                        "--no-progress", *extra], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return out


@pytest.mark.parametrize("layout", ["concat", "split"])
def test_mindformers_forward_on_converted_checkpoints_gives_the_golden_logits(tmp_path, layout):
    golden = np.load(TINY_MODEL / "golden.npz")
    extra = ["--qkv", "split", "--mlp", "split"] if layout == "split" else []
    ckpt = _convert(tmp_path, *extra)
    logits = _mf_logits(ckpt, golden["single_input_ids"], qkv_concat=layout == "concat",
                        mlp_concat=layout == "concat")
    diff = np.abs(logits.reshape(golden["single_logits"].shape) - golden["single_logits"]).max()
    print(f"\nmindformers forward, {layout} checkpoint: max |logits - golden| = {diff:.3e}")
    assert diff < 1e-4, diff


def test_rope_ratio_as_mindformers_computes_it(tmp_path):
    """``rope_ratio: 16`` (ChatGLM2-6B-32K's scaling) in both backends gives mindformers' logits, which
    differ from rope_ratio 1's."""
    import mindspore as ms
    import torch
    from mindspore import Tensor
    from glm_common.config import ChatGLM2Config
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration as MSModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    golden = np.load(TINY_MODEL / "golden.npz")
    ids = golden["single_input_ids"]
    ckpt = _convert(tmp_path)
    theirs = _mf_logits(ckpt, ids, rope_ratio=16.0).reshape(golden["single_logits"].shape)
    mc = json.loads((TINY_MODEL / "config.json").read_text())
    for k in ("architectures", "model_type", "torch_dtype", "tie_word_embeddings", "use_cache"):
        mc.pop(k)
    cfg, opts = ChatGLM2Config.from_model_config({**mc, "rope_ratio": 16, "compute_dtype": "float32",
                                                  "param_init_type": "float32"})
    assert cfg.rope_base == 160000.0
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    ours = MSModel.from_pretrained(str(TINY_MODEL), config=cfg, options=opts)
    ours.set_train(False)
    ms_logits = ours(Tensor(ids.astype(np.int32)))[0].asnumpy()
    pt = PTModel.from_pretrained(str(TINY_MODEL), config=cfg).eval()
    with torch.no_grad():
        pt_logits = pt(input_ids=torch.from_numpy(ids)).logits.numpy()
    d_ms, d_pt = np.abs(ms_logits - theirs).max(), np.abs(pt_logits - theirs).max()
    d_ratio = np.abs(theirs - golden["single_logits"]).max()
    print(f"\nrope_ratio 16: max |mindspore_glm - mindformers| = {d_ms:.3e}, max |torch_glm - mindformers| = "
          f"{d_pt:.3e}, max |mindformers(16) - golden(1)| = {d_ratio:.3e}")
    assert d_ms < 1e-4
    assert d_pt < 1e-4
    assert d_ratio > 1e-2     # the ratio changes the numbers


@pytest.mark.slow
def test_mindformers_forward_on_our_merged_lora_gives_torch_peft_logits(tmp_path):
    """A LoRA trained by our runner (configs/tiny/run_tiny_lora.yaml, 4 steps), merged into the converted
    base by convert/adapters.py: mindformers' logits equal torch_glm + peft's with the same adapter."""
    import torch
    import yaml
    from peft import PeftModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    base = _convert(tmp_path, name="base.ckpt")
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml", encoding="utf-8"))
    cfg["load_checkpoint"] = str(base)
    cfg["output_dir"] = str(tmp_path / "run")
    cfg["lr_schedule"]["warmup_steps"] = 0
    for part in ("train_dataset", "eval_dataset"):
        cfg[part]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
        cfg[part]["data_loader"]["dataset_dir"] = str(ADGEN_DIR / ("train.json" if part == "train_dataset" else "dev.json"))
    cfg["processor"]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
    run_yaml = tmp_path / "lora.yaml"
    run_yaml.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = subprocess.run([sys.executable, "-m", "mindspore_glm.run", "--config", str(run_yaml), "--run_mode", "finetune",
                        "--train_steps", "4", "--no_progress"], cwd=ROOT, env=_env(), capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ckdir = tmp_path / "run" / "checkpoint" / "rank_0"
    lora = ckdir / sorted(os.listdir(ckdir))[-1]
    merged, adapter = tmp_path / "merged.ckpt", tmp_path / "peft"
    for args in (["merge", "--base", str(base), "--adapter", str(lora), "--pet-config", str(run_yaml),
                  "--output", str(merged)],
                 ["ms-to-peft", "--ckpt", str(lora), "--pet-config", str(run_yaml), "--output", str(adapter)]):
        r = subprocess.run([sys.executable, "convert/adapters.py", *args], cwd=ROOT, env=_env(), capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
    ids = np.load(TINY_MODEL / "golden.npz")["single_input_ids"]
    theirs = _mf_logits(merged, ids).reshape(1, ids.shape[1], -1)
    model = PeftModel.from_pretrained(ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL)), str(adapter))
    model.eval()
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    base_logits = np.load(TINY_MODEL / "golden.npz")["single_logits"]
    d_adapter, d = np.abs(ref - base_logits).max(), np.abs(theirs - ref).max()
    print(f"\nmerged LoRA: max |mindformers - torch_glm+peft| = {d:.3e} (adapter moves logits by {d_adapter:.3e})")
    assert d_adapter > 1e-4       # the adapter is not zero
    assert d < 1e-4
