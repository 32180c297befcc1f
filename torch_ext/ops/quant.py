"""Weight-only quantized linear: wrappers, fake kernels and autograd (gradient w.r.t. x and bias).

The weight is frozen (packed integers): backward returns the gradient of x through the
dequantized weight, so adapters such as LoRA can train on top of a quantized layer.
"""

from __future__ import annotations

import torch

from torch_ext.ops._dispatch import call_differentiable
from torch_ext.ops._gemm_dtype import grad_through_weight

_LINEAR = torch.ops.torch_ext.weight_only_linear
_DEQUANTIZE = torch.ops.torch_ext.dequantize_weight


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """``x @ W.T + bias`` for W [N, K] stored 4- or 8-bit in the packed layout (docs/quant-layout.md).

    ``x`` is [..., K]: float16/bfloat16 on CUDA, float32/bfloat16/float16 on CPU; the result
    [..., N] has x's dtype. ``group_size`` is the group along K (-1: per output channel).
    Differentiable in ``x`` and ``bias``.
    """
    return call_differentiable(_LINEAR, x, qweight, scales, zeros, bias, bits, group_size)


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int | None = None) -> torch.Tensor:
    """W [N, K] = (q - zero) * scale in the scales' dtype; K = in_features (default 16 * qweight.shape[1])."""
    return _DEQUANTIZE(qweight, scales, zeros, bits, group_size, in_features)


@torch.library.register_fake("torch_ext::weight_only_linear")
def _weight_only_linear_fake(x, qweight, scales, zeros, bias, bits, group_size):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    torch._check(scales.dim() == 2, lambda: f"scales must be [groups, N], got {tuple(scales.shape)}")
    return x.new_empty((*x.shape[:-1], scales.shape[1]))


@torch.library.register_fake("torch_ext::dequantize_weight")
def _dequantize_weight_fake(qweight, scales, zeros, bits, group_size, in_features=None):
    k = 16 * qweight.shape[1] if in_features is None else in_features
    return scales.new_empty((scales.shape[1], k))


def _setup_context(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bias, bits, group_size = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.config = (bits, group_size, x.shape[-1], x.dtype, bias is not None)


def _backward(ctx, grad_y: torch.Tensor):
    qweight, scales, zeros = ctx.saved_tensors
    bits, group_size, k, dtype, has_bias = ctx.config
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_through_weight(
            grad_y, lambda compute: _DEQUANTIZE(qweight, scales, zeros, bits, group_size, k).to(compute)).to(dtype)
    if has_bias and ctx.needs_input_grad[4]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0)
    return grad_x, None, None, None, grad_bias, None, None


torch.library.register_autograd("torch_ext::weight_only_linear", _backward, setup_context=_setup_context)
