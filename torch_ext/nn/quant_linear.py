"""QuantLinear: a drop-in ``nn.Linear`` whose weight is stored 4- or 8-bit (weight-only quantization)."""

from __future__ import annotations

import torch
from torch import nn

from torch_ext.nn._attributes import bias_in
from torch_ext.ops.quant import weight_only_linear
from torch_ext.quant import awq, gptq, layout
from torch_ext.quant.quantize import check_quant_config, quantize_weight
from torch_ext.quant.weight import QuantizedWeight


def _groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


class QuantLinear(nn.Module):
    """``y = x @ W^T + bias`` with W held as a QuantizedWeight (docs/quant-layout.md).

    Buffers: ``qweight`` (int32), ``scales`` and ``zeros`` (float, the module's dtype) and
    ``perm`` (int64 act-order input permutation). ``zeros`` is None for symmetric weights and
    ``perm`` None without act-order, so ``state_dict`` holds only what the weight needs.
    ``.to(dtype)`` converts scales, zeros and bias only: ``nn.Module`` casts floating tensors
    alone, so qweight and perm keep their integer dtypes.

    The weight is frozen; ``bias`` is a Parameter with ``requires_grad=False`` so adapter code
    (LoRA) may unfreeze it. Gradients flow to ``x`` and, when enabled, ``bias``.

    Build one from a float layer or a checkpoint with the ``from_*`` constructors. The plain
    constructor makes an empty module of the right shapes for ``load_state_dict``: ``bits``
    and ``group_size`` are not in the state_dict, and ``symmetric`` / ``act_order`` / ``bias``
    decide which of zeros / perm / bias exist, so they must match the saved module (a strict
    load reports the missing or unexpected key). Until loaded it computes ``bias`` (zeros):
    all scales are 0.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128, bias: bool = True,
                 symmetric: bool = False, act_order: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        check_quant_config(bits, group_size)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        floats = dict(device=device, dtype=dtype)
        tiles = (layout.tiles_for(out_features), layout.tiles_for(in_features), layout.words_per_tile(bits))
        groups = (_groups(in_features, group_size), out_features)
        self.register_buffer("qweight", torch.zeros(tiles, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.zeros(groups, **floats))
        self.register_buffer("zeros", None if symmetric else torch.zeros(groups, **floats))
        self.register_buffer("perm", torch.arange(in_features, device=device) if act_order else None)
        self.bias = nn.Parameter(torch.zeros(out_features, **floats), requires_grad=False) if bias else None

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> "QuantLinear":
        """A module holding `qw`'s tensors (no copy) and `bias` [N] (frozen)."""
        n, k = qw.shape
        if bias is not None and tuple(bias.shape) != (n,):
            raise ValueError(f"bias must have shape ({n},) (out_features), got {tuple(bias.shape)}")
        # Built on the meta device (no allocation), then the real tensors take the buffers' places.
        module = cls(k, n, qw.bits, qw.group_size, bias=bias is not None, symmetric=qw.zeros is None,
                     act_order=qw.perm is not None, device="meta", dtype=qw.scales.dtype)
        module.qweight, module.scales, module.zeros = qw.qweight, qw.scales, qw.zeros
        module.perm = None if qw.perm is None else qw.perm.to(torch.int64)
        module.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        return module

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 4, group_size: int = 128,
                    symmetric: bool = False) -> "QuantLinear":
        """Round-to-nearest quantization of `linear`'s weight (quantize_weight): scales in the
        layer's dtype when float16/bfloat16, else float32; the bias is copied unchanged."""
        qw = quantize_weight(linear.weight, bits, group_size, symmetric)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_quantized(qw, bias)

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None) -> "QuantLinear":
        """From one AutoAWQ GEMM layer's tensors (torch_ext.quant.from_awq)."""
        return cls.from_quantized(awq.from_awq(qweight, qzeros, scales, group_size), bias)

    @classmethod
    def from_gptq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                  g_idx: torch.Tensor | None = None, bits: int = 4, sym: bool = True,
                  bias: torch.Tensor | None = None) -> "QuantLinear":
        """From one GPTQ v1 layer's tensors (torch_ext.quant.from_gptq); act-order sets perm."""
        return cls.from_quantized(gptq.from_gptq(qweight, qzeros, scales, g_idx, bits, sym), bias)

    def quantized_weight(self) -> QuantizedWeight:
        """The buffers as a QuantizedWeight (shared, not copied), e.g. to dequantize."""
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features), self.perm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The op converts scales/zeros to x's dtype where its kernels need it (CUDA), so a
        # module kept in another dtype still works, at one small conversion per call.
        # Buffers straight from the module's dict (nn/_attributes.py: project VM, 64 x 64 layer,
        # no_grad: 12.4 us per call through attribute lookups and an unconditional bias.to, 7.5
        # this way; the functional op alone 5.4, nn.Linear 5.8).
        buffers = self._buffers
        perm = buffers["perm"]
        if perm is not None:
            x = x.index_select(-1, perm)
        return weight_only_linear(x, buffers["qweight"], buffers["scales"], buffers["zeros"], bias_in(self, x.dtype),
                                  self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, group_size={self.group_size}")
