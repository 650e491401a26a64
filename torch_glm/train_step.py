"""One optimizer update in PyTorch: the optimizer over the trainable parameters and its learning rates.

The twin of ``mindspore_glm/train_step.py``. :func:`make_optimizer` takes the per-update learning rates
of :func:`glm_common.schedules.learning_rates` as MindSpore's does; the optimizer carries them as its
``lr_scheduler`` (a ``LambdaLR`` the loop steps once per update). :class:`AdamWeightDecay` is
MindSpore's ``nn.AdamWeightDecay`` formula in torch (MindSpore ships its own). The step itself is eager
autograd in ``torch_glm.train`` (MindSpore's is the GRAPH-mode ``TrainOneStepCell``).
"""
from __future__ import annotations

import numpy as np
import torch

from glm_common.run_config import TrainSettings
from glm_common.schedules import decays

__all__ = ["make_optimizer", "AdamWeightDecay"]


def make_optimizer(params, s: TrainSettings, lrs: np.ndarray) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer.type`` over ``params`` (``(name, parameter)`` pairs, the trainable ones;
    weight decay on :func:`glm_common.schedules.decays` ones), stepping through the per-update learning
    rates ``lrs [n]`` (its ``lr_scheduler``).

    ``AdamW`` (bias-corrected): ``torch.optim.AdamW``; the AdamWeightDecay family: :class:`AdamWeightDecay`.
    """
    decay, rest = [], []
    for n, p in params:
        (decay if decays(n, p.dim()) else rest).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    if s.bias_correction:
        optimizer = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)
    else:
        optimizer = AdamWeightDecay(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)
    lrs = np.asarray(lrs, np.float64)
    optimizer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: float(lrs[min(k, len(lrs) - 1)]) / s.learning_rate if s.learning_rate else 0.0)
    return optimizer


class AdamWeightDecay(torch.optim.Optimizer):
    """MindSpore's ``nn.AdamWeightDecay`` (mindformers' AdamWeightDecay family) in torch: Adam without
    bias correction and decoupled weight decay, in float32 (see :mod:`glm_common.schedules`)::

        m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr * (m / (sqrt(v) + eps) + wd * p)
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                pf = p.float()
                if group["weight_decay"]:
                    update = update + group["weight_decay"] * pf
                p.copy_(pf - group["lr"] * update)
