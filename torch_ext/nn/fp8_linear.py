"""FP8Linear: e4m3 weights per output channel, e4m3 activations per token (dynamic)."""

from __future__ import annotations

import torch

from torch_ext.nn.per_channel_linear import PerChannelQuantizedLinear
from torch_ext.ops._gemm_dtype import grad_through_weight
from torch_ext.ops.w8a8 import quantize_fp8_per_row, scaled_fp8_mm


class _Fp8Linear(torch.autograd.Function):
    """Forward in fp8; backward straight-through: grad_x = grad_y @ W (dequantized)."""

    @staticmethod
    def forward(ctx, x, w_q, w_scale, bias):
        ctx.save_for_backward(w_q, w_scale)
        ctx.has_bias = bias is not None
        x_rows = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_fp8_per_row(x_rows)
        y = scaled_fp8_mm(x_q, w_q, x_scale, w_scale, bias, x.dtype)
        return y.reshape(*x.shape[:-1], w_q.shape[0])

    @staticmethod
    def backward(ctx, grad_y):
        w_q, w_scale = ctx.saved_tensors
        grad_x = grad_through_weight(grad_y, lambda compute: (w_q.float() * w_scale.reshape(-1, 1)).to(compute))
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias


class FP8Linear(PerChannelQuantizedLinear):
    """``y = x @ W.T + b`` with W stored as float8_e4m3fn ``w_q`` [N, K] and float32 ``w_scale``
    [N] (max|row| / 448); activations quantized per token to e4m3 on every call."""

    weight_dtype = torch.float8_e4m3fn

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_fp8_per_row(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, self.w_q, self.w_scale, self.bias_for(x))
