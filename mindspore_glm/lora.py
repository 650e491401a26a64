"""LoRA for the MindSpore ChatGLM2: low-rank updates on chosen ``Linear`` layers, mindpet names.

``apply_lora(model, r=8, lora_alpha=32, lora_dropout=0.1, target_modules="query_key_value")`` gives each matching
:class:`mindspore_glm.model.Linear` two parameters, ``<linear>.mindpet_delta_lora_a [r, in]`` (uniform in
``±1/sqrt(in)``, as peft's default) and ``<linear>.mindpet_delta_lora_b [out, r]`` (zeros), so the layer
computes ``x @ W.T + (alpha / r) * dropout(x) @ A.T @ B.T``; every other parameter is frozen.
:func:`merge_lora` folds ``(alpha / r) * B @ A`` into ``W`` and :func:`unmerge_lora` takes it out again.

Target matching: a string is a regular expression, matched (``re.match``) against a layer's own name as
mindformers' ``target_modules`` is (``".*query_key_value"``, ``"dense_h_to_4h|dense_4h_to_h"``) or
(``re.fullmatch``) against its full dotted name; a list of names matches a layer whose full name equals
or ends with ``"." + name``, as peft's list form does.
"""
from __future__ import annotations

import re
from typing import Iterable, Optional, Union

import numpy as np
import mindspore as ms
from mindspore import Parameter, Tensor, nn

from glm_common.names import MINDPET_LORA_A as LORA_A, MINDPET_LORA_B as LORA_B, is_lora_name
from glm_common.run_config import RunConfigError
from mindspore_glm.model import Linear
from mindspore_glm.prefix import freeze_base

#: ChatGLM2's usual LoRA target (mindformers' ``.*query_key_value``, peft's ``["query_key_value"]``)
DEFAULT_TARGET_MODULES = "query_key_value"

__all__ = ["DEFAULT_TARGET_MODULES", "apply_lora", "merge_lora", "apply_pet", "unmerge_lora", "lora_layers",
           "lora_state", "mark_only_lora_trainable"]


def _matches(full_name: str, target: Union[str, Iterable[str]]) -> bool:
    local = full_name.rsplit(".", 1)[-1]
    if isinstance(target, str):
        return bool(re.match(target, local) or re.fullmatch(target, full_name))
    return any(full_name == t or full_name.endswith("." + t) for t in target)


def lora_layers(model) -> dict:
    """``{layer name: Linear}`` of the layers that carry LoRA."""
    return {name: cell for name, cell in model.cells_and_names() if isinstance(cell, Linear) and cell.lora_rank > 0}


def mark_only_lora_trainable(model) -> list:
    """Freeze everything but the LoRA matrices; return the trainable parameters."""
    train = []
    for p in model.get_parameters():
        p.requires_grad = is_lora_name(p.name)
        if p.requires_grad:
            train.append(p)
    return train


def apply_lora(model, r: int = 8, lora_alpha: float = 32, lora_dropout: float = 0.1,
               target_modules: Union[str, Iterable[str], None] = None, seed: int = 0) -> list:
    """Add LoRA to every matching ``Linear`` of ``model``; return the trainable LoRA parameters.

    Raises ``ValueError`` when ``rank`` is not positive, when no layer matches, or when a layer already
    has LoRA.
    """
    rank, alpha, dropout = r, lora_alpha, lora_dropout
    if target_modules is None:
        target_modules = DEFAULT_TARGET_MODULES
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"apply_lora: r must be a positive integer, got {rank!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"apply_lora: lora_dropout must be in [0, 1), got {dropout!r}")
    rng = np.random.default_rng(seed)
    hits = [(name, cell) for name, cell in model.cells_and_names()
            if isinstance(cell, Linear) and name and _matches(name, target_modules)]
    if not hits:
        raise ValueError(f"apply_lora: target_modules {target_modules!r} matches no Linear layer of the model")
    for name, cell in hits:
        if cell.lora_rank > 0:
            raise ValueError(f"apply_lora: {name} already has LoRA")
        dtype = cell.weight.dtype
        bound = 1.0 / np.sqrt(cell.in_features)
        a = rng.uniform(-bound, bound, (rank, cell.in_features)).astype(np.float32)
        setattr(cell, LORA_A, Parameter(Tensor(a, dtype), name=f"{name}.{LORA_A}"))
        setattr(cell, LORA_B, Parameter(Tensor(np.zeros((cell.out_features, rank), np.float32), dtype),
                                        name=f"{name}.{LORA_B}"))
        cell.lora_dropout = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        cell.lora_scaling = float(alpha) / rank
        cell.lora_rank = rank
        cell.lora_merged = False
    model.__dict__.pop("_gen_fns", None)
    return mark_only_lora_trainable(model)


def _delta(cell) -> np.ndarray:
    a = getattr(cell, LORA_A).asnumpy().astype(np.float32)
    b = getattr(cell, LORA_B).asnumpy().astype(np.float32)
    return cell.lora_scaling * (b @ a)


def _shift(cell, sign: float):
    w = cell.weight
    new = w.asnumpy().astype(np.float32) + sign * _delta(cell)
    w.set_data(Tensor(new, w.dtype) if w.dtype != ms.float32 else Tensor(new))


def merge_lora(model) -> int:
    """``W += (alpha/r) * B @ A`` on every LoRA layer not yet merged; the layers then skip the LoRA path.
    Returns the number of layers merged. Graphs compiled before merging must be compiled again."""
    n = 0
    for cell in lora_layers(model).values():
        if not cell.lora_merged:
            _shift(cell, 1.0)
            cell.lora_merged = True
            n += 1
    model.__dict__.pop("_gen_fns", None)
    return n


def apply_pet(model, pet: dict, seed: Optional[int] = None) -> tuple:
    """Make what ``pet`` (:func:`glm_common.run_config.pet_settings`) names trainable: LoRA (matrices drawn
    from ``seed``, 0 when None), P-tuning v2 (the prefix encoder, its dropout ``dropout_prob``) or, for
    ``full``, everything. Returns ``(model, trainable parameters)``."""
    kind = pet["pet_type"]
    if kind == "lora":
        params = apply_lora(model, r=pet["r"], lora_alpha=pet["lora_alpha"], lora_dropout=pet["lora_dropout"],
                            target_modules=pet["target_modules"], seed=0 if seed is None else seed)
        return model, params
    if kind == "ptuning2":
        p = pet.get("dropout_prob", 0.1)
        model.prefix_encoder.dropout = nn.Dropout(p=p) if p > 0 else nn.Identity()
        return model, freeze_base(model)
    if kind == "full":
        for p in model.get_parameters():
            p.requires_grad = True
        return model, list(model.get_parameters())
    raise RunConfigError(f"pet_config.pet_type: {kind!r} is not available in the MindSpore runner (lora, ptuning2)")


def unmerge_lora(model) -> int:
    """Undo :func:`merge_lora`; returns the number of layers unmerged."""
    n = 0
    for cell in lora_layers(model).values():
        if cell.lora_merged:
            _shift(cell, -1.0)
            cell.lora_merged = False
            n += 1
    model.__dict__.pop("_gen_fns", None)
    return n


def lora_state(model) -> dict:
    """``{mindpet name: numpy array}`` of the LoRA matrices (what an adapter checkpoint holds)."""
    return {p.name: p.asnumpy() for p in model.get_parameters() if is_lora_name(p.name)}
