"""Convolution modules: Im2winConv2d (drop-in for nn.Conv2d) and convert_conv2d."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ext.ops.conv import conv2d


class Im2winConv2d(nn.Conv2d):
    """``nn.Conv2d`` computed by torch_ext's im2win kernels.

    Same constructor arguments, parameters and state_dict keys as ``nn.Conv2d``, so
    checkpoints load either way. Padding modes other than ``'zeros'`` pad the input first,
    as ``nn.Conv2d`` does.
    """

    def _conv_forward(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.padding_mode != "zeros":
            input = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv2d(input, weight, bias, self.stride, 0, self.dilation, self.groups)
        return conv2d(input, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    @classmethod
    def from_conv2d(cls, conv: nn.Conv2d) -> "Im2winConv2d":
        """A new module sharing `conv`'s parameters (no copy)."""
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)
        new._parameters = dict(conv._parameters)
        new._buffers = dict(conv._buffers)
        new._modules = dict(conv._modules)
        return new


def convert_conv2d(module: nn.Module) -> nn.Module:
    """Replace every ``nn.Conv2d`` in `module` (itself included) by an ``Im2winConv2d``
    sharing its parameters; returns the converted module (converted in place)."""
    if type(module) is nn.Conv2d:
        return Im2winConv2d.from_conv2d(module)
    for name, child in module.named_children():
        setattr(module, name, convert_conv2d(child))
    return module
