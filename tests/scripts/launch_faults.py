"""Fault matrix of the launcher (scripts/run_distribute.sh): bad arguments and process faults, each run for
real (ranks are the stand-in worker tests/scripts/fake_worker.py, msrun is MindSpore's), and counted.

    python -m tests.scripts.launch_faults        (from the repository root; about a minute)

A bad input is *refused cleanly* when the launcher exits 2 with one ``error:`` line per problem, no Python
traceback, and nothing started or written. A process fault is *handled* when the launcher exits with the
documented status (1 for a failed rank, 128+N for signal N), names what failed, and no process of the
launch is left after 5 s (the kill -9 case: after the launcher is gone). Anything else is *wrong*.
Prints one line per case and ``tried N, refused cleanly or handled N, wrong N``; exit status 1 when a case
is wrong. The cases are :data:`CASES`; ``scripts/fault_matrix.py`` runs them too, as part of the whole matrix.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "run_distribute.sh")
TINY = os.path.join(ROOT, "configs", "tiny", "run_tiny_lora.yaml")
GLM2_LORA = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_lora.yaml")
GLM2_FT = os.path.join(ROOT, "configs", "glm2", "run_glm2_6b_finetune.yaml")
FAKE = f"{sys.executable} -m tests.scripts.fake_worker"


def _table(path, n):
    from hccl.rank_table import new_device, new_server, new_table
    srv = [new_server("10.0.0.1", [new_device(d, f"192.{d + 1}.27.6", d) for d in range(n)])]
    with open(path, "w") as f:
        json.dump(new_table(srv), f)
    return path


def _env(fake, **extra):
    os.makedirs(fake, exist_ok=True)
    e = dict(os.environ, PYTHON=sys.executable, GLM_LAUNCH_WORKER=FAKE, GLM_LAUNCH_SCHEDULER=FAKE + " --scheduler",
             FAKE_OUT=fake, PYTHONPATH=ROOT, **{k: str(v) for k, v in extra.items()})
    e.pop("GLM_DRY_RUN", None)
    return e


def _alive(pid):
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _fake_pids(fake):
    pids = []
    for name in os.listdir(fake):
        if name.endswith(".json"):
            info = json.load(open(os.path.join(fake, name)))
            pids += [info["pid"]] + ([info["child"]] if "child" in info else [])
    return pids


def bad_input(tmp, name, args, expected):
    """Refused cleanly: exit 2, the expected words on an ``error:`` line, no traceback, nothing started."""
    fake = os.path.join(tmp, name.replace(" ", "_"))
    r = subprocess.run(["bash", SCRIPT, "--output", os.path.join(fake, "out"), *args], cwd=tmp, env=_env(fake),
                       capture_output=True, text=True, timeout=120)
    errs = [x for x in r.stderr.splitlines() if "error:" in x]
    ok = (r.returncode == 2 and any(expected in x for x in errs) and "Traceback" not in r.stderr
          and not [f for f in os.listdir(fake) if f.endswith(".json")]
          and not os.path.exists(os.path.join(fake, "out")))
    return ok, (errs[0] if errs else f"exit {r.returncode}, no error: line: {r.stderr.strip()[-200:]}")


def fault(tmp, name, args, env, expect_code, expect_text, signal_after=None, kill9=False):
    fake = os.path.join(tmp, name.replace(" ", "_"))
    p = subprocess.Popen(["bash", SCRIPT, "--grace", "2", "--output", os.path.join(fake, "out"), *args], cwd=tmp,
                         env=_env(fake, **env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    if signal_after is not None or kill9:
        deadline = time.monotonic() + 60
        while len([f for f in os.listdir(fake) if f.endswith(".json")]) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL if kill9 else signal_after)
    try:
        out, err = p.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        return False, "launcher did not stop"
    deadline = time.monotonic() + 60              # a bound on the wait for the sweep, not a measure
    while any(_alive(x) for x in _fake_pids(fake)) and time.monotonic() < deadline:
        time.sleep(0.1)
    survivors = [x for x in _fake_pids(fake) if _alive(x)]
    for x in survivors:
        os.kill(x, signal.SIGKILL)
    ok = p.returncode == expect_code and expect_text in err and not survivors and "Traceback" not in err
    if kill9:
        return ok, (f"exit {p.returncode}, {len(survivors)} of {len(_fake_pids(fake))} launched processes alive "
                    f"after the launcher was killed with SIGKILL")
    line = next((x for x in err.splitlines() if expect_text in x), err.strip().splitlines()[-1:] or [""])
    return ok, f"exit {p.returncode}, {len(survivors)} survivors; {line if isinstance(line, str) else line[0]}"


def _file(tmp, name, write):
    """``tmp/name``, written by ``write(path)`` the first time it is asked for."""
    path = os.path.join(tmp, name)
    if not os.path.exists(path):
        write(path)
    return path


def _text(text):
    def write(path):
        with open(path, "w") as f:
            f.write(text)
    return write


def _bad_yaml(tmp):
    return _file(tmp, "bad.yaml", _text("model: [1, 2\n"))


def _t(tmp, n):
    return _file(tmp, f"t{n}.json", lambda p: _table(p, n))


def _broken(tmp):
    return _file(tmp, "broken.json", _text('{"version": "1.0", "server_list": [], "status": "completed"}'))


def _tight(tmp):
    """The 6B full fine-tune YAML with 16 GB per device: its plan (23 GiB with optimizer shard and recompute
    on 8 devices) does not fit."""
    with open(GLM2_FT, encoding="utf-8") as f:
        text = f.read()
    assert 'max_device_memory: "30GB"' in text
    return _file(tmp, "tight.yaml", _text(text.replace('max_device_memory: "30GB"', 'max_device_memory: "16GB"', 1)))


def _not_dir(tmp):
    return _file(tmp, "afile", _text(""))


# (name, kind, run(tmp) -> (ok, detail)); kind "refused" (bad input) or "handled" (a process fault)
CASES = [
    ("too few arguments", "refused", lambda tmp: bad_input(tmp, "few", ["-", TINY], "expected RANK_TABLE_FILE")),
    ("bad RUN_STATUS", "refused", lambda tmp: bad_input(tmp, "status", ["-", TINY, "[0,2)", "fine"], "RUN_STATUS")),
    ("empty DEVICE_RANGE", "refused", lambda tmp: bad_input(tmp, "range", ["-", TINY, "[2,2)", "finetune"],
                                                            "DEVICE_RANGE")),
    ("bad RANK_SIZE", "refused", lambda tmp: bad_input(tmp, "ranksize", ["-", TINY, "[0,2)", "finetune", "0"],
                                                       "RANK_SIZE")),
    ("missing config", "refused", lambda tmp: bad_input(tmp, "noconfig", ["-", "nope.yaml", "[0,2)", "finetune"],
                                                        "nope.yaml")),
    ("config not YAML", "refused", lambda tmp: bad_input(tmp, "badyaml", ["-", _bad_yaml(tmp), "[0,2)", "finetune"],
                                                         "not valid YAML")),
    ("Ascend without rank table", "refused", lambda tmp: bad_input(tmp, "notable", ["-", GLM2_LORA, "[0,8)",
                                                                                    "finetune"],
                                                                   "RANK_TABLE_FILE: required")),
    ("rank table of other size", "refused", lambda tmp: bad_input(tmp, "tablesize", [_t(tmp, 8), GLM2_LORA, "[0,4)",
                                                                                     "finetune"], "lists 8 devices")),
    ("broken rank table", "refused", lambda tmp: bad_input(tmp, "broken", [_broken(tmp), GLM2_LORA, "[0,8)",
                                                                           "finetune"], "RANK_TABLE_FILE")),
    ("predict without texts", "refused", lambda tmp: bad_input(tmp, "predict", ["-", TINY, "[0,2)", "predict"],
                                                               "PREDICT_DATA")),
    ("--output is a file", "refused", lambda tmp: bad_input(tmp, "outfile", ["--output",
                                                                             os.path.join(_not_dir(tmp), "x"), "-",
                                                                             TINY, "[0,2)", "finetune"],
                                                            "not a directory")),
    ("layout that does not fit", "refused", lambda tmp: bad_input(tmp, "memory", [_t(tmp, 8), _tight(tmp), "[0,8)",
                                                                                  "finetune"], "does not fit")),
    ("rank crashes", "handled", lambda tmp: fault(tmp, "crash", ["-", TINY, "[0,3)", "finetune"],
                                                  dict(FAKE_SECONDS=60, FAKE_SCHED_SECONDS=60, FAKE_CRASH_RANK=1,
                                                       FAKE_CRASH_AFTER=1, FAKE_CHILD=1), 1, "rank 1 failed")),
    ("rank ignores SIGTERM", "handled", lambda tmp: fault(tmp, "ignore", ["-", TINY, "[0,2)", "finetune"],
                                                          dict(FAKE_SECONDS=60, FAKE_CRASH_RANK=0, FAKE_CRASH_AFTER=1,
                                                               FAKE_IGNORE_TERM=1), 1, "SIGKILL")),
    ("scheduler fails", "handled", lambda tmp: fault(tmp, "sched", ["-", TINY, "[0,2)", "finetune"],
                                                     dict(FAKE_SECONDS=60, FAKE_SCHED_SECONDS=1, FAKE_SCHED_CODE=1), 1,
                                                     "scheduler failed")),
    ("SIGTERM to launcher", "handled", lambda tmp: fault(tmp, "term", ["-", TINY, "[0,2)", "finetune"],
                                                         dict(FAKE_SECONDS=60, FAKE_SCHED_SECONDS=60, FAKE_CHILD=1),
                                                         143, "SIGTERM received", signal_after=signal.SIGTERM)),
    ("kill -9 of launcher (cluster)", "handled", lambda tmp: fault(tmp, "k9c", ["-", TINY, "[0,2)", "finetune"],
                                                                   dict(FAKE_SECONDS=60, FAKE_SCHED_SECONDS=60,
                                                                        FAKE_CHILD=1), -9, "", kill9=True)),
    ("kill -9 of launcher (rank table)", "handled", lambda tmp: fault(tmp, "k9a", [_t(tmp, 2), GLM2_LORA, "[0,2)",
                                                                                   "finetune"],
                                                                      dict(FAKE_SECONDS=60, FAKE_CHILD=1), -9, "",
                                                                      kill9=True)),
]


def main() -> int:
    tmp = tempfile.mkdtemp(prefix="launch_faults_")
    good = 0
    for name, _kind, run in CASES:
        ok, detail = run(tmp)
        good += ok
        print(f"{'ok   ' if ok else 'WRONG'} {name}: {detail}", flush=True)
    print(f"launcher faults: tried {len(CASES)}, refused cleanly or handled {good}, wrong {len(CASES) - good}")
    return 0 if good == len(CASES) else 1


if __name__ == "__main__":
    sys.exit(main())
