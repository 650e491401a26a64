"""torch_glm.train on the ADGEN sample with the tiny model: full, LoRA and P-tuning v2 reduce the loss;
checkpoints resume to the same trajectory; the run YAML is mindformers-shaped."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL
from torch_glm import ChatGLM2ForConditionalGeneration
from glm_common.run_config import RunConfigError, settings_from_config
from glm_common.schedules import lr_at
from torch_glm.run import main
from torch_glm.train import train


def run_config(tmp_path, pet="full", lr=1e-3, rows=16, epochs=8, **over):
    """A mindformers-shaped run mapping for the tiny model on the first ``rows`` ADGEN rows."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    data = tmp_path / "train.json"
    with open(ADGEN_DIR / "train.json", encoding="utf-8") as f:
        data.write_text("".join(f.readlines()[:rows]), encoding="utf-8")
    mc = json.loads((TINY_MODEL / "config.json").read_text())
    for k in ("architectures", "model_type", "torch_dtype", "tie_word_embeddings", "use_cache"):
        mc.pop(k)
    mc.update(type="ChatGLM2Config", compute_dtype="float32", param_init_type="float32")
    if pet == "lora":
        mc["pet_config"] = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 32, "lora_dropout": 0.1,
                            "target_modules": ".*query_key_value*"}
    elif pet == "ptuning2":
        mc["pet_config"] = {"pet_type": "ptuning2", "pre_seq_len": 8, "prefix_projection": False}
    cfg = {
        "seed": 0, "output_dir": str(tmp_path / "out"), "load_checkpoint": str(TINY_MODEL), "resume_training": False,
        "runner_config": {"epochs": epochs, "batch_size": 4, "gradient_accumulation_steps": 1},
        "runner_wrapper": {"type": "MFTrainOneStepCell", "use_clip_grad": True, "max_grad_norm": 1.0},
        "train_dataset": {"data_loader": {"type": "ADGenDataLoader", "dataset_dir": str(data), "shuffle": True},
                          "tokenizer": {"type": "ChatGLM2Tokenizer", "vocab_file": str(TOKENIZER_MODEL)},
                          "max_source_length": 32, "max_target_length": 32, "batch_size": 4},
        "optimizer": {"type": "FP32StateAdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1.0e-8,
                      "weight_decay": 0.1},
        "lr_schedule": {"type": "cosine", "learning_rate": lr, "lr_end": 0.0, "warmup_steps": 2, "total_steps": -1},
        "callbacks": [{"type": "MFLossMonitor", "per_print_times": 1}],
        "model": {"model_config": mc, "arch": {"type": "ChatGLM2ForConditionalGeneration"}},
    }
    for key, value in over.items():
        cfg[key] = value
    return cfg


def run(cfg):
    s = settings_from_config(cfg)
    s.progress = False
    return train(s, device="cpu")


def mean(x):
    return sum(x) / len(x)


