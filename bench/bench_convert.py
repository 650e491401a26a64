"""HF -> MindSpore conversion of a full-size ChatGLM2-6B checkpoint: time and peak memory, side by side.

Writes (once, cached under --workdir) a random fp16 ChatGLM2-6B checkpoint in the layout of the real
release: 7 ``pytorch_model-0000N-of-00007.bin`` shards + ``pytorch_model.bin.index.json`` (~12.5 GB),
then measures, each in its own subprocess (peak RSS from ``wait4``), each ending with ``sync`` so that
the bytes reach the disk, and each starting with the source evicted from the page cache (as after a
download; ``--warm`` keeps it cached); ours and cp alternate for ``--rounds`` rounds, best of each kept:

- ``cp``: copying the same shard bytes (``cp --reflink=never``): the disk's limit for this work;
- ``ours``: ``python convert/hf_to_ms.py`` (streaming, one tensor at a time), with every weight checked on
  the way in (float dtype, shape, NaN/Inf count over all bytes: :mod:`convert.tensor_checks`), and the
  duplicate-tensor check over every shard;
- ``whole``: the load-whole-model approach (``torch.load`` every shard into one dict, then
  ``mindspore.save_checkpoint`` of ``ms.Tensor`` copies), only where available memory can hold it.

    python bench/bench_convert.py [--small] [--workdir output/bench_convert] [--keep-source]

``--small`` uses 4 layers of full width (~2.6 GB) for a quick run. Targets (issue): peak RSS of ours
under 2 GiB; wall time, weight checks included, within 1.5x of ``cp``.
"""
import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

GiB = 2 ** 30


