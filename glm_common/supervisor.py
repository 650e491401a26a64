"""A backend-free process supervisor: start a launch's processes, wait for them, stop them all when one
fails, when the launcher is told to stop, and when the launcher itself dies.

It lives in :mod:`glm_common` because it imports no framework (standard library, plus ``psutil`` where
it is installed, for msrun's workers): the launcher process of ``scripts/run_distribute.sh`` stays free of
MindSpore (fast to start, no device touched), and nothing in it is specific to one backend. What to start
(command lines, variables, working directories, logs) is the launch plan's business
(:mod:`mindspore_glm.launch_plan`); this module only runs a list of :class:`Proc`.

Ranks die with their launcher. ``kill -9`` of the supervisor cannot be caught, so two mechanisms that
need nothing from the dying process stand in:

* every process the supervisor starts gets a parent-death signal (Linux ``prctl(PR_SET_PDEATHSIG,
  SIGKILL)``, set through ``ctypes`` in the child between ``fork`` and ``exec``, :func:`die_with_parent`):
  the kernel kills the scheduler, each rank (rank-table and dynamic-cluster launches) and ``msrun`` the
  moment the supervisor's main thread ends. The signal belongs to the *thread* that forked, so
  :meth:`Supervisor.run` must run on the thread that lives for the whole launch (the main thread);
* a reaper (:func:`start_reaper`, ``python -m glm_common.supervisor --reap``): a small process in a
  session of its own that holds the read end of a pipe whose write end only the supervisor holds. When
  the supervisor dies, however it dies, the kernel closes the pipe; the reaper then finds every process
  whose environment carries this launch's ``GLM_LAUNCH_ID`` (set for every process the supervisor
  starts and inherited by everything they start: the ranks' own children, and msrun's workers, which
  msrun starts in sessions of their own where no parent-death signal of ours reaches), sends SIGTERM,
  and SIGKILL to what is left after the grace period (at most :data:`REAPER_GRACE_MAX` seconds).
  The rank entry needs no change for it: the variable is inherited, read from ``/proc/PID/environ``.

Both are Linux mechanisms (``prctl`` and ``/proc``); elsewhere the supervisor still stops its ranks on
a failure or a catchable signal, and says nothing about ``kill -9``.
"""
from __future__ import annotations

import ctypes
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Dict, List, Optional

__all__ = ["Proc", "Supervisor", "tail", "describe", "die_with_parent", "start_reaper", "stop_reaper", "sweep",
           "LAUNCH_ID_ENV", "TAIL_LINES", "REAPER_GRACE_MAX"]

#: the variable that marks every process of one launch (a random token per launch)
LAUNCH_ID_ENV = "GLM_LAUNCH_ID"
#: log lines shown for a failed rank by default
TAIL_LINES = 30
#: seconds the reaper waits between SIGTERM and SIGKILL after the launcher died (the launcher's
#: ``--grace``, capped: with the launcher gone nobody waits for a clean stop, only for the ranks' own
#: SIGTERM handlers to flush their logs)
REAPER_GRACE_MAX = 3.0
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_MSRUN_FAILED = re.compile(r"Worker process (\d+) exit with exception\. Error code: (-?\d+)")


@dataclass
class Proc:
    """One process of a launch: the scheduler (``rank`` None) or a rank."""

    name: str                      # "rank 0", "scheduler", "msrun"
    cmd: List[str]
    env: Dict[str, str]            # the variables set for it (on top of the launcher's environment)
    cwd: str
    log: str
    rank: Optional[int] = None
    device_id: Optional[int] = None
    is_worker: bool = True         # whose failure fails the launch and whose success is awaited


