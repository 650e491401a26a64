"""MindSpore ChatGLM2 on CPU beside torch_glm, same config, same weights, same inputs.

Measures
- training: forward + backward tokens/s (MindSpore: one ``mindspore.jit`` graph of value_and_grad;
  torch: eager ``loss.backward()``), ratio MindSpore / torch (target >= 0.8);
- cached decoding: greedy tokens/s after the prompt, at 16 and 512 tokens of context; the per-token
  time at 512 over that at 16 (target <= 1.5) and the ratio against torch.

Each backend runs in its own process (their thread pools never share one), alone, one after the
other, and the pair is repeated ``--passes`` times (A B A B) so that a load change on a shared
machine shows as a difference between passes. Both wall time and the process's CPU time are
reported; the CPU-time ratio is the steadier one where other work shares the cores.

Run: ``.venv/bin/python bench/bench_mindspore.py [--layers 4 --hidden 256 --batch 4 --seq 128]``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm_common.config import ChatGLM2Config  # noqa: E402


def small_config(layers: int, hidden: int) -> ChatGLM2Config:
    heads = hidden // 32
    return ChatGLM2Config.from_dict(dict(
        num_layers=layers, hidden_size=hidden, ffn_hidden_size=int(hidden * 8 / 3) // 8 * 8,
        num_attention_heads=heads, kv_channels=32, multi_query_attention=True, multi_query_group_num=2,
        padded_vocab_size=4096, seq_length=1024, add_qkv_bias=True, add_bias_linear=False,
        torch_dtype="float32"), source="bench")


def write_weights(cfg, weights_dir):
    """Random weights (normal, std 0.02; norms 1) as an HF directory both sides load."""
    from safetensors.numpy import save_file
    from glm_common.names import hf_param_shapes
    rng = np.random.default_rng(0)
    tensors = {n: (np.ones(s, np.float32) if n.endswith("layernorm.weight") else
                   rng.normal(0, 0.02, s).astype(np.float32)) for n, s in hf_param_shapes(cfg).items()}
    save_file(tensors, os.path.join(weights_dir, "model.safetensors"))
    cfg.save_hf(weights_dir)


def decode_time(make_iter) -> tuple:
    """(wall, CPU) seconds per token of the decode steps of one run (prefill and first step excluded)."""
    it = make_iter()
    next(it)          # prefill
    next(it)          # first decode step
    n, t, c = 0, time.perf_counter(), time.process_time()
    for _ in it:
        n += 1
    return (time.perf_counter() - t) / max(n, 1), (time.process_time() - c) / max(n, 1)


def _ms_worker(weights_dir, ids, prompts, new_tokens):
    import mindspore as ms
    from mindspore import Tensor
    from mindspore_glm import ChatGLM2ForConditionalGeneration
    ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(weights_dir)
    params = model.trainable_params()

    def loss_fn(input_ids, labels):
        return model(input_ids, None, None, labels)[0]

    step = ms.jit(ms.value_and_grad(loss_fn, None, params))
    args = (Tensor(ids), Tensor(ids))
    tasks = {"train": lambda: float(step(*args)[0].asnumpy())}
    for ctx, prompt in prompts.items():
        tasks[f"decode {ctx}"] = (lambda p=prompt: model.stream_generate(p, max_new_tokens=new_tokens, eos_token_id=[]))
    return tasks


def _torch_worker(weights_dir, ids, prompts, new_tokens):
    import torch
    from torch_glm import ChatGLM2ForConditionalGeneration
    model = ChatGLM2ForConditionalGeneration.from_pretrained(weights_dir)
    model.train(False)
    tids = torch.from_numpy(ids.astype(np.int64))
    never = model.config.padded_vocab_size + 7     # an eos id that never comes: every step runs

    def train():
        model.zero_grad(set_to_none=True)
        out = model(input_ids=tids, labels=tids)
        loss = out[0] if isinstance(out, tuple) else getattr(out, "loss", out)
        loss.backward()
        return float(loss.detach())

    def decode(prompt):
        with torch.no_grad():
            yield from model.stream_generate(torch.from_numpy(prompt), max_new_tokens=new_tokens, eos_token_id=never)

    tasks = {"train": train}
    for ctx, prompt in prompts.items():
        tasks[f"decode {ctx}"] = (lambda p=prompt: decode(p))
    return tasks


def _serve(side, conn, *args):
    """Worker process: build the side's tasks, then answer task names with measured seconds."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        tasks = (_ms_worker if side == "mindspore" else _torch_worker)(*args)
        conn.send("ready")
    except Exception as e:  # report, do not hang the parent
        conn.send(f"error: {type(e).__name__}: {e}")
        return
    while True:
        name = conn.recv()
        if name is None:
            return
        t, c = time.perf_counter(), time.process_time()
        if name.startswith("decode"):
            conn.send(decode_time(tasks[name]))
        else:
            tasks[name]()
            conn.send((time.perf_counter() - t, time.process_time() - c))


