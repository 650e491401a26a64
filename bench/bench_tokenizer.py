"""Tokenizer throughput on the ADGEN sample: ChatGLM2Tokenizer vs raw SentencePiece, side by side.

Per row, ours does what a fine-tuning preprocessor does: build_prompt(content) + encode(prompt) with
[gMASK, sop] + encode(summary) without specials. Raw SentencePiece encodes the same two strings (the
prompt text already built) and nothing else: the machine's limit for this work.

    python bench/bench_tokenizer.py [--repeat 20] [--data tests/fixtures/data/adgen/train.json]
Target (issue): ours >= 0.5x raw SentencePiece.
"""
import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import sentencepiece as spm  # noqa: E402

from glm_common.tokenizer import ChatGLM2Tokenizer  # noqa: E402

MODEL = os.path.join(ROOT, "tests", "fixtures", "tokenizer", "tiny_glm2_sp.model")
DATA = os.path.join(ROOT, "tests", "fixtures", "data", "adgen", "train.json")


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20, help="timed passes over the data; the best is kept")
    ap.add_argument("--data", default=DATA)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)

    rows = [json.loads(line) for line in open(args.data, encoding="utf-8") if line.strip()]
    tok = ChatGLM2Tokenizer(MODEL)
    sp = spm.SentencePieceProcessor(model_file=MODEL)
    prompts = [tok.build_prompt(r["content"]) for r in rows]
    answers = [r["summary"] for r in rows]

    def raw():
        for p, a in zip(prompts, answers):
            sp.encode(p)
            sp.encode(a)

    def ours_per_row():
        for r in rows:
            tok.encode(tok.build_prompt(r["content"]))
            tok.encode(r["summary"], add_special_tokens=False)

    def ours_batched():
        tok.encode_batch([tok.build_prompt(r["content"]) for r in rows])
        tok.encode_batch([r["summary"] for r in rows], add_special_tokens=False)

    # identical ids: the comparison is of the same work
    assert [tok.encode(p)[2:] for p in prompts] == [sp.encode(p) for p in prompts]
    best_of(raw, 2), best_of(ours_per_row, 2)  # warm-up
    t_raw = best_of(raw, args.repeat)
    t_row = best_of(ours_per_row, args.repeat)
    t_batch = best_of(ours_batched, args.repeat)
    n = len(rows)
    result = {
        "rows": n, "machine": f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}",
        "raw_rows_per_s": n / t_raw, "ours_rows_per_s": n / t_row, "ours_batched_rows_per_s": n / t_batch,
        "ratio_per_row": t_raw / t_row, "ratio_batched": t_raw / t_batch, "target": 0.5,
    }
    print(f"tokenizer throughput, ADGEN sample ({n} rows, best of {args.repeat}), {result['machine']}")
    print(f"  raw sentencepiece (2 encodes/row)        {result['raw_rows_per_s']:>10.0f} rows/s   1.00x")
    print(f"  ChatGLM2Tokenizer prompt+encode per row  {result['ours_rows_per_s']:>10.0f} rows/s   "
          f"{result['ratio_per_row']:.2f}x")
    print(f"  ChatGLM2Tokenizer encode_batch           {result['ours_batched_rows_per_s']:>10.0f} rows/s   "
          f"{result['ratio_batched']:.2f}x")
    ok = result["ratio_per_row"] >= result["target"]
    print(f"  target >= {result['target']:.2f}x of raw: {'met' if ok else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
