"""convert/adapters.py: real peft adapters (peft on torch_glm) <-> mindpet LoRA checkpoints, P-tuning prefixes,
merging; checked with peft itself, the safetensors library, mindspore.load_checkpoint and mindspore_glm."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file as st_load_numpy

from convert import adapters, hf_to_ms
from convert.hf_layout import write_tiny_hf_dir
from glm_common import names as N
from glm_common.config import ChatGLM2Config
from tests.conftest import ROOT, TINY_MODEL, TINY_PTUNING_MODEL

CFG = ChatGLM2Config.from_hf(TINY_MODEL)
R, ALPHA = 4, 8.0
TARGETS = ["query_key_value", "dense_4h_to_h"]


def _batch(golden_dir=TINY_MODEL):
    g = np.load(golden_dir / "golden.npz")
    return {k: torch.from_numpy(g[f"batch_{k}"]) for k in ("input_ids", "attention_mask", "position_ids")}


def _base():
    from torch_glm import ChatGLM2ForConditionalGeneration
    return ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL).eval()


@pytest.fixture(scope="module")
def peft_dir(tmp_path_factory):
    """A real peft adapter: peft.get_peft_model on torch_glm, B given values (it starts at zero)."""
    from peft import LoraConfig, TaskType, get_peft_model
    torch.manual_seed(0)
    model = get_peft_model(_base(), LoraConfig(task_type=TaskType.CAUSAL_LM, r=R, lora_alpha=ALPHA, lora_dropout=0.0,
                                               target_modules=TARGETS))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(str(out), safe_serialization=True)
    with torch.no_grad():
        logits = model.eval()(**_batch()).logits
    return out, logits


def _peft_logits(adapter_dir):
    from peft import PeftModel
    model = PeftModel.from_pretrained(_base(), str(adapter_dir)).eval()
    with torch.no_grad():
        return model(**_batch()).logits


def _mask():
    return torch.from_numpy(np.load(TINY_MODEL / "golden.npz")["batch_attention_mask"]).bool()


def test_peft_to_ms_and_back(peft_dir, tmp_path):
    import mindspore as ms
    adapter, logits = peft_dir
    ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "pet.yaml"
    assert adapters.main(["peft-to-ms", "--adapter", str(adapter), "--output", str(ckpt), "--pet-config", str(pet)]) == 0
    peft_tensors = st_load_numpy(str(adapter / "adapter_model.safetensors"))
    got = ms.load_checkpoint(str(ckpt))
    assert len(got) == len(peft_tensors) == 2 * 2 * CFG.num_layers
    for key, value in peft_tensors.items():
        np.testing.assert_array_equal(got[N.peft_to_mindpet(key)].asnumpy(), value, err_msg=key)
    assert all(k.endswith(("mindpet_delta_lora_a", "mindpet_delta_lora_b")) for k in got)
    pet_config = yaml.safe_load(open(pet))["pet_config"]
    assert pet_config == {"pet_type": "lora", "lora_rank": R, "lora_alpha": ALPHA, "lora_dropout": 0.0,
                          "target_modules": ".*dense_4h_to_h*|.*query_key_value*"}

    back = tmp_path / "back"
    assert adapters.main(["ms-to-peft", "--ckpt", str(ckpt), "--pet-config", str(pet), "--output", str(back)]) == 0
    again = st_load_numpy(str(back / "adapter_model.safetensors"))
    assert sorted(again) == sorted(peft_tensors)
    for key, value in peft_tensors.items():
        np.testing.assert_array_equal(again[key], value)
    cfg = json.load(open(back / "adapter_config.json"))
    assert (cfg["r"], cfg["lora_alpha"], sorted(cfg["target_modules"]), cfg["peft_type"]) == (R, ALPHA, sorted(TARGETS), "LORA")
    # vanilla peft loads the converted adapter and gives the same logits as the original
    torch.testing.assert_close(_peft_logits(back), logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("where", ["second write", "second move"])
def test_peft_to_ms_writes_the_pair_or_nothing(peft_dir, tmp_path, monkeypatch, capsys, where):
    """A failure while the pet_config is written (a full disk), or while the pair is moved into place, leaves
    neither a .ckpt without its pet_config nor a changed old pair."""
    import errno
    from glm_common import fsutil
    adapter, _ = peft_dir
    ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "lora_pet_config.yaml"
    if where == "second write":
        def full_disk(*a, **k):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(yaml, "safe_dump", full_disk)
    else:
        real = os.replace

        def fail_second(src, dst):
            if str(dst) == str(pet) and str(src).endswith(".pair-partial"):
                raise OSError(errno.EIO, "Input/output error")
            return real(src, dst)
        monkeypatch.setattr(fsutil.os, "replace", fail_second)
    assert adapters.main(["peft-to-ms", "--adapter", str(adapter), "--output", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("No space left" in err[0] or "Input/output" in err[0]), err
    assert sorted(os.listdir(tmp_path)) == []              # neither file, no staging leftovers
    # an existing pair is kept as it was
    ckpt.write_bytes(b"old ckpt")
    pet.write_text("old pet")
    assert adapters.main(["peft-to-ms", "--adapter", str(adapter), "--output", str(ckpt), "--overwrite"]) == 1
    assert ckpt.read_bytes() == b"old ckpt" and pet.read_text() == "old pet"
    assert sorted(os.listdir(tmp_path)) == ["lora.ckpt", "lora_pet_config.yaml"]
    monkeypatch.undo()
    capsys.readouterr()
    # without --overwrite the existing pair is refused in one line and kept
    assert adapters.main(["peft-to-ms", "--adapter", str(adapter), "--output", str(ckpt)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists (--overwrite replaces it)" in err[0], err
    assert ckpt.read_bytes() == b"old ckpt" and pet.read_text() == "old pet"
    assert adapters.main(["peft-to-ms", "--adapter", str(adapter), "--output", str(ckpt), "--overwrite"]) == 0
    assert yaml.safe_load(open(pet))["pet_config"]["lora_rank"] == R and ckpt.stat().st_size > 100


def test_mindformers_run_yaml_and_json_pet_config(peft_dir, tmp_path):
    adapter, _ = peft_dir
    ckpt = tmp_path / "lora.ckpt"
    adapters.peft_to_ms(str(adapter), str(ckpt), str(tmp_path / "pet.json"))
    assert json.load(open(tmp_path / "pet.json"))["pet_config"]["lora_rank"] == R
    run = tmp_path / "run_glm2_lora.yaml"
    yaml.safe_dump({"model": {"model_config": {"type": "ChatGLM2Config", "pet_config": {
        "pet_type": "lora", "lora_rank": R, "lora_alpha": ALPHA, "lora_dropout": 0.1,
        "target_modules": ".*query_key_value*"}}}}, open(run, "w"))
    adapters.ms_to_peft(str(ckpt), str(run), str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "adapter_config.json"))["lora_dropout"] == 0.1


def test_merge_hf_matches_peft_merge_and_unload(peft_dir, tmp_path):
    from peft import PeftModel
    adapter, logits = peft_dir
    merged_ref = PeftModel.from_pretrained(_base(), str(adapter)).merge_and_unload().state_dict()
    base = write_tiny_hf_dir(str(tmp_path / "base"), "sharded-bin")
    out = tmp_path / "merged"
    assert adapters.main(["merge", "--base", base, "--adapter", str(adapter), "--output", str(out),
                          "--no-progress"]) == 0
    got = st_load_numpy(str(out / "model.safetensors"))
    assert sorted(got) == sorted(k for k in merged_ref if not N.is_derived_buffer(k))
    for k, v in got.items():
        np.testing.assert_allclose(v, merged_ref[k].numpy(), rtol=0, atol=1e-6, err_msg=k)
    assert os.path.isfile(out / "config.json") and os.path.isfile(out / "tokenizer.model")
    from torch_glm import ChatGLM2ForConditionalGeneration
    with torch.no_grad():
        merged_logits = ChatGLM2ForConditionalGeneration.from_pretrained(out).eval()(**_batch()).logits
    assert (merged_logits - logits).abs()[_mask()].max().item() <= 1e-4


def test_merge_into_split_ckpt_and_mindspore_glm_logits(peft_dir, tmp_path):
    """LoRA .ckpt merged into a split-layout base .ckpt; mindspore_glm on the result gives peft's logits."""
    import mindspore as ms
    from peft import PeftModel
    adapter, logits = peft_dir
    merged_ref = {k: v.numpy() for k, v in PeftModel.from_pretrained(_base(), str(adapter)).merge_and_unload()
                  .state_dict().items()}
    base = tmp_path / "base.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(base), qkv="split", mlp="split", progress=False)
    lora_ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "pet.yaml"
    adapters.peft_to_ms(str(adapter), str(lora_ckpt), str(pet))
    out = tmp_path / "merged.ckpt"
    adapters.merge(str(base), str(out), str(lora_ckpt), str(pet), progress=False)
    got = ms.load_checkpoint(str(out))
    q, kv = CFG.projection_size, CFG.kv_groups * CFG.kv_channels
    for i in range(CFG.num_layers):
        p = f"transformer.encoder.layers.{i}."
        ref = merged_ref[p + "self_attention.query_key_value.weight"]
        for name, rows in zip(N.split_qkv_names(p + "self_attention.query_key_value.weight"),
                              (ref[:q], ref[q:q + kv], ref[q + kv:])):
            np.testing.assert_allclose(got[name].asnumpy(), rows, rtol=0, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got[p + "mlp.dense_4h_to_h.weight"].asnumpy(),
                                   merged_ref[p + "mlp.dense_4h_to_h.weight"], rtol=0, atol=1e-6)
    # the concat layout through mindspore_glm: same logits as the torch peft model
    concat = tmp_path / "base_concat.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(concat), progress=False)
    merged_concat = tmp_path / "merged_concat.ckpt"
    adapters.merge(str(concat), str(merged_concat), str(adapter), progress=False)
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    model = MSModel.from_pretrained(str(merged_concat), config=CFG)
    b = _batch()
    ms_logits = model(ms.Tensor(b["input_ids"].numpy()), ms.Tensor(b["attention_mask"].numpy()),
                      ms.Tensor(b["position_ids"].numpy()))
    err = (torch.from_numpy(ms_logits.asnumpy()) - logits).abs()[_mask()].max().item()
    assert err <= 1e-4


