"""A stand-in for ``python -m mindspore_glm.run`` in the launcher tests (no MindSpore).

Writes ``$FAKE_OUT/<role>.json`` (its argv, cwd, pid and the launch variables), prints a line, then
behaves as the variables say: ``FAKE_SECONDS`` (run this long, then exit 0; default 0.2),
``FAKE_CRASH_RANK`` + ``FAKE_CRASH_AFTER`` (that rank prints ``boom`` and exits 3 after the delay),
``FAKE_IGNORE_TERM=1`` (SIGTERM does nothing), ``FAKE_CHILD=1`` (starts a sleeping child in its process
group and records its pid). ``--scheduler`` (or ``MS_ROLE=MS_SCHED``): the scheduler's stand-in, exits ``FAKE_SCHED_CODE``
(default 0) after ``FAKE_SCHED_SECONDS`` (default 0.2).
"""
import json
import os
import signal
import subprocess
import sys
import time

KEYS = ("RANK_TABLE_FILE", "RANK_SIZE", "RANK_ID", "DEVICE_ID", "MS_ROLE", "MS_NODE_ID", "MS_SCHED_HOST",
        "MS_SCHED_PORT", "MS_WORKER_NUM", "MS_TOPO_TIMEOUT", "PYTHONPATH", "GLM_OUTPUT_LOCK_TOKEN")


def main() -> int:
    scheduler = sys.argv[1:2] == ["--scheduler"] or os.environ.get("MS_ROLE") == "MS_SCHED"
    role = "scheduler" if scheduler else f"rank_{os.environ.get('RANK_ID', 'x')}"
    info = {"argv": sys.argv[1:], "cwd": os.getcwd(), "pid": os.getpid(), "pgid": os.getpgid(0),
            "env": {k: os.environ[k] for k in KEYS if k in os.environ}}
    if os.environ.get("FAKE_IGNORE_TERM") == "1":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if os.environ.get("FAKE_CHILD") == "1" and not scheduler:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        info["child"] = child.pid
    out = os.environ["FAKE_OUT"]
    with open(os.path.join(out, role + ".json.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(out, role + ".json.tmp"), os.path.join(out, role + ".json"))
    print(f"{role} up, pid {os.getpid()}", flush=True)
    if scheduler:
        time.sleep(float(os.environ.get("FAKE_SCHED_SECONDS", "0.2")))
        return int(os.environ.get("FAKE_SCHED_CODE", "0"))
    if os.environ.get("FAKE_CRASH_RANK") == os.environ.get("RANK_ID"):
        time.sleep(float(os.environ.get("FAKE_CRASH_AFTER", "0.5")))
        for i in range(50):
            print(f"step {i} fine", flush=True)
        print("boom: injected failure", flush=True)
        return 3
    time.sleep(float(os.environ.get("FAKE_SECONDS", "0.2")))
    print(f"{role} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
