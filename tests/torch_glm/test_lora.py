"""LoRA through peft (adapter directories vanilla peft loads, merging), P-tuning v2 freezing, QLoRA."""
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from glm_common.names import peft_to_mindpet
from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL
from torch_glm import ChatGLM2ForConditionalGeneration
from glm_common.run_config import RunConfigError, pet_settings
from torch_glm.lora import apply_lora, apply_pet, apply_ptuning, apply_qlora, load_lora, merge_lora, save_lora

QKV = "self_attention.query_key_value"


def batch():
    g = np.load(TINY_MODEL / "golden.npz")
    return {k: torch.from_numpy(g[f"batch_{k}"]) for k in ("input_ids", "attention_mask", "position_ids")}


def lora_model(r=4, alpha=8.0, targets=None):
    torch.manual_seed(0)
    model = apply_lora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), r=r, lora_alpha=alpha,
                       lora_dropout=0.0, target_modules=targets)
    with torch.no_grad():  # lora_B starts at zero; give it values so the adapter changes the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model.eval()


def hand_merged(adapter_file, scale, base_dir=TINY_MODEL):
    """W + scale * B @ A computed from the adapter file alone, in a fresh base model."""
    model = ChatGLM2ForConditionalGeneration.from_pretrained(base_dir)
    adapter = load_file(adapter_file)
    sd = model.state_dict()
    done = 0
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        base = key[len("base_model.model."):].replace(".lora_A.weight", ".weight")
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        sd[base] = sd[base] + scale * (b @ a)
        done += 1
    model.load_state_dict(sd)
    return model, done


def test_trainable_parameters_and_names():
    model = lora_model()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 4 and all(QKV in n and "lora_" in n for n in trainable)


def test_adapter_dir_loads_in_vanilla_peft_and_matches_hand_merge(tmp_path):
    model = lora_model()
    save_lora(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["target_modules"] == [
        "query_key_value"] and cfg["task_type"] == "CAUSAL_LM"
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == f"base_model.model.transformer.encoder.layers.0.{QKV}.lora_A.weight"
    assert peft_to_mindpet(keys[0]) == f"transformer.encoder.layers.0.{QKV}.mindpet_delta_lora_a"
    with torch.no_grad():
        ours = model(**batch()).logits
        vanilla = PeftModel.from_pretrained(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), str(tmp_path))
        loaded = vanilla(**batch()).logits
        merged, n = hand_merged(tmp_path / "adapter_model.safetensors", scale=8 / 4)
        by_hand = merged(**batch()).logits
    assert n == 2
    mask = batch()["attention_mask"].bool()
    assert (ours - by_hand).abs()[mask].max() < 1e-5
    assert torch.equal(ours, loaded)
    base = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)(**batch()).logits
    assert (ours - base).abs()[mask].max() > 1e-3  # the adapter does something


def test_merge_and_save_as_plain_hf_checkpoint(tmp_path):
    model = lora_model(targets=["query_key_value", "dense_h_to_4h"])
    save_lora(model, tmp_path / "adapter")
    merged = merge_lora(model)
    assert type(merged) is ChatGLM2ForConditionalGeneration
    assert not any("lora" in n for n in merged.state_dict())
    merged.save_pretrained(tmp_path / "merged")
    by_hand, n = hand_merged(tmp_path / "adapter" / "adapter_model.safetensors", scale=2.0)
    assert n == 4
    again = ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path / "merged")
    for k, v in by_hand.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v, rtol=0, atol=1e-6)
    reloaded = load_lora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch()).logits, again(**batch()).logits, rtol=0, atol=1e-5)


def test_ptuning_freezes_the_base():
    model = apply_ptuning(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix_encoder.embedding.weight"]
    with pytest.raises(RunConfigError, match="pre_seq_len"):
        apply_ptuning(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL))


def test_pet_settings_mindformers_keys():
    """torch_glm reads pet_config through the one strict glm_common.run_config.pet_settings."""
    s = pet_settings({"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.05,
                      "target_modules": ".*query_key_value*"})
    assert s == {"pet_type": "lora", "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.05,
                 "target_modules": ".*query_key_value*", "ignored": []}
    model, params = apply_pet(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), s)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 2  # the regex form picks the same layers
    assert len(params) == 4 and all(p.requires_grad for p in params)
    assert pet_settings({"pet_type": "ptuning2", "pre_seq_len": 16}) == {
        "pet_type": "ptuning2", "pre_seq_len": 16, "prefix_projection": False, "dropout_prob": 0.1, "ignored": []}
    assert pet_settings(None) == {"pet_type": "full", "ignored": []}
    with pytest.raises(RunConfigError, match="pet_config.pet_type"):
        pet_settings({"pet_type": "adapter"})


def test_ptuning_dropout_prob_is_honoured():
    """pet_config.dropout_prob sets the prefix dropout (it was fixed at 0.1)."""
    s = pet_settings({"pet_type": "ptuning2", "pre_seq_len": 4, "dropout_prob": 0.3})
    model, params = apply_pet(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL), s)
    assert model.transformer.prefix_dropout.p == 0.3
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["transformer.prefix_encoder.embedding.weight"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on machines without CUDA")
def test_qlora_without_cuda_is_a_clear_error():
    with pytest.raises(RuntimeError, match="QLoRA needs"):
        apply_qlora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL))


@pytest.mark.cuda
def test_qlora_trains_and_stays_close(tmp_path):
    base = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    model = apply_qlora(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), r=4, lora_alpha=8,
                        lora_dropout=0.0)
    import bitsandbytes as bnb
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    b = {k: v.cuda() for k, v in batch().items()}
    g = np.load(TINY_MODEL / "golden.npz")
    labels = torch.from_numpy(g["batch_labels"]).cuda()
    with torch.no_grad():
        ref = base(**batch()).logits
        out = model(**b).logits.float().cpu()
    mask = batch()["attention_mask"].bool()
    assert (out - ref).abs()[mask].max() < 0.5  # 4-bit weights: close, not equal
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        loss = model(**b, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    save_lora(model, tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
