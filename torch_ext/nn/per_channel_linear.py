"""The common part of the W8A8 linear layers: an 8-bit weight ``w_q`` [N, K] with a float32 scale
per output channel ``w_scale`` [N], a frozen bias, and construction from an nn.Linear."""

from __future__ import annotations

import abc

import torch
from torch import nn

from torch_ext.nn._attributes import bias_in


class PerChannelQuantizedLinear(nn.Module, abc.ABC):
    """Base of Int8Linear and FP8Linear. Subclasses set ``weight_dtype`` and implement
    ``quantize_weight(weight) -> (w_q [N, K], w_scale [N, 1])`` and ``forward``."""

    weight_dtype: torch.dtype

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("w_q", torch.zeros(out_features, in_features, dtype=self.weight_dtype, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                  requires_grad=False) if bias else None)

    @staticmethod
    @abc.abstractmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w_q [N, K] of weight_dtype, w_scale [N, 1] float32) for a float weight [N, K]."""

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs):
        """Quantize ``linear.weight`` per output channel; the bias is copied."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, device=weight.device,
                     dtype=weight.dtype, **kwargs)
        w_q, w_scale = cls.quantize_weight(weight)
        module.w_q.copy_(w_q)
        module.w_scale.copy_(w_scale.reshape(-1))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def _apply(self, fn, recurse=True):
        """``.to(dtype)``, ``.half()`` and the like cast every floating buffer; the 8-bit weight
        (fp8 counts as floating) and its float32 scales keep their dtypes, and take everything
        else ``fn`` does (device moves, ``share_memory_``, ``to_empty``)."""
        kept = {name: self._buffers.pop(name) for name in ("w_q", "w_scale")}
        try:
            result = super()._apply(fn, recurse)
        finally:
            for name, tensor in kept.items():
                applied = fn(tensor)
                self._buffers[name] = applied if applied.dtype == tensor.dtype else tensor.to(applied.device)
        return result

    def bias_for(self, x: torch.Tensor) -> torch.Tensor | None:
        return bias_in(self, x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
