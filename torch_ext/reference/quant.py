"""References for the weight-only quantized ops: unpack, dequantize in float64, matmul."""

from __future__ import annotations

import torch

from torch_ext.quant import layout
from torch_ext.quant.weight import restore_input_order


def dequantize_weight(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      group_size: int, in_features: int | None = None) -> torch.Tensor:
    """W [N, K] = (q - zero) * scale in float64, K = in_features (default 16 * qweight.shape[1])."""
    n = scales.shape[1]
    k = layout.TILE * qweight.shape[1] if in_features is None else in_features
    group = layout.tiles_for(k) * layout.TILE if group_size == -1 else group_size
    q = layout.unpack_qweight(qweight.cpu(), bits, n, k).to(torch.float64)
    group_of_k = torch.arange(k) // group
    scale = scales.cpu().to(torch.float64)[group_of_k].t()
    zero = (torch.full_like(scale, 2 ** (bits - 1)) if zeros is None
            else zeros.cpu().to(torch.float64)[group_of_k].t())
    return (q - zero) * scale


def weight_only_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                       bias: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """x [..., K] @ W^T + bias in float64."""
    w = dequantize_weight(qweight, scales, zeros, bits, group_size, x.shape[-1])
    y = x.cpu().to(torch.float64) @ w.t()
    return y if bias is None else y + bias.cpu().to(torch.float64)


def original_weight(qw) -> torch.Tensor:
    """The float64 weight [N, K] a QuantizedWeight stands for, in the original input-channel
    order (undoing act-order's perm), computed without the op."""
    packed = dequantize_weight(qw.qweight, qw.scales, qw.zeros, qw.bits, qw.group_size, qw.in_features)
    return restore_input_order(packed, qw.perm)
