"""Compare the PyTorch and the MindSpore ChatGLM2 on the same weights and the same inputs.

    python scripts/parity.py --hf-dir DIR [--ms-ckpt FILE] [--prompts FILE] [--inputs FILE.npz]
        [--torch-device cpu|cuda] [--torch-dtype fp32|fp16|bf16] [--ms-dtype fp32|fp16|bf16]
        [--generate N] [--dump FILE.npz] [--report FILE.json] [--atol X]

Both backends run one forward pass over a left-padded batch (logits ``[B, S, V]``) and ``N`` greedy
decoding steps with their KV caches. The report compares the logits where ``attention_mask`` is 1 and
the greedy tokens; it exits 0 when every check holds, 1 when one fails (the failing metric is named),
2 on bad arguments or unreadable inputs (one line on stderr).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
from typing import Optional

import numpy as np

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}

#: default ``--atol`` on the logits (max absolute difference over the unmasked positions), by the less
#: precise of the two dtypes. float32: the issue's bound (the tiny golden model measures ~3e-6).
#: float16 / bfloat16: one half-precision rounding of a logit of magnitude ~10-30 is already 1e-2 /
#: 6e-2 (ulp/2 at 16-32: float16 2^-7 = 7.8e-3, bfloat16 2^-4 = 6.2e-2), and every layer adds its
#: own; the bounds leave room for ~28 layers of such errors. Measured on the tiny golden model
#: (CPU): fp16 vs fp32 6e-3, bf16 vs fp32 6e-2 (see tests/parity/test_parity_forward.py).
DEFAULT_ATOL = {"float32": 1e-4, "float16": 5e-2, "bfloat16": 2.5e-1}
#: the fraction of unmasked positions whose top-1 token must agree in half precision (float32: all
#: positions whose top-1 margin exceeds 2 * atol).
HALF_TOP1 = 0.99

DEFAULT_PROMPTS = [
    "你好",
    "类型#上衣*材质#牛仔布*颜色#白色*风格#简约*图案#刺绣*衣样式#外套*衣款式#破洞",
    "Write a short poem about the sea.",
]

EPILOG = """\
memory planning (full-size ChatGLM2-6B, 6.2e9 parameters):
  The backends run one after the other. torch loads (one tensor at a time into the model), runs the
  forward pass and the greedy steps, and only its logits [B, S, 65024] (float32) and tokens are kept;
  the model is then deleted and garbage-collected (and the CUDA cache emptied) before MindSpore loads.
  Peak host memory is therefore the larger of the two phases, not their sum:
    torch on cuda:            ~2 GB host (weights stream to the GPU; 12.5 GB GPU memory in fp16)
    torch on cpu, fp32/fp16:  ~25 / ~12.5 GB
    MindSpore on cpu, fp32:   ~25 GB of parameters + the checkpoint being read (12.5 GB for an fp16
                              .ckpt) = ~40 GB;  fp16: ~25 GB
  so a 128 GiB host suffices with room to spare (64 GiB too). Without --ms-ckpt the HF weights are
  converted first, streaming, into a temporary .ckpt (about the size of the HF weights: 12.5 GB for
  the fp16 release) under $TMPDIR, deleted at exit. Logits take B * S * 65024 * 4 bytes per backend
  (3 prompts of 40 tokens: 31 MB).

checks (exit 1 when one fails):
  max |logit diff| <= atol (default by the less precise dtype: fp32 1e-4, fp16 5e-2, bf16 2.5e-1);
  top-1: fp32, every position whose torch top-1 margin exceeds 2*atol agrees; half precision, at
  least 99% of the positions agree; greedy tokens: fp32, all N steps agree (half precision: reported).

example (the built-in tiny model, written with its tokenizer):
  python -m convert.hf_layout tiny --out /tmp/tiny_glm2
  python scripts/parity.py --hf-dir /tmp/tiny_glm2 --generate 8 --report /tmp/parity.json
