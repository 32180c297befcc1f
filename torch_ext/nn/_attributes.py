"""Attribute reads for the quantized layers' forward: nn.Module.__getattr__ costs ~0.7 us per
buffer or parameter lookup (project VM), which a decode step pays per layer and per tensor."""

from __future__ import annotations

import torch
from torch import nn


def bias_in(module: nn.Module, dtype: torch.dtype) -> torch.Tensor | None:
    """``module.bias`` (the registered Parameter, else the plain attribute a layer built without
    bias holds: None) in ``dtype``, with no call when it already is."""
    parameters = module._parameters
    bias = parameters["bias"] if "bias" in parameters else module.__dict__.get("bias")
    return bias if bias is None or bias.dtype == dtype else bias.to(dtype)
