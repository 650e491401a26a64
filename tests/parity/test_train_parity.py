"""Training parity: torch_glm.train and mindspore_glm.train, the same tiny weights, the same LoRA A/B, the
same batches and the same AdamWeightDecay settings, give the same 20 float32 losses (1e-4 relative), with
and without gradient accumulation."""
import warnings

import numpy as np
import pytest
import torch

from glm_common.run_config import RunConfigWarning, settings_from_config
from tests.conftest import ADGEN_DIR, TINY_MODEL, TOKENIZER_MODEL


def run_config(tmp_path, optimizer="FusedAdamWeightDecay", weight_decay=0.1, accum=1):
    data = tmp_path / "train.json"
    with open(ADGEN_DIR / "train.json", encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:40]), encoding="utf-8")
    import json
    mc = json.loads((TINY_MODEL / "config.json").read_text())
    for k in ("architectures", "model_type", "torch_dtype", "tie_word_embeddings", "use_cache"):
        mc.pop(k)
    mc.update(type="ChatGLM2Config", compute_dtype="float32", param_init_type="float32",
              pet_config={"pet_type": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.0,
                          "target_modules": ".*query_key_value"})
    return {
        "seed": 3, "output_dir": str(tmp_path / "out"), "load_checkpoint": str(TINY_MODEL),
        "runner_config": {"epochs": 2, "batch_size": 4 // accum, "gradient_accumulation_steps": accum},
        "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0,
                           "scale_sense": {"type": "DynamicLossScaleUpdateCell", "loss_scale_value": 1024,
                                           "scale_factor": 2, "scale_window": 1000}},
        "train_dataset": {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": str(data), "shuffle": True},
                          "tokenizer": {"vocab_file": str(TOKENIZER_MODEL)},
                          "max_source_length": 32, "max_target_length": 32},
        "optimizer": {"type": optimizer, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": weight_decay},
        "lr_schedule": {"type": "cosine", "learning_rate": 5e-3, "lr_end": 1e-5, "warmup_steps": 3,
                        "total_steps": -1},
        "model": {"model_config": mc},
    }


def settings(cfg, out):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunConfigWarning)
        s = settings_from_config(cfg)
    s.progress, s.output_dir = False, str(out)
    return s


@pytest.mark.parametrize("optimizer,weight_decay,accum,do_eval", [
    ("FusedAdamWeightDecay", 0.1, 1, False), ("AdamW", 0.0, 1, False), ("FusedAdamWeightDecay", 0.1, 2, True)],
    ids=["adamweightdecay", "adamw", "accumulate-2-with-eval"])
def test_twenty_lora_steps_match(tmp_path, optimizer, weight_decay, accum, do_eval):
    from mindspore_glm import train as ms_train
    from torch_glm import train as pt_train
    cfg = run_config(tmp_path, optimizer, weight_decay, accum)
    if do_eval:   # eval loss and rouge/bleu rows in the loss log every 10 updates
        cfg.update(do_eval=True, eval_step_interval=10)
        cfg["eval_dataset"] = {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": str(ADGEN_DIR / "dev.json")},
                               "tokenizer": {"vocab_file": str(TOKENIZER_MODEL)}, "num_samples": 4,
                               "batch_size": 2, "max_source_length": 32, "max_target_length": 8}
    s_ms, s_pt = settings(cfg, tmp_path / "ms"), settings(cfg, tmp_path / "pt")
    ms_model, ms_params = ms_train.build_model(s_ms)
    pt_model, _ = pt_train.build_model(s_pt, "cpu")
    # the same LoRA initial values in both: MindSpore's A (and zero B) copied into peft's lora_A / lora_B
    pt_params = dict(pt_model.named_parameters())
    copied = 0
    for p in ms_params:
        layer = p.name.rsplit(".", 1)[0]
        which = "lora_A" if p.name.endswith("lora_a") else "lora_B"
        target = pt_params[f"base_model.model.{layer}.{which}.default.weight"]
        with torch.no_grad():
            target.copy_(torch.from_numpy(p.asnumpy()))
        copied += 1
    assert copied == 2 * 2 and sum(p.requires_grad for p in pt_model.parameters()) == copied
    ms_out = ms_train.train(s_ms, ms_model, ms_params)
    pt_out = pt_train.train(s_pt, device="cpu", model=pt_model)
    a, b = np.array(ms_out["losses"]), np.array(pt_out["losses"])
    assert len(a) == len(b) == 20 and ms_out["skipped"] == 0
    rel = np.abs(a - b) / np.abs(b)
    assert rel.max() < 1e-4, rel.max()
    assert a[-3:].mean() < a[:3].mean() - 0.3        # it trained, not only agreed
    if do_eval:
        import json
        rows = {}
        for backend in ("ms", "pt"):
            log = [json.loads(x) for x in open(tmp_path / backend / "loss_log.jsonl", encoding="utf-8")]
            rows[backend] = {r["step"]: r for r in log if "eval_loss" in r}
        assert sorted(rows["ms"]) == sorted(rows["pt"]) == [10, 20]
        for step, r in rows["ms"].items():
            ref = rows["pt"][step]
            assert abs(r["eval_loss"] - ref["eval_loss"]) <= 1e-4 * ref["eval_loss"], (step, r, ref)
            assert {"rouge-1", "rouge-2", "rouge-l", "bleu-4"} <= set(r) & set(ref)
        assert ms_out["eval"]["eval_loss"] == pytest.approx(rows["ms"][20]["eval_loss"], abs=1e-6)
    # the trained LoRA matrices agree too
    for p in ms_params:
        layer = p.name.rsplit(".", 1)[0]
        which = "lora_A" if p.name.endswith("lora_a") else "lora_B"
        ref = pt_params[f"base_model.model.{layer}.{which}.default.weight"].detach().numpy()
        np.testing.assert_allclose(p.asnumpy(), ref, rtol=2e-3, atol=2e-5)
