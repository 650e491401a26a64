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

__all__ = ["MASTER_PREFIX", "make_optimizer", "AdamWeightDecay", "master_grads", "master_weights_to_model"]

#: the name prefix of the float32 master copies of weights kept in a lower precision (``master_weights.<param>``)
MASTER_PREFIX = "master_weights"


def make_optimizer(params, s: TrainSettings, lrs: np.ndarray) -> torch.optim.Optimizer:
    """The optimizer of ``optimizer.type`` over ``params`` (``(name, parameter)`` pairs, the trainable ones;
    weight decay on :func:`glm_common.schedules.decays` ones), stepping through the per-update learning
    rates ``lrs [n]`` (its ``lr_scheduler``).

    ``AdamW`` (bias-corrected): ``torch.optim.AdamW``; the AdamWeightDecay family: :class:`AdamWeightDecay`.

    Its states and the weights it updates are float32 whatever ``param_init_type``: a parameter kept in
    float16/bfloat16 is updated through a float32 master copy (mixed precision, as MindSpore's
    :func:`mindspore_glm.train_step.make_optimizer`); ``optimizer.master_pairs`` lists the
    ``(model parameter, master)`` pairs the loop goes through with :func:`master_grads` before the
    update and :func:`master_weights_to_model` after it (empty when every parameter is float32).
    """
    decay, rest = [], []
    pairs = []
    for n, p in params:
        if p.dtype != torch.float32:
            master = p.detach().float().clone().requires_grad_(True)
            pairs.append((p, master))
            p = master
        (decay if decays(n, p.dim()) else rest).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    if s.bias_correction:
        optimizer = torch.optim.AdamW(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)
    else:
        optimizer = AdamWeightDecay(groups, lr=s.learning_rate, betas=(s.beta1, s.beta2), eps=s.eps)
    lrs = np.asarray(lrs, np.float64)
    optimizer.master_pairs = pairs
    optimizer.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: float(lrs[min(k, len(lrs) - 1)]) / s.learning_rate if s.learning_rate else 0.0)
    return optimizer


def master_grads(optimizer) -> None:
    """The model's gradients (float16/bfloat16) as float32 gradients of the optimizer's master copies."""
    for p, master in getattr(optimizer, "master_pairs", ()):
        master.grad = None if p.grad is None else p.grad.float()
        p.grad = None


@torch.no_grad()
def master_weights_to_model(optimizer) -> None:
    """The updated float32 masters cast into the model's copies."""
    for p, master in getattr(optimizer, "master_pairs", ()):
        p.copy_(master)


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
