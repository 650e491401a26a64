"""The training loss log both backends write: one JSON object a line, a PNG curve, a summary line.

``loss_log.jsonl`` rows: ``{"step", "epoch", "loss", "lr", ...}`` for training steps (the MindSpore
runner adds ``loss_scale``, ``overflow``, ``tokens_per_s``; torch adds ``grad_norm``), and
``{"step", "eval_loss", "rouge-1", ...}`` for evaluations. :func:`plot_losses` draws it with
matplotlib's Agg backend.

A run stopped while writing a row (killed, disk full) leaves a cut last line: :func:`read_rows` drops it
with one line naming the file and line, and :meth:`LossLog.truncate` (resume) rewrites the file without
it. Any other line that is not a JSON object with a ``step`` is a :class:`LossLogError` naming the file
and line.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Optional

from glm_common.fsutil import atomic_path, atomic_write_text
from glm_common.run_config import RunConfigError

__all__ = ["LossLog", "LossLogError", "read_rows", "plot_losses", "summary_line"]


class LossLogError(RunConfigError):
    """A loss log line that is not a row (and not a cut last line); one line naming the file and line."""


def read_rows(path: str, say=None, lines: bool = False) -> list:
    """The rows of the JSONL loss log at ``path`` (``[]`` when absent).

    A last line that does not parse (a row cut short by a kill or a full disk) is dropped and reported
    through ``say`` (default: a line on stderr) naming the file and line; a bad line elsewhere raises
    :class:`LossLogError`. ``lines``: ``(row, text of its line)`` pairs instead of rows.
    """
    if not os.path.isfile(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.readlines()
    last = max((i for i, line in enumerate(text) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(text):
        if not line.strip():
            continue
        try:
            row = json.loads(line.strip())
            if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                raise ValueError("not a row (a JSON object with an integer \"step\")")
        except ValueError as e:
            if i == last:
                (say or (lambda m: print(m, file=sys.stderr)))(
                    f"{path}: line {i + 1} is cut short (the run stopped while writing it); dropped it")
                break
            why = f"{e.msg} (column {e.colno})" if isinstance(e, json.JSONDecodeError) else str(e)
            raise LossLogError(f"{path}: line {i + 1}: {why}") from None
        rows.append((row, line if line.endswith("\n") else line + "\n") if lines else row)
    return rows


class LossLog:
    """Append-only JSONL log at ``path``; :meth:`truncate` keeps the rows up to a step (resume)."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def truncate(self, step: int) -> None:
        """Keep the rows with ``step <= step`` (all rows go when ``step`` is 0), atomically."""
        if not self.enabled:
            return
        rows = [line for r, line in read_rows(self.path, lines=True) if r["step"] <= step] if step else []
        atomic_write_text(self.path, "".join(rows))

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def rows(self) -> list:
        return read_rows(self.path)


def plot_losses(log_path: str, png_path: str) -> Optional[str]:
    """Draw the train (and eval) loss curve of ``loss_log.jsonl`` into a PNG; None when no row has a loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = read_rows(log_path)
    train = [(r["step"], r["loss"]) for r in rows if r.get("loss") is not None]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(png_path, ".png") as tmp:
            fig.savefig(tmp, dpi=100)
    finally:
        plt.close(fig)
    return png_path


def summary_line(steps: int, first_loss, last_loss, tokens_per_s: float, seconds: float, skipped: int = 0,
                 result: Optional[str] = None) -> str:
    """``trained 32 steps in 4.1 s: loss 3.21 -> 2.10, 5120 tokens/s[, 1 skipped (overflow)][; wrote X]``."""
    f = (lambda x: "n/a" if x is None else f"{x:.4f}")
    line = (f"trained {steps} steps in {seconds:.1f} s: loss {f(first_loss)} -> {f(last_loss)}, "
            f"{tokens_per_s:.0f} tokens/s")
    if skipped:
        line += f", {skipped} skipped (overflow)"
    if result:
        line += f"; wrote {result}"
    return line
