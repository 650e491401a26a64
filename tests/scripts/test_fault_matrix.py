"""scripts/fault_matrix.py: every bad input of the matrix is refused cleanly (one line naming the file, no
traceback, nothing half-written), every fault (resume, launcher) is handled, and the script says so in its
closing count; the judge tells wrong from clean."""
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = str(ROOT / "scripts" / "fault_matrix.py")


@pytest.mark.slow
def test_every_bad_input_is_refused_cleanly():
    res = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=1800)
    last = res.stdout.strip().splitlines()[-1]
    wrong = [ln for ln in res.stdout.splitlines() if ln.startswith("WRONG")]
    assert res.returncode == 0 and not wrong, "\n".join(wrong) or res.stderr[-2000:]
    tried = int(last.split()[1])
    assert last.startswith(f"tried {tried} / refused cleanly {tried} / wrong 0") and tried >= 90, last
    for group in ("resume_", "launch_", "st_", "merge_", "data_", "rank_table_"):
        assert any(ln.split()[1].startswith(group) for ln in res.stdout.splitlines()[:-1]
                   if ln.startswith(("refused", "handled"))), group


def _fm():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fault_matrix as fm
    finally:
        sys.path.pop(0)
    return fm


def test_only_runs_the_named_cases_and_counts_them():
    res = subprocess.run([sys.executable, SCRIPT, "--only", "hccl_tools_bad_range"], capture_output=True, text=True,
                         timeout=300)
    lines = res.stdout.strip().splitlines()
    assert res.returncode == 0 and len(lines) == 2, res.stdout + res.stderr
    assert lines[0].startswith("refused  hccl_tools_bad_range: ") and "--device_num" in lines[0]
    assert lines[1].startswith("tried 1 / refused cleanly 1 / wrong 0"), lines[1]


def test_the_matrix_holds_the_resume_and_launcher_cases():
    names = {c.__name__[5:] for c in _fm().CASES}
    from tests.scripts.launch_faults import CASES as LAUNCH
    assert len([n for n in names if n.startswith("launch_")]) == len(LAUNCH) == 18
    assert {"resume_pickle_in_checkpoint", "resume_loss_log_cut_short", "resume_latest_checkpoint_zero_length",
            "resume_latest_checkpoint_truncated", "resume_ranks_latest_steps_disagree",
            "launch_kill_9_of_launcher_cluster"} <= names


def test_the_planted_pickle_would_run_if_loaded(tmp_path):
    """The pickle case can fail: loading its file the unsafe way writes the marker it checks for."""
    import torch
    fm = _fm()
    marker, p = tmp_path / "pwned", tmp_path / "trainer_state.pt"
    torch.save(fm._Planted(str(marker)), p)
    with pytest.raises(Exception):
        torch.load(p, weights_only=True)
    assert not marker.exists()
    torch.load(p, weights_only=False)
    assert marker.read_text() == "executed"


def test_the_judge_of_handled_faults(tmp_path):
    """Handled needs the exit status, every expected line, no traceback and no forbidden file."""
    fm = _fm()
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
    fm = _fm()
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
