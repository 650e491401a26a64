"""Adapters between peft / HF and MindSpore (mindformers, mindpet): LoRA, P-tuning v2 prefixes, merging.

    python convert/adapters.py peft-to-ms   --adapter PEFT_DIR --output lora.ckpt [--pet-config pet.yaml]
    python convert/adapters.py ms-to-peft   --ckpt lora.ckpt --pet-config pet.yaml --output PEFT_DIR
    python convert/adapters.py prefix-to-ms --hf PTUNING_DIR_OR_FILE --output prefix.ckpt
    python convert/adapters.py ms-to-prefix --ckpt prefix.ckpt --output DIR [--config config.json]
    python convert/adapters.py merge        --base HF_DIR|base.ckpt [--adapter PEFT_DIR|lora.ckpt]
                                            [--pet-config pet.yaml] --output DIR|merged.ckpt

LoRA. A peft adapter directory holds ``adapter_config.json`` (``r``, ``lora_alpha``, ``lora_dropout``,
``target_modules``) and ``adapter_model.safetensors`` (or ``.bin``) with
``base_model.model.<module>.lora_A.weight [r, in]`` and ``...lora_B.weight [out, r]``. MindSpore keeps
the same matrices as ``<module>.mindpet_delta_lora_a`` / ``_b`` and the settings in mindformers'
``pet_config`` (``pet_type: lora``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``, ``target_modules``
as a regex such as ``'.*query_key_value*'``). Both scale ``B @ A`` by ``lora_alpha / r``.

P-tuning v2. ``transformer.prefix_encoder.embedding.weight [pre_seq_len, num_layers*2*g*hn]`` (and the
``trans.*`` projection when ``prefix_projection``) <-> mindpet's
``prefix_encoder.mindpet_delta_prefixtuning_embedding.embedding_table`` (and ``dense_in/dense_out``).

Merge. ``W' = W + (lora_alpha / r) * B @ A`` for every adapted linear layer, computed in float32 and
stored in ``W``'s dtype, one base tensor at a time; works on an HF directory (output: an HF directory,
or a ``.ckpt`` with mindformers names) or on a ``.ckpt`` (concat or split qkv/mlp layouts), with the
adapter from a peft directory, a LoRA ``.ckpt`` or the base ``.ckpt`` itself (a mindformers LoRA run
saves both). Every output is written to a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
from typing import Any, Mapping, Optional

import numpy as np

from convert._cli import DTYPE_CHOICES, KNOWN_ERRORS, ConversionError, Progress, cast, report_error
from convert.hf_layout import (HFCheckpoint, CheckpointError, parse_size, remove_stale_weights, save_safetensors,
                               torch_to_numpy, write_hf_checkpoint)
from convert.ms_ckpt import save_ms_checkpoint
from convert.ms_to_hf import open_ms_checkpoint
from convert.safetensors_io import format_mismatch, numpy_dtype, output_error, torch_load_refusal
from convert.tensor_checks import check_cast, check_dtype, check_finite
from glm_common import names as N
from glm_common.fsutil import atomic_dir, atomic_file, atomic_files, check_output
from glm_common.cli import one_line_errors

__all__ = ["LoraAdapter", "validate_lora", "check_lora_settings", "check_target_modules", "read_peft_adapter", "read_ms_lora", "write_peft_adapter", "write_ms_lora",
           "read_pet_config", "write_pet_config", "peft_targets_to_regex", "peft_to_ms", "ms_to_peft",
           "prefix_to_ms", "ms_to_prefix", "merge", "main"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
#: the linear layers of ChatGLM2 a LoRA can wrap (HF module leaf names).
CHATGLM2_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "output_layer")


class LoraAdapter:
    """A LoRA adapter in memory (adapters are small): ``pairs`` maps the HF module name
    (``transformer.encoder.layers.0.self_attention.query_key_value``) to ``(A [r, in], B [out, r])``."""

    def __init__(self, pairs: dict[str, tuple[np.ndarray, np.ndarray]], r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, source: str = "adapter"):
        self.pairs, self.r, self.alpha, self.dropout, self.use_rslora, self.source = (
            pairs, int(r), float(alpha), float(dropout), bool(use_rslora), source)
        for module, (a, b) in pairs.items():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != self.r or b.shape[1] != self.r:
                raise ConversionError(f"{source}: {module}: lora A {list(a.shape)} / B {list(b.shape)} do not "
                                      f"have rank {self.r} (A [r, in], B [out, r])")

    @property
    def scaling(self) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA)."""
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def target_leaves(self) -> list[str]:
        """Leaf names of the adapted modules (``query_key_value`` ...), as peft's ``target_modules``."""
        return sorted({m.rsplit(".", 1)[-1] for m in self.pairs})

    def delta(self, module: str) -> np.ndarray:
        """``scaling * B @ A`` in float32, ``[out, in]``."""
        a, b = self.pairs[module]
        return (self.scaling * (b.astype(np.float32) @ a.astype(np.float32))).astype(np.float32)


