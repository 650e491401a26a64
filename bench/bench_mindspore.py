"""MindSpore ChatGLM2 on CPU beside torch_glm, same config, same weights, same inputs.

Measures
- training: forward + backward tokens/s. MindSpore: a GRAPH-mode cell returning the loss and the
  gradients of every weight, built like the runner's train step (``mindspore_glm.train``); torch: eager
  ``loss.backward()`` into ``.grad``. Target: MindSpore >= 0.8x torch;
- cached decoding: greedy tokens/s after the prompt, at 16 and 512 tokens of context; the per-token
  time at 512 over that at 16 (target <= 1.5) and the ratio against torch.

Each backend runs in its own process and both stay alive; every measurement alternates between them
round by round (A B, B A, ...; see ``bench/_sides.py``), so load from other tenants of a shared machine
hits both sides of a round alike. Ratios are medians of the per-round ratios, for wall time and for the
CPU time of each side's process.

Run: ``.venv/bin/python bench/bench_mindspore.py [--layers 4 --hidden 256 --batch 4 --seq 128]``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


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


def _ms_tasks(weights_dir, ids, prompts, new_tokens):
    import mindspore as ms
    from mindspore import ParameterTuple, Tensor, nn, ops
    from mindspore_glm import ChatGLM2ForConditionalGeneration
    from mindspore_glm.train_step import _LossCell
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = ChatGLM2ForConditionalGeneration.from_pretrained(weights_dir)

    class FwdBwd(nn.Cell):
        """The loss and the gradients of every weight, as the runner's TrainOneStepCell computes them."""

        def __init__(self):
            super().__init__(auto_prefix=False)
            self.network = _LossCell(model)
            self.weights = ParameterTuple(model.trainable_params())
            self.grad = ops.GradOperation(get_by_list=True)

        def construct(self, input_ids, labels):
            return self.network(input_ids, labels), self.grad(self.network, self.weights)(input_ids, labels)

    step = FwdBwd()
    x = Tensor(ids)
    tasks = {"train": lambda: float(step(x, x)[0].asnumpy())}
    for ctx, prompt in prompts.items():
        tasks[f"decode {ctx}"] = (lambda p=prompt: model.stream_generate(p, max_new_tokens=new_tokens, eos_token_id=[]))
    return tasks


def _torch_tasks(weights_dir, ids, prompts, new_tokens):
    import torch
    from torch_glm import ChatGLM2ForConditionalGeneration
    model = ChatGLM2ForConditionalGeneration.from_pretrained(weights_dir)
    model.train(False)
    tids = torch.from_numpy(ids.astype(np.int64))
    never = model.config.padded_vocab_size + 7     # an eos id that never comes: every step runs

    def train():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=tids, labels=tids).loss
        loss.backward()
        return float(loss.detach())

    def decode(prompt):
        with torch.no_grad():
            yield from model.stream_generate(torch.from_numpy(prompt), max_new_tokens=new_tokens, eos_token_id=never)

    tasks = {"train": train}
    for ctx, prompt in prompts.items():
        tasks[f"decode {ctx}"] = (lambda p=prompt: decode(p))
    return tasks


def main(argv=None):
    from _sides import Side, alternate, median, ratio
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds per measurement")
    ap.add_argument("--no-torch", action="store_true", help="MindSpore alone (no ratios)")
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
    with tempfile.TemporaryDirectory() as d:
        write_weights(cfg, d)
        sides = [Side("mindspore", _ms_tasks, d, ids, prompts, a.new_tokens)]
        if not sides[0].ready:
            raise SystemExit(f"mindspore side failed: {sides[0].status}")
        if not a.no_torch:
            t = Side("torch", _torch_tasks, d, ids, prompts, a.new_tokens)
            if t.ready:
                sides.append(t)
            else:
                print(f"torch side unavailable ({t.status}); no ratios")
        try:
            t0 = time.perf_counter()
            sides[0]("train")
            compile_s = time.perf_counter() - t0
            for s in sides:                     # warm-up: graph compiles, first calls
                for n in names:
                    s(n)
            times = {n: alternate(sides, n, a.rounds) for n in names}
            idle = {s.name: s.idle_cpu() for s in sides}
        finally:
            for s in sides:
                s.close()
    print(f"{a.rounds} rounds, the two sides called in turn (order reversed every other round); "
          "ratio = median over rounds; wall = elapsed time, cpu = CPU time of the side's process")
    both = len(sides) == 2
    hdr = f"{'':30s}{'MindSpore':>12s}{'torch':>12s}{'ms/torch wall':>15s}{'cpu':>7s}" if both else ""
    print(hdr or f"{'':30s}{'MindSpore':>12s}")
    rows = [("train fwd+bwd tokens/s", "train", tokens)] + \
        [(f"decode ctx {c} tokens/s", f"decode {c}", 1) for c in contexts]
    for label, n, per in rows:
        line = f"{label:30s}{per / median(times[n]['mindspore']):12.1f}"
        if both:
            line += (f"{per / median(times[n]['torch']):12.1f}{ratio(times[n], 'torch', 'mindspore'):15.2f}x"
                     f"{ratio(times[n], 'torch', 'mindspore', 1):6.2f}x")
        print(line)
    print(f"MindSpore train graph: first call (GRAPH compile) {compile_s:.1f} s, then "
          f"{median(times['train']['mindspore']) * 1e3:.1f} ms/step")
    for s in sides:
        slow = median(times["decode 512"][s.name]) / median(times["decode 16"][s.name])
        print(f"{s.name:10s} decode per-token time, ctx 512 / ctx 16: {slow:.2f}x (target <= 1.5: "
              f"{'met' if slow <= 1.5 else 'NOT met'})")
    if both:
        r = ratio(times["train"], "torch", "mindspore")
        print(f"MindSpore / torch training tokens/s: {r:.2f}x (target >= 0.8: {'met' if r >= 0.8 else 'NOT met'})")
    print("CPU used by a side while waiting for the other (a spinning thread pool would show here): " +
          ", ".join(f"{k} {v:.2f} s" for k, v in idle.items()))


if __name__ == "__main__":
    main()
