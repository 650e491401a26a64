"""python -m glm_common.data check|stats|features."""
import json
import subprocess
import sys

import numpy as np

from glm_common.data import build_train_features, load_features, load_samples
from glm_common.data.__main__ import main
from tests.conftest import ADGEN_DIR, ROOT, TOKENIZER_MODEL


def test_check_reports_bad_rows_and_exits_1(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"prompt": "你好", "response": "你好！"}\n{"prompt": "hi"}\nnot json\n'
                   '{"prompt": "x", "response": ""}\n', encoding="utf-8")
    r = subprocess.run([sys.executable, "-m", "glm_common.data", "check", str(bad)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert lines[:3] == [f"{bad}:2: missing field 'response'",
                         f"{bad}:3: invalid JSON: Expecting value (column 1)",
                         f"{bad}:4: field 'response' is empty"]
    assert lines[3] == f"{bad}: format chat, 1 good rows, 3 bad rows, 1 rounds"


def test_check_good_file(capsys):
    assert main(["check", str(ADGEN_DIR / "dev.json")]) == 0
    assert "format adgen, 100 good rows, 0 bad rows" in capsys.readouterr().out


def test_features_writes_what_training_uses(tmp_path, tokenizer, capsys):
    out = tmp_path / "out" / "train.npz"
    args = ["features", str(ADGEN_DIR / "dev.json"), "--tokenizer", str(TOKENIZER_MODEL), "--mode", "rounds",
            "--max-source-length", "48", "--max-target-length", "96", "--out", str(out)]
    assert main(args) == 0
    assert "100 rows x 145 tokens (mode rounds)" in capsys.readouterr().out
    got = load_features(str(out))
    ref = build_train_features(load_samples(ADGEN_DIR / "dev.json"), tokenizer, "rounds", 48, 96)
    for k in ("input_ids", "labels", "lengths"):
        np.testing.assert_array_equal(got[k], ref[k])
    assert not list(tmp_path.glob("out/*.tmp*"))


def test_training_side_refuses_bad_rows_unless_skipped(tmp_path, capsys):
    bad = tmp_path / "train.json"
    bad.write_text('{"content": "类型#裙", "summary": "好看的裙子。"}\n{"content": "类型#裤", "summary": 5}\n',
                   encoding="utf-8")
    out = tmp_path / "f.npz"
    base = ["features", str(bad), "--tokenizer", str(TOKENIZER_MODEL), "--out", str(out)]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: field 'summary' must be a string, got int" in err and not out.exists()
    assert "pass --skip-bad-rows to drop them" in err           # a flag this command has
    assert main(base + ["--skip-bad-rows"]) == 0
    assert f"{bad}: skipped 1 bad rows" in capsys.readouterr().err
    assert load_features(str(out))["input_ids"].shape == (1, 193)


def test_stats(capsys):
    assert main(["stats", str(ADGEN_DIR / "train.json"), "--tokenizer", str(TOKENIZER_MODEL)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("rows: 500\n") and "prompt_tokens: p50=" in out and "rows cut" in out
