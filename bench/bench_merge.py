"""Merging distributed checkpoint shards: convert/merge_shards.py beside mindspore.transform_checkpoints.

Builds the mp=4 shards of a full-width ChatGLM2-6B slice (``--layers`` layers of hidden 4096 / ffn 13696
plus the 65024 x 4096 embedding, fp16: about 2.2 GB of shards for 4 layers), then merges them once with
each tool, every run in its own subprocess, and prints wall time and peak RSS side by side with the
ratios, and whether the two merged files are bit-identical.

    python bench/bench_merge.py [--layers 4] [--workdir /tmp/bench_merge] [--keep]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import time

import numpy as np


from convert.ms_ckpt import CheckpointWriter, MSCheckpoint  # noqa: E402
from convert.strategy import Layout, write_strategy_file  # noqa: E402
from glm_common.config import preset  # noqa: E402
from glm_common.names import hf_param_shapes, hf_to_ms  # noqa: E402

MP = 4


def split_axis(name: str):
    if "query_key_value." in name or "dense_h_to_4h." in name or name.endswith("embedding_weight"):
        return 0
    if name.endswith(("self_attention.dense.weight", "dense_4h_to_h.weight")):
        return 1
    return None


def build(work: str, layers: int) -> int:
    """Write ``work/ckpt/rank_N/*.ckpt`` and ``work/strategy.ckpt``; return the bytes of shards."""
    cfg = dataclasses.replace(preset("glm2_6b"), num_layers=layers)
    shapes = {hf_to_ms(n): s for n, s in hf_param_shapes(cfg).items() if n != "transformer.output_layer.weight"}
    rng = np.random.default_rng(0)
    writers = [CheckpointWriter(os.path.join(work, "ckpt", f"rank_{r}", f"glm2_rank_{r}-1_100.ckpt"))
               for r in range(MP)]
    layouts = {}
    for i, (name, shape) in enumerate(shapes.items()):
        full = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
        ax = split_axis(name)
        tm = tuple(0 if d == ax else -1 for d in range(len(shape)))
        layouts[name] = Layout((1, MP), tm)
        for r, w in enumerate(writers):
            w.write(name, np.split(full, MP, axis=ax)[r] if ax is not None else full)
        del full
        print(f"\rbuilding shards: {i + 1}/{len(shapes)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    for w in writers:
        w.close()
    write_strategy_file(os.path.join(work, "strategy.ckpt"), layouts)
    return sum(w.bytes_written for w in writers)


def measured(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS GiB) of ``cmd`` run as a child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[2] if len(cmd) > 2 else cmd}: exit status {proc.returncode}")
    return wall, usage.ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


def identical(a: str, b: str) -> bool:
    ca, cb = MSCheckpoint(a), MSCheckpoint(b)
    if sorted(ca.names) != sorted(cb.names):
        return False
    return all(ca.info(n) == cb.info(n) and ca.read(n).tobytes() == cb.read(n).tobytes() for n in ca.names)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4, help="full-width ChatGLM2-6B layers (default 4)")
    ap.add_argument("--workdir", default="/tmp/bench_merge", help="scratch folder (deleted afterwards)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        print(build(a.workdir, a.layers))
        return
    need = (0.55 + 0.41 * a.layers) * 2**30 * 3.2  # shards + two merged copies + slack
    os.makedirs(os.path.dirname(os.path.abspath(a.workdir)), exist_ok=True)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(a.workdir))).free
    if free < need:
        raise SystemExit(f"{a.workdir}: {free / 2**30:.1f} GiB free, the benchmark needs about {need / 2**30:.1f} GiB")
    shutil.rmtree(a.workdir, ignore_errors=True)
    try:
        # built in a child: a forked child's peak RSS counts the parent's pages, so the parent stays small
        res = subprocess.run([sys.executable, os.path.abspath(__file__), "--build-only", "--layers", str(a.layers),
                              "--workdir", a.workdir], stdout=subprocess.PIPE, text=True, check=True)
        nbytes = int(res.stdout.split()[-1])
        src, strat = os.path.join(a.workdir, "ckpt"), os.path.join(a.workdir, "strategy.ckpt")
        ours_out = os.path.join(a.workdir, "ours.ckpt")
        ms_dir = os.path.join(a.workdir, "ms_out")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        ours = measured([sys.executable, os.path.join(root, "convert", "merge_shards.py"), "--src", src,
                         "--strategy", strat, "--output", ours_out, "--quiet", "--overwrite"])
        theirs = measured([sys.executable, "-c",
                           "import mindspore as ms, sys; ms.transform_checkpoints(*sys.argv[1:5], None)",
                           src, ms_dir, "merged_", strat])
        same = identical(ours_out, os.path.join(ms_dir, "rank_0", "merged_0.ckpt"))
        print(f"shards: {MP} ranks (mp={MP}), {a.layers} full-width layers + embedding, fp16, "
              f"{nbytes / 2**30:.2f} GiB")
        print(f"{'':28s}{'wall s':>10s}{'peak RSS GiB':>15s}")
        print(f"{'merge_shards.py':28s}{ours[0]:10.1f}{ours[1]:15.2f}")
        print(f"{'transform_checkpoints':28s}{theirs[0]:10.1f}{theirs[1]:15.2f}")
        print(f"ratio transform_checkpoints / merge_shards: wall {theirs[0] / ours[0]:.2f}x, "
              f"peak RSS {theirs[1] / ours[1]:.2f}x; outputs bit-identical: {same}")
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