_LINEAR_NAME = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(self_attention\.(query_key_value|dense)"
                          r"|mlp\.(dense_h_to_4h|dense_4h_to_h))|transformer\.output_layer")


def check_lora_settings(r, alpha, where: str, rank_key: str = "r") -> None:
    """``r`` a positive integer and ``alpha`` a finite number above 0 (a string, 0 or a negative alpha
    scales every delta wrongly); :class:`ConversionError` naming ``where`` and the key."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConversionError(f"{where}: {rank_key}: expected a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ConversionError(f"{where}: lora_alpha: expected a number above 0, got {alpha!r}")


def check_target_modules(targets, where: str) -> None:
    """peft/mindformers ``target_modules``: names of ChatGLM2's linear layers, or a valid regular
    expression that matches one of them."""
    import difflib
    if targets is None:
        return
    if isinstance(targets, str):
        try:
            pattern = re.compile(targets)
        except re.error as e:
            raise ConversionError(f"{where}: target_modules: {targets!r} is not a valid regular expression "
                                  f"({e})") from None
        probes = [f"transformer.encoder.layers.0.self_attention.{t}" for t in ("query_key_value", "dense")] + \
                 [f"transformer.encoder.layers.0.mlp.{t}" for t in ("dense_h_to_4h", "dense_4h_to_h")] + \
                 ["transformer.output_layer"] + list(CHATGLM2_LINEARS)
        if not any(pattern.match(p) or pattern.fullmatch(p) or pattern.search(p) for p in probes):
            raise ConversionError(f"{where}: target_modules: {targets!r} matches no linear layer of ChatGLM2 "
                                  f"({', '.join(CHATGLM2_LINEARS)})")
        return
    if not isinstance(targets, (list, tuple, set)) or not all(isinstance(t, str) for t in targets):
        raise ConversionError(f"{where}: target_modules: expected a list of names or a regular expression, "
                              f"got {targets!r}")
    for t in targets:
        leaf = t.rsplit(".", 1)[-1]
        if leaf not in CHATGLM2_LINEARS:
            near = difflib.get_close_matches(leaf, CHATGLM2_LINEARS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else f" (ChatGLM2 has {', '.join(CHATGLM2_LINEARS)})"
            raise ConversionError(f"{where}: target_modules: {t!r}: no such linear layer in ChatGLM2{hint}")


def validate_lora(adapter: "LoraAdapter", config=None, config_source: str = "config",
                  allow_nonfinite: bool = False, hf_names: bool = True) -> None:
    """Every pair on a ChatGLM2 linear layer (HF names), in a layer the model has, with ``A [r, in]`` and
    ``B [out, r]`` of that layer's shape (with ``config``; without it, the same shape on every layer of a
    kind), and finite values. :class:`ConversionError` naming the adapter file and the module."""
    expected = N.hf_param_shapes(config) if config is not None else None
    seen: dict[str, tuple] = {}
    for module, (a, b) in adapter.pairs.items():
        where = f"{adapter.source}: {module}"
        m = _LINEAR_NAME.fullmatch(module) if hf_names else None
        if hf_names and m is None:
            raise ConversionError(f"{where}: not a linear layer of ChatGLM2 (LoRA targets: "
                                  f"{', '.join(CHATGLM2_LINEARS)})")
        if config is not None and m is not None and m.group(1) is not None and int(m.group(1)) >= config.num_layers:
            raise ConversionError(f"{where}: layer {m.group(1)} is out of range ({config_source} has "
                                  f"{config.num_layers} layers, 0..{config.num_layers - 1})")
        if expected is not None and m is not None:
            out_f, in_f = expected[module + ".weight"]
            if tuple(a.shape) != (adapter.r, in_f) or tuple(b.shape) != (out_f, adapter.r):
                raise ConversionError(f"{where}: lora A {list(a.shape)} / B {list(b.shape)} do not fit the layer "
                                      f"[{out_f}, {in_f}] of {config_source} at rank {adapter.r} (expected A "
                                      f"[{adapter.r}, {in_f}], B [{out_f}, {adapter.r}])")
        kind = module.rsplit(".", 1)[-1]
        shapes = (tuple(a.shape), tuple(b.shape))
        if seen.setdefault(kind, shapes) != shapes:
            raise ConversionError(f"{where}: lora A {list(a.shape)} / B {list(b.shape)} differ from the other "
                                  f"{kind} layers (A {list(seen[kind][0])} / B {list(seen[kind][1])})")
        for half, arr in (("lora_A", a), ("lora_B", b)):
            check_dtype(f"{module}.{half}", arr.dtype, adapter.source)
            check_finite(f"{module}.{half}", arr, adapter.source, allow_nonfinite)


def _pair_up(entries: dict[str, tuple[str, str, np.ndarray]], source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{original name: (module, "A"/"B", array)}`` grouped into ``{module: (A, B)}``; a lone half is an error."""
    halves: dict[str, dict[str, np.ndarray]] = {}
    for name, (module, ab, array) in entries.items():
        halves.setdefault(module, {})[ab] = array
    pairs = {}
    for module, h in halves.items():
        if set(h) != {"A", "B"}:
            raise ConversionError(f"{source}: {module}: has lora_{'/'.join(sorted(h))} only (A and B go together)")
        pairs[module] = (h["A"], h["B"])
    return pairs