@pytest.mark.parametrize("pet,lr,drop", [("full", 1e-3, 1.0), ("lora", 5e-3, 0.4), ("ptuning2", 0.3, 0.4)])
def test_fine_tuning_reduces_the_loss(tmp_path, pet, lr, drop):
    out = run(run_config(tmp_path, pet, lr))
    losses = out["losses"]
    assert out["steps"] == len(losses) == 32  # 16 rows / batch 4 x 8 epochs
    assert mean(losses[-4:]) < mean(losses[:4]) - drop, (mean(losses[:4]), mean(losses[-4:]))
    rows = [json.loads(r) for r in open(out["log"], encoding="utf-8")]
    assert [r["step"] for r in rows] == list(range(1, 33)) and rows[-1]["loss"] == pytest.approx(losses[-1], abs=1e-6)
    png = tmp_path / "out" / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the result loads with the ordinary tools
    model = out["model"]
    if pet == "full":
        again = ChatGLM2ForConditionalGeneration.from_pretrained(out["result"])
        assert torch.equal(again.transformer.output_layer.weight, model.transformer.output_layer.weight)
    elif pet == "lora":
        from peft import PeftModel
        assert sorted(os.listdir(out["result"]))[:2] == ["README.md", "adapter_config.json"]
        loaded = PeftModel.from_pretrained(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL), out["result"])
        ids = torch.tensor([[3001, 3003, 10, 11, 12]])
        model.eval()
        with torch.no_grad():
            assert torch.allclose(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
    else:
        from glm_common.config import ChatGLM2Config
        from torch_glm.prefix import load_prefix
        cfg = ChatGLM2Config.from_hf(out["result"])
        assert cfg.pre_seq_len == 8
        fresh = load_prefix(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL, config=cfg), out["result"])
        assert torch.equal(fresh.transformer.prefix_encoder.embedding.weight,
                           model.transformer.prefix_encoder.embedding.weight)
        base = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
        assert torch.equal(fresh.transformer.output_layer.weight, base.transformer.output_layer.weight)  # frozen


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_resume_continues_the_same_trajectory(tmp_path, dtype):
    """LoRA with dropout (RNG state matters), gradient accumulation 2: 8 steps, then resume from step 3.
    float16 weights: the optimizer's float32 master copies are part of the checkpoint (restarted from the
    float16 weights, the resumed losses would differ)."""
    cfg = run_config(tmp_path / "a", "lora", 5e-3, rows=32, epochs=1,
                     callbacks=[{"type": "CheckpointMonitor", "prefix": "tiny", "save_checkpoint_steps": 3,
                                 "keep_checkpoint_max": 2}])
    cfg["model"]["model_config"]["param_init_type"] = dtype
    cfg["runner_config"]["gradient_accumulation_steps"] = 2
    cfg["runner_config"]["batch_size"] = 2
    whole = run(cfg)["losses"]
    assert len(whole) == 8
    out = tmp_path / "a" / "out"
    ckpts = sorted(os.listdir(out / "checkpoint"))
    assert ckpts == ["tiny_step_3", "tiny_step_6"]
    shutil.rmtree(out / "checkpoint" / "tiny_step_6")  # as if the run had died between steps 3 and 6
    cfg["resume_training"] = True
    resumed = run(cfg)["losses"]
    assert resumed == whole[3:]
    logged = [json.loads(r)["loss"] for r in open(out / "loss_log.jsonl", encoding="utf-8")]
    assert logged == [round(x, 6) for x in whole]


def test_lr_schedules():
    s = settings_from_config(run_config_dummy())
    s.learning_rate, s.lr_end, s.warmup_steps = 1.0, 0.1, 2
    s.schedule = "linear"
    assert [round(lr_at(k, s, 12), 6) for k in (0, 1, 2, 7, 12)] == [0.0, 0.5, 1.0, 0.55, 0.1]
    s.schedule = "cosine"
    assert round(lr_at(7, s, 12), 6) == round(0.1 + 0.45 * (1 + np.cos(np.pi * 0.5)), 6)
    s.schedule, s.power = "polynomial", 2.0
    assert round(lr_at(7, s, 12), 6) == round(0.1 + 0.9 * 0.25, 6)
    s.warmup_steps, s.warmup_ratio = 0, 0.25
    assert lr_at(1, s, 12) == pytest.approx(1 / 3)


def run_config_dummy():
    return {"model": {"model_config": {"type": "ChatGLM2Config", "num_layers": 1, "hidden_size": 8,
                                       "ffn_hidden_size": 8, "num_attention_heads": 2, "kv_channels": 4,
                                       "padded_vocab_size": 16}}}


