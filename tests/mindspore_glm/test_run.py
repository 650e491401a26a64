"""mindspore_glm.run and scripts/run_standalone.sh with configs/tiny: LoRA fine-tune, then eval (metric
table) and predict (responses) with the LoRA checkpoint it wrote; bad flags and keys stop with one line."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from glm_common.metrics import compute_metrics
from mindspore_glm.run import main
from tests.conftest import ADGEN_DIR, ROOT


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    """3 LoRA steps through scripts/run_standalone.sh (a fresh process, as a user runs it)."""
    tmp = tmp_path_factory.mktemp("run")
    proc = subprocess.run(["bash", "scripts/run_standalone.sh", "configs/tiny/run_tiny_lora.yaml", "0", "finetune",
                           "--train_steps", "3", "--output_dir", str(tmp / "out"), "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp / "log")})
    assert proc.returncode == 0, proc.stdout[-3000:]
    return tmp, proc.stdout


def test_finetune_through_run_standalone(lora_run):
    tmp, stdout = lora_run
    summary = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
    assert summary["steps"] == 3 and summary["result"].endswith("checkpoint/rank_0/tiny-glm2-lora-1_3.ckpt")
    assert "keys that mean nothing here, ignored: model.model_config.use_past" in stdout   # warned once
    assert stdout.count("keys that mean nothing here") == 1
    assert "trained 3 steps in" in stdout
    logs = os.listdir(tmp / "log")
    assert len(logs) == 1 and logs[0].startswith("finetune_device0_")
    rows = [json.loads(r) for r in open(tmp / "out" / "loss_log.jsonl", encoding="utf-8")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["tokens_per_s"] > 0 for r in rows)


def eval_config(tmp):
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "run_tiny_lora_eval.yaml", encoding="utf-8"))
    for part in ("train_dataset", "eval_dataset"):
        cfg[part]["tokenizer"]["vocab_file"] = str(ROOT / cfg[part]["tokenizer"]["vocab_file"])
        cfg[part]["data_loader"]["dataset_dir"] = str(ROOT / cfg[part]["data_loader"]["dataset_dir"])
    cfg["processor"]["tokenizer"]["vocab_file"] = cfg["train_dataset"]["tokenizer"]["vocab_file"]
    cfg["load_checkpoint"] = str(ROOT / cfg["load_checkpoint"])
    cfg["eval_dataset"].update(num_samples=4, batch_size=4, max_target_length=12)
    cfg["model"]["model_config"]["max_decode_length"] = 64 + 12     # the total: prompt (<= 64) + 12
    path = tmp / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def test_eval_and_predict_with_the_lora_checkpoint(lora_run, capsys):
    tmp, _ = lora_run
    ckpt = str(tmp / "out" / "checkpoint" / "rank_0" / "tiny-glm2-lora-1_3.ckpt")
    config = eval_config(tmp)
    out = str(tmp / "eval")
    assert main(["--config", config, "--run_mode", "eval", "--load_checkpoint", ckpt, "--output_dir", out,
                 "--no_progress"]) == 0
    printed = capsys.readouterr().out
    assert "| rouge-1 | rouge-2 | rouge-l | bleu-4 |" in printed
    results = json.load(open(os.path.join(out, "eval_results.json"), encoding="utf-8"))
    preds = [json.loads(r) for r in open(os.path.join(out, "eval_predictions.jsonl"), encoding="utf-8")]
    refs = [json.loads(line)["summary"] for line in open(ADGEN_DIR / "dev.json", encoding="utf-8")][:4]
    assert [p["reference"] for p in preds] == refs and results["num_samples"] == 4
    assert {k: results[k] for k in ("rouge-1", "rouge-2", "rouge-l", "bleu-4")} == \
        compute_metrics([p["prediction"] for p in preds], refs)
    assert all(p["prediction"] for p in preds)
    # predict: texts given on the command line
    queries = ["类型#裙*颜色#红色", "类型#上衣*材质#棉"]
    assert main(["--config", config, "--run_mode", "predict", "--load_checkpoint", ckpt, "--output_dir", out,
                 "--predict_data", *queries]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(r) for r in open(os.path.join(out, "predict_results.jsonl"), encoding="utf-8")]
    assert [r["query"] for r in rows] == queries and all(r["response"] for r in rows)
    assert all(f"{r['query']}\n-> {r['response']}" in printed for r in rows)


def test_bad_input_stops_with_one_line(tmp_path, capsys):
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml", encoding="utf-8"))
    cfg["optimizer"]["beta1"] = "high"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    assert main(["--config", str(path), "--run_mode", "finetune"]) == 2
    assert f"error: {path}: optimizer.beta1: expected a number, got 'high'" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.yaml")]) == 2
    assert "none.yaml: no such file" in capsys.readouterr().err
    good = str(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml")
    assert main(["--config", good, "--run_mode", "predict", "--load_checkpoint", str(tmp_path / "x.ckpt"),
                 "--output_dir", str(tmp_path / "o")]) == 2
    assert "load_checkpoint" in capsys.readouterr().err


def test_busy_output_dir_is_refused_in_one_line(tmp_path, capsys):
    """Two runs on one output_dir: the second is refused naming the first (glm_common.run_lock)."""
    from glm_common.run_lock import OutputLock
    out = tmp_path / "out"
    good = str(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml")
    with OutputLock(out) as held:  # stands for a run in progress (this process: pid and host in the file)
        assert main(["--config", good, "--run_mode", "finetune", "--train_steps", "1", "--no_progress",
                     "--output_dir", str(out)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and f"pid {os.getpid()} on host" in err[-1] and held.held
        assert os.listdir(out) == [".glm2_run.lock"]    # no loss log, no checkpoint


def _bad_rows_file(tmp_path):
    bad = tmp_path / "bad_rows.json"
    bad.write_text('{"content": "类型#裙", "summary": "好看的裙子。"}\n{"content": "类型#裤", "summary": 5}\n',
                   encoding="utf-8")
    return bad


def _flags(parser_main):
    """The option strings the runner's parser accepts."""
    import argparse
    seen = {}
    real = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        seen.update({o: 1 for act in self._actions for o in act.option_strings})
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = grab
    try:
        with pytest.raises(SystemExit):
            parser_main(["--config", "x"])
    finally:
        argparse.ArgumentParser.parse_args = real
    return set(seen)


