"""scripts/fault_matrix.py: every bad input of the matrix is refused cleanly (one line naming the file, no
traceback, nothing half-written), and the script says so in its closing count."""
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
    assert last.startswith(f"tried {tried} / refused cleanly {tried} / wrong 0") and tried >= 60, last


def test_the_judge_tells_wrong_from_clean(tmp_path):
    """A command that exits 0, one that prints a traceback, one that leaves a partial file: all wrong."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import fault_matrix as fm
    finally:
        sys.path.pop(0)
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
