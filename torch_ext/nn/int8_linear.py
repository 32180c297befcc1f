"""Int8Linear: the drop-in LLM.int8() linear layer (int8 weight per output channel, int8
activations per token, 16-bit outlier features)."""

from __future__ import annotations

import torch

from torch_ext.nn.per_channel_linear import PerChannelQuantizedLinear
from torch_ext.ops.w8a8 import int8_linear, quantize_per_token


class Int8Linear(PerChannelQuantizedLinear):
    """``y = x @ W.T + b`` with W stored as int8 ``w_q`` [N, K] and float32 ``w_scale`` [N]
    (absmax / 127 per output channel).

    Buffers ``w_q`` and ``w_scale`` (and a frozen ``bias`` Parameter) make the state_dict;
    ``outlier_threshold`` (default 6.0, the LLM.int8() paper's value; <= 0 disables the
    16-bit path) is a plain attribute. Build with ``from_linear(linear, outlier_threshold=...)``
    or construct empty and load a state_dict.
    """

    weight_dtype = torch.int8

    def __init__(self, in_features: int, out_features: int, bias: bool = True, outlier_threshold: float = 6.0,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device, dtype)
        self.outlier_threshold = outlier_threshold

    @staticmethod
    def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_per_token(weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self._buffers
        return int8_linear(x, buffers["w_q"], buffers["w_scale"], self.bias_for(x), self.outlier_threshold)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier_threshold={self.outlier_threshold}"
