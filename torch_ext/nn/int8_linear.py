"""Int8Linear: the drop-in LLM.int8() linear layer (int8 weight per output channel, int8
activations per token, 16-bit outlier features)."""

from __future__ import annotations

import torch
from torch import nn

from torch_ext.ops.w8a8 import int8_linear, quantize_per_token


class Int8Linear(nn.Module):
    """``y = x @ W.T + b`` with W stored as int8 ``w_q`` [N, K] and float32 ``w_scale`` [N].

    Buffers ``w_q`` and ``w_scale`` (and a frozen ``bias`` Parameter) make the state_dict;
    ``outlier_threshold`` (default 6.0, the LLM.int8() paper's value; <= 0 disables the
    16-bit path) is a plain attribute. Build with ``from_linear`` or construct empty and load
    a state_dict.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, outlier_threshold: float = 6.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.outlier_threshold = outlier_threshold
        self.register_buffer("w_q", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("w_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype or torch.float32, device=device),
                                  requires_grad=False) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, outlier_threshold: float = 6.0) -> "Int8Linear":
        """Quantize ``linear.weight`` symmetrically per output channel (absmax / 127)."""
        weight = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, outlier_threshold,
                     device=weight.device, dtype=weight.dtype)
        w_q, w_scale = quantize_per_token(weight.float())
        module.w_q.copy_(w_q)
        module.w_scale.copy_(w_scale.reshape(-1))
        if linear.bias is not None:
            module.bias.data.copy_(linear.bias.detach())
        return module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return int8_linear(x, self.w_q, self.w_scale, bias, self.outlier_threshold)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, outlier_threshold={self.outlier_threshold}")