class Side:
    """One backend in its own process (so neither runtime's threads slow the other)."""

    def __init__(self, side, *args):
        import multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(side, child) + args, daemon=True)
        self.proc.start()
        self.status = self.conn.recv()

    def __call__(self, name):
        self.conn.send(name)
        return self.conn.recv()

    def close(self):
        self.conn.send(None)
        self.proc.join(timeout=30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--no-torch", action="store_true")
    a = ap.parse_args(argv)
    cfg = small_config(a.layers, a.hidden)
    contexts = (16, 512)
    tokens = a.batch * a.seq
    print(f"config: {a.layers} layers, hidden {a.hidden}, {cfg.num_attention_heads} heads x {cfg.kv_channels}, "
          f"{cfg.kv_groups} kv groups, ffn {cfg.ffn_hidden_size}, vocab {cfg.padded_vocab_size}; "
          f"train batch {a.batch} x {a.seq}; decode {a.new_tokens} new tokens, batch 1")
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.padded_vocab_size, (a.batch, a.seq)).astype(np.int32)
    prompts = {ctx: rng.integers(5, cfg.padded_vocab_size, (1, ctx)) for ctx in contexts}
    names = ["train"] + [f"decode {c}" for c in contexts]
    order = ["mindspore"] + ([] if a.no_torch else ["torch"])
    times = {}
    compile_s = None
    with tempfile.TemporaryDirectory() as d:
        write_weights(cfg, d)
        # each backend alone in its own process, one after the other, the pair repeated `passes` times
        # (A B A B): a load change on the shared machine shows up as a difference between passes
        for _ in range(a.passes):
            for s in list(order):
                side = Side(s, d, ids, prompts, a.new_tokens)
                if side.status != "ready":
                    if s == "mindspore":
                        raise SystemExit(f"mindspore side failed: {side.status}")
                    print(f"{s} side unavailable ({side.status}); no ratios")
                    order.remove(s)
                    continue
                t0 = time.perf_counter()
                side("train")
                if s == "mindspore" and compile_s is None:
                    compile_s = time.perf_counter() - t0
                for n in names[1:]:           # warm-up (graph compiles)
                    side(n)
                for _ in range(a.repeat):
                    for n in names:
                        times.setdefault((s, n), []).append(side(n))
                side.close()
    sides = order
    print("wall = elapsed seconds (what a user waits; inflated by other load on a shared machine); "
          "cpu = CPU seconds of the backend's process (all its threads)")
    for kind, i in (("wall", 0), ("cpu", 1)):
        res = {k: float(np.median([x[i] for x in v])) for k, v in times.items()}
        for s in sides:
            v = res[(s, "train")]
            extra = f", first call with graph compile {compile_s:.1f} s" if s == "mindspore" and i == 0 else ""
            per_pass = np.array([x[i] for x in times[(s, "train")]]).reshape(a.passes, a.repeat)
            spread = ", per pass " + " / ".join(f"{np.median(r) * 1e3:.0f}" for r in per_pass) + " ms"
            print(f"[{kind}] {s:10s} train fwd+bwd: {tokens / v:9.0f} tokens/s  ({v * 1e3:.1f} ms/step{spread}{extra})")
            for ctx in contexts:
                v = res[(s, f"decode {ctx}")]
                print(f"[{kind}] {s:10s} decode ctx {ctx:4d}: {1 / v:7.1f} tokens/s  ({v * 1e3:.2f} ms/token)")
            print(f"[{kind}] {s:10s} decode per-token time, ctx 512 / ctx 16: "
                  f"{res[(s, 'decode 512')] / res[(s, 'decode 16')]:.2f}x (target <= 1.5)")
        if "torch" in sides:
            print(f"[{kind}] ratio mindspore/torch train tokens/s: "
                  f"{res[('torch', 'train')] / res[('mindspore', 'train')]:.2f}x (target >= 0.8)")
            for ctx in contexts:
                print(f"[{kind}] ratio mindspore/torch decode tokens/s at ctx {ctx}: "
                      f"{res[('torch', f'decode {ctx}')] / res[('mindspore', f'decode {ctx}')]:.2f}x")


if __name__ == "__main__":
    main()
