"""One training run per output directory: a lock file ``<output_dir>/.glm2_run.lock``.

Two runs writing one ``output_dir`` interleave their ``loss_log.jsonl`` and overwrite each other's
checkpoints, so a trainer (:func:`mindspore_glm.train.train`, :func:`torch_glm.train.train`) and the
launcher of ``scripts/run_distribute.sh`` hold this lock for the whole run:

* the lock file holds its owner as JSON (``pid``, ``host``, ``token``, ``started``); the lock itself is an
  ``flock`` on that file (the standard library's :func:`fcntl.flock`), which the kernel drops when the
  owner dies however it dies, so a lock cannot outlive its run on this host;
* a second run on the same directory is refused with one line naming the owner (:class:`OutputLocked`);
* a lock file left by a run that is gone (its pid dead on this host, the ``flock`` free) is stale: it is
  taken over with a one-line note on stderr. A lock file naming another host whose ``flock`` is free is
  refused all the same (this host cannot tell whether that run is alive, and some shared file systems
  keep ``flock`` per host): the message says to delete the file once that run is gone;
* released (file removed, ``flock`` dropped) when the run ends, by an error too.

A multi-rank run takes one lock: the launcher (or, without it, rank 0) holds it and gives its token to
the ranks in :data:`LOCK_TOKEN_ENV`; rank 0 finds the lock held under that token and goes on, the other
ranks do not lock (they never refuse each other). ``torchrun`` ranks: rank 0 locks.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import uuid
from typing import Optional

from glm_common.training import TrainingError

__all__ = ["LOCK_NAME", "LOCK_TOKEN_ENV", "OutputLocked", "OutputLock", "output_lock", "lock_path"]

#: the lock file's name inside the output directory
LOCK_NAME = ".glm2_run.lock"
#: the variable a launcher that holds the lock gives its ranks (the lock's token)
LOCK_TOKEN_ENV = "GLM_OUTPUT_LOCK_TOKEN"


class OutputLocked(TrainingError):
    """The output directory is in use by another run; the message names the owner and the lock file."""


def lock_path(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), LOCK_NAME)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    except OSError:
        return False
    return True


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        raw += chunk
    try:
        owner = json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (UnicodeDecodeError, ValueError):
        owner = {}
    return owner if isinstance(owner, dict) else {}


def _who(owner: dict) -> str:
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}"


class OutputLock:
    """The lock of ``output_dir`` (:meth:`acquire` / :meth:`release`, or a ``with`` block)."""

    def __init__(self, output_dir: str, token: Optional[str] = None):
        self.output_dir = os.path.abspath(output_dir)
        self.path = lock_path(output_dir)
        self.token = token or uuid.uuid4().hex
        self.host = socket.gethostname()
        self._fd: Optional[int] = None
        self.note: Optional[str] = None   # the stale-lock note, when one was taken over

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "OutputLock":
        os.makedirs(self.output_dir, exist_ok=True)
        for _ in range(20):  # the file may be removed by its releasing owner between open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                owner = _read_owner(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputLocked(f"{self.output_dir}: in use by another run ({_who(owner)}, lock file "
                                   f"{self.path}); wait for it or choose another output_dir") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its owner just removed: try the one now at the path
                os.close(fd)
                continue
            owner = _read_owner(fd)
            if owner.get("pid") is not None:
                if owner.get("host") not in (None, self.host):
                    os.close(fd)
                    raise OutputLocked(f"{self.output_dir}: lock file {self.path} names a run of {_who(owner)}, "
                                       f"which this host cannot check; delete the file if that run is gone")
                state = "no longer running" if not _pid_alive(int(owner["pid"])) else "not holding it"
                self.note = (f"note: {self.path}: stale lock of {_who(owner)} ({state}), taken over")
                print(self.note, file=sys.stderr, flush=True)
            record = {"pid": os.getpid(), "host": self.host, "token": self.token,
                      "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv[:8]}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
            os.fsync(fd)
            self._fd = fd
            return self
        raise OutputLocked(f"{self.output_dir}: cannot take lock file {self.path} (it keeps changing)")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if _read_owner(fd).get("token") == self.token:
                os.unlink(self.path)
        except OSError:
            pass
        finally:
            os.close(fd)

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class _Shared:
    """A no-op lock: the run's lock is held by its launcher, or by rank 0."""

    held = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def _held_by(output_dir: str, token: str) -> bool:
    """Whether ``output_dir``'s lock file is held now under ``token`` (by a launcher)."""
    try:
        fd = os.open(lock_path(output_dir), os.O_RDONLY)
    except OSError:
        return False
    try:
        try:  # a shared lock succeeds only when nobody holds it: then nobody is holding it for us
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        except OSError:
            return _read_owner(fd).get("token") == token
    finally:
        os.close(fd)


def output_lock(output_dir: str, rank: int = 0, environ=None):
    """The lock a training rank takes for ``output_dir``: a context manager.

    Rank 0 takes :class:`OutputLock` unless its launcher already holds it under the token in
    :data:`LOCK_TOKEN_ENV`; other ranks take none (rank 0 or the launcher holds the run's one lock)."""
    environ = os.environ if environ is None else environ
    if rank != 0:
        return _Shared()
    token = environ.get(LOCK_TOKEN_ENV)
    if token and _held_by(output_dir, token):
        return _Shared()
    return OutputLock(output_dir)
