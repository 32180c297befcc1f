"""silu_and_mul: the gated activation of SwiGLU MLPs (Llama, Mixtral, DeepSeek)."""

import torch

from torch_ext.ops._dispatch import call_differentiable

_OP = torch.ops.torch_ext.silu_and_mul
_BACKWARD_OP = torch.ops.torch_ext.silu_and_mul_backward


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Return ``silu(x[..., :d]) * x[..., d:]`` for ``x`` of shape ``[..., 2 * d]``.

    One pass over memory (the unfused form reads ``x`` twice and writes two temporaries).
    Math runs in float32 and rounds once to ``x.dtype``. Supports float32, float16 and
    bfloat16 on CPU and CUDA; differentiable with respect to ``x``.

    Raises:
        RuntimeError: if ``x`` has another dtype or an odd last dimension.
    """
    return call_differentiable(_OP, x)


@torch.library.register_fake("torch_ext::silu_and_mul")
def _silu_and_mul_fake(x: torch.Tensor) -> torch.Tensor:
    torch._check(x.dim() >= 1 and x.shape[-1] % 2 == 0, lambda: f"x must be [..., 2*d], got {tuple(x.shape)}")
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2))


@torch.library.register_fake("torch_ext::silu_and_mul_backward")
def _silu_and_mul_backward_fake(grad_out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output) -> None:
    (x,) = inputs
    ctx.save_for_backward(x)


def _backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    (x,) = ctx.saved_tensors
    return _BACKWARD_OP(grad_out.contiguous(), x)


torch.library.register_autograd("torch_ext::silu_and_mul", _backward, setup_context=_setup_context)
