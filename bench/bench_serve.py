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

Then, per backend, the time to first token of a chat's fifth turn (its prompt holds the four turns
before it, answers of ``--tokens`` tokens) with ``--prefix-cache`` (turns 1-4 served first, so their
keys/values are kept) against without, round by round; ``N streams`` with every request asking for ``repetition_penalty``, ``presence_penalty``,
``frequency_penalty``, ``top_k`` and 5 ``logprobs`` against plain requests (the cost of those settings),
and, torch only, ``--quantize 8`` and ``4`` against float32 in the same process, round by round: tokens/s
ratio, the transformer layers' bytes ratio, and quality on the prompt (max |logit error| / logit std,
greedy next-token agreement over the prompt's positions).

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


SETTINGS = dict(repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5, top_k=40, logprobs=5)


def _layer_bytes(model) -> int:
    layers = model.transformer.encoder.layers
    return sum(t.numel() * t.element_size() for t in [*layers.parameters(), *layers.buffers()])


def worker(backend_name: str, folder: str, tokens: int, streams: int, rounds: int, device: str = "cpu") -> dict:
    from glm_serve.backends import load_backend
    from glm_serve.protocol import ChatRequest
    from glm_serve.scheduler import Scheduler
    b = load_backend(backend_name, folder, TOKENIZER, device=device)
    never = -1                                          # no end-of-sequence: every answer has `tokens` tokens
    sched = Scheduler(b.decoder(streams), b.tokenizer, b.settings_cls, b.seq_length, [never]).start()
    ids = b.tokenizer.encode(PROMPT)
    quantized = {}
    if backend_name == "torch":
        import torch
        with torch.no_grad():
            want = b.model(input_ids=torch.tensor([ids])).logits
        for bits in (8, 4):
            qb = load_backend("torch", folder, TOKENIZER, quantize=bits)
            with torch.no_grad():
                got = qb.model(input_ids=torch.tensor([ids])).logits
            quantized[bits] = dict(
                sched=Scheduler(qb.decoder(streams), qb.tokenizer, qb.settings_cls, qb.seq_length, [never]).start(),
                bytes=_layer_bytes(qb.model) / _layer_bytes(b.model),
                err=float((got - want).abs().max() / want.std()),
                agree=float((got.argmax(-1) == want.argmax(-1)).float().mean()))

    def through_scheduler(n, on=None, **settings):
        on = on or sched
        done = threading.Semaphore(0)
        counts = []

        def emit(event):
            if event[0] == "done":
                counts.append(event[2]["completion_tokens"])
                done.release()

        t = time.perf_counter()
        for _ in range(n):
            req = ChatRequest(prompt=PROMPT, chat=False, max_tokens=tokens, temperature=0, **settings)
            on.submit(on.prepare(req, emit))
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

    from glm_common.prompt import build_prompt
    cached = Scheduler(b.decoder(streams, 8), b.tokenizer, b.settings_cls, b.seq_length, [never]).start()

    def ask(on, prompt, n):
        """``(answer text, seconds to the first token)``"""
        first, parts, done = [], [], threading.Event()

        def emit(event):
            if not first:
                first.append(time.perf_counter())
            if event[0] == "text":
                parts.append(event[1])
            elif event[0] in ("done", "error"):
                done.set()

        t = time.perf_counter()
        on.submit(on.prepare(ChatRequest(prompt=prompt, chat=True, max_tokens=n, temperature=0), emit))
        done.wait()
        return "".join(parts), first[0] - t

    queries = ["类型#裙*版型#宽松*颜色#蓝色", "再写一条", "换个风格", "短一点", "最后一条"]
    history = []
    for q in queries[:-1]:
        history.append((q, ask(sched, build_prompt(q, history), tokens)[0]))
    turns = [build_prompt(q, history[:i]) for i, q in enumerate(queries)]

    def fifth_turn():
        cached.decoder.kept.clear()
        for prompt in turns[:-1]:
            ask(cached, prompt, tokens)
        with_cache = ask(cached, turns[-1], 1)[1]
        return with_cache, ask(sched, turns[-1], 1)[1]

    fifth_turn()
    through_scheduler(1), through_scheduler(streams), serial(1)           # warm-up (MindSpore: compiles)
    through_scheduler(streams, **SETTINGS)
    for q in quantized.values():
        through_scheduler(streams, q["sched"])
    rows = []
    for r in range(rounds):
        one = through_scheduler(1)
        many = through_scheduler(streams)
        ser = serial(streams)
        row = dict(one=one, many=many, serial=ser, settings=through_scheduler(streams, **SETTINGS))
        row["ttft_cached"], row["ttft_plain"] = fifth_turn()
        for bits, q in quantized.items():
            row[f"int{bits}"] = through_scheduler(streams, q["sched"])
        rows.append(row)
        print(f"  {backend_name} round {r + 1}/{rounds}: 1 stream {one:.1f} tok/s, {streams} streams "
              f"{many:.1f} tok/s, serial {ser:.1f} tok/s", file=sys.stderr, flush=True)
    sched.stop()
    cached.stop()
    for q in quantized.values():
        q.pop("sched").stop()
    return dict(rows=rows, prompt_tokens=len(ids), quantized={str(k): v for k, v in quantized.items()},
                fifth_prompt_tokens=len(b.tokenizer.encode(turns[-1])))


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
    print("\nTime to first token of a chat's 5th turn, with --prefix-cache vs without:")
    for name, res in results.items():
        rows = res["rows"]
        ratio = statistics.median(r["ttft_cached"] / r["ttft_plain"] for r in rows)
        print(f"{name:<10} {statistics.median(r['ttft_cached'] for r in rows) * 1e3:>8.1f} ms vs "
              f"{statistics.median(r['ttft_plain'] for r in rows) * 1e3:>8.1f} ms: {ratio:.2f}x "
              f"(prompt {res['fifth_prompt_tokens']} tokens)")
    print(f"\n{n} streams asking for {', '.join(f'{k}={v}' for k, v in SETTINGS.items())}, vs plain requests:")
    for name, res in results.items():
        ratio = statistics.median(r["settings"] / r["many"] for r in res["rows"])
        print(f"{name:<10} {ratio:>6.2f}x tokens/s")
    for name, res in results.items():
        if not res.get("quantized"):
            continue
        print(f"\n{name}: weight-only quantization vs float32 ({n} streams, same process, round by round):")
        print(f"{'weights':<8} {'tokens/s':>9} {'layer bytes':>12} {'logit err':>10} {'greedy agree':>13}")
        for bits, q in res["quantized"].items():
            ratio = statistics.median(r[f"int{bits}"] / r["many"] for r in res["rows"])
            print(f"{'int' + bits:<8} {ratio:>8.2f}x {q['bytes']:>11.2f}x {q['err']:>10.3f} {q['agree']:>12.1%}")
        print("(logit err: max |quantized - float32 logit| / std of the float32 logits over the prompt; greedy agree: "
              "positions whose argmax matches)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": args.device, "streams": n, "tokens": args.tokens, "backends": summary}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
