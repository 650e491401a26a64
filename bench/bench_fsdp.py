"""Sharded (FSDP2) vs data parallel (DDP) training on 2 CPU ranks: tokens/s and memory per rank, as ratios.

Both runs are ``python -m torch_glm.train`` under ``torchrun --nproc_per_node 2`` (gloo) with one run YAML
that differs only in ``parallel.enable_parallel_optimizer``: the same random-initialised model (default
4 layers x 512 wide, 12.4M parameters: weights and Adam states dominate), the same ADGEN batches, full
fine-tuning, float32. Rounds alternate the order (DDP FSDP, FSDP DDP, ...) so a change of load on a
shared machine moves both runs of a round; the ratios quoted are the medians of the per-round ratios.

Per rank, from the trainer's summary: tokens/s (training loop only), parameter + gradient + optimizer
bytes (local shards, after the first update) and the peak resident memory of the training loop. Beside
them, the memory plan of the same YAML (:mod:`glm_common.memory_plan`, torch engine, 2 devices): its
weights + gradients + optimizer states against the measured parameter + gradient + optimizer bytes (the
ratio measured/plan), and its per-device total against the measured peak (on CPU the peak also holds the
Python and torch runtime, which the plan does not count).

    python bench/bench_fsdp.py [--rounds 2] [--steps 6] [--layers 4] [--hidden 512]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")


def run_yaml(tmp: str, sharded: bool, a) -> str:
    import yaml
    mc = json.load(open(os.path.join(FIXTURES, "model", "tiny_glm2", "config.json"), encoding="utf-8"))
    for k in ("architectures", "model_type", "torch_dtype", "tie_word_embeddings", "use_cache"):
        mc.pop(k, None)
    mc.update(type="ChatGLM2Config", compute_dtype="float32", param_init_type="float32", num_layers=a.layers,
              hidden_size=a.hidden, ffn_hidden_size=a.ffn, kv_channels=a.hidden // mc["num_attention_heads"])
    cfg = {
        "seed": 0, "output_dir": os.path.join(tmp, "out"), "load_checkpoint": "",
        "runner_config": {"epochs": 100, "batch_size": a.batch, "max_steps": a.steps},
        "train_dataset": {"data_loader": {"dataset_dir": os.path.join(FIXTURES, "data", "adgen", "train.json"),
                                          "shuffle": True},
                          "tokenizer": {"vocab_file": os.path.join(FIXTURES, "tokenizer", "tiny_glm2_sp.model")},
                          "max_source_length": a.seq // 2, "max_target_length": a.seq // 2},
        "optimizer": {"type": "AdamWeightDecay", "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.1},
        "lr_schedule": {"type": "constant", "learning_rate": 1e-4},
        "parallel": {"enable_parallel_optimizer": sharded},
        "model": {"model_config": mc},
    }
    path = os.path.join(tmp, "run.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return path


def plan_of(path: str) -> dict:
    """The memory plan of the run YAML ``path`` on 2 torch ranks (DDP, or FSDP2 with the optimizer shard)."""
    from glm_common.memory_plan import layout_from_config, plan_memory
    from glm_common.run_config import load_run_config
    p = plan_memory(layout_from_config(load_run_config(path), source=path, devices=2, backend="torch"))
    b = p["per_device_bytes"]
    return {"state": b["weights"] + b["gradients"] + b["optimizer_states"], "total": p["total_bytes"]}


def one_run(sharded: bool, a) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as tmp:
        path = run_yaml(tmp, sharded, a)
        plan = plan_of(path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "torch_glm.train", "--config", path, "--no_progress"]
        # a fixed glibc mmap threshold: freed tensors give their pages back, so the resident peak
        # follows the live tensors rather than the allocator's history
        env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONPATH": ROOT, "MALLOC_ARENA_MAX": "2",
               "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            sys.exit(f"error: {'FSDP' if sharded else 'DDP'} run failed: {proc.stderr.strip().splitlines()[-1]}")
        return {**json.loads(proc.stdout.strip().splitlines()[-1]), "plan": plan}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="DDP/FSDP pairs, the order alternating")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps a run")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=2, help="rows a rank a step")
    ap.add_argument("--seq", type=int, default=64, help="source + target tokens")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads a rank")
    a = ap.parse_args(argv)
    speed, peak, state = [], [], []
    vs_plan = {"DDP": [], "FSDP": []}
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        got = {sharded: one_run(sharded, a) for sharded in order}
        ddp, fsdp = got[False], got[True]
        speed.append(fsdp["tokens_per_s"] / ddp["tokens_per_s"])
        peak.append(max(m["peak_bytes"] for m in fsdp["memory"]) / max(m["peak_bytes"] for m in ddp["memory"]))
        state.append(max(m["state_bytes"]["total"] for m in fsdp["memory"])
                     / max(m["state_bytes"]["total"] for m in ddp["memory"]))
        print(f"round {r + 1}: FSDP/DDP tokens/s {speed[-1]:.3f}, peak memory a rank {peak[-1]:.3f}, "
              f"parameter+gradient+optimizer bytes a rank {state[-1]:.3f} "
              f"(DDP {max(m['state_bytes']['total'] for m in ddp['memory']) / 2**20:.1f} MiB, "
              f"FSDP {max(m['state_bytes']['total'] for m in fsdp['memory']) / 2**20:.1f} MiB)", file=sys.stderr)
        for name, run in (("DDP", ddp), ("FSDP", fsdp)):
            got = max(m["state_bytes"]["total"] for m in run["memory"])
            vs_plan[name].append(got / run["plan"]["state"])
            print(f"  {name} plan vs measured a rank: parameter+gradient+optimizer {run['plan']['state'] / 2**20:.1f} "
                  f"MiB planned, {got / 2**20:.1f} MiB measured (x{vs_plan[name][-1]:.3f}); total "
                  f"{run['plan']['total'] / 2**20:.1f} MiB planned, peak resident "
                  f"{max(m['peak_bytes'] for m in run['memory']) / 2**20:.1f} MiB measured (runtime included)",
                  file=sys.stderr)
    print(json.dumps({"model": f"{a.layers} x {a.hidden} (ffn {a.ffn})", "ranks": 2, "steps": a.steps,
                      "tokens_per_s_fsdp_over_ddp": round(float(np.median(speed)), 3),
                      "peak_memory_per_rank_fsdp_over_ddp": round(float(np.median(peak)), 3),
                      "state_bytes_per_rank_fsdp_over_ddp": round(float(np.median(state)), 3),
                      "state_bytes_measured_over_plan_ddp": round(float(np.median(vs_plan["DDP"])), 3),
                      "state_bytes_measured_over_plan_fsdp": round(float(np.median(vs_plan["FSDP"])), 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