def test_merge_lora_inside_a_training_ckpt(peft_dir, tmp_path):
    """A mindformers LoRA run saves base + LoRA in one .ckpt: merge without --adapter."""
    import mindspore as ms
    adapter, _ = peft_dir
    base = tmp_path / "base.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(base), progress=False)
    lora_ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "pet.yaml"
    adapters.peft_to_ms(str(adapter), str(lora_ckpt), str(pet))
    both = {**ms.load_checkpoint(str(base)), **ms.load_checkpoint(str(lora_ckpt))}
    ms.save_checkpoint([{"name": k, "data": v} for k, v in both.items()], str(tmp_path / "run.ckpt"))
    adapters.merge(str(tmp_path / "run.ckpt"), str(tmp_path / "a.ckpt"), pet_config=str(pet), progress=False)
    adapters.merge(str(base), str(tmp_path / "b.ckpt"), str(adapter), progress=False)
    a, b = ms.load_checkpoint(str(tmp_path / "a.ckpt")), ms.load_checkpoint(str(tmp_path / "b.ckpt"))
    assert sorted(a) == sorted(b) and not any("mindpet" in k for k in a)
    for k in a:
        np.testing.assert_array_equal(a[k].asnumpy(), b[k].asnumpy())


def test_prefix_both_ways(tmp_path):
    import mindspore as ms
    golden = st_load_numpy(str(TINY_PTUNING_MODEL / "model.safetensors"))
    prefix = golden[N.HF_PREFIX_EMBEDDING]
    # the official P-tuning checkpoint: pytorch_model.bin with the prefix encoder only
    ptuning = tmp_path / "ptuning"
    os.makedirs(ptuning)
    torch.save({N.HF_PREFIX_EMBEDDING: torch.from_numpy(prefix)}, ptuning / "pytorch_model.bin")
    ckpt = tmp_path / "prefix.ckpt"
    assert adapters.main(["prefix-to-ms", "--hf", str(ptuning / "pytorch_model.bin"), "--output", str(ckpt)]) == 0
    got = ms.load_checkpoint(str(ckpt))
    assert list(got) == [N.MS_PREFIX_EMBEDDING]
    np.testing.assert_array_equal(got[N.MS_PREFIX_EMBEDDING].asnumpy(), prefix)
    # from a whole HF directory (base + prefix): only the prefix is taken
    adapters.prefix_to_ms(str(TINY_PTUNING_MODEL), str(tmp_path / "p2.ckpt"))
    assert list(ms.load_checkpoint(str(tmp_path / "p2.ckpt"))) == [N.MS_PREFIX_EMBEDDING]
    back = tmp_path / "back"
    assert adapters.main(["ms-to-prefix", "--ckpt", str(ckpt), "--output", str(back), "--config",
                          str(TINY_MODEL / "config.json")]) == 0
    sd = torch.load(back / "pytorch_model.bin", weights_only=True)
    assert list(sd) == [N.HF_PREFIX_EMBEDDING]
    np.testing.assert_array_equal(sd[N.HF_PREFIX_EMBEDDING].numpy(), prefix)
    assert json.load(open(back / "config.json"))["pre_seq_len"] == prefix.shape[0]


