"""glm_common.run_lock: one training run per output directory (a lock file with the owner's pid and host,
an ``flock`` the kernel drops when the owner dies), on both trainers and the launcher."""
import json
import os
import socket
import subprocess
import sys

import pytest

from glm_common.run_lock import LOCK_NAME, LOCK_TOKEN_ENV, OutputLock, OutputLocked, output_lock
from tests.conftest import ROOT

HOLDER = ("import sys, time; from glm_common.run_lock import OutputLock; "
          "l = OutputLock(sys.argv[1], token=sys.argv[2] if len(sys.argv) > 2 else None).acquire(); "
          "print('held', flush=True); sys.stdin.read(); l.release()")


class Holder:
    """Another process holding the lock of ``directory`` until closed (a running run, or a launcher)."""

    def __init__(self, directory, token=None):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), *([token] if token else [])],
                                     cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONPATH": ROOT})
        assert self.proc.stdout.readline().strip() == "held"

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_second_run_is_refused_naming_the_owner(tmp_path):
    with Holder(tmp_path) as h:
        owner = json.loads((tmp_path / LOCK_NAME).read_text())
        assert owner["pid"] == h.proc.pid and owner["host"] == socket.gethostname()
        with pytest.raises(OutputLocked) as e:
            OutputLock(tmp_path).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {h.proc.pid} on host {socket.gethostname()}" in msg and LOCK_NAME in msg
    assert not (tmp_path / LOCK_NAME).exists()      # released by its owner
    with OutputLock(tmp_path):
        pass


def test_stale_lock_of_a_dead_pid_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "token": "x"}))
    lock = OutputLock(tmp_path).acquire()
    try:
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"stale lock of pid {dead.pid}" in err[0] and "taken over" in err[0]
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_lock_of_another_host_is_not_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere-node", "token": "x"}))
    with pytest.raises(OutputLocked, match="pid 1 on host elsewhere-node.*delete the file"):
        OutputLock(tmp_path).acquire()


def test_released_when_the_run_fails(tmp_path):
    with pytest.raises(ValueError):
        with OutputLock(tmp_path):
            raise ValueError("a failing run")
    assert not (tmp_path / LOCK_NAME).exists()


def test_ranks_of_one_launch_share_the_launchers_lock(tmp_path):
    with Holder(tmp_path, token="launch-token"):
        # rank 0 of that launch finds the lock held under its token; other ranks take no lock
        with output_lock(tmp_path, 0, {LOCK_TOKEN_ENV: "launch-token"}) as l0, output_lock(tmp_path, 1, {}) as l1:
            assert not l0.held and not l1.held
        # rank 0 of another run is refused
        with pytest.raises(OutputLocked):
            with output_lock(tmp_path, 0, {LOCK_TOKEN_ENV: "another-launch"}):
                pass
    with output_lock(tmp_path, 0, {}) as l0:     # a single-process run locks for itself
        assert l0.held and (tmp_path / LOCK_NAME).exists()


def test_torch_trainer_refuses_a_busy_output_dir(tmp_path):
    import yaml
    from tests.torch_glm.test_train import run_config
    cfg = run_config(tmp_path, "full", 1e-3, rows=8, epochs=1)
    out = tmp_path / "out"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    with Holder(out) as h:
        r = subprocess.run([sys.executable, "-m", "torch_glm.run", "--config", str(path), "--no_progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT})
    assert r.returncode == 1, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and f"pid {h.proc.pid}" in lines[-1] and "Traceback" not in r.stderr
    assert sorted(os.listdir(out)) == []          # nothing written; the holder removed its lock file
