"""The fault matrix's judge tells wrong from clean, its cases can fail, and ``scripts/fault_matrix.py``
(``pytest -m faults`` printed as a matrix) prints what it ran and counts it."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.faults import cases as fm

SCRIPT = str(ROOT / "scripts" / "fault_matrix.py")


def test_the_matrix_script_runs_the_named_cases_and_counts_them():
    res = subprocess.run([sys.executable, SCRIPT, "-k", "hccl_tools_bad_range or launch_too_few_arguments"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and len(lines) == 3, res.stdout + res.stderr
    assert lines[0].startswith("refused  hccl_tools_bad_range: ") and "--device_num" in lines[0], lines
    assert lines[1].startswith("refused  launch_too_few_arguments: ") and "RANK_TABLE_FILE" in lines[1], lines
    assert lines[2] == "tried 2 / refused cleanly or handled 2 / wrong 0", lines[2]


def test_the_matrix_holds_the_resume_and_launcher_cases():
    names = {c.__name__[5:] for c in fm.CASES}
    from tests.faults.launch_cases import CASES as LAUNCH
    assert len([n for n in names if n.startswith("launch_")]) == len(LAUNCH) == 12
    assert {"resume_pickle_in_checkpoint", "resume_loss_log_cut_short", "resume_latest_checkpoint_zero_length",
            "resume_latest_checkpoint_truncated", "resume_ranks_latest_steps_disagree",
            "launch_layout_that_does_not_fit"} <= names
    assert len(names) >= 85


def test_the_planted_pickle_would_run_if_loaded(tmp_path):
    """The pickle case can fail: loading its file the unsafe way writes the marker it checks for."""
    import torch
    marker, p = tmp_path / "pwned", tmp_path / "trainer_state.pt"
    torch.save(fm._Planted(str(marker)), p)
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    assert not marker.exists()
    torch.load(p, weights_only=False)
    assert marker.read_text() == "executed"


def test_the_judge_of_handled_faults(tmp_path):
    """Handled needs the exit status, every expected line, no traceback and no forbidden file."""
    py = sys.executable
    say = "import sys; print('resuming from x at step 3', file=sys.stderr)"
    ok, why = fm.judge(fm.Expect([py, "-c", say], ["at step 3"]), str(tmp_path))
    assert ok and why == "resuming from x at step 3"
    ok, why = fm.judge(fm.Expect([py, "-c", say], ["skipping checkpoint"]), str(tmp_path))
    assert not ok and "no line saying" in why
    ok, why = fm.judge(fm.Expect([py, "-c", say + "; sys.exit(1)"], ["at step 3"]), str(tmp_path))
    assert not ok and "exit 1" in why
    ok, why = fm.judge(fm.Expect([py, "-c", say + "; {}['x']"], ["at step 3"]), str(tmp_path))
    assert not ok and "traceback" in why
    marker = tmp_path / "pwned"
    ok, why = fm.judge(fm.Expect([py, "-c", say + f"; open({str(marker)!r}, 'w')"], ["at step 3"], [str(marker)]),
                       str(tmp_path))
    assert not ok and "pwned" in why
    assert fm.judge(fm.Checked(False, "exit 0, 2 survivors"), str(tmp_path)) == (False, "exit 0, 2 survivors")


def test_the_judge_tells_wrong_from_clean(tmp_path):
    """A command that exits 0, one that prints a traceback, one that leaves a partial file: all wrong."""
    py = sys.executable
    ok, why = fm.judge(fm.Run([py, "-c", "pass"], ["x"]), str(tmp_path))
    assert not ok and "exit 0" in why
    ok, why = fm.judge(fm.Run([py, "-c", "import json; json.loads('{')"], ["x"]), str(tmp_path))
    assert not ok and "traceback" in why
    (tmp_path / "o.ckpt.partial").write_text("half")
    ok, why = fm.judge(fm.Run([py, "-c", "import sys; sys.exit('error: in.ckpt: bad')"], ["in.ckpt"]), str(tmp_path))
    assert not ok and "o.ckpt.partial" in why
    (tmp_path / "o.ckpt.partial").unlink()
    ok, why = fm.judge(fm.Run([py, "-c", "import sys; sys.exit('error: in.ckpt: bad')"], ["other.ckpt"]), str(tmp_path))
    assert not ok and "does not name" in why
    ok, why = fm.judge(fm.Run([py, "-c", "import sys; sys.exit('error: in.ckpt: bad')"], ["in.ckpt"]), str(tmp_path))
    assert ok, why
