"""Two backends measured side by side: each in its own process, both alive, called in turn.

Each side is a worker process that builds its tasks once (a name -> callable dict) and then runs the task
named by each request, answering with the wall and CPU seconds it took (decode tasks are generators:
their answer is the per-token time of the steps after the prefill and the first step). Neither runtime's
thread pool ever shares a process with the other's.

:func:`alternate` runs one task on every side in turn, round after round, the order reversed every
other round (A B, B A, ...): both sides see the same machine, so a change of load on a shared machine
(other tenants, CPU steal) moves both numbers of a round together and cancels in their ratio. The
statistic to quote is the median of the per-round ratios.

A side must not burn CPU while it waits: :meth:`Side.idle_cpu` gives the CPU seconds the worker spent
outside its own tasks (a spinning thread pool would show here and slow the other side).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def per_token_time(gen) -> tuple:
    """(wall, CPU) seconds per token of a token generator's steps after the prefill and first step."""
    next(gen)          # prefill
    next(gen)          # first decode step
    n, t, c = 0, time.perf_counter(), time.process_time()
    for _ in gen:
        n += 1
    return (time.perf_counter() - t) / max(n, 1), (time.process_time() - c) / max(n, 1)


def _serve(build, conn, args):
    try:
        tasks = build(*args)
    except Exception as e:  # report, do not hang the parent
        conn.send(f"error: {type(e).__name__}: {e}")
        return
    conn.send("ready")
    start_cpu = time.process_time()
    task_cpu = 0.0
    while True:
        name = conn.recv()
        if name is None:
            return
        if name == "idle_cpu":
            conn.send(time.process_time() - start_cpu - task_cpu)
            continue
        t, c = time.perf_counter(), time.process_time()
        out = tasks[name]()
        if hasattr(out, "__next__"):
            res = per_token_time(out)
        else:
            res = (time.perf_counter() - t, time.process_time() - c)
        task_cpu += time.process_time() - c
        conn.send(res)


class Side:
    """A worker process running ``build(*args)`` (a picklable top-level function returning the tasks)."""

    def __init__(self, name: str, build, *args):
        ctx = mp.get_context("spawn")
        self.name = name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(build, child, args), daemon=True)
        self.proc.start()
        try:
            self.status = self.conn.recv()
        except EOFError:
            self.proc.join(5)
            self.status = f"error: the worker exited with code {self.proc.exitcode}"

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    def __call__(self, task: str) -> tuple:
        self.conn.send(task)
        return self.conn.recv()

    def idle_cpu(self) -> float:
        return self("idle_cpu")

    def close(self):
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


def alternate(sides, task: str, rounds: int) -> dict:
    """Run ``task`` on every side once per round, the order reversed every other round.
    Returns ``{side name: [(wall, cpu), ...]}`` in round order."""
    out = {s.name: [] for s in sides}
    for r in range(rounds):
        for s in (sides if r % 2 == 0 else sides[::-1]):
            out[s.name].append(s(task))
    return out


def ratio(times: dict, num: str, den: str, which: int = 0) -> float:
    """Median over rounds of ``times[num] / times[den]`` (seconds, so > 1 means ``den`` is faster)."""
    a = np.array([t[which] for t in times[num]])
    b = np.array([t[which] for t in times[den]])
    return float(np.median(a / b))


def median(times: list, which: int = 0) -> float:
    return float(np.median([t[which] for t in times]))
