"""References for the activation ops."""

import torch
import torch.nn.functional as F


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul_backward(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    s = torch.sigmoid(gate)
    d_gate = grad_out * up * s * (1 + gate * (1 - s))
    d_up = grad_out * gate * s
    return torch.cat([d_gate, d_up], dim=-1)