def test_unmerged_adapter_logits_in_mindspore_glm(peft_dir, tmp_path):
    """peft adapter in torch vs the converted adapter applied by mindspore_glm.lora (float32, 1e-4)."""
    import mindspore as ms
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from mindspore_glm import lora as ms_lora
    adapter, logits = peft_dir
    lora_ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "pet.yaml"
    adapters.peft_to_ms(str(adapter), str(lora_ckpt), str(pet))
    base = tmp_path / "base.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(base), progress=False)
    model = MSModel.from_pretrained(str(base), config=CFG)
    settings = yaml.safe_load(open(pet))["pet_config"]
    # the pet_config regex the converter wrote selects the same layers in mindspore_glm as peft's list did
    ms_lora.apply_lora(model, target_modules=settings["target_modules"], r=settings["lora_rank"],
                       lora_alpha=settings["lora_alpha"], lora_dropout=0.0)
    assert len(ms_lora.lora_layers(model)) == len(TARGETS) * CFG.num_layers
    not_loaded, unexpected = ms.load_param_into_net(model, ms.load_checkpoint(str(lora_ckpt)))
    assert unexpected == [] and not any("mindpet" in n for n in not_loaded)
    model.set_train(False)
    b = _batch()
    out = model(ms.Tensor(b["input_ids"].numpy()), ms.Tensor(b["attention_mask"].numpy()),
                ms.Tensor(b["position_ids"].numpy()))
    assert (torch.from_numpy(out.asnumpy()) - logits).abs()[_mask()].max().item() <= 1e-4


