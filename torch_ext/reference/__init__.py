"""Plain PyTorch float64 references of every op: the ground truth of tests and self-checks."""

from torch_ext.reference.activation import silu_and_mul, silu_and_mul_backward
from torch_ext.reference.conv import conv2d, im2win_transform
from torch_ext.reference import attention, moe, quant

__all__ = ["attention", "conv2d", "im2win_transform", "moe", "quant", "silu_and_mul", "silu_and_mul_backward"]
