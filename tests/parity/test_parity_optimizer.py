"""One optimizer step, torch vs MindSpore, compared parameter by parameter (full fine-tuning and LoRA).

MindSpore's optimizer is the runner's (:func:`mindspore_glm.train_step.make_optimizer`, ``nn.AdamWeightDecay``
over the weight-decay groups of :func:`glm_common.schedules.decays`); torch's is the one its runner pairs
with it (:class:`torch_glm.train_step.AdamWeightDecay`, or ``torch.optim.AdamW`` for ``optimizer.type: AdamW``).
Hyperparameters: lr 1e-3, betas (0.9, 0.95), eps 1e-8, weight decay 0.1 (AdamWeightDecay) / 0 (AdamW:
the MindSpore runner refuses AdamW with weight decay).

Two comparisons each:
- the same gradients (torch's) into both optimizers: the update formulas alone, element by element;
- each backend with its own gradients (end to end). Adam's first step is ``lr * g / (|g| + eps')``
  (``eps' = eps / sqrt(1 - b2)``), nearly ``lr * sign(g)``: where ``|g|`` is comparable to eps the two
  backends' float32 gradients (which differ by ~1e-7 relative, see test_parity_forward) can give
  updates anywhere in ``[-lr, lr]``. Those elements are bounded by 2 * lr; every element with ``|g| >
  1e-4`` is compared at 1e-6.

Bias correction: MindSpore folds ``sqrt(1 - b2^t) / (1 - b1^t)`` into the learning rate, which makes it
torch's AdamW with ``eps * / sqrt(1 - b2^t)`` (step 1, b2 0.95: eps x 4.47). Measured difference to
``torch.optim.AdamW`` with the same eps after one step, same gradients: 3.6e-4 on elements whose
gradient is ~1e-8 (36% of lr); about ``lr * (eps' - eps) / |g|`` elsewhere (3.6e-7 at ``|g| = 1e-4``,
asserted under 1e-6 there); with eps rescaled it is gone (asserted at 3e-7, 2.5 float32 ulp at ``|p| ~ 1``).
"""
import types

import numpy as np
import pytest
import mindspore as ms
import torch
from mindspore import Tensor

from glm_common.schedules import decays
from tests.conftest import TINY_MODEL
from tests.parity.helpers import golden, hf_name, ms_param_hf_name, ms_step, torch_step

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
LR, B1, B2, EPS, WD = 1e-3, 0.9, 0.95, 1e-8, 0.1
R, ALPHA = 4, 8.0


def _settings(kind):
    return types.SimpleNamespace(weight_decay=WD if kind == "AdamWeightDecay" else 0.0,
                                 bias_correction=kind == "AdamW", beta1=B1, beta2=B2, eps=EPS, source="test")


def _torch_optimizer(model, kind, eps=EPS):
    from torch_glm.train_step import AdamWeightDecay
    wd = _settings(kind).weight_decay
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in named if decays(hf_name(n), p.dim())], "weight_decay": wd},
              {"params": [p for n, p in named if not decays(hf_name(n), p.dim())], "weight_decay": 0.0}]
    groups = [gr for gr in groups if gr["params"]]
    if kind == "AdamW":
        return torch.optim.AdamW(groups, lr=LR, betas=(B1, B2), eps=eps)
    return AdamWeightDecay(groups, lr=LR, betas=(B1, B2), eps=EPS)


def _models(mode):
    """Fresh torch and MindSpore models with the same trainable parameters (and LoRA values)."""
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from mindspore_glm.lora import apply_lora as ms_lora
    from torch_glm.lora import apply_lora
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    pt, msm = PTModel.from_pretrained(TINY_MODEL), MSModel.from_pretrained(TINY_MODEL)
    msm.set_train(False)
    if mode == "full":
        for p in pt.parameters():
            p.requires_grad_(True)
        return pt, msm
    pt = apply_lora(pt, r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["query_key_value"])
    ms_lora(msm, r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="query_key_value")
    rng = np.random.default_rng(0)
    pt_params = {hf_name(n): p for n, p in pt.named_parameters() if p.requires_grad}
    for p in msm.trainable_params():   # the same A and a non-zero B in both, so A gets a gradient too
        value = rng.normal(0, 0.1, p.shape).astype(np.float32)
        p.set_data(Tensor(value))
        with torch.no_grad():
            pt_params[ms_param_hf_name(p.name)].copy_(torch.from_numpy(value))
    return pt, msm


