"""Serving throughput with continuous batching, both backends on CPU, side by side in one run.

For each backend (each in its own process, one after the other, on the same random small ChatGLM2 saved
once as an HF directory) and each round, three measurements of aggregate decode throughput (answer
tokens per wall second, prefill included, the end-of-sequence token disabled so every answer has
``--tokens`` tokens):

* ``1 stream``: one request through the serving scheduler (``glm_serve.scheduler`` over the backend's
  ``BatchDecoder``);
* ``N streams``: ``--streams`` requests submitted together through the same scheduler (one batch);
* ``serial``: the same ``--streams`` requests answered one after another by the model's own
  ``generate`` (how the official ChatGLM2 demos serve).

Printed: tokens/s of each and the medians over rounds of the per-round ratios ``N streams / 1 stream``
and ``N streams / serial`` (ratios of measurements taken back to back, so a change of machine load
mostly cancels). MindSpore runs its compiled graphs; the first (warm-up) round compiles them.

    python bench/bench_serve.py [--tokens 64] [--streams 8] [--rounds 3] [--threads 2] [--backends torch,mindspore]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TOKENIZER = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tiny_glm2_sp.model")
#: small enough for a CPU, large enough that a decode step is matrix work rather than per-op overhead
SMALL = dict(num_layers=4, hidden_size=512, ffn_hidden_size=1376, num_attention_heads=8, kv_channels=64,
             multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=3072, seq_length=1024,
             add_qkv_bias=True, torch_dtype="float32")
PROMPT = "[Round 1]\n\n问：类型#裙*版型#宽松*颜色#蓝色*风格#清新\n\n答："


def make_model(folder: str) -> None:
    import torch

    from glm_common.config import ChatGLM2Config
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    torch.manual_seed(0)
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config(**SMALL))
    model.save_pretrained(folder)


def worker(backend_name: str, folder: str, tokens: int, streams: int, rounds: int, device: str = "cpu") -> dict:
    from glm_serve.backends import load_backend
    from glm_serve.protocol import ChatRequest
    from glm_serve.scheduler import Scheduler
    b = load_backend(backend_name, folder, TOKENIZER, device=device)
    never = -1                                          # no end-of-sequence: every answer has `tokens` tokens
    sched = Scheduler(b.decoder(streams), b.tokenizer, b.settings_cls, b.seq_length, [never]).start()
    ids = b.tokenizer.encode(PROMPT)

    def through_scheduler(n):
        done = threading.Semaphore(0)
        counts = []

        def emit(event):
            if event[0] == "done":
                counts.append(event[2]["completion_tokens"])
                done.release()

        t = time.perf_counter()
        for _ in range(n):
            req = ChatRequest(prompt=PROMPT, chat=False, max_tokens=tokens, temperature=0)
            sched.submit(sched.prepare(req, emit))
        for _ in range(n):
            done.acquire()
        return sum(counts) / (time.perf_counter() - t)

    def serial(n):
        import numpy as np
        total, t = 0, time.perf_counter()
        for _ in range(n):
            if backend_name == "torch":
                import torch
                out = b.model.generate(torch.tensor([ids], device=next(b.model.parameters()).device),
                                       max_new_tokens=tokens,
                                       eos_token_id=never)
            else:
                out = b.model.generate(np.array([ids]), max_new_tokens=tokens, eos_token_id=never)
            total += out.shape[1] - len(ids)
        return total / (time.perf_counter() - t)

    through_scheduler(1), through_scheduler(streams), serial(1)           # warm-up (MindSpore: compiles)
    rows = []
    for r in range(rounds):
        one = through_scheduler(1)
        many = through_scheduler(streams)
        ser = serial(streams)
        rows.append(dict(one=one, many=many, serial=ser))
        print(f"  {backend_name} round {r + 1}/{rounds}: 1 stream {one:.1f} tok/s, {streams} streams "
              f"{many:.1f} tok/s, serial {ser:.1f} tok/s", file=sys.stderr, flush=True)
    sched.stop()
    return dict(rows=rows, prompt_tokens=len(ids))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--tokens", type=int, default=64, help="answer tokens per request")
    ap.add_argument("--streams", type=int, default=8, help="concurrent requests")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads per backend")
    ap.add_argument("--backends", default="torch,mindspore")
    ap.add_argument("--device", default="cpu", help="the backends' device (torch: cpu, cuda; mindspore: cpu, ascend)")
    ap.add_argument("--json", metavar="FILE", help="also write the medians and ratios as JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        if args.worker == "torch":
            import torch
            torch.set_num_threads(args.threads)
        else:
            import mindspore as ms
            if args.device == "cpu":
                ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
        print(json.dumps(worker(args.worker, args.model, args.tokens, args.streams, args.rounds, args.device)))
        return 0
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as folder:
        make_model(folder)
        for name in args.backends.split(","):
            print(f"{name}: measuring ...", file=sys.stderr, flush=True)
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLOG_v": "3", "PYTHONPATH": ROOT}
            out = subprocess.run([sys.executable, __file__, "--worker", name, "--model", folder, "--tokens",
                                  str(args.tokens), "--streams", str(args.streams), "--rounds", str(args.rounds),
                                  "--threads", str(args.threads), "--device", args.device], capture_output=True, text=True, env=env)
            if out.returncode:
                print(out.stderr[-3000:], file=sys.stderr)
                return 1
            sys.stderr.write(out.stderr)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
    cfg = ", ".join(f"{k}={v}" for k, v in SMALL.items() if k in ("num_layers", "hidden_size", "ffn_hidden_size"))
    where = f"CPU ({args.threads} threads)" if args.device == "cpu" else args.device
    print(f"\nServing throughput, {where}, model {cfg}, {args.tokens} answer tokens per "
          f"request, {args.rounds} rounds (medians):")
    n = args.streams
    print(f"{'backend':<10} {'1 stream':>10} {f'{n} streams':>10} {'serial':>10} {f'{n}/1':>7} {f'{n}/serial':>9}")
    summary = {}
    for name, res in results.items():
        rows = res["rows"]
        med = {k: statistics.median(r[k] for r in rows) for k in ("one", "many", "serial")}
        r1 = statistics.median(r["many"] / r["one"] for r in rows)
        rs = statistics.median(r["many"] / r["serial"] for r in rows)
        summary[name] = {"tokens_per_s": med, f"{n}_streams_over_1": r1, f"{n}_streams_over_serial": rs}
        print(f"{name:<10} {med['one']:>10.1f} {med['many']:>10.1f} {med['serial']:>10.1f} {r1:>6.2f}x {rs:>8.2f}x")
    print("(tokens/s: answer tokens per wall second, all requests together; serial: one request after another "
          "through the model's own generate)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "streams": n, "tokens": args.tokens, "backends": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
