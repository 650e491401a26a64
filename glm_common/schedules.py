"""Learning-rate schedules and the AdamWeightDecay facts both backends share (numpy only).

A schedule is a numpy float32 array ``lrs [total]``: ``lrs[k]`` is the learning rate of optimizer
update ``k`` (0-based). Linear warmup from 0 over ``warmup_steps`` (or ``warmup_ratio x total``), then

* ``constant``: ``lr``;
* ``linear``: ``lr_end + (lr - lr_end) * (1 - p)``;
* ``cosine``: ``lr_end + (lr - lr_end) * (1 + cos(pi p)) / 2``;
* ``polynomial``: ``lr_end + (lr - lr_end) * (1 - p) ** power``;

with ``p = min(1, (k - warmup) / max(1, total - warmup))``. ``total_steps: -1`` in a run YAML means
epochs x steps per epoch (:func:`schedule_total`).

The AdamWeightDecay family (mindformers' ``AdamWeightDecay``, ``FusedAdamWeightDecay``,
``FP32StateAdamWeightDecay``; MindSpore's ``nn.AdamWeightDecay``) updates without bias correction::

    m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
    p = p - lr * (m / (sqrt(v) + eps) + wd * p)          # wd only where decays(name, ndim)

``AdamW`` (``torch.optim.AdamW``) divides ``m`` by ``1 - b1^t`` and ``sqrt(v)`` by ``sqrt(1 - b2^t)``.
:data:`BIAS_CORRECTED` says which optimizer type does which.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["SCHEDULES", "OPTIMIZERS", "BIAS_CORRECTED", "lr_at", "learning_rates", "schedule_total", "decays"]

#: accepted ``lr_schedule.type`` values (lower case) -> schedule
SCHEDULES = {"linear": "linear", "linearwithwarmuplr": "linear", "cosine": "cosine",
             "cosinewithwarmuplr": "cosine", "polynomial": "polynomial", "polynomialwithwarmuplr": "polynomial",
             "constant": "constant", "constantwarmuplr": "constant"}
#: accepted ``optimizer.type`` values (lower case)
OPTIMIZERS = ("adamw", "adamweightdecay", "fusedadamweightdecay", "fp32stateadamweightdecay")
#: optimizer types whose update divides by the bias corrections ``1 - beta^t``
BIAS_CORRECTED = ("adamw",)


def lr_at(step: int, s, total: int) -> float:
    """Learning rate of update ``step`` (0-based) of ``total``; ``s`` has ``learning_rate``, ``lr_end``,
    ``schedule``, ``warmup_steps``, ``warmup_ratio``, ``power`` (a TrainSettings)."""
    warmup = s.warmup_steps or int(round(s.warmup_ratio * total))
    if warmup and step < warmup:
        return s.learning_rate * step / warmup
    if s.schedule == "constant":
        return s.learning_rate
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if s.schedule == "linear":
        return s.lr_end + (s.learning_rate - s.lr_end) * (1.0 - progress)
    if s.schedule == "cosine":
        return s.lr_end + 0.5 * (s.learning_rate - s.lr_end) * (1.0 + math.cos(math.pi * progress))
    return s.lr_end + (s.learning_rate - s.lr_end) * (1.0 - progress) ** s.power


def schedule_total(s, steps_per_epoch: int) -> int:
    """Steps the schedule spans: ``lr_schedule.total_steps``, or (-1) ``epochs x steps_per_epoch``."""
    return s.total_steps if s.total_steps > 0 else s.epochs * steps_per_epoch


def learning_rates(s, total: int, length: int | None = None) -> np.ndarray:
    """``float32 [length]`` (default ``total``): :func:`lr_at` for every update; past ``total`` the
    last value repeats."""
    n = total if length is None else max(length, 1)
    return np.array([lr_at(min(k, total), s, total) for k in range(n)], dtype=np.float32)


def decays(name: str, ndim: int) -> bool:
    """Whether weight decay applies to a parameter: not to norms, biases or other 1-D parameters."""
    low = name.lower()
    return ndim >= 2 and "layernorm" not in low and not low.endswith("bias")