def test_bad_rows_refusal_names_only_flags_the_runner_has(tmp_path, capsys):
    import re
    bad = _bad_rows_file(tmp_path)
    good = str(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml")
    assert main(["--config", good, "--run_mode", "finetune", "--train_steps", "1", "--no_progress",
                 "--train_dataset_dir", str(bad), "--output_dir", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and f"{bad}:2:" in err and "glm_common.data check" in err
    assert set(re.findall(r"(?<![\w-])--[a-z_-]+", err)) <= _flags(main), err


def test_predict_data_naming_a_missing_file_is_an_error(tmp_path, capsys):
    good = str(ROOT / "configs" / "tiny" / "run_tiny_lora_eval.yaml")
    missing = tmp_path / "prompts.json"
    assert main(["--config", good, "--run_mode", "predict", "--predict_data", str(missing),
                 "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --predict_data: {missing}: no such file (texts to answer are given as they are; "
                       f"a data file must exist)")
    assert not (tmp_path / "o" / "predict_results.jsonl").exists()
    from mindspore_glm.run import _predict_inputs
    assert _predict_inputs(["类型#裙*颜色#红色"]) == ["类型#裙*颜色#红色"]      # a text stays a text
    assert _predict_inputs(["what is in notes.txt"]) == ["what is in notes.txt"]


def test_lora_dropout_with_a_fixed_seed_repeats_the_losses(lora_run):
    """The YAML's seed fixes MindSpore's dropout masks too (nn.Dropout takes its kernel seeds from the global
    seed when built): a second process on the same YAML gives the same losses, bit for bit, as torch does."""
    tmp, _ = lora_run
    out = tmp / "again"
    proc = subprocess.run(["bash", "scripts/run_standalone.sh", "configs/tiny/run_tiny_lora.yaml", "0", "finetune",
                           "--train_steps", "3", "--output_dir", str(out), "--no_progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "LOG_DIR": str(tmp / "log_again")})
    assert proc.returncode == 0, proc.stdout[-3000:]
    cfg = yaml.safe_load(open(ROOT / "configs" / "tiny" / "run_tiny_lora.yaml", encoding="utf-8"))
    assert cfg["model"]["model_config"]["pet_config"]["lora_dropout"] > 0
    first = [json.loads(r)["loss"] for r in open(tmp / "out" / "loss_log.jsonl", encoding="utf-8")]
    second = [json.loads(r)["loss"] for r in open(out / "loss_log.jsonl", encoding="utf-8")]
    assert len(first) == 3 and all(np.isfinite(first))
    assert second == first
