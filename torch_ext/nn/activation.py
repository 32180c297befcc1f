"""Activation modules."""

import torch
from torch import nn

from torch_ext.ops.activation import silu_and_mul


class SiluAndMul(nn.Module):
    """``silu(x[..., :d]) * x[..., d:]``: the gating of a SwiGLU MLP in one fused op.

    Replaces ``F.silu(gate_proj(x)) * up_proj(x)`` when gate and up projections are
    concatenated into one ``[2 * d, hidden]`` weight.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
