"""P-tuning v2: the prefix encoder and the helpers that freeze the base model around it.

The prefix encoder turns ``arange(pre_seq_len)`` into one past (key, value) pair per layer
(docs/architecture.md, section 5). Parameter names are ChatGLM2's (``transformer.prefix_encoder.embedding``,
``transformer.prefix_encoder.trans.{0,2}``) so prefix checkpoints move between implementations.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from glm_common.config import ChatGLM2Config
from glm_common.names import PREFIX_MODULE, is_prefix_name

__all__ = ["PrefixEncoder", "freeze_base", "prefix_trainable_params", "prefix_state_dict", "load_prefix"]


class PrefixEncoder(nn.Module):
    """``prefix [B, P] -> [B, P, num_layers * 2 * g * hn]``.

    Diverges from mindspore_glm's (``batch_size -> [2L, B, g, P, hn]``): ChatGLM2's HF layout and names.

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


def freeze_base(model: nn.Module) -> list:
    """Make only the prefix encoder trainable; return its (trainable) parameters."""
    train = []
    for name, p in model.named_parameters():
        keep = is_prefix_name(name)
        p.requires_grad_(keep)
        if keep:
            train.append(p)
    if not train:
        raise ValueError(f"freeze_base: the model has no prefix_encoder (no parameter under {PREFIX_MODULE}; "
                         "is pre_seq_len set?)")
    return train


def prefix_trainable_params(model: nn.Module) -> list:
    """The prefix encoder's parameters."""
    return [p for n, p in model.named_parameters() if is_prefix_name(n)]


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The prefix encoder's weights under their full HF names (what a P-tuning checkpoint holds)."""
    return {k: v.detach() for k, v in model.state_dict().items() if k.startswith(PREFIX_MODULE + ".")}


def load_prefix(model: nn.Module, path) -> nn.Module:
    """Load P-tuning weights (a ``prefix_encoder.safetensors`` file, or the directory holding one) into
    ``model.transformer.prefix_encoder``; names are HF's (``transformer.prefix_encoder.…``)."""
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
