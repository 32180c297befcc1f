"""Weight-only quantization of stacked MoE expert weights (fused_moe_quantized's format)."""

from __future__ import annotations

import dataclasses

import torch

from torch_ext.quant.quantize import quantize_weight


@dataclasses.dataclass
class QuantizedExperts:
    """E expert matrices [N, K], each in the weight-only packed layout (docs/quant-layout.md),
    stacked along a leading dimension: qweight [E, ceil(N/16), ceil(K/16), 8 * bits], scales and
    zeros (None when symmetric) [E, groups, N]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int, int]  # (E, N, K)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """[E, N, K] in `dtype` (default: the scales')."""
        experts, _, k = self.shape
        w = torch.stack([torch.ops.torch_ext.dequantize_weight(
            self.qweight[e], self.scales[e], None if self.zeros is None else self.zeros[e], self.bits,
            self.group_size, k) for e in range(experts)])
        return w if dtype is None else w.to(dtype)


def quantize_experts(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                     scale_dtype: torch.dtype | None = None) -> QuantizedExperts:
    """Round-to-nearest quantization (as :func:`quantize_weight`) of each expert of w [E, N, K]."""
    if w.dim() != 3:
        raise ValueError(f"w must be stacked expert weights [E, N, K], got shape {tuple(w.shape)}")
    parts = [quantize_weight(w[e], bits, group_size, symmetric, scale_dtype) for e in range(w.shape[0])]
    zeros = None if symmetric else torch.stack([p.zeros for p in parts])
    return QuantizedExperts(torch.stack([p.qweight for p in parts]), torch.stack([p.scales for p in parts]), zeros,
                            bits, group_size, tuple(w.shape))
