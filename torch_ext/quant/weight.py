"""QuantizedWeight: the packed tensors of one weight-only quantized linear layer."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class QuantizedWeight:
    """A weight W [N, K] stored as (q - zero) * scale in the kernels' packed layout.

    Attributes:
        qweight: int32 [ceil(N/16), ceil(K/16), 8 * bits] (docs/quant-layout.md).
        scales: [groups, N], float32 / float16 / bfloat16.
        zeros: [groups, N] integer zero points in the scales' dtype, or None (symmetric:
            zero = 2**(bits-1)).
        bits: 4 or 8.
        group_size: input channels per group; -1 = one group per output channel.
        shape: (N, K) of the original weight.
        perm: optional int64 [K] input-channel permutation (act-order): the packed weight's
            column i is the original column perm[i], so y = x[..., perm] @ W_packed^T.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]
    perm: torch.Tensor | None = None

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def groups(self) -> int:
        return self.scales.shape[0]

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "QuantizedWeight":
        """Moved to `device` and/or with scales and zeros in `dtype` (qweight and perm keep theirs)."""
        def move(t: torch.Tensor | None, cast: bool) -> torch.Tensor | None:
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        return dataclasses.replace(self, qweight=move(self.qweight, False), scales=move(self.scales, True),
                                   zeros=move(self.zeros, True), perm=move(self.perm, False))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [N, K] in the original input-channel order, in `dtype` (default: the scales')."""
        w = torch.ops.torch_ext.dequantize_weight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                                  self.in_features)
        if dtype is not None:
            w = w.to(dtype)
        return restore_input_order(w, self.perm)

    def nbytes(self) -> int:
        """Bytes the kernels read: qweight, scales and zeros."""
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros) if t is not None)


def restore_input_order(w: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """The packed weight's columns back in the original input-channel order (undoes act-order)."""
    if perm is None:
        return w
    original = torch.empty_like(w)
    original[:, perm.to(w.device)] = w
    return original