# ----------------------------------------------------------------------------- pet_config
def peft_targets_to_regex(targets) -> str:
    """peft ``target_modules`` (list of module-name suffixes, or a regex string) -> mindformers' regex.

    ``["query_key_value"]`` -> ``'.*query_key_value*'`` as mindformers writes it; a name that begins
    another ChatGLM2 layer's name (``dense`` vs ``dense_h_to_4h``) is anchored: ``'.*\\.dense$'``.
    """
    if isinstance(targets, str):
        return targets
    parts = []
    for t in sorted(targets):
        if any(o != t and o.startswith(t) for o in CHATGLM2_LINEARS):
            parts.append(f".*\\.{re.escape(t)}$")
        else:
            parts.append(f".*{t}*")
    return "|".join(parts)


def read_pet_config(path: str) -> dict:
    """A ``pet_config`` from YAML or JSON: the mapping itself, under ``pet_config:``, or in a full
    mindformers run YAML (``model.model_config.pet_config``)."""
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file (expected a pet_config YAML or JSON)")
    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConversionError(f"{path}:{e.lineno}: not valid JSON: {e.msg}") from None
        except UnicodeDecodeError as e:
            raise ConversionError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    else:  # duplicate keys refused, errors name the line
        from glm_common.run_config import load_yaml
        data = load_yaml(path, ConversionError)
    if isinstance(data, Mapping) and isinstance(data.get("model"), Mapping):
        data = data["model"].get("model_config", {})
    if isinstance(data, Mapping) and "pet_config" in data:
        data = data["pet_config"]
    if not isinstance(data, Mapping) or "pet_type" not in data:
        raise ConversionError(f"{path}: pet_config.pet_type: missing (expected pet_type: lora ...)")
    return dict(data)


def write_pet_config(pet: Mapping[str, Any], path: str, fmt_of: Optional[str] = None) -> str:
    """Write ``{"pet_config": pet}`` as YAML (or JSON for ``*.json``; ``fmt_of``: the name that decides, where
    ``path`` is a staging name) atomically."""
    with atomic_file(path, "w", encoding="utf-8") as f:
        if (fmt_of or path).endswith(".json"):
            json.dump({"pet_config": dict(pet)}, f, indent=2)
            f.write("\n")
        else:
            import yaml
            yaml.safe_dump({"pet_config": dict(pet)}, f, sort_keys=False)
    return path


def _lora_settings(pet: Mapping[str, Any], source: str) -> tuple[Optional[int], float, float]:
    if str(pet.get("pet_type", "")).lower() != "lora":
        raise ConversionError(f"{source}: pet_type: expected lora, got {pet.get('pet_type')!r}")
    if "lora_alpha" not in pet:
        raise ConversionError(f"{source}: lora_alpha: missing (the scaling alpha / r needs it)")
    rank = pet.get("lora_rank")
    check_lora_settings(rank if rank is not None else 1, pet["lora_alpha"], source, "lora_rank")
    check_target_modules(pet.get("target_modules"), source)
    return (int(rank) if rank is not None else None), float(pet["lora_alpha"]), float(pet.get("lora_dropout", 0.0))


# ----------------------------------------------------------------------------- reading adapters
def _read_tensor_file(path: str) -> dict[str, np.ndarray]:
    if path.endswith(".safetensors"):
        f = open_ms_checkpoint(path)
        return {n: f.read(n) for n in f.names}
    import torch
    mismatch = format_mismatch(path, "torch-zip")
    if mismatch:
        raise CheckpointError(mismatch)
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(torch_load_refusal(path, e)) from None
    return {k: torch_to_numpy(v) for k, v in sd.items()}