# ---------------------------------------------------------------------------------------- parent death
def die_with_parent(parent_pid: int, sig: int = signal.SIGKILL) -> None:
    """In a freshly forked child (a ``preexec_fn``): ask the kernel for ``sig`` when the parent thread
    dies; if the parent is already gone (it died between ``fork`` and here), exit at once."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:
        os._exit(1)


def _launch_pids(token: str) -> List[int]:
    """Pids of this user's processes whose environment holds ``GLM_LAUNCH_ID=token`` (Linux ``/proc``)."""
    needle = f"{LAUNCH_ID_ENV}={token}".encode()
    me, found = os.getpid(), []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for e in entries:
        if not e.isdigit() or int(e) == me:
            continue
        try:
            with open(f"/proc/{e}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(e))
        except OSError:  # gone, or not ours
            pass
    return found


def sweep(token: str, grace: float) -> List[int]:
    """SIGTERM to every process of the launch ``token``, SIGKILL to what is left after ``grace``
    seconds; returns the pids found."""
    pids = _launch_pids(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except OSError:
            pass
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline and _launch_pids(token):
        time.sleep(0.05)
    for pid in _launch_pids(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    return pids


def start_reaper(token: str, grace: float):
    """Start the reaper of launch ``token`` (see the module docstring); None where it cannot run."""
    if not os.path.isdir("/proc"):
        return None
    env = {k: v for k, v in os.environ.items() if k != LAUNCH_ID_ENV}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(x for x in (root, env.get("PYTHONPATH", "")) if x)
    return subprocess.Popen([sys.executable or "python3", "-m", "glm_common.supervisor", "--reap", token,
                             str(min(float(grace), REAPER_GRACE_MAX))], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)


def stop_reaper(reaper) -> None:
    """After a supervised run ended: tell the reaper the launch is over (it kills what is left of it at
    once, normally nothing) and wait for it."""
    if reaper is None:
        return
    try:
        reaper.stdin.write(b"done\n")
        reaper.stdin.close()
    except OSError:
        pass
    try:
        reaper.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


def _reap(token: str, grace: float) -> int:
    """The reaper's body: wait for the supervisor's end (EOF on stdin), then sweep its launch."""
    done = False
    try:
        for line in sys.stdin.buffer:
            if line.strip() == b"done":
                done = True
                break
    except (OSError, KeyboardInterrupt):
        pass
    sweep(token, 0.0 if done else grace)
    return 0


# ---------------------------------------------------------------------------------------- supervision
def tail(path: str, n: int = TAIL_LINES) -> List[str]:
    """The last ``n`` lines of the text file ``path`` (empty when it cannot be read)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 256 * 1024))
            data = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    return data.splitlines()[-n:] if n > 0 else []


def describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class Supervisor:
    """Start the processes of a launch plan, wait for them, stop them all when one fails or on a signal.

    ``plan`` is any object with ``procs`` (a list of :class:`Proc`, started in order), ``mode``
    (``"msrun"`` when msrun starts the ranks), ``rank_size`` and ``output`` (the root of the logs), as
    :class:`mindspore_glm.launch_plan.Plan`.

    ``run()`` returns the launcher's exit status: 0 when every worker exited 0, 1 when one failed,
    128 + signal number when the launcher was told to stop.
    """

    def __init__(self, plan, grace: float = 10.0, tail_lines: int = TAIL_LINES, out=None, err=None,
                 poll: float = 0.1):
        self.plan, self.grace, self.tail_lines, self.poll = plan, float(grace), int(tail_lines), poll
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.popen: Dict[str, "object"] = {}
        self.procs = {p.name: p for p in plan.procs}
        self._signal: Optional[int] = None
        self._msrun_ranks: Dict[int, int] = {}
        self._msrun_offset = 0
        self._msrun_next = 0.0
        self.token = uuid.uuid4().hex
        self._reaper = None

    def _say(self, msg: str, err: bool = False) -> None:
        stream = self.err if err else self.out
        print(f"run_distribute: {msg}", file=stream, flush=True)

    def _on_signal(self, signum, _frame) -> None:
        if self._signal is None:
            self._signal = signum

    def start(self) -> None:
        """Start the reaper, then every process of the plan, in order. Call it from the thread that
        lives for the whole run (the main thread): the parent-death signal of the children fires when
        the thread that forked them ends."""
        self._reaper = start_reaper(self.token, self.grace)
        parent = os.getpid()
        for p in self.plan.procs:
            os.makedirs(p.cwd, exist_ok=True)
            os.makedirs(os.path.dirname(p.log), exist_ok=True)
            env = dict(os.environ)
            env.update(p.env)
            env[LAUNCH_ID_ENV] = self.token
            with open(p.log, "wb") as log:
                # a session of its own: the rank and everything it starts form one process group;
                # it is killed when this process dies (parent-death signal, set in the child)
                self.popen[p.name] = subprocess.Popen(p.cmd, cwd=p.cwd, env=env, stdin=subprocess.DEVNULL,
                                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                      preexec_fn=lambda: die_with_parent(parent))
            self._say(f"started {p.name} (pid {self.popen[p.name].pid}), log {p.log}")

    def _alive(self) -> List[str]:
        return [n for n, pp in self.popen.items() if pp.poll() is None]

    def _group_alive(self, pid: int) -> bool:
        try:
            os.killpg(pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def stop(self) -> None:
        """SIGTERM to every process group still running (msrun gets SIGINT first: its handler stops its
        workers, which run in sessions of their own), SIGKILL to what is left after ``grace`` seconds."""
        descendants = self._descendants()
        for name, pp in self.popen.items():
            if not self._group_alive(pp.pid):
                continue
            sig = signal.SIGINT if name == "msrun" else signal.SIGTERM
            try:
                os.killpg(pp.pid, sig)
            except ProcessLookupError:
                pass
        for d in descendants:
            try:
                d.terminate()
            except Exception:
                pass
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline:
            for pp in self.popen.values():
                pp.poll()
            if not any(self._group_alive(pp.pid) for pp in self.popen.values()) \
                    and not any(_running(d) for d in descendants):
                break
            time.sleep(0.05)
        for name, pp in self.popen.items():
            if self._group_alive(pp.pid):
                self._say(f"{name} did not stop within {self.grace:g} s of SIGTERM; SIGKILL", err=True)
                try:
                    os.killpg(pp.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for d in descendants:
            if _running(d):
                try:
                    d.kill()
                except Exception:
                    pass
        for pp in self.popen.values():
            try:
                pp.wait(timeout=5)
            except Exception:
                pass

    def _descendants(self) -> list:
        """Processes started by the launched ones that left their process group (msrun's workers)."""
        try:
            import psutil
        except ImportError:
            return []
        found = []
        for pp in self.popen.values():
            try:
                found.extend(c for c in psutil.Process(pp.pid).children(recursive=True)
                             if os.getpgid(c.pid) != pp.pid)
            except Exception:
                pass
        return found

    def _watch_msrun(self) -> None:
        """Remember the rank (``MS_NODE_ID``) of each worker msrun has started, by pid."""
        pp = self.popen.get("msrun")
        if pp is None or time.monotonic() < self._msrun_next:
            return
        self._msrun_next = time.monotonic() + 0.5
        try:
            import psutil
            for c in psutil.Process(pp.pid).children():
                if c.pid not in self._msrun_ranks:
                    env = c.environ()
                    if env.get("MS_ROLE") != "MS_SCHED" and "MS_NODE_ID" in env:
                        self._msrun_ranks[c.pid] = int(env["MS_NODE_ID"])
        except Exception:
            pass

    def _msrun_failure(self):
        """``(rank name, exit code)`` once msrun's log says a worker failed (msrun then waits for its
        scheduler, which can take minutes); None before."""
        p = self.procs.get("msrun")
        if p is None:
            return None
        try:
            with open(p.log, "rb") as f:
                f.seek(self._msrun_offset)
                text = f.read().decode("utf-8", errors="replace")
        except OSError:
            return None
        cut = text.rfind("\n") + 1
        self._msrun_offset += len(text[:cut].encode("utf-8"))
        m = _MSRUN_FAILED.search(text[:cut])
        if not m:
            return None
        pid, code = int(m.group(1)), int(m.group(2))
        rank = self._msrun_ranks.get(pid)
        return (f"rank {rank}" if rank is not None else f"worker pid {pid}"), code

    def _report_failure(self, name: str, code: int) -> None:
        p = self.procs.get(name)
        if p is None:  # a worker of msrun
            log_dir = os.path.dirname(self.procs["msrun"].log)
            log = os.path.join(log_dir, f"worker_{name.split()[-1]}.log")
        else:
            log = p.log
        lines = tail(log, self.tail_lines)
        self._say(f"{name} failed ({describe(code)}); log {log}" + (f"; its last {len(lines)} lines:" if lines
                                                                     else " (empty)"), err=True)
        for line in lines:
            print(f"  | {line}", file=self.err)
        if name == "msrun":  # msrun failed without saying which worker: show them all
            log_dir = os.path.dirname(log)
            for w in sorted(os.listdir(log_dir)):
                if w.startswith("worker") and w.endswith(".log"):
                    self._say(f"{w}: last lines:", err=True)
                    for line in tail(os.path.join(log_dir, w), max(5, self.tail_lines // 3)):
                        print(f"  | {line}", file=self.err)
        self.err.flush()

    def run(self) -> int:
        """Start, supervise, return the exit status (see the class docstring)."""
        handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        old = {s: signal.signal(s, self._on_signal) for s in handled}
        t0 = time.monotonic()
        try:
            self.start()
            workers = [p.name for p in self.plan.procs if p.is_worker]
            done: Dict[str, int] = {}
            while True:
                if self._signal is not None:
                    name = signal.Signals(self._signal).name
                    running = self._alive()
                    self._say(f"{name} received; stopping {', '.join(running) or 'nothing (all exited)'}", err=True)
                    self.stop()
                    return 128 + self._signal
                failed = None
                for name, pp in self.popen.items():
                    code = pp.poll()
                    if code is None or name in done:
                        continue
                    done[name] = code
                    if code == 0 and name in workers:
                        self._say(f"{name} finished after {time.monotonic() - t0:.1f} s")
                    elif code != 0:  # a scheduler that exits 0 is done serving; only the workers count
                        failed = failed or (name, code)
                if not failed and "msrun" in self.popen:
                    self._watch_msrun()
                    failed = self._msrun_failure()
                if failed:
                    name, code = failed
                    others = [n for n in self._alive() if n != name]
                    self._say(f"{name} failed ({describe(code)}) after {time.monotonic() - t0:.1f} s; stopping "
                              f"{', '.join(others) or 'nothing (the others have exited)'}", err=True)
                    self.stop()
                    self._report_failure(name, code)
                    return 1
                if all(w in done for w in workers):
                    rest = self._alive()
                    if rest:  # the scheduler exits on its own once the workers are gone; give it time
                        deadline = time.monotonic() + max(self.grace, 5.0)
                        while self._alive() and time.monotonic() < deadline and self._signal is None:
                            time.sleep(self.poll)
                        if self._alive():
                            self.stop()
                    n = self.plan.rank_size if self.plan.mode == "msrun" else len(workers)
                    self._say(f"all {n} rank{'s' if n != 1 else ''} succeeded in "
                              f"{time.monotonic() - t0:.1f} s; logs in {os.path.join(self.plan.output, 'log')}")
                    return 0
                time.sleep(self.poll)
        except BaseException:
            self.stop()
            raise
        finally:
            stop_reaper(self._reaper)
            for s, h in old.items():
                signal.signal(s, h)


def _running(proc) -> bool:
    try:
        return proc.is_running() and proc.status() != "zombie"
    except Exception:
        return False


if __name__ == "__main__":
    if sys.argv[1:2] == ["--reap"] and len(sys.argv) == 4:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the launch is not for the reaper
        sys.exit(_reap(sys.argv[2], float(sys.argv[3])))
    print("usage: python -m glm_common.supervisor --reap TOKEN GRACE (started by the launcher)", file=sys.stderr)
    sys.exit(2)
