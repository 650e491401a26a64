"""The memory plan (glm_common/memory_plan.py) against the measured memory of a training step on this machine.

For a mid-size ChatGLM2 (4 layers x 1024 wide, float32, batch 4 x seq 256 by default) it runs one
training update per setup, each in a fresh process, and measures the growth of the process's peak
resident memory over the update: the kernel's high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs``
``5``) right before the step, and the growth is ``VmHWM`` after it minus ``VmRSS`` before it. Setups:

* MindSpore, the runner's GRAPH ``TrainOneStepCell`` (AdamWeightDecay, clip), full and LoRA. The graph is
  compiled first (``Cell.compile``), so the step's growth is its runtime memory: the gradients,
  activations and workspace of the plan (the weights and optimizer states exist before it).
* torch (one process, as a DDP rank of one), ``torch_glm``'s optimizer with ``clip_grad_norm_``, full and
  LoRA: AdamW creates its states in the first step, so the growth is gradients + optimizer states +
  activations + workspace.

Each setup also runs with ``recompute_config.recompute`` (the ``-rc`` setups): MindSpore marks every
GLMBlock ``Cell.recompute()`` (``mindspore_glm.parallel.apply_recompute``), torch checkpoints every block.

The prediction is the plan's sum of those parts for the same layout; each pair is printed with its
ratio.

``--dryrun``: the plan's per-device total of the 6B YAMLs (full fine-tune, LoRA) against the peak MindSpore
itself counts when it compiles their training step for an Ascend cluster (``mindspore_glm.dryrun``,
``MS_SIMULATION_LEVEL=1``, rank 0), and both against the published per-device figures (25.2 GB full
fine-tune, 22.38 GB LoRA, mindformers' glm2 README, 8 x 910A). The step is compiled with 1 and 2 layers (the
host's memory does not hold a 28-layer compile: over 4 GiB and growing) and the peak extrapolated linearly
to 28 (LoRA with 4 and 5: MindSpore's data-parallel optimizer shard refuses fewer trained tensors than
devices).

    python bench/bench_plan.py [--layers 4 --hidden 1024 --batch 4 --seq 256 --vocab 16384] [--only ms-full,...]
    python bench/bench_plan.py --dryrun [--dryrun-only LoRA] [--dryrun-layers 1,2]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SETUPS = ("ms-full", "ms-lora", "torch-full", "torch-lora", "ms-full-rc", "ms-lora-rc", "torch-full-rc",
          "torch-lora-rc")


def _split(setup: str):
    """``"ms-full-rc"`` -> ``("ms", "full", True)``."""
    backend, pet, *rc = setup.split("-")
    return backend, pet, bool(rc)


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def config_for(layers: int, hidden: int, vocab: int):
    from glm_common.config import preset
    heads = hidden // 64
    return preset("tiny", num_layers=layers, hidden_size=hidden, ffn_hidden_size=int(hidden * 8 / 3) // 8 * 8,
                  num_attention_heads=heads, kv_channels=64, multi_query_attention=True, multi_query_group_num=2,
                  padded_vocab_size=vocab, seq_length=1024)


def _weights(config) -> dict:
    from glm_common.names import hf_param_shapes
    rng = np.random.default_rng(0)
    return {n: (np.ones(s, np.float32) if "layernorm" in n else rng.normal(0, 0.02, s).astype(np.float32))
            for n, s in hf_param_shapes(config).items()}


def _settings(config, pet):
    from glm_common.run_config import TrainSettings
    s = TrainSettings(config=config)
    s.pet = {"pet_type": "lora", "r": 8, "lora_alpha": 32.0, "lora_dropout": 0.0,
             "target_modules": ".*query_key_value"} if pet == "lora" else {"pet_type": "full"}
    s.learning_rate, s.weight_decay = 1e-4, 0.1
    return s


def predicted(setup: str, config, batch: int, seq: int) -> dict:
    from glm_common.memory_plan import Layout, plan_memory
    backend, pet, rc = _split(setup)
    L = Layout(config=config, method=pet, pet=_settings(config, pet).pet, param_dtype="float32",
               compute_dtype="float32", layernorm_dtype="float32", softmax_dtype="float32", batch_size=batch,
               seq_length=seq, backend="mindspore" if backend == "ms" else "torch", device_target="CPU",
               recompute=rc)
    p = plan_memory(L)
    b = p["per_device_bytes"]
    parts = ["gradients", "activations", "workspace"] + (["optimizer_states"] if backend == "torch" else [])
    return {"bytes": sum(b[k] for k in parts), "parts": {k: b[k] for k in parts}}


def measure(setup: str, layers: int, hidden: int, vocab: int, batch: int, seq: int) -> dict:
    """In this process: build, (compile,) one update; the growth of peak RSS over the update."""
    backend, pet, rc = _split(setup)
    config = config_for(layers, hidden, vocab)
    ids = np.random.default_rng(1).integers(5, vocab, (batch, seq)).astype(np.int64)
    if backend == "ms":
        import mindspore as ms
        from mindspore import Tensor
        from mindspore_glm.model import ChatGLM2ForConditionalGeneration
        from mindspore_glm.lora import apply_pet
        from mindspore_glm.parallel import configure_model
        from mindspore_glm.train_step import TrainOneStepCell, make_optimizer
        ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
        model = ChatGLM2ForConditionalGeneration(config)
        model.load_weights(_weights(config).items(), source="bench")
        s = _settings(config, pet)
        s.gradient_checkpointing = rc
        model, params = apply_pet(model, s.pet)
        configure_model(model, s)
        step = TrainOneStepCell(model, make_optimizer(params, s, np.full(100, 1e-4, np.float32)), s)
        step.set_train(True)
        t = Tensor(ids.astype(np.int32))
        step.compile(t, t)
        before = _status("VmRSS")
        _reset_peak()
        loss = float(step(t, t)[0].asnumpy())
    else:
        import torch
        from torch_glm.lora import apply_pet
        from torch_glm.model import ChatGLM2ForConditionalGeneration
        from torch_glm.train_step import make_optimizer
        torch.manual_seed(0)
        model = ChatGLM2ForConditionalGeneration(config)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in _weights(config).items()}, strict=False)
        s = _settings(config, pet)
        model, params = apply_pet(model, s.pet)
        if rc:
            model.gradient_checkpointing_enable()
        model.train()
        opt = make_optimizer([(n, p) for n, p in model.named_parameters() if p.requires_grad], s,
                             np.full(100, 1e-4, np.float32))
        t = torch.from_numpy(ids)
        before = _status("VmRSS")
        _reset_peak()
        out = model(input_ids=t, labels=t).loss
        out.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        loss = float(out.item())
    peak = _status("VmHWM")
    return {"setup": setup, "measured": peak - before, "loss": loss}


#: the 6B YAMLs and the per-device memory published for them (mindformers' glm2 README, 8 x 910A, GB as printed)
#: and the layer counts compiled (LoRA: MindSpore's data-parallel optimizer shard needs at least as many
#: trained tensors as devices, 2 a layer, so 4 layers for 8 devices)
DRYRUN_YAMLS = (("full fine-tune", "configs/glm2/run_glm2_6b_finetune.yaml", 25.2, (1, 2)),
                ("LoRA", "configs/glm2/run_glm2_6b_lora.yaml", 22.38, (4, 5)))


def dryrun_rows(layer_counts=None, root: str = "", only=None) -> list:
    """Per 6B YAML: MindSpore's DryRun peak of rank 0 at each of ``layer_counts`` layers (default: the YAML's
    in :data:`DRYRUN_YAMLS`), extrapolated to the YAML's depth from the first two, beside the plan of the
    whole YAML and the published figure."""
    from mindspore_glm.dryrun import dryrun, format_report
    rows = []
    from glm_common.memory_plan import plan_from_file
    for label, rel, published, counts in DRYRUN_YAMLS:
        if only and label not in only:
            continue
        path = os.path.join(root, rel)
        got = {}
        use = layer_counts or counts
        for n in use:
            rep = dryrun(path, ranks=[0], num_layers=n)
            print(f"$ python -m mindspore_glm.plan --config {rel} --compile --ranks 0 --num-layers {n}")
            print(format_report(rep), flush=True)
            r = rep["ranks"][0]
            if not r["ok"]:
                rows.append({"run": label, "error": f"{n} layers: {r['error']} ({r['key']})"})
                break
            got[n] = (r["peak_bytes"], r["plan_bytes"], r.get("host_rss_bytes"))
        else:
            import yaml
            depth = yaml.safe_load(open(path))["model"]["model_config"]["num_layers"]
            a, b = use[0], use[1]
            per_layer = (got[b][0] - got[a][0]) / (b - a)
            plan_layer = (got[b][1] - got[a][1]) / (b - a)
            rows.append({"run": label, "config": rel, "layers": dict(got), "per_layer_peak": per_layer,
                         "per_layer_plan": plan_layer,
                         "peak_28": got[depth][0] if depth in got else got[a][0] + (depth - a) * per_layer,
                         "peak_28_measured": depth in got,
                         "plan_28": plan_from_file(path)["total_bytes"], "published_gb": published})
    return rows


def print_dryrun(rows) -> None:
    gib = 2 ** 30
    print("6B YAMLs, rank 0: MindSpore DryRun peak (MS_SIMULATION_LEVEL=1, 'Used peak memory usage') vs the memory "
          "plan vs the published figure (GB as published)")
    print(f"{'run':<16}{'per layer DryRun/plan GiB':>27}{'28 layers DryRun GiB':>22}{'plan GiB':>10}"
          f"{'DryRun/plan':>13}{'published':>11}{'plan/published':>16}")
    for r in rows:
        if "error" in r:
            print(f"{r['run']:<16}does not compile: {r['error']}")
            continue
        pl = f"{r['per_layer_peak'] / gib:.3f} / {r['per_layer_plan'] / gib:.3f}"
        peak = f"{r['peak_28'] / gib:.2f}" + ("" if r["peak_28_measured"] else " (extrap.)")
        print(f"{r['run']:<16}{pl:>27}{peak:>22}{r['plan_28'] / gib:>10.2f}{r['peak_28'] / r['plan_28']:>13.2f}"
              f"{r['published_gb']:>11.2f}{r['plan_28'] / gib / r['published_gb']:>16.2f}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--only", default=",".join(SETUPS), help="comma-separated setups of " + ", ".join(SETUPS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--dryrun", action="store_true", help="the 6B YAMLs: plan vs MindSpore's DryRun peak vs published")
    ap.add_argument("--dryrun-layers", default="", help="layer counts compiled (default: 1,2 full, 4,5 LoRA)")
    ap.add_argument("--dryrun-only", default="", help="comma-separated runs: full fine-tune, LoRA")
    a = ap.parse_args(argv)
    if a.dryrun:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        counts = tuple(int(x) for x in a.dryrun_layers.split(",")) if a.dryrun_layers else None
        only = [x.strip() for x in a.dryrun_only.split(",")] if a.dryrun_only else None
        print_dryrun(dryrun_rows(counts, root, only))
        return 0
    if a.child:
        print(json.dumps(measure(a.child, a.layers, a.hidden, a.vocab, a.batch, a.seq)))
        return 0
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(x for x in (root, os.environ.get("PYTHONPATH", "")) if x),
               GLOG_v="3", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    config = config_for(a.layers, a.hidden, a.vocab)
    print(f"model: {a.layers} layers x {a.hidden} (ffn {config.ffn_hidden_size}, vocab {a.vocab}), float32, "
          f"batch {a.batch} x seq {a.seq}; growth of peak RSS over one training update")
    print(f"{'setup':<12}{'predicted MiB':>15}{'measured MiB':>14}{'plan/measured':>15}   plan parts (MiB)")
    rows, worst = [], 0.0
    for setup in a.only.split(","):
        args = [sys.executable, os.path.abspath(__file__), "--child", setup, "--layers", str(a.layers), "--hidden",
                str(a.hidden), "--vocab", str(a.vocab), "--batch", str(a.batch), "--seq", str(a.seq)]
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            print(f"{setup:<12} failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        m = json.loads(r.stdout.strip().splitlines()[-1])
        p = predicted(setup, config, a.batch, a.seq)
        ratio = p["bytes"] / m["measured"]
        worst = max(worst, abs(ratio - 1))
        parts = ", ".join(f"{k} {v / 2 ** 20:.0f}" for k, v in p["parts"].items())
        print(f"{setup:<12}{p['bytes'] / 2 ** 20:>15.0f}{m['measured'] / 2 ** 20:>14.0f}{ratio:>15.2f}   {parts}",
              flush=True)
        rows.append({"setup": setup, "predicted_bytes": p["bytes"], "measured_bytes": m["measured"], "ratio": ratio})
    print(f"largest deviation: {worst:.0%} (target <= 25%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
