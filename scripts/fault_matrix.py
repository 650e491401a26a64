"""The fault matrix, printed: runs ``pytest -m faults`` (each bad input and fault of ``tests/faults/``, and
the launcher's process faults in ``tests/scripts/test_run_distribute.py``) and prints one line per case,
``refused`` / ``handled`` (with the error line the tool gave), ``WRONG`` (with why) or ``skipped``, then
``tried N / refused cleanly or handled N / wrong N``. Exit status 1 when a case is wrong.

    python scripts/fault_matrix.py [-k EXPRESSION] [--list] [any other pytest option]

The cases and their rules are in ``tests/faults/cases.py``; this script only runs pytest and reads its
JUnit XML report (``xml.etree``), so the matrix and ``make test`` run the same cases.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATHS = ["tests/faults", "tests/scripts/test_run_distribute.py"]


def _rows(xml_path: str) -> list:
    """``(status, name, why)`` per test case of the report; status ``refused``/``handled``/``WRONG``/``skipped``."""
    rows = []
    for tc in ET.parse(xml_path).iter("testcase"):
        name = tc.get("name", "")
        name = name[name.index("[") + 1:-1] if name.startswith("test_refused_cleanly_or_handled[") else name
        props = {p.get("name"): p.get("value") for p in tc.iter("property")}
        bad = tc.find("failure") if tc.find("failure") is not None else tc.find("error")
        if bad is not None:
            rows.append(("WRONG", name, (bad.get("message") or "").splitlines()[0][:300] if bad.get("message") else ""))
        elif tc.find("skipped") is not None:
            rows.append(("skipped", name, tc.find("skipped").get("message", "")))
        else:
            rows.append((props.get("verdict", "handled"), name, props.get("why", "as the test checks")))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python scripts/fault_matrix.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="keyword", default=None, help="run only the cases pytest's -k expression selects")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args, rest = ap.parse_known_args(argv)
    cmd = [sys.executable, "-m", "pytest", *PATHS, "-m", "faults", "-p", "no:cacheprovider", *rest]
    if args.keyword:
        cmd += ["-k", args.keyword]
    if args.list:
        return subprocess.run(cmd + ["--collect-only", "-q"], cwd=ROOT).returncode
    with tempfile.TemporaryDirectory(prefix="fault_matrix_") as tmp:
        xml_path = os.path.join(tmp, "faults.xml")
        res = subprocess.run(cmd + ["-q", f"--junitxml={xml_path}", "-o", "junit_family=xunit1"], cwd=ROOT,
                             capture_output=True, text=True)
        if not os.path.exists(xml_path):
            sys.stderr.write(res.stdout[-3000:] + res.stderr[-3000:])
            return res.returncode or 1
        rows = _rows(xml_path)
    for status, name, why in rows:
        print(f"{status:<8} {name}: {why}", flush=True)
    tried = [r for r in rows if r[0] != "skipped"]
    wrong = [r for r in tried if r[0] == "WRONG"]
    skipped = len(rows) - len(tried)
    print(f"tried {len(tried)} / refused cleanly or handled {len(tried) - len(wrong)} / wrong {len(wrong)}"
          + (f" / skipped {skipped}" if skipped else ""))
    return 1 if wrong or res.returncode not in (0, 5) else 0


if __name__ == "__main__":
    sys.exit(main())
