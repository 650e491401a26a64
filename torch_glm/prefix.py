"""P-tuning v2: the prefix encoder and the helpers that freeze the base model around it.

The prefix encoder turns ``arange(pre_seq_len)`` into one past (key, value) pair per layer
(chatglm2.md, "P-tuning v2"). Parameter names are ChatGLM2's (``transformer.prefix_encoder.embedding``,
``transformer.prefix_encoder.trans.{0,2}``) so prefix checkpoints move between implementations.
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from glm_common.config import ChatGLM2Config

__all__ = ["PrefixEncoder", "freeze_base", "prefix_state_dict", "load_prefix", "PREFIX_MODULE", "set_prefix_dropout"]

#: module path of the prefix encoder inside ChatGLM2ForConditionalGeneration.
PREFIX_MODULE = "transformer.prefix_encoder"


class PrefixEncoder(nn.Module):
    """``prefix [B, P] -> [B, P, num_layers * 2 * g * hn]``.

    Without ``prefix_projection`` an Embedding ``[P, kv]``; with it Embedding ``[P, kv]`` -> Linear
    ``kv -> H`` -> tanh -> Linear ``H -> kv`` (ChatGLM2's layout, ``trans.0`` and ``trans.2``).
    """

    def __init__(self, config: ChatGLM2Config):
        super().__init__()
        if config.pre_seq_len is None:
            raise ValueError("pre_seq_len: PrefixEncoder needs a config with pre_seq_len set")
        self.prefix_projection = config.prefix_projection
        kv = config.prefix_kv_size
        self.embedding = nn.Embedding(config.pre_seq_len, kv)
        if self.prefix_projection:
            self.trans = nn.Sequential(nn.Linear(kv, config.hidden_size), nn.Tanh(),
                                       nn.Linear(config.hidden_size, kv))

    def forward(self, prefix: torch.Tensor) -> torch.Tensor:
        """``prefix``: int ``[B, P]``; returns ``[B, P, kv]``."""
        out = self.embedding(prefix)
        if self.prefix_projection:
            out = self.trans(out)
        return out


def freeze_base(model: nn.Module, trainable: Iterable[str] = (PREFIX_MODULE,)) -> list[str]:
    """Freeze every parameter except those under ``trainable`` module paths; return the trainable names."""
    prefixes = tuple(p.rstrip(".") + "." for p in trainable)
    names = []
    for name, p in model.named_parameters():
        keep = name.startswith(prefixes)
        p.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ValueError(f"freeze_base: no parameter under {', '.join(trainable)} (is pre_seq_len set?)")
    return names


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's weights under their full HF names (what a P-tuning checkpoint holds)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(PREFIX_MODULE + ".")}


def load_prefix(model: nn.Module, path) -> nn.Module:
    """Load P-tuning weights (a ``prefix_encoder.safetensors`` file, or the directory holding one) into
    ``model.transformer.prefix_encoder``; names are HF's (``transformer.prefix_encoder.…``)."""
    import os

    from safetensors.torch import load_file
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "prefix_encoder.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (a P-tuning result holds prefix_encoder.safetensors)")
    encoder = getattr(getattr(model, "transformer", None), "prefix_encoder", None)
    if encoder is None:
        raise ValueError(f"{path}: the model has no prefix encoder (build it with pre_seq_len set)")
    state = load_file(path)
    own = encoder.state_dict()
    sub = {}
    for name, value in state.items():
        key = name[len(PREFIX_MODULE) + 1:] if name.startswith(PREFIX_MODULE + ".") else name
        if key not in own:
            raise ValueError(f"{path}: {name}: not a prefix encoder parameter")
        if own[key].shape != value.shape:
            raise ValueError(f"{path}: {name}: shape {list(value.shape)}, expected {list(own[key].shape)}")
        sub[key] = value
    missing = sorted(set(own) - set(sub))
    if missing:
        raise ValueError(f"{path}: {PREFIX_MODULE}.{missing[0]}: missing")
    encoder.load_state_dict(sub)
    return model


def set_prefix_dropout(model: nn.Module, p: float) -> nn.Module:
    """``pet_config.dropout_prob``: the dropout on the prefix key/values (training only; ChatGLM2's
    P-tuning code fixes 0.1, mindformers' ``ChatGLM2WithPtuning2`` takes ``dropout_prob``)."""
    for m in model.modules():
        if hasattr(m, "prefix_dropout") and isinstance(m.prefix_dropout, nn.Dropout):
            m.prefix_dropout.p = float(p)
    return model