def write_random_checkpoint(out_dir: str, num_layers: int, shards: int = 7, seed: int = 0) -> int:
    """A random fp16 ChatGLM2-6B-shaped ``.bin`` checkpoint in ``shards`` files + index; returns bytes."""
    import torch
    from glm_common.config import preset
    from glm_common.names import hf_param_shapes

    cfg = preset("glm2_6b", num_layers=num_layers)
    shapes = hf_param_shapes(cfg)
    shapes["transformer.rotary_pos_emb.inv_freq"] = (cfg.kv_channels // 4,)  # the release ships this buffer
    total = sum(int(np.prod(s)) * 2 for s in shapes.values())
    limit = -(-total // shards)
    rng = np.random.default_rng(seed)
    stage = out_dir + ".partial"
    shutil.rmtree(stage, ignore_errors=True)
    os.makedirs(stage)
    groups, cur, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = int(np.prod(shape)) * 2
        if cur and size + nbytes > limit and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
        cur.append(name)
        size += nbytes
    groups.append(cur)
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        sd = {}
        for name in group:
            n = int(np.prod(shapes[name]))
            bits = np.frombuffer(rng.bytes(2 * n), dtype=np.uint16) & np.uint16(0xBBFF)  # finite fp16, |x| < 1
            sd[name] = torch.from_numpy(bits.view(np.float16).reshape(shapes[name]).copy())
            weight_map[name] = fname
        torch.save(sd, os.path.join(stage, fname))
        del sd
        print(f"  wrote {fname} ({len(group)} tensors)", flush=True)
    with open(os.path.join(stage, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    cfg.save_hf(stage)
    os.replace(stage, out_dir)
    return total


def measure(cmd, cwd=ROOT) -> dict:
    """Run ``cmd`` (then ``sync``); wall seconds and the child's peak RSS from wait4."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    os.sync()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.strip()[-2000:]}")
    return {"seconds": seconds, "peak_rss": usage.ru_maxrss * 1024, "stdout": out.strip()}


WHOLE_MODEL = r"""
import glob, os, sys, torch, mindspore as ms
src, out = sys.argv[1], sys.argv[2]
state = {}
for f in sorted(glob.glob(os.path.join(src, "pytorch_model-*.bin"))):
    state.update(torch.load(f, map_location="cpu", weights_only=True))
params = []
for name, t in state.items():
    if name.endswith("inv_freq"):
        continue
    ms_name = "transformer.embedding.embedding_weight" if name == "transformer.embedding.word_embeddings.weight" else name
    params.append({"name": ms_name, "data": ms.Tensor(t.numpy())})
ms.save_checkpoint(params, out)
"""


def evict(files) -> None:
    """Drop the (clean) pages of ``files`` from the page cache, so that the next run reads them from disk."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def available_memory() -> int:
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="4 layers of full width (~2.6 GB) instead of 28 (~12.5 GB)")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (overrides --small)")
    ap.add_argument("--workdir", default=os.path.join(ROOT, "output", "bench_convert"),
                    help="where the random checkpoint is cached and outputs are written")
    ap.add_argument("--skip-whole", action="store_true", help="do not run the load-whole-model approach")
    ap.add_argument("--min-free-gb", type=float, default=40.0, help="skip (with a message) below this free disk space")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours and cp; the best of each is kept")
    ap.add_argument("--warm", action="store_true",
                    help="leave the source in the page cache (default: evict it before each run, as after a download)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    layers = args.layers or (4 if args.small else 28)
    src = os.path.join(args.workdir, f"chatglm2_6b_fp16_{layers}l")
    os.makedirs(args.workdir, exist_ok=True)
    free = shutil.disk_usage(args.workdir).free
    need = args.min_free_gb * 1e9 * (1.0 if layers == 28 else layers / 28 + 0.2)
    if not os.path.isdir(src) and free < need:
        print(f"skipped: {free / 1e9:.1f} GB free under {args.workdir}, the benchmark needs {need / 1e9:.0f} GB")
        return 0
    if not os.path.isdir(src):
        print(f"writing a random fp16 ChatGLM2-6B checkpoint ({layers} layers) to {src} (once) ...", flush=True)
        t0 = time.perf_counter()
        # in a child process: this process stays small, so that the children it forks start small
        # (a forked child's peak RSS counts the parent's pages until it execs)
        subprocess.run([sys.executable, "-c", f"import runpy; w = runpy.run_path({os.path.abspath(__file__)!r})"
                        f"['write_random_checkpoint']; w({src!r}, {layers})"],
                       check=True)
        print(f"  done in {time.perf_counter() - t0:.0f} s", flush=True)
    total = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".bin"))
    print(f"checkpoint: {src}: {total / 1e9:.2f} GB in "
          f"{len([f for f in os.listdir(src) if f.endswith('.bin')])} .bin shards; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"{available_memory() / GiB:.1f} GiB available memory")

    results = {}
    copy_dir = os.path.join(args.workdir, "cp_copy")
    shards = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".bin"))
    ours_out = os.path.join(args.workdir, "ours.ckpt")
    state = "warm page cache" if args.warm else "cold: source evicted from the page cache before each run"
    print(f"{args.rounds} rounds, alternating ours / cp, best of each kept; {state}")

    def prepare():
        os.sync()
        if not args.warm:
            evict(shards)

    ours_size = 0
    for _ in range(args.rounds):
        prepare()
        r = measure([sys.executable, os.path.join(ROOT, "convert", "hf_to_ms.py"), "--hf-dir", src,
                     "--output", ours_out, "--no-progress"])
        ours_size = os.path.getsize(ours_out)
        os.remove(ours_out)
        if "ours" not in results or r["seconds"] < results["ours"]["seconds"]:
            results["ours"] = r
        shutil.rmtree(copy_dir, ignore_errors=True)
        os.makedirs(copy_dir)
        prepare()
        r = measure(["cp", "--reflink=never"] + shards + [copy_dir])
        shutil.rmtree(copy_dir, ignore_errors=True)
        if "cp" not in results or r["seconds"] < results["cp"]["seconds"]:
            results["cp"] = r

    whole_need = 2.3 * total
    if args.skip_whole:
        print("whole-model approach: skipped (--skip-whole)")
    elif available_memory() < whole_need:
        print(f"whole-model approach: skipped: needs about {whole_need / GiB:.1f} GiB of memory (two copies of the "
              f"model), {available_memory() / GiB:.1f} GiB available")
    else:
        whole_out = os.path.join(args.workdir, "whole.ckpt")
        prepare()
        results["whole"] = measure([sys.executable, "-c", WHOLE_MODEL, src, whole_out])
        os.remove(whole_out)

    print(f"\n{'approach':<34}{'wall s':>9}{'GB/s':>8}{'peak RSS':>12}{'x cp time':>11}")
    labels = {"cp": "cp (disk limit)", "ours": "ours: hf_to_ms.py, checks on", "whole": "load whole model (torch+ms)"}
    for key, r in results.items():
        print(f"{labels[key]:<34}{r['seconds']:>9.1f}{total / 1e9 / r['seconds']:>8.2f}"
              f"{r['peak_rss'] / GiB:>10.2f} G{r['seconds'] / results['cp']['seconds']:>10.2f}x")
    ours = results["ours"]
    line = ours["stdout"].splitlines()[-1] if ours["stdout"] else ""
    print(f"\nours: {line}")
    m = re.search(r", ([\d.]+) s -> ", line)
    if m:
        startup = ours["seconds"] - float(m.group(1))
        print(f"ours: {float(m.group(1)):.1f} s converting ({float(m.group(1)) / results['cp']['seconds']:.2f}x cp) "
              f"+ {startup:.1f} s interpreter start, imports (torch) and sync")
    print(f"ours output {ours_size / 1e9:.2f} GB; peak RSS {ours['peak_rss'] / GiB:.2f} GiB (target < 2 GiB: "
          f"{'met' if ours['peak_rss'] < 2 * GiB else 'MISSED'}); wall {ours['seconds'] / results['cp']['seconds']:.2f}x "
          f"cp (target <= 1.5x: {'met' if ours['seconds'] <= 1.5 * results['cp']['seconds'] else 'MISSED'})")
    if "whole" in results:
        print(f"whole-model approach: {results['whole']['peak_rss'] / ours['peak_rss']:.1f}x our peak RSS, "
              f"{results['whole']['seconds'] / ours['seconds']:.2f}x our time")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"layers": layers, "bytes": total, **{k: {kk: vv for kk, vv in v.items() if kk != "stdout"}
                                                            for k, v in results.items()}}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
