"""The training loss log both backends write: one JSON object a line, a PNG curve, a summary line.

``loss_log.jsonl`` rows: ``{"step", "epoch", "loss", "lr", ...}`` for training steps (the MindSpore
runner adds ``loss_scale``, ``overflow``, ``tokens_per_s``; torch adds ``grad_norm``), and
``{"step", "eval_loss", "rouge-1", ...}`` for evaluations. :func:`plot_losses` draws it with
matplotlib's Agg backend.
"""
from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["LossLog", "plot_losses", "summary_line"]


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
        rows = []
        if step and os.path.isfile(self.path):
            with open(self.path, encoding="utf-8") as f:
                rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(rows)
        os.replace(self.path + ".tmp", self.path)

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def rows(self) -> list:
        if not os.path.isfile(self.path):
            return []
        with open(self.path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def plot_losses(log_path: str, png_path: str) -> Optional[str]:
    """Draw the train (and eval) loss curve of ``loss_log.jsonl`` into a PNG; None when no row has a loss."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    with open(log_path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
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
    tmp = png_path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
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
