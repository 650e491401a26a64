"""What the parity tests share: golden inputs, both backends' forward + gradients, masked comparisons.

Both backends are driven the same way: ``(logits [B, S, V] float32, loss, {HF name: gradient})`` from one
forward/backward pass over the golden batch, trainable parameters as the model says (all of them for
the plain model, the prefix encoder for the P-tuning model, the LoRA matrices for LoRA).
"""
from __future__ import annotations

import numpy as np

BATCH_KEYS = ("batch_input_ids", "batch_attention_mask", "batch_position_ids", "batch_labels")


def golden(path) -> dict:
    with np.load(path / "golden.npz") as g:
        return {k: g[k] for k in g.files}


def masked_max_diff(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """Max ``|a - b|`` over the positions ``[B, S]`` where ``mask`` is 1 (padding queries excluded)."""
    keep = mask.astype(bool)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64))[keep].max())


# ---------------------------------------------------------------------------------------- torch
def torch_device() -> str:
    """Where the torch side of the parity suite computes: ``PARITY_TORCH_DEVICE``, else CUDA when a GPU
    is present (float32 matmuls without TF32), else the CPU."""
    import os
    import torch
    device = os.environ.get("PARITY_TORCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return device


def torch_step(model, batch: dict, keys=BATCH_KEYS) -> tuple[np.ndarray, float, dict]:
    """One forward + backward in torch (on :func:`torch_device`; the model is moved there and back, so
    callers keep a CPU model with its gradients): logits, loss and the gradient of every trainable
    parameter under its HF name (peft's ``base_model.model.`` prefix and ``.default`` adapter name removed)."""
    import torch
    device = torch_device()
    home = next(model.parameters()).device
    model.zero_grad(set_to_none=True)
    model.to(device)
    try:
        ids, mask, pos, labels = (torch.as_tensor(batch[k]).to(device) for k in keys)
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
        out.loss.backward()
        logits, loss = out.logits.detach().float().cpu().numpy(), out.loss.item()
    finally:
        model.to(home)
    grads = {hf_name(n): p.grad.detach().float().cpu().numpy().copy() for n, p in model.named_parameters()
             if p.requires_grad}
    return logits, loss, grads


def hf_name(name: str) -> str:
    """peft parameter names -> the base model's HF names (``...lora_A.weight`` for LoRA matrices)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".default.weight", ".weight")


# ---------------------------------------------------------------------------------------- mindspore
def ms_tensors(batch: dict, keys=BATCH_KEYS) -> list:
    from mindspore import Tensor
    return [Tensor(np.asarray(batch[k]).astype(np.int32)) for k in keys]


def ms_step(model, batch: dict, params=None, keys=BATCH_KEYS) -> tuple[np.ndarray, float, dict]:
    """One forward + gradient (PYNATIVE ``value_and_grad``) in MindSpore; gradients under HF names
    (LoRA matrices under peft's ``lora_A.weight`` / ``lora_B.weight``)."""
    import mindspore as ms
    params = list(params if params is not None else model.trainable_params())

    def forward(input_ids, attention_mask, position_ids, labels):
        return model(input_ids, attention_mask, position_ids, labels)

    (loss, logits), grads = ms.value_and_grad(forward, None, params, has_aux=True)(*ms_tensors(batch, keys))
    out = {ms_param_hf_name(p.name): g.asnumpy().astype(np.float32) for p, g in zip(params, grads)}
    return ms.ops.cast(logits, ms.float32).asnumpy(), float(loss), out


def ms_param_hf_name(name: str) -> str:
    from glm_common.names import ms_to_hf
    if name.endswith(".mindpet_delta_lora_a"):
        return name[:-len(".mindpet_delta_lora_a")] + ".lora_A.weight"
    if name.endswith(".mindpet_delta_lora_b"):
        return name[:-len(".mindpet_delta_lora_b")] + ".lora_B.weight"
    return ms_to_hf(name)


def grad_diffs(a: dict, b: dict) -> dict:
    """``{name: (max |a - b|, max |a|)}`` over the same names (asserted)."""
    assert set(a) == set(b), f"trainable parameters differ: {sorted(set(a) ^ set(b))}"
    return {n: (float(np.abs(a[n] - b[n]).max()), float(np.abs(a[n]).max())) for n in a}