def _ms_optimizer(msm, kind):
    from mindspore_glm.train_step import make_optimizer
    return make_optimizer(msm.trainable_params(), _settings(kind), np.array([LR], np.float32))


def _ms_apply(opt, grads: dict):
    """One update with ``{hf name: gradient}``, in the optimizer's own parameter order."""
    opt(tuple(Tensor(grads[ms_param_hf_name(p.name)]) for p in opt.parameters))
    return {ms_param_hf_name(p.name): p.asnumpy() for p in opt.parameters}


def _torch_apply(model, opt, grads: dict):
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.grad = torch.from_numpy(grads[hf_name(n)]).clone()
    opt.step()
    return {hf_name(n): p.detach().numpy().copy() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module", params=["full", "lora"])
def step_inputs(request):
    """The starting parameters and both backends' gradients on the golden batch."""
    g = golden(TINY_MODEL)
    pt, msm = _models(request.param)
    _, _, pt_grads = torch_step(pt, g)
    _, _, ms_grads = ms_step(msm, g)
    start = {hf_name(n): p.detach().numpy().copy() for n, p in pt.named_parameters() if p.requires_grad}
    expected = 17 if request.param == "full" else 4
    assert len(pt_grads) == len(ms_grads) == expected
    return request.param, start, pt_grads, ms_grads


def _compare(a: dict, b: dict, tol: float, grads=None, small_bound=None):
    assert set(a) == set(b)
    worst = 0.0
    for name in a:
        d = np.abs(a[name].astype(np.float64) - b[name])
        if grads is not None:
            big = np.abs(grads[name]) > 1e-4
            assert d[~big].max(initial=0) <= small_bound, f"{name}: {d[~big].max():.3g}"
            d = d[big]
        worst = max(worst, float(d.max(initial=0)))
        assert d.max(initial=0) <= tol, f"{name}: max |torch - MindSpore| {d.max():.3g} after one step"
    return worst


@pytest.mark.parametrize("kind", ["AdamWeightDecay", "AdamW"])
def test_one_step_same_gradients(step_inputs, kind):
    mode, start, pt_grads, _ = step_inputs
    pt, msm = _models(mode)
    after_ms = _ms_apply(_ms_optimizer(msm, kind), pt_grads)
    eps = EPS / np.sqrt(1 - B2) if kind == "AdamW" else EPS     # MindSpore's bias correction = eps / sqrt(1 - b2^t)
    after_pt = _torch_apply(pt, _torch_optimizer(pt, kind, eps), pt_grads)
    moved = max(float(np.abs(after_pt[n] - start[n]).max()) for n in start)
    assert moved > 0.4 * LR    # the step really moved them (no bias correction: lr * 0.1 / sqrt(0.05) = 0.45 lr)
    _compare(after_pt, after_ms, 3e-7)


def test_adamw_same_eps_difference_is_bias_correction_only(step_inputs):
    """torch.optim.AdamW with the same eps: equal where |g| >> eps, at most 2 * lr apart elsewhere."""
    mode, start, pt_grads, _ = step_inputs
    pt, msm = _models(mode)
    after_ms = _ms_apply(_ms_optimizer(msm, "AdamW"), pt_grads)
    after_pt = _torch_apply(pt, _torch_optimizer(pt, "AdamW"), pt_grads)
    _compare(after_pt, after_ms, 1e-6, grads=pt_grads, small_bound=2 * LR)


@pytest.mark.parametrize("kind", ["AdamWeightDecay", "AdamW"])
def test_one_step_end_to_end(step_inputs, kind):
    """Each backend with its own gradients and its own optimizer."""
    mode, start, pt_grads, ms_grads = step_inputs
    pt, msm = _models(mode)
    after_ms = _ms_apply(_ms_optimizer(msm, kind), ms_grads)
    eps = EPS / np.sqrt(1 - B2) if kind == "AdamW" else EPS
    after_pt = _torch_apply(pt, _torch_optimizer(pt, kind, eps), pt_grads)
    _compare(after_pt, after_ms, 1e-6, grads=pt_grads, small_bound=2 * LR)
