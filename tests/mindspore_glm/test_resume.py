"""mindspore_glm resume faults: damaged latest checkpoints fall back to the newest complete one and a cut last
loss-log line is dropped, each said in one line; checkpoints record world size, rank and step; two ranks
whose latest checkpoints differ (rank 1 killed while writing) resume at one step (a real 2-rank CPU run)."""
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from convert.ms_ckpt import MSCheckpoint
from mindspore_glm.train import train
from tests.mindspore_glm.test_train import run_config, settings


def test_damaged_checkpoints_and_cut_log_line_fall_back_with_a_line_each(tmp_path, capsys):
    """4 updates, a checkpoint after each; then the latest is empty, the one before cut in half and the loss
    log's last row cut short: resume starts from step 2 and continues the same trajectory."""
    cfg = run_config(tmp_path, "lora", 5e-3, rows=16, epochs=1, batch=4)
    cfg["model"]["model_config"]["pet_config"]["lora_dropout"] = 0.0
    cfg["callbacks"][1].update(save_checkpoint_steps=1, keep_checkpoint_max=10, prefix="tiny")
    whole = train(settings(cfg))["losses"]
    assert len(whole) == 4
    ckdir = tmp_path / "out" / "checkpoint" / "rank_0"
    ck = MSCheckpoint(str(ckdir / "tiny-1_4.ckpt"))
    assert [int(ck.read(n)[0]) for n in ("world_size", "rank_id", "step_num")] == [1, 0, 4]
    assert ck.names[-2:] == ["world_size", "rank_id"]             # written last: a cut file lacks them

    (ckdir / "tiny-1_4.ckpt").write_bytes(b"")
    data = (ckdir / "tiny-1_3.ckpt").read_bytes()
    (ckdir / "tiny-1_3.ckpt").write_bytes(data[:len(data) // 2])
    log = tmp_path / "out" / "loss_log.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines(keepends=True)
    log.write_text("".join(lines[:3]) + lines[3][:20], encoding="utf-8")

    capsys.readouterr()
    cfg["resume_training"] = True
    resumed = train(settings(cfg))["losses"]
    err = capsys.readouterr().err
    assert f"skipping checkpoint {ckdir / 'tiny-1_4.ckpt'}: empty file (0 bytes)\n" in err, err
    assert f"skipping checkpoint {ckdir / 'tiny-1_3.ckpt'}: truncated checkpoint (" in err, err  # ms_ckpt's line
    assert f"resuming from {ckdir / 'tiny-1_2.ckpt'} at step 2\n" in err
    assert f"{log}: line 4 is cut short (the run stopped while writing it); dropped it" in err
    assert resumed == whole[2:]
    assert [json.loads(r)["loss"] for r in open(log, encoding="utf-8")] == [round(x, 6) for x in whole]
    assert int(MSCheckpoint(str(ckdir / "tiny-1_4.ckpt")).read("step_num")[0]) == 4   # rewritten whole


@pytest.mark.slow
def test_two_ranks_resume_at_the_newest_step_both_hold(tmp_path):
    """Rank 1 was killed while writing its step-4 checkpoint (a cut ``.partial`` left, no step 4), rank 0
    completed step 4: both resume at step 3, say so in one line, and end as one replica set."""
    from tests.scripts.test_run_distribute import _launch, _tiny_dp_config
    out = tmp_path / "dp_out"
    cfg = yaml.safe_load(open(_tiny_dp_config(tmp_path / "dp.yaml", 4, str(out))))
    cfg["callbacks"][1].update(save_checkpoint_steps=1, keep_checkpoint_max=10, prefix="tiny")
    (tmp_path / "dp.yaml").write_text(yaml.safe_dump(cfg, allow_unicode=True))

    def launch(*args):
        r = _launch(["-", str(tmp_path / "dp.yaml"), "[0,2)", "finetune", "--", "--no_progress", *args], tmp_path,
                    env={"GLOG_v": "3"}, timeout=400)
        logs = [(tmp_path / "output" / "log" / f"rank_{i}" / "worker.log").read_text() for i in (0, 1)]
        assert r.returncode == 0, r.stdout + r.stderr + "".join(x[-3000:] for x in logs)
        return logs

    launch("--train_steps", "4")
    first = [json.loads(x) for x in open(out / "loss_log.jsonl")]
    r1 = out / "checkpoint" / "rank_1"
    data = (r1 / "tiny-1_4.ckpt").read_bytes()
    os.remove(r1 / "tiny-1_4.ckpt")
    (r1 / "tiny-1_4.ckpt.partial").write_bytes(data[:len(data) // 2])

    log0, log1 = launch("--train_steps", "6", "--resume_training", "True")
    assert ("resuming all 2 ranks at step 3 (the newest step every rank holds complete); newer steps skipped: "
            "rank 1 has no complete step 4") in log0, log0[-3000:]
    rows = [json.loads(x) for x in open(out / "loss_log.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[3]["loss"] == pytest.approx(first[3]["loss"], abs=1e-6)    # step 4 again, from step 3
    ck0, ck1 = (MSCheckpoint(str(out / "checkpoint" / f"rank_{r}" / "tiny-1_6.ckpt")) for r in (0, 1))
    for n in ck0.names:
        if n == "rank_id":
            assert (int(ck0.read(n)[0]), int(ck1.read(n)[0])) == (0, 1)
        else:
            np.testing.assert_array_equal(ck0.read(n), ck1.read(n), err_msg=n)
    assert int(ck0.read("world_size")[0]) == 2 and int(ck0.read("step_num")[0]) == 6
    shutil.rmtree(tmp_path / "output", ignore_errors=True)
