"""Weight-only int8 / int4 quantization for serving (ChatGLM2's own ``model.quantize(8 / 4)``).

As THUDM's ``quantization.py``, only the transformer layers' linears are quantized (``query_key_value``,
``dense``, ``dense_h_to_4h``, ``dense_4h_to_h``): the word embedding and the output layer keep their
dtype. Weights are stored as integers with symmetric scales, activations stay in the model's dtype:

- int8: one scale per output row (``max|w| / 127``); the matmul runs on the int8 weight cast to the
  activation dtype and the scales multiply its output, as gpt-fast's ``WeightOnlyInt8Linear`` does.
- int4: one scale per group of :data:`INT4_GROUP` input columns (``max|w| / 7``, values in ``[-8, 7]``),
  two values packed per byte; the weight is unpacked and scaled for each call.

Plain torch (no custom kernels), so it runs on CPU and CUDA alike; it trades speed for memory (the
linears take about 1/4 (int8) or 1/7 (int4) of their float32 bytes).

There is no ``mindspore_glm`` twin of this module: MindSpore serving on Ascend keeps float16 weights
(the ``--quantize`` flag of ``glm2-serve`` is refused there in one line).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WeightOnlyLinear", "quantize", "QUANTIZED_LINEARS", "INT4_GROUP"]

#: the linears ChatGLM2's quantize() replaces (leaf names inside each transformer layer)
QUANTIZED_LINEARS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")
#: input columns sharing one int4 scale (a row that does not divide by it gets one scale per row)
INT4_GROUP = 32


class WeightOnlyLinear(nn.Module):
    """An ``nn.Linear`` with its weight stored as int8 or packed int4 and float scales."""

    def __init__(self, linear: nn.Linear, bits: int):
        super().__init__()
        if bits not in (8, 4):
            raise ValueError(f"bits: 8 or 4, got {bits}")
        w = linear.weight.detach().float()
        out_features, in_features = w.shape
        self.bits, self.in_features, self.out_features = bits, in_features, out_features
        self.dtype = linear.weight.dtype
        if bits == 8:
            scale = w.abs().amax(1, keepdim=True).clamp(min=1e-12) / 127
            self.register_buffer("qweight", torch.round(w / scale).clamp(-127, 127).to(torch.int8))
            self.register_buffer("scale", scale.squeeze(1).to(self.dtype))
        else:
            self.group = INT4_GROUP if in_features % INT4_GROUP == 0 and in_features % 2 == 0 else in_features
            g = w.view(out_features, in_features // self.group, self.group)
            scale = g.abs().amax(2, keepdim=True).clamp(min=1e-12) / 7
            q = (torch.round(g / scale).clamp(-8, 7) + 8).to(torch.uint8).view(out_features, in_features)
            self.register_buffer("qweight", q[:, 0::2] | (q[:, 1::2] << 4))
            self.register_buffer("scale", scale.squeeze(2).to(self.dtype))
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The weight ``[out, in]`` as the matmul sees it (float32)."""
        if self.bits == 8:
            return self.qweight.float() * self.scale.float()[:, None]
        q = torch.stack([self.qweight & 0xF, self.qweight >> 4], -1).view(self.out_features, self.in_features)
        g = (q.float() - 8).view(self.out_features, -1, self.group) * self.scale.float()[:, :, None]
        return g.view(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized().to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}"


@torch.no_grad()
def quantize(model: nn.Module, bits: int) -> int:
    """Replace the transformer layers' linears of ``model`` (in place) by :class:`WeightOnlyLinear`;
    returns how many were replaced."""
    if bits not in (8, 4):
        raise ValueError(f"--quantize: 8 or 4 bits, got {bits}")
    count = 0
    for layer in model.transformer.encoder.layers:
        for parent in layer.modules():
            for name, child in list(parent.named_children()):
                if name in QUANTIZED_LINEARS and isinstance(child, nn.Linear):
                    setattr(parent, name, WeightOnlyLinear(child, bits).to(child.weight.device))
                    count += 1
    return count