"""


class ParityError(ValueError):
    """Bad arguments or unreadable inputs; the message is one line naming the file or option."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python scripts/parity.py", description=__doc__.split("\n\n")[0].strip() + ".",
                 epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF ChatGLM2 directory (config.json + weights; tokenizer.model "
                    "for prompts)")
    ap.add_argument("--ms-ckpt", help="MindSpore .ckpt of the same model (default: convert --hf-dir on the fly)")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--prompts", help="text file, one chat prompt a line (build_prompt, left padding)")
    src.add_argument("--inputs", help=".npz with input_ids [B, S] and optional attention_mask, position_ids")
    ap.add_argument("--torch-device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--torch-dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--ms-dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--ms-device", default="cpu", choices=("cpu", "ascend"), help="MindSpore device (default cpu)")
    ap.add_argument("--generate", type=int, default=8, metavar="N", help="greedy steps to compare (default 8; 0: none)")
    ap.add_argument("--dump", metavar="FILE.npz", help="save torch_logits and ms_logits (float32) and the inputs")
    ap.add_argument("--report", metavar="FILE.json", help="write the report as JSON")
    ap.add_argument("--atol", type=float, help="max |logit diff| allowed (default by dtype, see below)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


# ---------------------------------------------------------------------------------------- inputs
def _int_array(data, key: str, where: str) -> np.ndarray:
    a = np.asarray(data[key])
    if a.dtype.kind not in "iu":
        raise ParityError(f"{where}: {key}: expected integers, got {a.dtype}")
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0:
        raise ParityError(f"{where}: {key}: expected shape [B, S], got {list(a.shape)}")
    return a.astype(np.int64)


def load_npz_inputs(path: str, vocab_size: int) -> dict:
    """``input_ids [B, S]`` and optional ``attention_mask`` / ``position_ids`` (same shape) from an npz."""
    if not os.path.isfile(path):
        raise ParityError(f"{path}: no such file (--inputs)")
    try:
        data = np.load(path)
    except Exception as e:
        raise ParityError(f"{path}: not a readable .npz file ({type(e).__name__})") from None
    if "input_ids" not in data:
        raise ParityError(f"{path}: input_ids: missing (keys: {', '.join(sorted(data.files)) or 'none'})")
    ids = _int_array(data, "input_ids", path)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ParityError(f"{path}: input_ids: ids must lie in [0, {vocab_size}), got {ids.min()}..{ids.max()}")
    out = {"input_ids": ids}
    for key in ("attention_mask", "position_ids"):
        if key in data:
            a = _int_array(data, key, path)
            if a.shape != ids.shape:
                raise ParityError(f"{path}: {key}: shape {list(a.shape)} differs from input_ids {list(ids.shape)}")
            out[key] = a
    mask = out.setdefault("attention_mask", np.ones_like(ids))
    if not set(np.unique(mask).tolist()) <= {0, 1} or (mask.sum(1) == 0).any():
        raise ParityError(f"{path}: attention_mask: expected 0/1 with at least one 1 a row")
    if "position_ids" not in out:
        out["position_ids"] = np.maximum(np.cumsum(mask, 1) - 1, 0)
    return out


def load_prompts(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise ParityError(f"{path}: no such file (--prompts)")
    with open(path, encoding="utf-8") as f:
        prompts = [line.rstrip("\n") for line in f]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise ParityError(f"{path}: no prompts (one a line expected)")
    return prompts


def encode_prompts(hf_dir: str, prompts: list[str], source: str) -> dict:
    from glm_common.prompt import build_prompt
    from glm_common.tokenizer import ChatGLM2Tokenizer
    if not os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
        raise ParityError(f"{os.path.join(hf_dir, 'tokenizer.model')}: no such file (the {source} need the "
                          f"tokenizer; give --inputs FILE.npz instead)")
    tok = ChatGLM2Tokenizer.from_pretrained(hf_dir)
    return tok([build_prompt(p) for p in prompts], padding=True, return_tensors="np")


# ---------------------------------------------------------------------------------------- backends
def run_torch(hf_dir: str, inputs: dict, dtype: str, device: str, steps: int) -> dict:
    """Load, forward, greedy-generate; returns float32 logits ``[B, S, V]``, tokens ``[B, N]`` and timings.
    The model is freed before returning."""
    import torch
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    if device == "cuda" and not torch.cuda.is_available():
        raise ParityError("--torch-device cuda: no CUDA device is available to torch")
    t0 = time.perf_counter()
    model = ChatGLM2ForConditionalGeneration.from_pretrained(hf_dir, torch_dtype=DTYPES[dtype], device=device)
    model.eval()
    out = {"load_s": time.perf_counter() - t0}
    ids, mask, pos = (torch.as_tensor(inputs[k], device=device) for k in ("input_ids", "attention_mask", "position_ids"))
    try:
        with torch.no_grad():
            t0 = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            out["logits"] = logits.float().cpu().numpy()
            out["forward_s"] = time.perf_counter() - t0
            del logits
            t0 = time.perf_counter()
            if steps:
                gen = model.generate(ids, attention_mask=mask, position_ids=pos, max_new_tokens=steps, eos_token_id=-1)
                out["tokens"] = gen[:, ids.shape[1]:].cpu().numpy()
            else:
                out["tokens"] = np.zeros((ids.shape[0], 0), np.int64)
            out["generate_s"] = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return out


def run_mindspore(ckpt: str, hf_dir: str, inputs: dict, dtype: str, device: str, steps: int) -> dict:
    """Load the .ckpt, forward, greedy-generate (compiled prefill/decode graphs); float32 logits, tokens, timings."""
    import mindspore as ms
    from glm_common.config import ChatGLM2Config
    from mindspore_glm import ChatGLM2ForConditionalGeneration
    ms.set_context(mode=ms.PYNATIVE_MODE)
    target = "CPU" if device == "cpu" else "Ascend"
    if ms.get_context("device_target") != target:
        ms.set_device(target)
    config = ChatGLM2Config.from_hf(hf_dir)
    name = DTYPES[dtype]
    t0 = time.perf_counter()
    model = ChatGLM2ForConditionalGeneration.from_pretrained(ckpt, config=config, param_init_type=name,
                                                             compute_dtype=name)
    model.set_train(False)
    out = {"load_s": time.perf_counter() - t0}
    ids, mask, pos = (ms.Tensor(inputs[k].astype(np.int32)) for k in ("input_ids", "attention_mask", "position_ids"))
    try:
        t0 = time.perf_counter()
        logits = model(ids, mask, pos)
        out["logits"] = ms.ops.cast(logits, ms.float32).asnumpy()
        out["forward_s"] = time.perf_counter() - t0
        del logits
        t0 = time.perf_counter()
        if steps:
            gen = model.generate(inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                 position_ids=inputs["position_ids"], max_new_tokens=steps, eos_token_id=[])
            out["tokens"] = np.asarray(gen[:, inputs["input_ids"].shape[1]:], np.int64)
        else:
            out["tokens"] = np.zeros((inputs["input_ids"].shape[0], 0), np.int64)
        out["generate_s"] = time.perf_counter() - t0
    finally:
        del model
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------- metrics
def compare(torch_logits: np.ndarray, ms_logits: np.ndarray, mask: np.ndarray, torch_tokens: np.ndarray,
            ms_tokens: np.ndarray, atol: float) -> dict:
    """Metrics over the positions where ``mask`` is 1: logits ``[B, S, V]``, tokens ``[B, N]``."""
    keep = mask.astype(bool)
    a = torch_logits[keep].astype(np.float64)       # [T, V]
    b = ms_logits[keep].astype(np.float64)
    diff = np.abs(a - b)
    cos = (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)
    top_a, top_b = a.argmax(-1), b.argmax(-1)
    two = np.sort(a, axis=-1)[:, -2:]
    margin = two[:, 1] - two[:, 0]
    decisive = margin > 2 * atol
    n_steps = torch_tokens.shape[1]
    same = torch_tokens == ms_tokens
    first = [int(np.argmin(row)) if not row.all() else n_steps for row in same]
    return {
        "positions": int(keep.sum()),
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "top1_agreement": float((top_a == top_b).mean()),
        "top1_decisive_positions": int(decisive.sum()),
        "top1_decisive_agreement": float((top_a == top_b)[decisive].mean()) if decisive.any() else 1.0,
        "greedy_steps": int(n_steps),
        "greedy_agreement": float(same.mean()) if same.size else 1.0,
        "greedy_first_difference": first,
    }


def checks(metrics: dict, atol: float, half: bool) -> dict:
    """``{name: {"value", "limit", "ok"}}``; the run fails when one is not ok."""
    out = {"max_abs_diff": {"value": metrics["max_abs_diff"], "limit": f"<= {atol:g}",
                            "ok": metrics["max_abs_diff"] <= atol}}
    if half:
        out["top1_agreement"] = {"value": metrics["top1_agreement"], "limit": f">= {HALF_TOP1:g}",
                                 "ok": metrics["top1_agreement"] >= HALF_TOP1}
    else:
        out["top1_agreement"] = {"value": metrics["top1_decisive_agreement"],
                                 "limit": f"= 1 where margin > {2 * atol:g}",
                                 "ok": metrics["top1_decisive_agreement"] == 1.0}
        if metrics["greedy_steps"]:
            out["greedy_agreement"] = {"value": metrics["greedy_agreement"], "limit": "= 1",
                                       "ok": metrics["greedy_agreement"] == 1.0}
    return out


def format_table(report: dict) -> str:
    m, c, t, s = report["metrics"], report["checks"], report["torch"], report["mindspore"]

    def row(name, value, key=None):
        chk = c.get(key) if key else None
        limit = chk["limit"] if chk else ""
        ok = ("ok" if chk["ok"] else "FAIL") if chk else ""
        return f"{name:<22}{value:<30}{limit:<26}{ok}".rstrip()

    inp = report["inputs"]
    lines = [
        f"parity: torch ({t['device']}, {t['dtype']}) vs MindSpore ({s['device']}, {s['dtype']}); "
        f"batch {inp['batch']} x {inp['seq_len']} tokens, {m['positions']} positions compared, "
        f"{m['greedy_steps']} greedy steps",
        f"{'metric':<22}{'value':<30}{'limit':<26}check",
        row("max |logit diff|", f"{m['max_abs_diff']:.3e}", "max_abs_diff"),
        row("mean |logit diff|", f"{m['mean_abs_diff']:.3e}"),
        row("cosine (min / mean)", f"{m['min_cosine']:.7f} / {m['mean_cosine']:.7f}"),
        row("top-1 agreement", f"{100 * m['top1_agreement']:.2f}% (decisive "
            f"{100 * m['top1_decisive_agreement']:.2f}%)", "top1_agreement"),
        row("greedy agreement", f"{100 * m['greedy_agreement']:.2f}% "
            f"({round(m['greedy_agreement'] * m['greedy_steps'] * inp['batch'])}/{m['greedy_steps'] * inp['batch']})",
            "greedy_agreement"),
    ]
    ms_times = (f"convert {s['convert_s']:.2f} s, " if s.get("convert_s") is not None else "")
    lines.append(row("torch time", f"load {t['load_s']:.2f} s, forward {t['forward_s']:.3f} s, "
                                   f"generate {t['generate_s']:.3f} s"))
    lines.append(row("MindSpore time", f"{ms_times}load {s['load_s']:.2f} s, forward {s['forward_s']:.3f} s, "
                                       f"generate {s['generate_s']:.3f} s"))
    failed = [k for k, v in c.items() if not v["ok"]]
    lines.append("result: PASS" if not failed else "result: FAIL (" + ", ".join(
        f"{k} {c[k]['value']:.6g} not {c[k]['limit']}" for k in failed) + ")")
    return "\n".join(lines)


def _write_atomic(path: str, write) -> None:
    from glm_common.fsutil import atomic_path
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with atomic_path(path, os.path.splitext(path)[1]) as tmp:
        write(tmp)


# ---------------------------------------------------------------------------------------- main
def run(args) -> dict:
    from glm_common.config import ChatGLM2Config
    hf_dir = args.hf_dir
    if not os.path.isfile(os.path.join(hf_dir, "config.json")):
        raise ParityError(f"{hf_dir}: not an HF ChatGLM2 directory (no config.json) (--hf-dir)")
    if args.ms_ckpt and not os.path.isfile(args.ms_ckpt):
        raise ParityError(f"{args.ms_ckpt}: no such file (--ms-ckpt)")
    if args.generate < 0:
        raise ParityError(f"--generate: expected a number >= 0, got {args.generate}")
    if args.atol is not None and not (args.atol > 0 and math.isfinite(args.atol)):
        raise ParityError(f"--atol: expected a positive number, got {args.atol}")
    config = ChatGLM2Config.from_hf(hf_dir)
    if args.inputs:
        inputs = load_npz_inputs(args.inputs, config.padded_vocab_size)
    else:
        prompts = load_prompts(args.prompts) if args.prompts else DEFAULT_PROMPTS
        inputs = encode_prompts(hf_dir, prompts, "--prompts" if args.prompts else "default prompts")
    need = int(inputs["position_ids"].max()) + args.generate + 1
    if need > config.seq_length:
        raise ParityError(f"--generate: positions up to {need} exceed seq_length {config.seq_length} of "
                          f"{os.path.join(hf_dir, 'config.json')}")
    less_precise = max((DTYPES[args.torch_dtype], DTYPES[args.ms_dtype]), key=lambda d: DEFAULT_ATOL[d])
    atol = args.atol if args.atol is not None else DEFAULT_ATOL[less_precise]

    # torch first: keep only its logits and tokens, free the model, then MindSpore
    pt = run_torch(hf_dir, inputs, args.torch_dtype, args.torch_device, args.generate)
    convert_s = None
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        ckpt = args.ms_ckpt
        if not ckpt:
            from convert.hf_to_ms import convert_hf_to_ms
            t0 = time.perf_counter()
            ckpt = os.path.join(tmp, "model.ckpt")
            convert_hf_to_ms(hf_dir, ckpt, progress=not args.no_progress)
            convert_s = time.perf_counter() - t0
        msr = run_mindspore(ckpt, hf_dir, inputs, args.ms_dtype, args.ms_device, args.generate)
    if pt["logits"].shape != msr["logits"].shape:
        raise ParityError(f"{args.ms_ckpt or hf_dir}: MindSpore logits {list(msr['logits'].shape)} differ in shape "
                          f"from torch's {list(pt['logits'].shape)}")
    metrics = compare(pt["logits"], msr["logits"], inputs["attention_mask"], pt["tokens"], msr["tokens"], atol)
    report = {
        "hf_dir": os.path.abspath(hf_dir), "ms_ckpt": os.path.abspath(args.ms_ckpt) if args.ms_ckpt else None,
        "inputs": {"source": args.inputs or args.prompts or "default prompts",
                   "batch": int(inputs["input_ids"].shape[0]), "seq_len": int(inputs["input_ids"].shape[1])},
        "torch": {"device": args.torch_device, "dtype": args.torch_dtype,
                  **{k: pt[k] for k in ("load_s", "forward_s", "generate_s")}},
        "mindspore": {"device": args.ms_device, "dtype": args.ms_dtype, "convert_s": convert_s,
                      **{k: msr[k] for k in ("load_s", "forward_s", "generate_s")}},
        "atol": atol, "metrics": metrics, "checks": checks(metrics, atol, less_precise != "float32"),
        "torch_tokens": pt["tokens"].tolist(), "ms_tokens": msr["tokens"].tolist(),
    }
    report["ok"] = all(v["ok"] for v in report["checks"].values())
    if args.dump:
        def dump(path):
            with open(path, "wb") as f:
                np.savez(f, torch_logits=pt["logits"].astype(np.float32), ms_logits=msr["logits"].astype(np.float32),
                         torch_tokens=pt["tokens"], ms_tokens=msr["tokens"], **inputs)
        _write_atomic(args.dump, dump)
    if args.report:
        def write_report(path):
            with open(path, "w", encoding="utf-8") as f:
                f.write(json.dumps(report, indent=2) + "\n")
        _write_atomic(args.report, write_report)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GLOG_v", "3")
    try:
        report = run(args)
    except ParityError as e:
        print(f"parity.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # loader / converter errors are one line naming file and parameter
        from convert._cli import KNOWN_ERRORS
        if isinstance(e, KNOWN_ERRORS) or type(e).__name__ in ("WeightError", "ConfigError",
                                                              "TokenizerError"):
            print(f"parity.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
            return 2
        raise
    print(format_table(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
