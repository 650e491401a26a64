"""Recompute on CPU: peak memory of a MindSpore GRAPH training step without recompute, with
``recompute_config.recompute`` (every GLMBlock) and with ``recompute_config.select_recompute: True`` (each
layer's MLP only).

Each side runs in its own fresh process (peak RSS is per process): it builds the model (random weights
from one seed, the same in both), the runner's ``TrainOneStepCell`` (full fine-tuning, AdamWeightDecay,
clipping) with ``mindspore_glm.parallel.configure_model`` marking every GLMBlock ``Cell.recompute()``,
only the MLPs, or nothing, and runs training steps on the same batches. The step is compiled first (compilation memory is not
the step's), freed heap is returned to the OS, and the RSS is sampled every 2 ms while the steps run: it
reports the RSS before the steps, their peak RSS, the growth of the peak over the steps, the process's
peak RSS including compilation (``getrusage``), the losses and the gradient norms. Printed side by
side: the ratio of each recompute side's growth (and peak) to the plain side's, and the largest relative difference
of the losses and gradient norms (recompute changes memory, not numbers).

    python bench/bench_recompute.py [--layers 4] [--hidden 256] [--seq 512] [--batch 8] [--steps 1]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import threading
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config_for(layers: int, hidden: int, seq: int):
    from glm_common.config import preset
    heads = max(2, hidden // 64)
    return preset("tiny", num_layers=layers, hidden_size=hidden, ffn_hidden_size=(hidden * 8 // 3 + 7) // 8 * 8,
                  num_attention_heads=heads, kv_channels=hidden // heads, multi_query_group_num=2,
                  padded_vocab_size=3072, seq_length=seq)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


SIDES = {"plain": "without recompute", "recompute": "recompute (every layer)",
         "select": "select_recompute (the MLPs)"}


def child(layers: int, hidden: int, seq: int, batch: int, steps: int, side: str) -> dict:
    """One side, in this process: ``{rss_before, peak, growth, losses, norms}`` (bytes)."""
    warnings.simplefilter("ignore")
    import mindspore as ms
    from mindspore import Tensor
    from glm_common.run_config import TrainSettings
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    from mindspore_glm.parallel import configure_model
    from mindspore_glm.train import init_weights
    from mindspore_glm.train_step import TrainOneStepCell, make_optimizer
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cfg = config_for(layers, hidden, seq)
    s = TrainSettings(config=cfg)
    s.gradient_checkpointing = side == "recompute"
    if side == "select":
        s.scaleout = {"recompute": {"select_recompute": ("mlp",)}}
    s.learning_rate, s.weight_decay = 1e-4, 0.0
    model = ChatGLM2ForConditionalGeneration(cfg)
    init_weights(model, 0)
    configure_model(model, s)
    model.set_train(True)
    params = list(model.get_parameters())
    cell = TrainOneStepCell(model, make_optimizer(params, s, np.full(steps + 1, 1e-4, np.float32)), s)
    cell.set_train(True)
    rng = np.random.default_rng(0)
    ids = [Tensor(rng.integers(5, cfg.padded_vocab_size, (batch, seq)).astype(np.int32)) for _ in range(steps)]
    # compile first (its own memory is not the step's), hand freed heap back to the OS, then sample the RSS
    # every 2 ms while the steps run
    cell.compile(ids[0], ids[0])
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _rss()
    peak, done = [before], threading.Event()

    def poll():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    losses, norms = [], []
    for x in ids:
        loss, _, _, norm = cell(x, x)
        losses.append(float(loss.asnumpy()))
        norms.append(float(norm.asnumpy()))
    done.set()
    watcher.join()
    return {"rss_before": before, "peak": peak[0], "growth": peak[0] - before, "losses": losses, "norms": norms,
            "max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure(layers=4, hidden=256, seq=512, batch=8, steps=1) -> dict:
    """The three sides, each in a fresh process: ``{"plain": ..., "recompute": ..., "select": ...}``."""
    out = {}
    for name in SIDES:
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--layers", str(layers),
               "--hidden", str(hidden), "--seq", str(seq), "--batch", str(batch), "--steps", str(steps)]
        res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, GLOG_v="3"))
        if res.returncode != 0:
            raise RuntimeError(f"{name} side failed: {res.stderr.strip().splitlines()[-1:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-30)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--child", choices=tuple(SIDES), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child is not None:
        print(json.dumps(child(a.layers, a.hidden, a.seq, a.batch, a.steps, a.child)))
        return 0
    print(f"recompute, MindSpore GRAPH train step on CPU: {a.layers} layers x {a.hidden} wide, batch {a.batch} x seq "
          f"{a.seq}, {a.steps} steps, each side in its own process", file=sys.stderr)
    m = measure(a.layers, a.hidden, a.seq, a.batch, a.steps)
    p = m["plain"]
    gb = 2 ** 30
    print("| | RSS before the steps (GiB) | peak RSS during the steps (GiB) | growth (GiB) | process peak with compile (GiB) |")
    print("| --- | --- | --- | --- | --- |")
    for name, label in SIDES.items():
        d = m[name]
        print(f"| {label} | {d['rss_before'] / gb:.3f} | {d['peak'] / gb:.3f} | {d['growth'] / gb:.3f} | "
              f"{d['max_rss'] / gb:.3f} |")
    for name in ("recompute", "select"):
        r = m[name]
        print(f"{SIDES[name]} / plain: peak growth ratio {r['growth'] / p['growth']:.3f}, peak RSS ratio "
              f"{r['peak'] / p['peak']:.3f}; largest relative difference: losses {rel(r['losses'], p['losses']):.2e}, "
              f"gradient norms {rel(r['norms'], p['norms']):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
