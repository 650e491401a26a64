"""scripts/device_check.py (``make device-check``) as a user runs it, on a machine without an accelerator:
its arguments, its plan, and its report when the device is missing (a loud failure, every step named,
nothing skipped silently). The steps themselves run on the accelerator."""
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "device_check.py")


def _run(*args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


@pytest.mark.parametrize("args,words", [
    (["--device", "tpu"], "--device: 'tpu'; expected one of cuda, ascend"),
    (["--only", "parity-bf16,nope"], "--only: nope is not a step of --device cuda"),
    (["--device", "ascend", "--only", "serve-bench"], "--only: serve-bench is not a step of --device ascend"),
    (["--layers", "0"], "--layers: expected a positive number"),
])
def test_bad_arguments_are_one_line(tmp_path, args, words):
    r = _run(*args, "--out", str(tmp_path / "r"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    assert r.stderr.startswith("device_check: error: ") and not (tmp_path / "r").exists()


@pytest.mark.parametrize("device,steps", [
    ("cuda", ["torch-cuda", "cuda-tests", "qlora-4bit", "fsdp2-one-gpu", "parity-bf16", "parity-fp16", "serve-bench"]),
    ("ascend", ["ascend-tests", "semi-auto-20"]),
])
def test_dry_run_writes_the_plan(tmp_path, device, steps):
    r = _run("--device", device, "--dry-run", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == steps and report["verdict"] == "planned"
    cmds = {s["name"]: s.get("command", "") for s in report["steps"]}
    if device == "cuda":
        assert "-m cuda" in cmds["cuda-tests"] and "--torch-device cuda --torch-dtype bf16 --ms-dtype fp32" in \
            cmds["parity-bf16"] and "--device cuda" in cmds["serve-bench"]
    else:
        assert "-m ascend" in cmds["ascend-tests"] and "--train_steps 20" in cmds["semi-auto-20"]
    md = (tmp_path / "device_check.md").read_text()
    assert all(f"| {s} | planned |" in md for s in steps)


def test_without_a_gpu_it_fails_loudly_and_reports_every_step(tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: make device-check runs the real steps")
    r = _run("--no-install", "--out", str(tmp_path))
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads((tmp_path / "device_check.json").read_text())
    first, *rest = report["steps"]
    assert first["name"] == "torch-cuda" and first["result"] == "FAILED"
    assert "CPU build" in first["detail"] or "no CUDA GPU" in first["detail"]
    assert len(rest) == 6 and all(s["result"] == "FAILED" and s["detail"] == "not run: torch-cuda failed"
                                  for s in rest)
    assert report["verdict"].startswith("FAILED: torch-cuda, cuda-tests")
    md = (tmp_path / "device_check.md").read_text()
    assert md.startswith("# Device check: cuda") and "| torch-cuda | FAILED |" in md
    assert "device check FAILED" in r.stdout
