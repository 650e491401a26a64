"""The main job on the built-in tiny model and the ADGEN sample, step by step (``make demo``).

Each step prints one line: what it did and where its output is. A failing step stops the demo with
the step's name and a non-zero exit. Output goes to ``output/demo/`` (override with --out).
"""
import argparse
import os
import shutil
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("GLOG_v", "3")

FIXTURES = os.path.join(ROOT, "tests", "fixtures")
ADGEN = os.path.join(FIXTURES, "data", "adgen")

STEPS = []


def step(name):
    def register(fn):
        STEPS.append((name, fn))
        return fn
    return register


@step("write tiny HF checkpoint")
def write_checkpoint(ctx):
    from convert.hf_layout import HFCheckpoint, write_tiny_hf_dir
    out = os.path.join(ctx["out"], "tiny_glm2_hf")
    write_tiny_hf_dir(out, layout="sharded-bin")
    ckpt = HFCheckpoint(out)
    ctx["hf_dir"] = out
    return f"{len(ckpt.names)} tensors in {len(ckpt.shards)} .bin shards + index, tokenizer -> {out}"


@step("tokenize the ADGEN sample")
def tokenize(ctx):
    import json

    import numpy as np

    from glm_common.tokenizer import ChatGLM2Tokenizer
    tok = ChatGLM2Tokenizer.from_pretrained(ctx["hf_dir"])
    rows = [json.loads(line) for line in open(os.path.join(ADGEN, "train.json"), encoding="utf-8")]
    prompts = tok.encode_batch([tok.build_prompt(r["content"]) for r in rows])
    answers = tok.encode_batch([r["summary"] for r in rows], add_special_tokens=False)
    lengths = np.array([len(p) + len(a) + 1 for p, a in zip(prompts, answers)])
    ctx["tokenizer"] = tok
    return (f"{len(rows)} rows, tokens per row p50 {int(np.percentile(lengths, 50))} / p95 "
            f"{int(np.percentile(lengths, 95))} / max {lengths.max()}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "output", "demo"), help="output directory")
    args = ap.parse_args(argv)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    ctx = {"out": args.out}
    t_all = time.time()
    for i, (name, fn) in enumerate(STEPS, 1):
        t0 = time.time()
        try:
            what = fn(ctx)
        except Exception as e:  # the demo reports which step failed, then the traceback
            traceback.print_exc()
            print(f"[{i}/{len(STEPS)}] {name}: FAILED: {e}", file=sys.stderr)
            return 1
        print(f"[{i}/{len(STEPS)}] {name} ({time.time() - t0:.1f}s): {what}", flush=True)
    print(f"demo finished in {time.time() - t_all:.0f}s; outputs under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
