"""Rows/s of the official train features next to raw SentencePiece encoding of the same text.

    python bench/bench_data.py [--data tests/fixtures/data/adgen/train.json] [--tokenizer MODEL] [--repeat 20]

Ours: ``load_samples`` already done, then ``build_train_features(mode="official", 64, 128)`` (prompt
building, encoding, truncation, padding, labels). Raw: ``SentencePieceProcessor.encode`` of the
contents and of the summaries (two batched calls, no prompt, no arrays). Also shown: a per-row loop
in the style of the public reference preprocessing (one ``encode`` per prompt and per answer, lists
padded in Python). Target: ours >= 0.5 x raw.
"""
from __future__ import annotations

import argparse
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]

from glm_common.data import build_train_features, load_samples  # noqa: E402
from glm_common.tokenizer import ChatGLM2Tokenizer  # noqa: E402


def per_row_reference(samples, tok, S=64, T=128):
    """The shape of the public preprocessing: one encode per text, python lists."""
    out_ids, out_labels = [], []
    L = S + T + 1
    for s in samples:
        prompt = tok.build_prompt(s.query(), s.history())
        a = tok.encode(prompt, add_special_tokens=True)[:S]
        b = tok.encode(s.answer, add_special_tokens=False)[:T]
        ids = a + b + [tok.eos_token_id]
        labels = [tok.pad_token_id] * len(a) + b + [tok.eos_token_id]
        pad = L - len(ids)
        ids += [tok.pad_token_id] * pad
        labels += [tok.pad_token_id] * pad
        out_ids.append(ids)
        out_labels.append([x if x != tok.pad_token_id else -100 for x in labels])
    return out_ids, out_labels


def best_rates(fns: dict, n_rows: int, repeat: int) -> dict:
    """rows/s of each function: best of ``repeat`` runs, the functions interleaved so that they share
    whatever load the machine has."""
    best = {k: float("inf") for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: n_rows / v for k, v in best.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(ROOT / "tests/fixtures/data/adgen/train.json"))
    p.add_argument("--tokenizer", default=str(ROOT / "tests/fixtures/tokenizer/tiny_glm2_sp.model"))
    p.add_argument("--repeat", type=int, default=30)
    args = p.parse_args()
    tok = ChatGLM2Tokenizer.from_pretrained(args.tokenizer)
    samples = load_samples(args.data)
    n = len(samples)
    queries = [s.query() for s in samples]
    answers = [s.answer for s in samples]
    sp = tok.sp_model

    def raw():
        sp.encode(queries)
        sp.encode(answers)

    rates = best_rates({"ours": lambda: build_train_features(samples, tok, "official", 64, 128), "raw": raw,
                        "ref": lambda: per_row_reference(samples, tok)}, n, args.repeat)
    ours, rawr, ref = rates["ours"], rates["raw"], rates["ref"]
    print(f"{args.data}: {n} rows, best of {args.repeat} runs")
    print(f"  raw sentencepiece encode      {rawr:12,.0f} rows/s")
    print(f"  official features (ours)      {ours:12,.0f} rows/s   ratio {ours / rawr:.2f} x raw (target >= 0.50)")
    print(f"  per-row reference-style loop  {ref:12,.0f} rows/s   ratio {ref / rawr:.2f} x raw")


if __name__ == "__main__":
    main()
