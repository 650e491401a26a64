"""One forward + backward of a seeded ChatGLM2 sharded with FSDP2 (run it under torchrun).

Rank 0 writes ``grads.npz`` (every gradient gathered to full size) and ``probe.json`` (loss and
every rank's peak memory above what it held before the forward pass). ``--recompute`` turns on
per-block activation checkpointing as ``recompute_config.recompute`` does in a run YAML.
Used by tests/torch_glm/test_fsdp.py.

    torchrun --standalone --nproc_per_node 2 tests/torch_glm/fsdp_probe.py --out DIR [--recompute]
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.distributed as dist


def _resident(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.memory_allocated(device))
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def main(argv=None) -> int:
    from glm_common.config import ChatGLM2Config
    from glm_common.run_config import TrainSettings
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    from torch_glm.parallel import peak_memory_bytes, reset_peak_memory, shard_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--ffn", type=int, default=512)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=512)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    rank = dist.get_rank()
    device = args.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    tiny_model = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "fixtures", "model", "tiny_glm2")
    config = ChatGLM2Config.from_hf(tiny_model).replace(
        num_layers=args.layers, hidden_size=args.hidden, ffn_hidden_size=args.ffn, kv_channels=args.hidden // 4)
    s = TrainSettings(config=config)
    s.gradient_checkpointing = args.recompute
    s.compute_dtype = "float32"
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(config).to(device)
    model.train()
    shard_model(model, s, device)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, config.padded_vocab_size, (args.batch, args.seq), generator=g).to(device)
    reset_peak_memory(device)
    before = _resident(device)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    peak = peak_memory_bytes(device) - before  # what the forward + backward added
    grads = {}
    for n, p in model.named_parameters():
        full = p.grad.full_tensor()
        if rank == 0:
            grads[n] = full.float().cpu().numpy()
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        np.savez(os.path.join(args.out, "grads.npz"), **grads)
        with open(os.path.join(args.out, "probe.json"), "w") as f:
            json.dump({"loss": loss.item(), "peak_bytes": peaks}, f)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    rc = main()
    # everything is written and the process group destroyed: leave without running the C++ destructors,
    # where a gloo worker thread still joinable at interpreter teardown aborts the rank ("terminate called
    # without an active exception", seen once under a parallel test run)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)
