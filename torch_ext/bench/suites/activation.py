"""Activation suite: ``silu_and_mul`` (gated MLP activation) against eager PyTorch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..case import Case, register_suite

# Token counts (decode, small batch, prefill) x LLM MLP intermediate sizes.
_TOKENS = (1, 64, 4096)
_DIMS = (4096, 14336)
_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}
# Quick mode: a few representative cases, small enough for a 2-core CPU.
_QUICK = {
    "cpu": ((64, 4096, torch.float32), (64, 14336, torch.bfloat16), (4096, 4096, torch.bfloat16)),
    "cuda": ((1, 4096, torch.bfloat16), (64, 14336, torch.float16), (4096, 14336, torch.bfloat16)),
}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

BASELINE = "torch (F.silu(a) * b)"


def silu_and_mul_ours(x: torch.Tensor) -> torch.Tensor:
    """The torch_ext op, looked up at call time so the suite imports without the extension."""
    return torch.ops.torch_ext.silu_and_mul(x)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch reference: ``silu(x[..., :d]) * x[..., d:]``."""
    a, b = x.chunk(2, -1)
    return F.silu(a) * b


def silu_and_mul_backward_torch(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Eager PyTorch gradient of silu(a) * b with respect to x = [a, b]."""
    a, b = x.chunk(2, -1)
    s = torch.sigmoid(a)
    return torch.cat([grad * b * s * (1 + a * (1 - s)), grad * a * s], dim=-1)


@register_suite("activation")
def activation_suite(device: str, quick: bool) -> list[Case]:
    """silu_and_mul cases for ``device``; unsupported device types get none."""
    kind = torch.device(device).type
    if quick:
        shapes = _QUICK.get(kind, ())
    else:
        shapes = tuple((t, d, dtype) for dtype in _DTYPES.get(kind, ()) for t in _TOKENS for d in _DIMS)
    cases = [_silu_and_mul_case(device, t, d, dtype) for t, d, dtype in shapes]
    return cases + [_backward_case(device, t, d, dtype) for t, d, dtype in shapes[-1:]]


def _backward_case(device: str, tokens: int, dim: int, dtype: torch.dtype) -> Case:
    def make_inputs(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(tokens, dim, generator=gen, device=device, dtype=dtype),
                torch.randn(tokens, 2 * dim, generator=gen, device=device, dtype=dtype))

    element = torch.empty((), dtype=dtype).element_size()
    return Case(
        family="activation", op="silu_and_mul_backward", label=f"T={tokens} d={dim} {_SHORT[dtype]}",
        make_inputs=make_inputs, ours=lambda g, x: torch.ops.torch_ext.silu_and_mul_backward(g, x),
        baselines={"torch (eager formula)": silu_and_mul_backward_torch},
        bytes=float((tokens * dim + 2 * tokens * 2 * dim) * element),  # read grad, x; write grad_x
        device=device,
    )


def _silu_and_mul_case(device: str, tokens: int, dim: int, dtype: torch.dtype) -> Case:
    def make_inputs(seed: int) -> tuple[torch.Tensor]:
        gen = torch.Generator(device=device).manual_seed(seed)
        return (torch.randn(tokens, 2 * dim, generator=gen, device=device, dtype=dtype),)

    element = torch.empty((), dtype=dtype).element_size()
    return Case(
        family="activation",
        op="silu_and_mul",
        label=f"T={tokens} d={dim} {_SHORT[dtype]}",
        make_inputs=make_inputs,
        ours=silu_and_mul_ours,
        baselines={BASELINE: silu_and_mul_torch},
        flops=0.0,  # memory-bound: the roofline is bandwidth
        bytes=float((tokens * 2 * dim + tokens * dim) * element),  # read x, write out
        device=device,
    )
