"""Run every benchmark of bench/ and write bench/REPORT.md (``make bench``).

Each benchmark measures ours beside its comparison in the same run and prints the ratio; this script
runs them one after the other (never two at once: they would measure each other), keeps their output
verbatim and writes the report with the machine it ran on and each issue's target.

    python bench/run_all.py            # quick: the converter and merger on reduced full-width models
    python bench/run_all.py --full     # the full-size ChatGLM2-6B checkpoint (12.5 GB) and 4-layer merge
    python bench/run_all.py --only tokenizer data
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from glm_common.fsutil import atomic_write_text  # noqa: E402

# name, script, quick args, full args, what it compares, target (from the issue that asked for it)
BENCHES = [
    ("tokenizer", "bench_tokenizer.py", [], [],
     "build_prompt + encode(prompt) + encode(answer) on the ADGEN sample vs raw SentencePiece on the same strings",
     ">= 0.5x raw SentencePiece"),
    ("data", "bench_data.py", [], [],
     "official fine-tuning features (rows/s) vs raw SentencePiece encoding of the same text",
     ">= 0.5x raw SentencePiece (the public reference preprocessing: ~0.07x)"),
    ("torch", "bench_torch.py", ["--threads", "1"], ["--threads", "1"],
     "torch_glm training tokens/s, cached decode tokens/s vs recomputing, per-token decode at context 16 vs 512",
     "decode per token at 512 context <= 1.5x that at 16"),
    ("mindspore", "bench_mindspore.py", [], [],
     "mindspore_glm GRAPH forward+backward and cached decode vs torch_glm, same config and inputs",
     "training >= 0.8x torch; decode per token at 512 <= 1.5x that at 16"),
    ("train", "bench_train.py", ["--steps", "15"], ["--steps", "30"],
     "full training step (optimizer, loss scale, clipping) tokens/s, MindSpore runner vs torch_glm trainer",
     "report (issue 6 asks for the ratios)"),
    ("convert", "bench_convert.py", ["--small"], [],
     "hf_to_ms.py on a random fp16 ChatGLM2-6B checkpoint in the release's .bin layout vs cp of the same bytes "
     "and vs loading the whole model",
     "peak RSS < 2 GiB; wall time <= 1.5x cp"),
    ("fsdp", "bench_fsdp.py", ["--rounds", "2"], ["--rounds", "4", "--steps", "10"],
     "torch_glm under torchrun, 2 CPU ranks: FSDP2 (parallel.enable_parallel_optimizer) vs DDP, tokens/s, peak "
     "memory and parameter+gradient+optimizer bytes a rank",
     "state bytes a rank ~0.5x DDP's; peak memory a rank < DDP's; report tokens/s"),
    ("merge", "bench_merge.py", ["--layers", "1"], ["--layers", "4"],
     "merge_shards.py vs mindspore.transform_checkpoints on mp=4 shards of full-width ChatGLM2-6B layers",
     "report wall time and peak RSS beside transform_checkpoints"),
    ("plan", "bench_plan.py", ["--layers", "2"], [],
     "memory plan (glm_common/memory_plan.py) vs measured peak-memory growth of one training update, MindSpore "
     "GRAPH and torch, full and LoRA, with and without recompute, 4 x 1024 model (2 x 1024 quick)",
     "plan within 25% of measured"),
    ("recompute", "bench_recompute.py", ["--layers", "2", "--seq", "256"], [],
     "peak RSS of a MindSpore GRAPH training step: no recompute vs recompute_config.recompute (every layer) vs "
     "select_recompute (the MLPs), same batches",
     "lower with recompute and with select_recompute; losses and gradient norms equal"),
]


def machine() -> str:
    try:
        import psutil
        mem = f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        mem = "RAM unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {mem}, {platform.system()} {platform.release()}, Python {platform.python_version()}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="full-size converter and merger runs (needs ~45 GB disk)")
    ap.add_argument("--only", nargs="*", help="run only these benchmarks: " + ", ".join(b[0] for b in BENCHES))
    ap.add_argument("--report", default=os.path.join(ROOT, "bench", "REPORT.md"))
    args = ap.parse_args(argv)
    chosen = [b for b in BENCHES if not args.only or b[0] in args.only]
    sections, failed = [], []
    for name, script, quick, full, what, target in chosen:
        cmd = [sys.executable, os.path.join("bench", script)] + (full if args.full else quick)
        shown = "python " + " ".join(cmd[1:])
        print(f"== {name}: {shown}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, GLOG_v="3"))
        secs = time.time() - t0
        out = "\n".join(line for line in proc.stdout.splitlines() if "[WARNING]" not in line).strip()
        print(out, flush=True)
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        if proc.returncode:
            failed.append(name)
        sections.append(f"## {name}\n\n- compares: {what}\n- target: {target}\n- command: `{shown}` "
                        f"({secs:.0f} s, {status})\n\n```\n{out}\n```\n")
    head = (f"# Benchmark report\n\nWritten by `make bench` (`python bench/run_all.py"
            f"{' --full' if args.full else ''}`) on {datetime.date.today().isoformat()}.\n\n"
            f"Machine: {machine()}.\n\nEvery ratio below was measured side by side in one run of its "
            f"benchmark; the benchmarks ran one after the other on an otherwise idle machine.\n")
    atomic_write_text(args.report, head + "\n" + "\n".join(sections))
    print(f"wrote {args.report}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
