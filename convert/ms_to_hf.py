"""Convert a MindSpore ChatGLM2 checkpoint to a complete HF directory, one tensor at a time.

    python convert/ms_to_hf.py --ckpt glm2_6b.ckpt --config chatglm2-6b/config.json --output out_dir
        [--dtype keep|fp32|fp16|bf16] [--max-shard-size 2GB] [--format safetensors|bin]
        [--tokenizer tokenizer.model]

Accepts mindformers names (``embedding_weight`` or the legacy ``embedding_table``), the concat and the
split layouts (``wq/wk/wv`` are stacked back into ``query_key_value [np*hn + 2*g*hn, H]``,
``dense_left/dense_right`` into ``dense_h_to_4h [2F, H]``), and training checkpoints: optimizer
state and training-loop scalars (``glm_common.names.is_train_state``: ``adam_m.*``, ``adam_v.*``,
``global_step``, ``loss_scale_good_steps`` ...) and kv-cache buffers are skipped. Every weight is
checked against the config (a ``config.json``, its directory, or a mindformers YAML with
``model.model_config``). The directory gets ``config.json``, the weight shards (with their index when
sharded) and, with ``--tokenizer``, ``tokenizer.model`` + ``tokenizer_config.json``; it is assembled in
``<output>.partial`` and moved into place only when complete.

Memory: one shard (``--max-shard-size``) at most; with ``--format safetensors`` and no shard limit the
whole model is one file, so keep the default limit for 6B.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Iterator, Optional

import numpy as np

from convert._cli import DTYPE_CHOICES, ConversionError, Progress, cast, out_dtype_name, run_main
from convert.hf_layout import parse_size, remove_stale_weights, write_hf_checkpoint
from convert.ms_ckpt import MSCheckpoint
from convert.safetensors_io import SafetensorsFile, numpy_dtype, output_error
from convert.tensor_checks import check_cast, check_dtype, check_finite
from glm_common import names as N
from glm_common.config import ChatGLM2Config, ConfigError
from glm_common.fsutil import atomic_dir, check_output
from glm_common.cli import one_line_errors

__all__ = ["load_config", "open_ms_checkpoint", "plan_ms_to_hf", "convert_ms_to_hf", "main"]


def open_ms_checkpoint(path: str):
    """A ``.ckpt`` (:class:`MSCheckpoint`) or MindSpore ``.safetensors`` file, read lazily."""
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return MSCheckpoint(path)


def load_config(path: str) -> ChatGLM2Config:
    """An HF ``config.json`` (or its directory) or a mindformers YAML (``model.model_config``)."""
    if path.endswith((".yaml", ".yml")):
        from glm_common.run_config import load_yaml
        if not os.path.isfile(path):
            raise ConfigError(f"{path}: no such file")
        data = load_yaml(path, ConfigError)
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "model_config" in data["model"]:
            return ChatGLM2Config.from_model_config(data["model"]["model_config"], source=f"{path}: model.model_config")[0]
        if isinstance(data, dict) and "model_config" in data:
            return ChatGLM2Config.from_model_config(data["model_config"], source=f"{path}: model_config")[0]
        raise ConfigError(f"{path}: model.model_config: missing (expected a mindformers run YAML)")
    return ChatGLM2Config.from_hf(path)


_SPLIT = re.compile(r"\.(wq|wk|wv|dense_left|dense_right)\.")
_JOIN = {"wq": ("query_key_value", 0), "wk": ("query_key_value", 1), "wv": ("query_key_value", 2),
         "dense_left": ("dense_h_to_4h", 0), "dense_right": ("dense_h_to_4h", 1)}


def plan_ms_to_hf(ckpt, config: ChatGLM2Config, config_source: str, allow_extra: bool = False
                  ) -> tuple[dict[str, list[str]], dict]:
    """Map the checkpoint onto HF names: ``({hf_name: [ms names stacked in order]}, notes)``, in HF order.

    Raises :class:`ConversionError` (file and parameter named) on unknown names unless ``allow_extra``,
    on shapes contradicting ``config``, on a split layout with a part missing, and on missing weights.
    """
    expected = N.hf_param_shapes(config)
    parts: dict[str, dict[int, str]] = {}
    notes = {"derived": 0, "optimizer": 0, "extra": []}
    split: set[str] = set()
    for name in ckpt.names:
        if N.is_derived_buffer(name):
            notes["derived"] += 1
            continue
        if N.is_train_state(name):
            notes["optimizer"] += 1
            continue
        m = _SPLIT.search(name)
        slot = 0
        joined = name
        if m:
            fused, slot = _JOIN[m.group(1)]
            joined = name[:m.start()] + f".{fused}." + name[m.end():]
        hf = N.ms_to_hf(joined)
        if hf not in expected:
            if "mindpet_delta_lora" in name:
                raise ConversionError(f"{ckpt.path}: {name}: LoRA weight in a base checkpoint (merge it with "
                                      f"convert/adapters.py merge, or export it with convert/adapters.py ms-to-peft)")
            if not allow_extra:
                raise ConversionError(f"{ckpt.path}: {name}: unknown parameter for the config in {config_source} "
                                      f"(--allow-extra copies it unchanged)")
            notes["extra"].append(name)
            parts[name] = {0: name}
            continue
        if m:
            split.add(hf)
        if slot in parts.setdefault(hf, {}):
            raise ConversionError(f"{ckpt.path}: {name}: holds the same weight as {parts[hf][slot]}")
        parts[hf][slot] = name
    plan: dict[str, list[str]] = {}
    for hf, shape in expected.items():
        if hf not in parts:
            if hf.startswith("transformer.prefix_encoder."):
                continue
            missing = [n for n in expected if n not in parts and not n.startswith("transformer.prefix_encoder.")]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise ConversionError(f"{ckpt.path}: {N.hf_to_ms(hf)}: missing, but {config_source} needs it{more}")
        slots = parts[hf]
        need = 1 if hf not in split else (3 if ".query_key_value." in hf else 2)
        if len(slots) != need or sorted(slots) != list(range(need)):
            have = ", ".join(slots[s] for s in sorted(slots))
            raise ConversionError(f"{ckpt.path}: {hf}: split layout incomplete (found {have})")
        names = [slots[s] for s in range(need)]
        rows = 0
        for n in names:
            s, dt = ckpt.info(n)
            check_dtype(n, dt, ckpt.path)
            if tuple(s[1:]) != shape[1:] or (need == 1 and tuple(s) != shape):
                raise ConversionError(f"{ckpt.path}: {n}: shape {list(s)} contradicts {config_source} "
                                      f"(expected {list(shape)} for {hf})")
            rows += s[0] if s else 1
        if need > 1:
            if rows != shape[0]:
                raise ConversionError(f"{ckpt.path}: {', '.join(names)}: {rows} rows together, {config_source} "
                                      f"gives {hf} {shape[0]}")
            sizes = [ckpt.info(n)[0][0] for n in names]
            want = ([config.projection_size] + [config.kv_groups * config.kv_channels] * 2
                    if need == 3 else [config.ffn_hidden_size] * 2)
            if sizes != want:
                raise ConversionError(f"{ckpt.path}: {', '.join(names)}: rows {sizes} contradict {config_source} "
                                      f"(expected {want})")
        plan[hf] = names
    for name in notes["extra"]:
        plan[name] = [name]
    return plan, notes


def _tensors(ckpt, plan: dict[str, list[str]], dtype: str, bar: Progress, extra=(),
             allow_nonfinite: bool = False) -> Iterator[tuple[str, np.ndarray]]:
    for hf, ms_names in plan.items():
        arrays = [ckpt.read(n) for n in ms_names]
        checked = hf not in extra
        bad = sum(check_finite(n, a, ckpt.path, allow_nonfinite) for n, a in zip(ms_names, arrays)) if checked else 0
        array = arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)
        del arrays
        out = cast(array, dtype)
        if checked:
            check_cast(ms_names[0] if len(ms_names) == 1 else hf, array, out, ckpt.path, bad)
        array = out
        bar.update(array)
        yield hf, array


def convert_ms_to_hf(ckpt_path: str, config: str, output: str, dtype: str = "keep",
                     max_shard_size: Optional[str] = "2GB", fmt: str = "safetensors",
                     tokenizer: Optional[str] = None, allow_extra: bool = False, progress: bool = True,
                     overwrite: bool = False, allow_nonfinite: bool = False) -> dict:
    """Write the HF directory ``output`` from ``ckpt_path``; return a summary (``line``, ``files`` ...).

    ``output`` must not be, hold or lie inside an input; an existing non-empty ``output`` is refused unless
    ``overwrite`` (then the files this converter writes are replaced and the others are left alone)."""
    if dtype not in DTYPE_CHOICES:
        raise ConversionError(f"dtype: expected one of {', '.join(DTYPE_CHOICES)}, got {dtype!r}")
    if fmt not in ("safetensors", "bin"):
        raise ConversionError(f"format: expected safetensors or bin, got {fmt!r}")
    if str(max_shard_size).strip().lower() in ("none", ""):
        limit = None
    else:
        limit = parse_size(max_shard_size)
        if limit is None or limit <= 0:
            raise ConversionError(f"max-shard-size: expected a positive size such as 2GB or 'none', "
                                  f"got {max_shard_size!r}")
    check_output(output, [ckpt_path, config, tokenizer], "--output", overwrite=overwrite)
    cfg = load_config(config)
    if tokenizer is not None and not os.path.isfile(tokenizer):
        raise ConversionError(f"{tokenizer}: no such file (expected a SentencePiece tokenizer.model)")
    ckpt = open_ms_checkpoint(ckpt_path)
    plan, notes = plan_ms_to_hf(ckpt, cfg, config, allow_extra)
    total = sum(int(np.prod(ckpt.info(n)[0], dtype=np.int64)) * numpy_dtype(ckpt.info(n)[1]).itemsize
                for ns in plan.values() for n in ns)
    if limit is not None and total <= limit:
        limit = None  # as transformers does: one file, no index, when everything fits in one shard
    output = os.path.abspath(output)
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConversionError(f"{output}: exists and is not a directory")
    try:
        os.makedirs(os.path.dirname(output), exist_ok=True)
    except OSError as e:
        raise output_error(output, e) from None
    bar = Progress(total, "ms_to_hf", enabled=progress)
    try:
        # written beside ``output`` and moved in when complete; other files already in ``output`` stay, stale
        # weight files of another layout are removed by write_hf_checkpoint
        with atomic_dir(output, merge=True) as stage:
            files = write_hf_checkpoint(_tensors(ckpt, plan, dtype, bar, set(notes["extra"]), allow_nonfinite), stage, fmt=fmt, max_shard_size=limit)
            out_dtype = out_dtype_name(dtype) or _main_float_dtype(bar.dtypes) or cfg.torch_dtype
            cfg.torch_dtype = out_dtype
            cfg.save_hf(stage)
            if tokenizer is not None:
                from glm_common.tokenizer import ChatGLM2Tokenizer
                ChatGLM2Tokenizer(tokenizer).save_pretrained(stage)
        remove_stale_weights(output, files)
    finally:
        bar.close()
    extra = [f"{len(files)} weight files"]
    if notes["optimizer"]:
        extra.append(f"skipped {notes['optimizer']} optimizer-state entries")
    if notes["derived"]:
        extra.append(f"skipped {notes['derived']} buffers")
    if notes["extra"]:
        extra.append(f"copied {len(notes['extra'])} extra tensors")
    return {"tensors": bar.tensors, "bytes": bar.bytes, "dtypes": dict(bar.dtypes), "output": output,
            "files": sorted(os.listdir(output)), "notes": notes, "line": bar.summary("ms_to_hf", output, "; ".join(extra))}


def _main_float_dtype(counts: dict[str, int]) -> Optional[str]:
    floats = {k: v for k, v in counts.items() if k in ("float32", "float16", "bfloat16")}
    return max(floats, key=floats.get) if floats else None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python convert/ms_to_hf.py",
        description="Convert a MindSpore ChatGLM2 checkpoint (.ckpt or MindSpore .safetensors; mindformers names, "
                    "concat or split qkv/mlp layout, training checkpoints with optimizer state) to a complete HF "
                    "directory that transformers tooling and torch_glm load.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="MindSpore checkpoint: FILE.ckpt or FILE.safetensors")
    ap.add_argument("--config", required=True,
                    help="the architecture: an HF config.json (or its directory) or a mindformers run YAML with "
                         "model.model_config; every weight is checked against it and it is written as config.json")
    ap.add_argument("--output", required=True,
                    help="HF directory to write (created; must not hold or be an input)")
    ap.add_argument("--overwrite", action="store_true",
                    help="write into a non-empty --output: replaces the weight files, index, config.json and "
                         "tokenizer files this converter writes, leaves every other file")
    ap.add_argument("--dtype", default="keep", choices=DTYPE_CHOICES,
                    help="dtype of the saved floating-point tensors (config.json torch_dtype follows); keep: as stored")
    ap.add_argument("--max-shard-size", default="2GB",
                    help="largest shard, e.g. 2GB, 500MB, 10GB (decimal units as HF); 'none' writes a single file")
    ap.add_argument("--format", default="safetensors", choices=("safetensors", "bin"),
                    help="safetensors: model*.safetensors; bin: pytorch_model*.bin (torch.save)")
    ap.add_argument("--tokenizer", default=None,
                    help="SentencePiece tokenizer.model to put beside the weights (with tokenizer_config.json)")
    ap.add_argument("--allow-extra", action="store_true",
                    help="copy tensors the config does not know, unchanged, instead of stopping with an error")
    ap.add_argument("--allow-nonfinite", action="store_true",
                    help="convert weights holding NaN/Inf instead of stopping with an error naming the tensor")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (the summary line is printed)")
    return ap


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_main(lambda: convert_ms_to_hf(args.ckpt, args.config, args.output, args.dtype, args.max_shard_size,
                                               args.format, args.tokenizer, args.allow_extra, progress=not args.no_progress,
                                               overwrite=args.overwrite, allow_nonfinite=args.allow_nonfinite))


if __name__ == "__main__":
    sys.exit(main())
