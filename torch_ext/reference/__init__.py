"""Plain PyTorch float64 references of every op: the ground truth of tests and self-checks."""

from torch_ext.reference.activation import silu_and_mul, silu_and_mul_backward

__all__ = ["silu_and_mul", "silu_and_mul_backward"]