def test_mindspore_glm_lora_to_peft_gives_same_logits(tmp_path):
    """The reverse direction: a LoRA on mindspore_glm, saved as a mindformers .ckpt + pet_config, converted to a
    peft adapter: torch (peft on torch_glm) gives mindspore_glm's logits (float32, 1e-4)."""
    import mindspore as ms
    from peft import PeftModel
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from mindspore_glm import lora as ms_lora
    base = tmp_path / "base.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(base), progress=False)
    model = MSModel.from_pretrained(str(base), config=CFG)
    ms_lora.apply_lora(model, target_modules=".*query_key_value*|.*dense_h_to_4h*", r=R, lora_alpha=ALPHA,
                       lora_dropout=0.0)
    rng = np.random.default_rng(1)
    for p in model.get_parameters():
        if "mindpet_delta_lora_" in p.name:  # as if trained: B away from zero
            p.set_data(ms.Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    # what a mindformers LoRA run leaves behind: the whole network (base + LoRA) in one .ckpt
    ms.save_checkpoint(model, str(tmp_path / "run.ckpt"))
    pet = tmp_path / "pet.yaml"
    yaml.safe_dump({"pet_config": {"pet_type": "lora", "lora_rank": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
                                   "target_modules": ".*query_key_value*|.*dense_h_to_4h*"}}, open(pet, "w"))
    model.set_train(False)
    b = _batch()
    ms_logits = model(ms.Tensor(b["input_ids"].numpy()), ms.Tensor(b["attention_mask"].numpy()),
                      ms.Tensor(b["position_ids"].numpy()))
    out = tmp_path / "peft"
    assert adapters.main(["ms-to-peft", "--ckpt", str(tmp_path / "run.ckpt"), "--pet-config", str(pet),
                          "--output", str(out)]) == 0
    torch_model = PeftModel.from_pretrained(_base(), str(out)).eval()
    assert sorted(json.load(open(out / "adapter_config.json"))["target_modules"]) == ["dense_h_to_4h", "query_key_value"]
    with torch.no_grad():
        logits = torch_model(**b).logits
    err = (torch.from_numpy(ms_logits.asnumpy()) - logits).abs()[_mask()].max().item()
    assert err <= 1e-4


# ----------------------------------------------------------------------------- bad input
def _fail(capsys, argv, must_not_exist, *words):
    rc = adapters.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("error: "), err
    for w in words:
        assert w in err[0], (w, err[0])
    assert not os.path.exists(must_not_exist) and not os.path.exists(str(must_not_exist) + ".partial")


def test_bad_inputs(peft_dir, tmp_path, capsys):
    adapter, _ = peft_dir
    out = tmp_path / "x.ckpt"
    _fail(capsys, ["peft-to-ms", "--adapter", str(tmp_path), "--output", str(out)], out, "adapter_config.json")
    broken = tmp_path / "broken"
    os.makedirs(broken)
    (broken / "adapter_config.json").write_text(open(adapter / "adapter_config.json").read())
    data = open(adapter / "adapter_model.safetensors", "rb").read()
    (broken / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    _fail(capsys, ["peft-to-ms", "--adapter", str(broken), "--output", str(out)], out,
          "adapter_model.safetensors", "truncated")
    lora_ckpt, pet = tmp_path / "lora.ckpt", tmp_path / "pet.yaml"
    adapters.peft_to_ms(str(adapter), str(lora_ckpt), str(pet))
    wrong = tmp_path / "wrong.yaml"
    yaml.safe_dump({"pet_config": {"pet_type": "lora", "lora_rank": 16, "lora_alpha": 32}}, open(wrong, "w"))
    _fail(capsys, ["ms-to-peft", "--ckpt", str(lora_ckpt), "--pet-config", str(wrong), "--output",
                   str(tmp_path / "o")], tmp_path / "o", "lora_rank", "16", "rank 4")
    base = tmp_path / "base.ckpt"
    hf_to_ms.convert_hf_to_ms(str(TINY_MODEL), str(base), progress=False)
    _fail(capsys, ["merge", "--base", str(base), "--adapter", str(lora_ckpt), "--output", str(out)], out,
          "--pet-config")
    _fail(capsys, ["ms-to-prefix", "--ckpt", str(base), "--output", str(tmp_path / "p")], tmp_path / "p",
          "not a P-tuning")


def test_script_help():
    script = str(ROOT / "convert" / "adapters.py")
    top = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for cmd in ("peft-to-ms", "ms-to-peft", "prefix-to-ms", "ms-to-prefix", "merge"):
        assert cmd in top
    merge_help = subprocess.run([sys.executable, script, "merge", "--help"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
    for opt in ("--base", "--adapter", "--pet-config", "--output", "--dtype", "--max-shard-size"):
        assert opt in merge_help
