"""Eval with a trained LoRA adapter: MindSpore's runner and torch_glm + peft give the same greedy answers.

The adapter is trained by ``python -m mindspore_glm.run`` (configs/tiny/run_tiny_lora.yaml, four steps
with no warm-up, enough to move the answers), evaluated by the same runner
(configs/tiny/run_tiny_lora_eval.yaml, ``--load_checkpoint`` the LoRA checkpoint over the base), and
converted by ``convert/adapters.py ms-to-peft`` for peft (the independent LoRA implementation) on
torch_glm's model, evaluated by ``torch_glm.evaluate.evaluate`` on the same YAML. The same eval without
the adapter checkpoint is refused (the LoRA would be its initial value, i.e. the base model).
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from tests.conftest import ADGEN_DIR, ROOT, TINY_MODEL, TOKENIZER_MODEL

pytestmark = pytest.mark.slow

N_SAMPLES = 4


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), GLOG_v="3")


def _yaml(name, tmp_path, **top):
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / name, encoding="utf-8"))
    cfg["load_checkpoint"] = str(TINY_MODEL)
    cfg["context"]["mode"] = 1                  # PYNATIVE: no graph compile for a few steps on CPU
    for part in ("train_dataset", "eval_dataset"):
        cfg[part]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
        cfg[part]["data_loader"]["dataset_dir"] = str(ADGEN_DIR / ("train.json" if part == "train_dataset" else "dev.json"))
    cfg["processor"]["tokenizer"]["vocab_file"] = str(TOKENIZER_MODEL)
    cfg.update(top)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return path, cfg


def _ms_run(*args):
    return subprocess.run([sys.executable, "-m", "mindspore_glm.run", *args, "--no_progress"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)


def test_ms_lora_eval_equals_torch_peft_eval_and_missing_adapter_is_refused(tmp_path):
    from peft import PeftModel
    from glm_common.run_config import load_run_config, settings_from_config
    from glm_common.tokenizer import ChatGLM2Tokenizer
    from torch_glm.evaluate import evaluate
    from torch_glm.model import ChatGLM2ForConditionalGeneration

    # 1. a LoRA adapter trained by the MindSpore runner
    train_yaml, cfg = _yaml("run_tiny_lora.yaml", tmp_path, output_dir=str(tmp_path / "train"))
    cfg["lr_schedule"].update(warmup_steps=0, learning_rate=3e-3)
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    train_yaml.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    r = _ms_run("--config", str(train_yaml), "--run_mode", "finetune", "--train_steps", "4")
    assert r.returncode == 0, r.stderr[-3000:]
    ckdir = tmp_path / "train" / "checkpoint" / "rank_0"
    lora = ckdir / sorted(os.listdir(ckdir))[-1]

    # 2. refused: the eval YAML's pet_config names LoRA, its load_checkpoint (the HF base) holds none
    eval_yaml, ecfg = _yaml("run_tiny_lora_eval.yaml", tmp_path, output_dir=str(tmp_path / "refused"))
    ecfg["eval_dataset"]["num_samples"] = N_SAMPLES
    eval_yaml.write_text(yaml.safe_dump(ecfg, allow_unicode=True))
    r = _ms_run("--config", str(eval_yaml), "--run_mode", "eval")
    assert r.returncode == 2, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "pet_type lora needs its LoRA (lora_a/lora_b) weights" in last, last
    assert str(eval_yaml) in last and "Traceback" not in r.stderr
    assert not (tmp_path / "refused" / "eval_results.json").exists()

    # 3. MindSpore's eval with the adapter
    ecfg["output_dir"] = str(tmp_path / "eval")
    eval_yaml.write_text(yaml.safe_dump(ecfg, allow_unicode=True))
    r = _ms_run("--config", str(eval_yaml), "--run_mode", "eval", "--load_checkpoint", str(lora))
    assert r.returncode == 0, r.stderr[-3000:]
    ms_preds = [json.loads(x)["prediction"] for x in open(tmp_path / "eval" / "eval_predictions.jsonl",
                                                          encoding="utf-8")]
    ms_metrics = json.load(open(tmp_path / "eval" / "eval_results.json"))
    assert len(ms_preds) == N_SAMPLES and ms_metrics["num_samples"] == N_SAMPLES

    # 4. torch_glm + peft on the converted adapter, the same YAML's eval
    adapter = tmp_path / "peft"
    r = subprocess.run([sys.executable, "convert/adapters.py", "ms-to-peft", "--ckpt", str(lora), "--pet-config",
                        str(train_yaml), "--output", str(adapter)], cwd=ROOT, env=_env(), capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    s = settings_from_config(load_run_config(str(eval_yaml)), source=str(eval_yaml))
    s.progress = False
    tokenizer = ChatGLM2Tokenizer.from_pretrained(str(TOKENIZER_MODEL))
    model = PeftModel.from_pretrained(ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL)),
                                      str(adapter)).eval()
    pt_metrics, pt_preds, _ = evaluate(model, s, tokenizer)
    base = ChatGLM2ForConditionalGeneration.from_pretrained(str(TINY_MODEL)).eval()
    base_preds = evaluate(base, s, tokenizer)[1]
    same = sum(a == b for a, b in zip(ms_preds, pt_preds))
    moved = sum(a != b for a, b in zip(pt_preds, base_preds))
    print(f"\nLoRA eval, {N_SAMPLES} samples: MindSpore = torch_glm+peft on {same}; the adapter changed {moved} answers")

    assert pt_preds != base_preds                      # the adapter changes the answers
    assert len(set("".join(pt_preds))) > 10            # and they are not one repeated token
    assert ms_preds == pt_preds
    for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4"):
        assert ms_metrics[k] == pytest.approx(pt_metrics[k], abs=1e-9), k
    assert np.isfinite(list(pt_metrics.values())).all()