def read_peft_adapter(adapter_dir: str) -> LoraAdapter:
    """Read a peft LoRA adapter directory."""
    cfg_path = os.path.join(adapter_dir, ADAPTER_CONFIG)
    if not os.path.isfile(cfg_path):
        raise ConversionError(f"{adapter_dir}: no {ADAPTER_CONFIG} (not a peft adapter directory)")
    try:
        cfg = json.load(open(cfg_path, encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{cfg_path}:{e.lineno}: not valid JSON: {e.msg}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise ConversionError(f"{cfg_path}: peft_type: only LORA adapters convert to mindpet LoRA, got "
                              f"{cfg.get('peft_type')!r}")
    for key in ("r", "lora_alpha"):
        if key not in cfg:
            raise ConversionError(f"{cfg_path}: {key}: missing")
    if cfg.get("fan_in_fan_out"):
        raise ConversionError(f"{cfg_path}: fan_in_fan_out: true is not supported (ChatGLM2 linears are [out, in])")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise ConversionError(f"{cfg_path}: rank_pattern/alpha_pattern: per-layer ranks have no mindpet equivalent")
    if cfg.get("use_dora"):
        raise ConversionError(f"{cfg_path}: use_dora: true: DoRA's magnitude vector has no mindpet equivalent "
                              f"(converting it as plain LoRA would give wrong numbers)")
    check_lora_settings(cfg["r"], cfg["lora_alpha"], cfg_path)
    check_target_modules(cfg.get("target_modules"), cfg_path)
    files = [os.path.join(adapter_dir, f) for f in ADAPTER_FILES if os.path.isfile(os.path.join(adapter_dir, f))]
    if not files:
        raise ConversionError(f"{adapter_dir}: no {' or '.join(ADAPTER_FILES)}")
    tensors = _read_tensor_file(files[0])
    entries = {}
    for name, array in tensors.items():
        if "lora_embedding_" in name or "lora_magnitude" in name:
            raise ConversionError(f"{files[0]}: {name}: embedding LoRA / DoRA have no mindpet equivalent")
        try:
            module, ab = N.lora_base_name(name)
        except N.NamingError:
            raise ConversionError(f"{files[0]}: {name}: not a LoRA weight (expected ...lora_A.weight / "
                                  f"lora_B.weight)") from None
        entries[name] = (module, ab, array)
    return LoraAdapter(_pair_up(entries, files[0]), cfg["r"], cfg["lora_alpha"], cfg.get("lora_dropout", 0.0),
                       cfg.get("use_rslora", False), source=files[0])


def _ms_module_to_hf(module: str, source: str) -> str:
    if re.search(r"\.(wq|wk|wv|dense_left|dense_right)$", module):
        raise ConversionError(f"{source}: {module}: LoRA on a split layout (qkv_concat/mlp_concat False) has no "
                              f"peft equivalent on HF names; train with qkv_concat: True")
    return N.ms_to_hf(module + ".weight")[: -len(".weight")]


def read_ms_lora(ckpt_path: str, pet: Mapping[str, Any], pet_source: str = "pet_config",
                 hf_names: bool = True) -> LoraAdapter:
    """The ``mindpet_delta_lora_a/b`` entries of a ``.ckpt`` (other entries are ignored) with the
    settings of ``pet``. ``hf_names``: key the pairs by HF module names (else mindformers names)."""
    rank, alpha, dropout = _lora_settings(pet, pet_source)
    ckpt = open_ms_checkpoint(ckpt_path)
    entries = {}
    for name in ckpt.names:
        if "mindpet_delta_lora" not in name or N.is_train_state(name):
            continue
        module, ab = N.lora_base_name(name)
        if hf_names:
            module = _ms_module_to_hf(module, ckpt_path)
        entries[name] = (module, ab, ckpt.read(name))
    if not entries:
        raise ConversionError(f"{ckpt_path}: no mindpet_delta_lora_a/b weights (not a LoRA checkpoint)")
    pairs = _pair_up(entries, ckpt_path)
    found = {a.shape[0] for a, _ in pairs.values()}
    if len(found) != 1:
        raise ConversionError(f"{ckpt_path}: LoRA ranks {sorted(found)} differ between layers")
    r = found.pop()
    if rank is not None and rank != r:
        raise ConversionError(f"{pet_source}: lora_rank: {rank}, but the weights in {ckpt_path} have rank {r}")
    return LoraAdapter(pairs, r, alpha, dropout, source=ckpt_path)


# ----------------------------------------------------------------------------- writing adapters
def write_ms_lora(adapter: LoraAdapter, output: str, pet_config_path: Optional[str] = None, dtype: str = "keep",
                  targets=None) -> tuple[str, str]:
    """Write the mindpet ``.ckpt`` and its ``pet_config`` (default: ``<output stem>_pet_config.yaml``)."""
    pet_config_path = pet_config_path or os.path.splitext(output)[0] + "_pet_config.yaml"
    pairs = []
    for module, (a, b) in adapter.pairs.items():
        pairs.append((N.peft_to_mindpet(f"{module}.lora_A.weight"), cast(a, dtype)))
        pairs.append((N.peft_to_mindpet(f"{module}.lora_B.weight"), cast(b, dtype)))
    if adapter.use_rslora:
        raise ConversionError(f"{adapter.source}: use_rslora: mindpet scales by alpha / r; rsLoRA has no equivalent")
    pet = {"pet_type": "lora", "lora_rank": adapter.r, "lora_alpha": adapter.alpha, "lora_dropout": adapter.dropout,
           "target_modules": peft_targets_to_regex(targets if targets is not None else adapter.target_leaves)}
    with atomic_files(output, pet_config_path) as (ckpt_stage, pet_stage):  # the pair appears whole or not at all
        save_ms_checkpoint(pairs, ckpt_stage)
        write_pet_config(pet, pet_stage, fmt_of=pet_config_path)
    return output, pet_config_path


def write_peft_adapter(adapter: LoraAdapter, output: str, dtype: str = "keep",
                       base_model_name_or_path: Optional[str] = None) -> str:
    """Write a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``) atomically."""
    tensors = []
    for module in sorted(adapter.pairs):
        a, b = adapter.pairs[module]
        tensors.append((f"{N.PEFT_PREFIX}{module}.lora_A.weight", cast(a, dtype)))
        tensors.append((f"{N.PEFT_PREFIX}{module}.lora_B.weight", cast(b, dtype)))
    _parent(output)
    with atomic_dir(output, merge=True) as stage:
        config = _peft_config_dict(adapter, base_model_name_or_path)
        with open(os.path.join(stage, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
            f.write("\n")
        save_safetensors(tensors, os.path.join(stage, "adapter_model.safetensors"), metadata={"format": "pt"})
    return output


def _parent(output: str) -> None:
    """Create the folder ``output`` goes in (an OutputError naming ``output`` if that fails)."""
    try:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    except OSError as e:
        raise output_error(output, e) from None


def _peft_config_dict(adapter: LoraAdapter, base: Optional[str]) -> dict:
    kw = dict(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
              target_modules=adapter.target_leaves, base_model_name_or_path=base)
    try:  # the exact file peft writes, when peft is installed
        from peft import LoraConfig, TaskType
        cfg = LoraConfig(task_type=TaskType.CAUSAL_LM, **kw).to_dict()
        return json.loads(json.dumps(cfg, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))
    except ImportError:
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False,
                "inference_mode": True, "init_lora_weights": True, "modules_to_save": None, **kw}


# ----------------------------------------------------------------------------- commands
def _adapter_config(adapter_dir: str, cfg: Mapping, config: Optional[str]):
    """``(ChatGLM2Config or None, its source)``: ``config`` (config.json, its folder or a run YAML), else the
    local ``base_model_name_or_path`` of the adapter when it holds a config.json."""
    from convert.ms_to_hf import load_config
    if config:
        return load_config(config), config
    base = cfg.get("base_model_name_or_path")
    if isinstance(base, str) and base and os.path.isfile(os.path.join(base, "config.json")):
        return load_config(base), os.path.join(base, "config.json")
    return None, ""


def peft_to_ms(adapter_dir: str, output: str, pet_config: Optional[str] = None, dtype: str = "keep",
               config: Optional[str] = None, allow_nonfinite: bool = False, overwrite: bool = False) -> str:
    """A peft LoRA directory -> mindpet ``.ckpt`` + ``pet_config``, validated (:func:`validate_lora`) against
    ``config`` when given (or found as the adapter's local base model)."""
    adapter = read_peft_adapter(adapter_dir)
    check_output(output, [adapter_dir], "--output", overwrite=overwrite)
    check_output(pet_config or os.path.splitext(output)[0] + "_pet_config.yaml", [adapter_dir, output],
                 "--pet-config", overwrite=overwrite)
    with open(os.path.join(adapter_dir, ADAPTER_CONFIG), encoding="utf-8") as f:
        cfg = json.load(f)
    model_cfg, model_src = _adapter_config(adapter_dir, cfg, config)
    validate_lora(adapter, model_cfg, model_src, allow_nonfinite)
    ckpt, pet = write_ms_lora(adapter, output, pet_config, dtype, targets=cfg.get("target_modules"))
    return (f"peft-to-ms: {2 * len(adapter.pairs)} LoRA tensors (rank {adapter.r}, alpha {adapter.alpha:g}) "
            f"-> {ckpt} + {pet}")


def ms_to_peft(ckpt: str, pet_config: str, output: str, dtype: str = "keep", base: Optional[str] = None,
               overwrite: bool = False) -> str:
    check_output(output, [ckpt, pet_config], "--output", overwrite=overwrite)
    adapter = read_ms_lora(ckpt, read_pet_config(pet_config), pet_config)
    validate_lora(adapter)
    write_peft_adapter(adapter, output, dtype, base)
    return (f"ms-to-peft: {2 * len(adapter.pairs)} LoRA tensors (rank {adapter.r}, alpha {adapter.alpha:g}, "
            f"targets {', '.join(adapter.target_leaves)}) -> {output}")


def _prefix_source(path: str):
    """``(reader with names/read, label)`` for an HF directory or a single weights file."""
    if os.path.isdir(path):
        return HFCheckpoint(path)
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: no such file or directory")
    tensors = _read_tensor_file(path)

    class _Mem:
        names = list(tensors)
        read = staticmethod(tensors.__getitem__)
    return _Mem()


def prefix_to_ms(hf: str, output: str, dtype: str = "keep", overwrite: bool = False) -> str:
    """P-tuning v2 prefix weights of an HF directory / file -> mindpet names in a ``.ckpt``."""
    check_output(output, [hf], "--output", overwrite=overwrite)
    src = _prefix_source(hf)
    names = [n for n in src.names if n.startswith("transformer.prefix_encoder.")]
    if not names:
        raise ConversionError(f"{hf}: no transformer.prefix_encoder.* weights (not a P-tuning v2 checkpoint)")
    unknown = [n for n in names if n not in N.HF_TO_MS_PREFIX]
    if unknown:
        raise ConversionError(f"{hf}: {unknown[0]}: unknown prefix-encoder parameter")
    save_ms_checkpoint(((N.hf_to_ms(n), cast(src.read(n), dtype)) for n in names), output)
    return f"prefix-to-ms: {len(names)} prefix tensors -> {output}"


def ms_to_prefix(ckpt: str, output: str, dtype: str = "keep", fmt: str = "bin", config: Optional[str] = None,
                 overwrite: bool = False) -> str:
    """mindpet prefix weights of a ``.ckpt`` -> an HF P-tuning checkpoint directory (as the official
    ChatGLM2 P-tuning saves it: ``pytorch_model.bin`` with ``transformer.prefix_encoder.*``), with
    ``config.json`` (``pre_seq_len`` set from the weights) when ``config`` is given."""
    check_output(output, [ckpt, config], "--output", overwrite=overwrite)
    src = open_ms_checkpoint(ckpt)
    names = [n for n in src.names if n in N.MS_TO_HF_PREFIX]
    if not names:
        raise ConversionError(f"{ckpt}: no {N.MS_PREFIX_EMBEDDING} (not a P-tuning v2 checkpoint)")
    cfg = None
    if config is not None:
        from convert.ms_to_hf import load_config
        shape = src.info(N.MS_PREFIX_EMBEDDING)[0]
        cfg = load_config(config)
        if shape[1] != cfg.prefix_kv_size:
            raise ConversionError(f"{ckpt}: {N.MS_PREFIX_EMBEDDING}: width {shape[1]} contradicts {config} "
                                  f"(num_layers*2*g*hn = {cfg.prefix_kv_size})")
        cfg = cfg.replace(pre_seq_len=int(shape[0]), prefix_projection=any(".dense_in." in n for n in names))
    _parent(output)
    with atomic_dir(output, merge=True) as stage:
        write_hf_checkpoint(((N.ms_to_hf(n), cast(src.read(n), dtype)) for n in names), stage, fmt=fmt)
        if cfg is not None:
            cfg.save_hf(stage)
    return f"ms-to-prefix: {len(names)} prefix tensors -> {output}"


_SPLIT_PARTS = {"wq": ("query_key_value", 0), "wk": ("query_key_value", 1), "wv": ("query_key_value", 2),
                "dense_left": ("dense_h_to_4h", 0), "dense_right": ("dense_h_to_4h", 1)}


def merge(base: str, output: str, adapter: Optional[str] = None, pet_config: Optional[str] = None,
          dtype: str = "keep", max_shard_size: Optional[str] = "2GB", progress: bool = True,
          overwrite: bool = False, allow_nonfinite: bool = False) -> str:
    """Fold a LoRA into base weights, one base tensor at a time (see the module docstring). The adapter is
    validated (:func:`validate_lora`; against the base's config.json for an HF base) and every base
    tensor is checked (float dtype, finite values, the merged values in range of the stored dtype)."""
    base_is_ckpt = os.path.isfile(base)
    out_is_ckpt = output.endswith((".ckpt", ".safetensors")) and not os.path.isdir(output)
    check_output(output, [base, adapter, pet_config], "--output", overwrite=overwrite)
    if base_is_ckpt and not out_is_ckpt:
        raise ConversionError(f"{output}: a .ckpt base gives a .ckpt (convert it with convert/ms_to_hf.py afterwards)")
    pet = read_pet_config(pet_config) if pet_config else None
    if adapter is None:
        if not base_is_ckpt:
            raise ConversionError(f"{base}: --adapter is needed (an HF directory holds no LoRA weights)")
        adapter = base
    if os.path.isdir(adapter):
        lora = read_peft_adapter(adapter)
    else:
        if pet is None:
            raise ConversionError(f"{adapter}: --pet-config is needed with a LoRA .ckpt (for lora_alpha)")
        lora = read_ms_lora(adapter, pet, pet_config, hf_names=not base_is_ckpt)
    base_cfg = None
    if not base_is_ckpt and os.path.isfile(os.path.join(base, "config.json")):
        from glm_common.config import ChatGLM2Config
        base_cfg = ChatGLM2Config.from_hf(base)
    validate_lora(lora, base_cfg, os.path.join(base, "config.json"), allow_nonfinite,
                  hf_names=os.path.isdir(adapter) or not base_is_ckpt)
    if base_is_ckpt:
        if os.path.isdir(adapter):  # peft keys are HF module names; the base uses mindformers names
            lora.pairs = {N.hf_to_ms(m + ".weight")[: -len(".weight")]: ab for m, ab in lora.pairs.items()}
        src = open_ms_checkpoint(base)
        names = [n for n in src.names if "mindpet_delta_lora" not in n and not N.is_train_state(n)
                 and not N.is_derived_buffer(n)]
    else:
        src = HFCheckpoint(base)
        names = [n for n in src.names if not N.is_derived_buffer(n)]
    present = set(names)

    def target_of(name: str) -> Optional[tuple[str, Optional[str]]]:
        """``(adapted module, split leaf or None)`` for a base weight name, or None."""
        if not name.endswith(".weight"):
            return None
        module = name[: -len(".weight")]
        if module in lora.pairs:
            return module, None
        parent, _, leaf = module.rpartition(".")
        if leaf in _SPLIT_PARTS and f"{parent}.{_SPLIT_PARTS[leaf][0]}" in lora.pairs:
            return f"{parent}.{_SPLIT_PARTS[leaf][0]}", leaf
        return None

    used = {t[0] for t in map(target_of, names) if t}
    unused = sorted(set(lora.pairs) - used)
    if unused:
        raise ConversionError(f"{lora.source}: {unused[0]}: LoRA target has no weight in {base}")
    deltas: dict[str, np.ndarray] = {}

    def merged(name: str, array: np.ndarray) -> np.ndarray:
        target = target_of(name)
        if target is None:
            return array
        module, leaf = target
        if leaf is None:
            d = lora.delta(module)
        else:  # a split base (wq/wk/wv, dense_left/right): the rows of the fused delta that belong here
            if module not in deltas:
                deltas.clear()
                deltas[module] = lora.delta(module)
            fused, slot = _SPLIT_PARTS[leaf]
            before = [name.replace(f".{leaf}.weight", f".{other}.weight") for other, (f, i) in _SPLIT_PARTS.items()
                      if f == fused and i < slot]
            missing = [b for b in before if b not in present]
            if missing:
                raise ConversionError(f"{base}: {missing[0]}: missing (split layout incomplete)")
            start = sum(src.info(b)[0][0] for b in before)
            d = deltas[module][start:start + array.shape[0]]
        if d.shape != array.shape:
            raise ConversionError(f"{lora.source}: {module}: B @ A rows do not fit {name} {list(array.shape)} in {base}")
        total = array.astype(np.float32) + d
        with np.errstate(over="ignore"):  # out of the dtype's range: check_cast names it
            out = total.astype(array.dtype)
        check_cast(name, total, out, src.file_of(name) if hasattr(src, "file_of") else base)
        return out

    total = sum(int(np.prod(src.info(n)[0], dtype=np.int64)) * numpy_dtype(src.info(n)[1]).itemsize for n in names)
    bar = Progress(total, "merge", enabled=progress)

    def stream():
        for n in names:
            raw = src.read(n)
            where = src.file_of(n) if hasattr(src, "file_of") else base
            check_dtype(n, raw.dtype, where)
            bad = check_finite(n, raw, where, allow_nonfinite)
            fused = merged(n, raw)
            a = cast(fused, dtype)
            check_cast(n, fused, a, where, bad)
            bar.update(a, read_bytes=raw.nbytes)
            del raw
            yield (N.hf_to_ms(n) if out_is_ckpt and not base_is_ckpt else n), a
            if hasattr(src, "release"):
                src.release(n)

    try:
        if out_is_ckpt:
            save_ms_checkpoint(stream(), output)
        else:
            _parent(output)
            with atomic_dir(output, merge=True) as stage:
                limit = parse_size(max_shard_size) if max_shard_size not in (None, "", "none") else None
                if limit is not None and total <= limit:
                    limit = None  # one file, no index, as transformers writes a model that fits in one shard
                write_hf_checkpoint(stream(), stage, fmt="safetensors", max_shard_size=limit)
                for extra in os.listdir(base):  # config and tokenizer files travel with the weights
                    if extra.endswith((".json", ".model", ".py", ".txt")) and not extra.endswith("index.json"):
                        shutil.copyfile(os.path.join(base, extra), os.path.join(stage, extra))
                if dtype != "keep":
                    from glm_common.config import ChatGLM2Config
                    from convert.hf_layout import NP_DTYPES
                    cfg = ChatGLM2Config.from_hf(stage)
                    cfg.torch_dtype = NP_DTYPES[dtype]
                    cfg.save_hf(stage)
                written = os.listdir(stage)
            remove_stale_weights(output, written)
    finally:
        bar.close()
    return bar.summary("merge", output, f"{len(used)} LoRA targets merged, scaling {lora.scaling:g}")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python convert/adapters.py",
                                 description="Convert LoRA adapters and P-tuning v2 prefixes between peft/HF and "
                                             "MindSpore (mindpet names + pet_config), and merge a LoRA into base "
                                             "weights.")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    fmt = argparse.ArgumentDefaultsHelpFormatter
    dt = dict(default="keep", choices=DTYPE_CHOICES, help="dtype of the saved floating-point tensors; keep: as stored")

    p = sub.add_parser("peft-to-ms", formatter_class=fmt, help="peft LoRA adapter directory -> mindpet .ckpt + pet_config")
    p.add_argument("--adapter", required=True, help="peft adapter directory (adapter_config.json, adapter_model.*)")
    p.add_argument("--output", required=True, help="MindSpore LoRA checkpoint to write (.ckpt)")
    p.add_argument("--pet-config", default=None,
                   help="pet_config to write (.yaml or .json); default: <output stem>_pet_config.yaml")
    p.add_argument("--config", default=None,
                   help="the base model's config.json (or folder, or run YAML) to check layers and shapes against; "
                        "default: the adapter's base_model_name_or_path when it is a local folder")
    p.add_argument("--allow-nonfinite", action="store_true", help="convert NaN/Inf LoRA values instead of refusing")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output (and --pet-config) file")
    p.add_argument("--dtype", **dt)

    p = sub.add_parser("ms-to-peft", formatter_class=fmt, help="mindpet LoRA .ckpt + pet_config -> peft adapter directory")
    p.add_argument("--ckpt", required=True,
                   help="MindSpore checkpoint holding *.mindpet_delta_lora_a/b (other entries are ignored)")
    p.add_argument("--pet-config", required=True,
                   help="pet_config (YAML/JSON; or a mindformers run YAML) giving lora_alpha, lora_rank, lora_dropout")
    p.add_argument("--output", required=True, help="peft adapter directory to write")
    p.add_argument("--base-model", default=None, help="base_model_name_or_path to record in adapter_config.json")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output folder (replaces the files this command writes, keeps others)")
    p.add_argument("--dtype", **dt)

    p = sub.add_parser("prefix-to-ms", formatter_class=fmt, help="HF P-tuning v2 prefix weights -> mindpet .ckpt")
    p.add_argument("--hf", required=True,
                   help="HF directory or weights file (.bin/.safetensors) holding transformer.prefix_encoder.*")
    p.add_argument("--output", required=True, help="MindSpore checkpoint to write (.ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    p.add_argument("--dtype", **dt)

    p = sub.add_parser("ms-to-prefix", formatter_class=fmt, help="mindpet prefix weights in a .ckpt -> HF P-tuning dir")
    p.add_argument("--ckpt", required=True, help="MindSpore checkpoint holding prefix_encoder.mindpet_delta_prefixtuning_*")
    p.add_argument("--output", required=True, help="directory to write (pytorch_model.bin or model.safetensors)")
    p.add_argument("--format", default="bin", choices=("bin", "safetensors"), help="weights file format")
    p.add_argument("--config", default=None,
                   help="base config.json (or mindformers YAML): also write config.json with pre_seq_len set")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --output folder (replaces the files this command writes, keeps others)")
    p.add_argument("--dtype", **dt)

    p = sub.add_parser("merge", formatter_class=fmt, help="fold W + (alpha/r) B@A into base weights")
    p.add_argument("--base", required=True, help="base weights: an HF directory or a MindSpore .ckpt")
    p.add_argument("--adapter", default=None,
                   help="peft adapter directory or LoRA .ckpt; default: the LoRA weights inside --base (.ckpt)")
    p.add_argument("--pet-config", default=None, help="pet_config giving lora_alpha (needed with a LoRA .ckpt)")
    p.add_argument("--output", required=True,
                   help="FILE.ckpt (mindformers names) or a directory (HF, from an HF base; config/tokenizer copied)")
    p.add_argument("--max-shard-size", default="2GB", help="largest shard of an HF output directory")
    p.add_argument("--allow-nonfinite", action="store_true", help="merge NaN/Inf values instead of refusing")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --output file, or write into a non-empty --output folder "
                        "(replaces the files this command writes, keeps others)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--dtype", **dt)
    return ap


@one_line_errors
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "peft-to-ms":
            line = peft_to_ms(args.adapter, args.output, args.pet_config, args.dtype, args.config,
                              args.allow_nonfinite, args.overwrite)
        elif args.cmd == "ms-to-peft":
            line = ms_to_peft(args.ckpt, args.pet_config, args.output, args.dtype, args.base_model, args.overwrite)
        elif args.cmd == "prefix-to-ms":
            line = prefix_to_ms(args.hf, args.output, args.dtype, args.overwrite)
        elif args.cmd == "ms-to-prefix":
            line = ms_to_prefix(args.ckpt, args.output, args.dtype, args.format, args.config, args.overwrite)
        else:
            line = merge(args.base, args.output, args.adapter, args.pet_config, args.dtype, args.max_shard_size,
                         progress=not args.no_progress, overwrite=args.overwrite,
                         allow_nonfinite=args.allow_nonfinite)
    except KNOWN_ERRORS as e:
        return report_error(e)
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
