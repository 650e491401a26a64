"""torch_glm resume faults: a damaged latest checkpoint falls back to the previous complete one, a pickle in
a checkpoint directory is never loaded, a cut last loss-log line is repaired, and two ranks that see
different latest checkpoints agree on one step (a real 2-process gloo run)."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import ROOT
from tests.torch_glm.test_train import run, run_config

SAVE_EVERY_STEP = [{"type": "CheckpointMonitor", "prefix": "tiny", "save_checkpoint_steps": 1,
                    "keep_checkpoint_max": 10}]


def _lora_cfg(tmp_path):
    """LoRA with dropout (the RNG state matters), 16 rows, batch 4: 4 steps, a checkpoint after each."""
    return run_config(tmp_path, "lora", 5e-3, rows=16, epochs=1, callbacks=SAVE_EVERY_STEP)


def _logged(out):
    return [json.loads(r) for r in open(out / "loss_log.jsonl", encoding="utf-8")]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
    """One uninterrupted run: its losses and its output directory (copied by each test)."""
    tmp = tmp_path_factory.mktemp("whole")
    cfg = _lora_cfg(tmp)
    losses = run(cfg)["losses"]
    assert len(losses) == 4
    return losses, tmp / "out"


def _copy(four_steps, tmp_path):
    losses, src = four_steps
    cfg = _lora_cfg(tmp_path)
    shutil.copytree(src, tmp_path / "out")
    cfg["resume_training"] = True
    return losses, cfg, tmp_path / "out"


@pytest.mark.parametrize("damage", ["zero-length", "truncated"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(four_steps, tmp_path, capsys, damage):
    whole, cfg, out = _copy(four_steps, tmp_path)
    latest = out / "checkpoint" / "tiny_step_4"
    if damage == "zero-length":
        (latest / "trainable.safetensors").write_bytes(b"")
    else:
        state = latest / "trainer_state.safetensors"
        if not state.exists():   # (the pickled layout of earlier versions)
            state = latest / "trainer_state.pt"
        data = state.read_bytes()
        state.write_bytes(data[:len(data) // 2])
    capsys.readouterr()
    resumed = run(cfg)["losses"]
    err = capsys.readouterr().err
    what = ("trainable.safetensors: empty file (0 bytes)" if damage == "zero-length"
            else "trainer_state.safetensors: Error while deserializing header")
    assert f"skipping checkpoint {latest}: {what}" in err, err
    assert f"resuming from {out / 'checkpoint' / 'tiny_step_3'} at step 3" in err
    assert resumed == whole[3:]   # the same trajectory from the previous complete checkpoint
    assert [r["loss"] for r in _logged(out)] == [round(x, 6) for x in whole]


class _Planted:
    """A pickle that, when unpickled, writes a marker file (what an attacker's would do instead)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('executed')",)


def test_a_pickle_in_a_checkpoint_is_never_loaded(four_steps, tmp_path, capsys):
    whole, cfg, out = _copy(four_steps, tmp_path)
    marker = tmp_path / "pwned"
    latest = out / "checkpoint" / "tiny_step_4"
    (latest / "trainer_state.json").unlink(missing_ok=True)   # a directory in the old pickled layout ...
    for step in (3, 4):                              # ... and a pickle planted beside a complete one
        torch.save(_Planted(marker), out / "checkpoint" / f"tiny_step_{step}" / "trainer_state.pt")
    capsys.readouterr()
    resumed = run(cfg)["losses"]
    err = capsys.readouterr().err
    assert not marker.exists(), "a pickle in the checkpoint directory was executed"
    assert f"skipping checkpoint {latest}: no trainer_state.json; its trainer_state.pt is a pickle" in err, err
    assert resumed == whole[3:]


def test_cut_last_line_of_the_loss_log_is_dropped_on_resume(four_steps, tmp_path, capsys):
    whole, cfg, out = _copy(four_steps, tmp_path)
    shutil.rmtree(out / "checkpoint" / "tiny_step_4")
    log = out / "loss_log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][:17], encoding="utf-8")   # killed while writing row 4
    capsys.readouterr()
    resumed = run(cfg)["losses"]
    err = capsys.readouterr().err
    assert f"{log}: line 4 is cut short (the run stopped while writing it); dropped it" in err, err
    assert resumed == whole[3:]
    assert [r["step"] for r in _logged(out)] == [1, 2, 3, 4]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(config, out_dirs, extra, timeout=300):
    """Start rank 0 and rank 1 of a gloo run by hand (as torchrun would), each with its own output_dir."""
    port = _free_port()
    procs = []
    for rank, out in enumerate(out_dirs):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "torch_glm.train", "--config", str(config),
                                       "--no_progress", "--device", "cpu", "--output_dir", str(out), *extra],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            results.append((p.returncode, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    return results


@pytest.mark.slow
def test_two_ranks_with_different_latest_checkpoints_resume_at_one_step(tmp_path):
    """Rank 0 holds steps 1..4; rank 1 (its own disk) holds 1..3 and the staging folder of step 4 it was
    writing when killed. Both resume at step 3, say so in one line, and finish with one loss log."""
    cfg = run_config(tmp_path, "full", 1e-3, rows=16, epochs=2, callbacks=SAVE_EVERY_STEP)
    cfg["runner_config"]["batch_size"] = 2
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    a, b = tmp_path / "node_a", tmp_path / "node_b"
    for rc, err in _two_ranks(config, [a, a], ["--max_steps", "4"]):
        assert rc == 0, err[-3000:]
    first = _logged(a)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoint" / "tiny_step_4")
    shutil.copytree(a / "checkpoint" / "tiny_step_4", b / "checkpoint" / "tiny_step_4.tmp")
    data = (b / "checkpoint" / "tiny_step_4.tmp" / "trainable.safetensors").read_bytes()
    (b / "checkpoint" / "tiny_step_4.tmp" / "trainable.safetensors").write_bytes(data[:len(data) // 3])

    (rc0, err0), (rc1, err1) = _two_ranks(config, [a, b], ["--max_steps", "6", "--resume"])
    assert rc0 == 0 and rc1 == 0, err0[-3000:] + err1[-3000:]
    line = ("resuming all 2 ranks at step 3 (the newest step every rank holds complete); "
            "newer steps skipped: rank 1 has no complete step 4")
    assert line in err0, err0[-3000:]
    rows = _logged(a)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    # step 4 retrained from step 3 on both ranks: the same mean loss as the first time
    assert rows[3]["loss"] == pytest.approx(first[3]["loss"], abs=1e-5)
    record = json.loads((a / "checkpoint" / "tiny_step_6" / "trainer_state.json").read_text())
    assert (record["world_size"], record["rank_id"], record["step"]) == (2, 0, 6)