def test_config_errors(tmp_path):
    bad = run_config_dummy()
    bad["lr_schedule"] = {"type": "warp"}
    with pytest.raises(RunConfigError, match="lr_schedule.type"):
        settings_from_config(bad, source="run.yaml")
    bad = run_config_dummy()
    bad["model"]["model_config"]["pet_config"] = {"pet_type": "ptuning2"}
    with pytest.raises(ValueError, match="pre_seq_len: missing"):
        settings_from_config(bad)
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  model_config: [\n")
    assert main(["--config", str(path)]) == 2


def test_command_line(tmp_path):
    cfg = run_config(tmp_path, "full", 1e-3, rows=8, epochs=1)
    cfg["do_eval"] = True
    cfg["eval_dataset"] = {"data_loader": {"dataset_dir": str(ADGEN_DIR / "dev.json")}, "num_samples": 4,
                           "max_source_length": 32, "max_target_length": 8, "batch_size": 4}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch_glm.train", "--config", str(path), "--no_progress",
                           "--output_dir", str(tmp_path / "cli")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["result"].endswith("model")
    rows = [json.loads(r) for r in open(tmp_path / "cli" / "loss_log.jsonl", encoding="utf-8")]
    ev = rows[-1]
    assert set(ev) == {"step", "eval_loss", "rouge-1", "rouge-2", "rouge-l", "bleu-4"} and ev["eval_loss"] > 0


def test_consecutive_overflows_stop_the_run(tmp_path):
    """Non-finite losses (from a finite weight whose logits overflow: a NaN on disk is refused at load) skip
    the update and count as overflows; runner_wrapper.max_consecutive_overflows of them in a row stop the
    run: one line, exit status 1."""
    bad = tmp_path / "bad_model"
    shutil.copytree(TINY_MODEL, bad)
    model = ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL))
    with torch.no_grad():
        model.transformer.output_layer.weight[:, 0] = 3e38             # finite on disk, inf in every logit
    model.save_pretrained(str(bad))
    cfg = run_config(tmp_path, "lora", 5e-3, rows=16, epochs=2, load_checkpoint=str(bad))
    cfg["runner_wrapper"]["max_consecutive_overflows"] = 3
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch_glm.train", "--config", str(path), "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: step 3: 3 consecutive updates overflowed; stopping (the loss scale is stuck or the weights are "
        "not finite; runner_wrapper.max_consecutive_overflows: 3)")
    rows = [json.loads(r) for r in open(tmp_path / "out" / "loss_log.jsonl", encoding="utf-8")]
    assert [(r["loss"], r["overflow"]) for r in rows] == [(None, True)] * 3


@pytest.mark.slow
def test_torchrun_ddp_two_processes_gloo(tmp_path):
    """2 CPU processes (gloo): each trains on its shard; rank 0 logs the mean loss and writes the result."""
    cfg = run_config(tmp_path, "full", 1e-3, rows=16, epochs=4)
    cfg["runner_config"]["batch_size"] = 2
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", "29517", "-m", "torch_glm.train", "--config", str(path), "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(r) for r in open(tmp_path / "out" / "loss_log.jsonl", encoding="utf-8")]
    assert len(rows) == 16  # 16 rows / (2 ranks x batch 2) x 4 epochs
    assert rows[-1]["tokens"] == 16 * 2 * 2 * 65  # both ranks' tokens (batch 2, length 32 + 32 + 1)
    assert mean([r["loss"] for r in rows[-4:]]) < mean([r["loss"] for r in rows[:4]]) - 0.5
    model = ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path / "out" / "model")
    assert torch.isfinite(model.transformer.output_layer.weight).all()


def test_bad_rows_refusal_names_only_flags_the_runner_has(tmp_path, capsys):
    import re
    from tests.mindspore_glm.test_run import _bad_rows_file, _flags
    bad = _bad_rows_file(tmp_path)
    cfg = run_config(tmp_path, "full", 1e-3, rows=8, epochs=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert main(["--config", str(path), "--train_dataset", str(bad), "--no_progress", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"{bad}:2:" in err and "glm_common.data check" in err
    assert set(re.findall(r"(?<![\w-])--[a-z_-]+", err)) <= _flags(main), err


def test_resume_on_an_empty_output_dir_says_so(tmp_path, capsys):
    cfg = run_config(tmp_path, "full", 1e-3, rows=4, epochs=1)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    assert main(["--config", str(path), "--resume", "--no_progress", "--device", "cpu", "--max_steps", "1"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "resume_training" in x]
    assert lines == [f"resume_training: no checkpoint in {tmp_path / 'out' / 'checkpoint'}; starting from step 0"], err
