"""``python -m glm_common.data check|stats|features``: validate data files, length statistics, features.

    python -m glm_common.data check FILE [--format F]
    python -m glm_common.data stats FILE --tokenizer MODEL [--max-source-length 64 --max-target-length 128]
    python -m glm_common.data features FILE --tokenizer MODEL [--mode official|rounds]
                                       [--max-source-length N] [--max-target-length N] --out FILE.npz

``check`` prints every bad row as ``FILE:LINE: what is wrong`` and exits 1 when there is any.
``stats`` and ``features`` refuse bad rows unless ``--skip-bad-rows`` is given.
"""
from __future__ import annotations

import argparse
import os
import sys

from glm_common.data.features import MODES, build_train_features, length_stats, save_features
from glm_common.fsutil import check_output
from glm_common.data.formats import FORMATS, DataError, load_samples, read_samples
from glm_common.cli import one_line_errors


def _tokenizer(path):
    from glm_common.tokenizer import ChatGLM2Tokenizer
    return ChatGLM2Tokenizer.from_pretrained(path)


def cmd_check(args) -> int:
    total_bad = 0
    for path in args.files:
        samples, bad, fmt = read_samples(path, args.format)
        for b in bad:
            print(b)
        total_bad += len(bad)
        rounds = sum(len(s.rounds) for s in samples)
        print(f"{path}: format {fmt}, {len(samples)} good rows, {len(bad)} bad rows, {rounds} rounds")
    return 1 if total_bad else 0


def cmd_stats(args) -> int:
    samples = load_samples(args.files, args.format, on_error="skip" if args.skip_bad_rows else "raise",
                           skip_hint="pass --skip-bad-rows to drop them")
    st = length_stats(samples, _tokenizer(args.tokenizer), args.max_source_length, args.max_target_length)
    print(f"rows: {st['rows']}")
    for key in ("prompt_tokens", "answer_tokens", "total_tokens"):
        pct = "  ".join(f"p{p}={v}" for p, v in st[key].items()) or "n/a"
        print(f"{key}: {pct}")
    print(f"truncation (max_source_length {args.max_source_length}, max_target_length "
          f"{args.max_target_length}, length {st['max_length']}): {st['prompts_cut']} prompts cut, "
          f"{st['answers_cut']} answers cut, {st['rows_cut']} rows cut")
    return 0


def cmd_features(args) -> int:
    check_output(args.out, list(args.files) + [args.tokenizer], "--out", overwrite=args.overwrite)
    samples = load_samples(args.files, args.format, on_error="skip" if args.skip_bad_rows else "raise",
                           skip_hint="pass --skip-bad-rows to drop them")
    feats = build_train_features(samples, _tokenizer(args.tokenizer), args.mode, args.max_source_length,
                                 args.max_target_length, progress=True)
    out = args.out
    d = os.path.dirname(os.path.abspath(out))
    os.makedirs(d, exist_ok=True)
    save_features(out, feats, mode=args.mode, max_source_length=args.max_source_length,
                  max_target_length=args.max_target_length)
    n, L = feats["input_ids"].shape
    trained = int((feats["labels"] != -100).sum())
    print(f"{out}: {n} rows x {L} tokens (mode {args.mode}), {int(feats['lengths'].sum())} real tokens, "
          f"{trained} trained on")
    return 0


@one_line_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m glm_common.data",
                                description="Validate fine-tuning data files, print token-length statistics, write train features.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, tokenizer):
        sp.add_argument("files", nargs="+", metavar="FILE", help=".json/.jsonl (JSON Lines or a JSON array) or .txt")
        sp.add_argument("--format", choices=FORMATS, default=None, help="default: detect from the first row")
        if tokenizer:
            sp.add_argument("--tokenizer", required=True, help="tokenizer.model or a model directory")
            sp.add_argument("--max-source-length", type=int, default=64)
            sp.add_argument("--max-target-length", type=int, default=128)
            sp.add_argument("--skip-bad-rows", action="store_true", help="drop bad rows (their count is printed)")

    common(sub.add_parser("check", help="validate files and print a summary; exit 1 on bad rows"), False)
    common(sub.add_parser("stats", help="token-length percentiles and truncation counts"), True)
    f = sub.add_parser("features", help="write the input_ids/labels a run trains on to an .npz")
    common(f, True)
    f.add_argument("--mode", choices=MODES, default="official")
    f.add_argument("--out", required=True, help="output .npz")
    f.add_argument("--overwrite", action="store_true", help="replace an existing --out file (refused otherwise)")
    args = p.parse_args(argv)
    try:
        return {"check": cmd_check, "stats": cmd_stats, "features": cmd_features}[args.command](args)
    except (DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # an output that cannot be written (OutputError names it) or an unreadable input
        print(f"error: {e.filename}: {e.strerror}" if e.filename else f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
