"""Convert an HF ChatGLM2 checkpoint directory to a MindSpore checkpoint, one tensor at a time.

    python convert/hf_to_ms.py --hf-dir chatglm2-6b --output glm2_6b.ckpt [--dtype fp16]
        [--naming mindformers|legacy] [--qkv concat|split] [--mlp concat|split] [--format ckpt|safetensors]

Reads every HF layout (``model.safetensors``, sharded safetensors, sharded or single ``pytorch_model*.bin``)
without building a model: safetensors tensors are read one by one from the file, ``.bin`` shards are
memory-mapped. A tensor kept in its dtype is copied by the kernel from the input file to the output
(``os.copy_file_range``, as ``cp`` does); a cast one is read, cast and written, and the pages of the
mapping are dropped once written. Peak memory is about the largest tensor when casting (the
65024 x 4096 embedding: 0.5 GB in fp16), well under that otherwise; never the model.

Names follow mindformers (``transformer.embedding.embedding_weight``; ``--naming legacy`` gives the older
``embedding_table``). ``--qkv split`` writes ``query_key_value`` ``[np*hn + 2*g*hn, H]`` as
``wq [np*hn, H]``, ``wk [g*hn, H]``, ``wv [g*hn, H]`` (mindformers ``qkv_concat: False``); ``--mlp split``
writes ``dense_h_to_4h [2F, H]`` as ``dense_left [F, H]`` (first half) and ``dense_right [F, H]``
(``mlp_concat: False``). Biases are split the same way.

The output is written to ``<output>.partial`` and renamed when complete; on any error nothing is left.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from convert._cli import DTYPE_CHOICES, ConversionError, Progress, cast, run_main
from convert.hf_layout import HFCheckpoint
from convert.ms_ckpt import CheckpointWriter
from convert.safetensors_io import NP_DTYPES, SafetensorsWriter, numpy_dtype
from convert.tensor_checks import check_cast, check_dtype, check_file_range, check_finite
from glm_common import names as N
from glm_common.config import ChatGLM2Config
from glm_common.fsutil import check_output
from glm_common.cli import one_line_errors

__all__ = ["plan_hf_to_ms", "convert_hf_to_ms", "main", "Piece"]


@dataclass
class Piece:
    """One output tensor: ``rows`` of the HF tensor ``source`` (``None``: all of it) saved as ``name``."""

    name: str
    source: str
    rows: Optional[tuple[int, int]]
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name of the output (float32 / float16 / bfloat16 ...)


def _describe(name: str, ckpt: HFCheckpoint) -> str:
    return f"{ckpt.file_of(name)}: {name}"


def plan_hf_to_ms(ckpt: HFCheckpoint, config: ChatGLM2Config, config_source: str, naming: str = "mindformers",
                  qkv: str = "concat", mlp: str = "concat", dtype: str = "keep",
                  allow_extra: bool = False) -> tuple[list[Piece], dict]:
    """Check every tensor of ``ckpt`` against ``config`` (names and shapes) and list the output tensors.

    Returns ``(pieces, notes)``, pieces in the order the input is read (shard by shard); notes count
    skipped derived buffers and extra tensors. Raises :class:`ConversionError` naming the file and
    parameter on an unknown name (unless ``allow_extra``), a shape that contradicts ``config`` or a
    missing weight.
    """
    if naming not in N.NAMINGS:
        raise ConversionError(f"naming: expected one of {', '.join(N.NAMINGS)}, got {naming!r}")
    for opt, val in (("qkv", qkv), ("mlp", mlp)):
        if val not in ("concat", "split"):
            raise ConversionError(f"{opt}: expected concat or split, got {val!r}")
    expected = N.hf_param_shapes(config)
    q_rows, kv_rows, F = config.projection_size, config.kv_groups * config.kv_channels, config.ffn_hidden_size
    by_shard: dict[str, list[str]] = {}
    for name, shard in ckpt.weight_map.items():
        by_shard.setdefault(shard, []).append(name)
    pieces: list[Piece] = []
    notes = {"derived": 0, "extra": []}
    seen = set()
    for shard_names in by_shard.values():
        for name in shard_names:
            if N.is_derived_buffer(name):
                notes["derived"] += 1
                continue
            shape, src_dtype = ckpt.info(name)
            out_dtype = src_dtype if dtype == "keep" or src_dtype not in NP_DTYPES.values() else NP_DTYPES[dtype]
            if name not in expected:
                if not allow_extra:
                    raise ConversionError(f"{_describe(name, ckpt)}: unknown parameter for the config in "
                                          f"{config_source} (--allow-extra copies it unchanged)")
                notes["extra"].append(name)
                pieces.append(Piece(N.hf_to_ms(name, naming), name, None, tuple(shape), out_dtype))
                continue
            check_dtype(name, src_dtype, ckpt.file_of(name))
            if tuple(shape) != expected[name]:
                raise ConversionError(f"{_describe(name, ckpt)}: shape {list(shape)} contradicts {config_source} "
                                      f"(expected {list(expected[name])})")
            seen.add(name)
            ms_name = N.hf_to_ms(name, naming)
            rest = tuple(shape[1:])
            if qkv == "split" and ".query_key_value." in name:
                bounds = ((0, q_rows), (q_rows, q_rows + kv_rows), (q_rows + kv_rows, q_rows + 2 * kv_rows))
                for part, (a, b) in zip(N.split_qkv_names(ms_name), bounds):
                    pieces.append(Piece(part, name, (a, b), (b - a,) + rest, out_dtype))
            elif mlp == "split" and ".mlp.dense_h_to_4h." in name:
                for part, (a, b) in zip(N.split_mlp_names(ms_name), ((0, F), (F, 2 * F))):
                    pieces.append(Piece(part, name, (a, b), (b - a,) + rest, out_dtype))
            else:
                pieces.append(Piece(ms_name, name, None, tuple(shape), out_dtype))
    missing = [n for n in expected if n not in seen and not n.startswith("transformer.prefix_encoder.")]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{ckpt.path}: {missing[0]}: missing, but {config_source} needs it{more}")
    return pieces, notes


def convert_hf_to_ms(hf_dir: str, output: str, dtype: str = "keep", naming: str = "mindformers",
                     qkv: str = "concat", mlp: str = "concat", fmt: Optional[str] = None,
                     config: Optional[str] = None, allow_extra: bool = False, progress: bool = True,
                     allow_nonfinite: bool = False, overwrite: bool = False) -> dict:
    """Convert ``hf_dir`` to ``output`` (``.ckpt``, or MindSpore safetensors with ``fmt="safetensors"``).

    Every weight is checked on the way (:mod:`convert.tensor_checks`): a float dtype, finite values (unless
    ``allow_nonfinite``), and a cast that keeps every value in range.

    Returns a summary: ``tensors``, ``bytes``, ``dtypes``, ``seconds``, ``output``, ``line``.
    """
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    fmt = fmt or ("safetensors" if output.endswith(".safetensors") else "ckpt")
    if fmt not in ("ckpt", "safetensors"):
        raise ConversionError(f"format: expected ckpt or safetensors, got {fmt!r}")
    config_source = config or os.path.join(hf_dir, "config.json")
    if not os.path.isdir(hf_dir):
        raise ConversionError(f"{hf_dir}: not a directory (expected an HF ChatGLM2 directory)")
    check_output(output, [hf_dir, config_source], "--output", overwrite=overwrite)
    cfg = ChatGLM2Config.from_hf(config_source)
    ckpt = HFCheckpoint(hf_dir)
    pieces, notes = plan_hf_to_ms(ckpt, cfg, config_source, naming, qkv, mlp, dtype, allow_extra)

    total_in = sum(int(np.prod(ckpt.info(n)[0], dtype=np.int64)) * numpy_dtype(ckpt.info(n)[1]).itemsize
                   for n in dict.fromkeys(p.source for p in pieces))
    bar = Progress(total_in, "hf_to_ms", enabled=progress)
    if fmt == "ckpt":
        writer = CheckpointWriter(output)
    else:
        writer = SafetensorsWriter(output, [(p.name, p.shape, numpy_dtype(p.dtype)) for p in pieces],
                                   metadata={"format": "ms"})
    try:
        i = 0
        while i < len(pieces):
            source = pieces[i].source
            j = i
            while j < len(pieces) and pieces[j].source == source:
                j += 1
            group = pieces[i:j]
            src_shape, src_dtype = ckpt.info(source)
            where = ckpt.byte_range(source) if all(p.dtype == src_dtype for p in group) else None
            extra_tensor = source in notes["extra"]
            if where is not None:  # same dtype: the kernel copies the bytes (rows of a split are contiguous)
                file, offset, nbytes = where
                if not extra_tensor:
                    check_file_range(source, file, offset, nbytes, src_dtype, file, allow_nonfinite)
                row = nbytes // src_shape[0] if src_shape and src_shape[0] else nbytes
                for p in group:
                    start, count = (p.rows[0] * row, (p.rows[1] - p.rows[0]) * row) if p.rows else (0, nbytes)
                    writer.write_from_file(p.name, p.shape, numpy_dtype(p.dtype), file, offset + start, count)
                    bar.count(count, p.dtype)
            else:
                array = ckpt.read(source, copy=False)  # written straight from the file's bytes
                bad = 0 if extra_tensor else check_finite(source, array, ckpt.file_of(source), allow_nonfinite)
                ckpt.prefetch(source)                  # readahead of the whole tensor in large requests
                if j < len(pieces) and ckpt.file_of(pieces[j].source) == ckpt.file_of(source):
                    ckpt.prefetch(pieces[j].source)    # the next tensor is read while this one is written
                for p in group:
                    part = array if p.rows is None else array[p.rows[0]:p.rows[1]]
                    out = cast(part, dtype)
                    if not extra_tensor:
                        check_cast(source, part, out, ckpt.file_of(source), bad if p.rows is None else None)
                    part = out
                    writer.write(p.name, part)
                    bar.update(part)
                del array, part
                ckpt.release(source)
            i = j
        bar.close()
    except BaseException:
        bar.close()
        writer.abort()
        raise
    writer.close()
    extra = []
    if notes["derived"]:
        extra.append(f"skipped {notes['derived']} derived buffers")
    if notes["extra"]:
        extra.append(f"copied {len(notes['extra'])} extra tensors")
    line = bar.summary("hf_to_ms", output, "; ".join(extra))
    return {"tensors": bar.tensors, "bytes": bar.bytes, "dtypes": dict(bar.dtypes), "seconds": bar.close(),
            "output": output, "line": line, "notes": notes}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python convert/hf_to_ms.py",
        description="Convert an HF ChatGLM2 checkpoint directory (model.safetensors, sharded safetensors or "
                    "sharded pytorch_model-*.bin with their index) to a MindSpore checkpoint, one tensor at a "
                    "time (memory: about the largest tensor, not the model).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--hf-dir", required=True, help="HF directory holding config.json and the weights")
    ap.add_argument("--output", required=True,
                    help="MindSpore checkpoint to write (FILE.ckpt, or FILE.safetensors for --format safetensors); "
                         "written to FILE.partial and renamed when complete")
    ap.add_argument("--dtype", default="keep", choices=DTYPE_CHOICES,
                    help="dtype of the saved floating-point tensors; keep: as stored in the HF checkpoint")
    ap.add_argument("--naming", default="mindformers", choices=tuple(N.NAMINGS),
                    help="MindSpore parameter names: mindformers (embedding_weight) or legacy (embedding_table, "
                         "older mindformers releases)")
    ap.add_argument("--qkv", default="concat", choices=("concat", "split"),
                    help="concat: one query_key_value tensor (mindformers qkv_concat: True); split: wq/wk/wv "
                         "(qkv_concat: False)")
    ap.add_argument("--mlp", default="concat", choices=("concat", "split"),
                    help="concat: one dense_h_to_4h tensor (mlp_concat: True); split: dense_left/dense_right "
                         "(mlp_concat: False)")
    ap.add_argument("--format", default=None, choices=("ckpt", "safetensors"),
                    help="MindSpore .ckpt (protobuf) or the safetensors file mindspore.load_checkpoint(path, "
                         "format='safetensors') reads; default: from the --output extension")
    ap.add_argument("--config", default=None,
                    help="config.json to check names and shapes against (default: the one in --hf-dir)")
    ap.add_argument("--allow-extra", action="store_true",
                    help="copy tensors the config does not know, unchanged, instead of stopping with an error")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="convert weights holding NaN/Inf instead of stopping with an error naming the tensor")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file (refused otherwise)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is printed)")
    return ap


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: convert_hf_to_ms(args.hf_dir, args.output, args.dtype, args.naming, args.qkv, args.mlp,
                                               args.format, args.config, args.allow_extra, progress=not args.no_progress,
                                               allow_nonfinite=args.allow_nonfinite, overwrite=args.overwrite))


if __name__ == "__main__":
    sys.exit(main())
