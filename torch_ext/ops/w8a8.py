"""W8A8 building blocks: per-token int8 quantization of activations and the scaled int8 GEMM,
with their fake kernels. Neither is differentiable (integer outputs / inputs)."""

from __future__ import annotations

import torch

_QUANTIZE = torch.ops.torch_ext.quantize_per_token
_MM = torch.ops.torch_ext.scaled_int8_mm


def quantize_per_token(x: torch.Tensor, clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 quantization of each row of ``x`` [..., K] (fp32/fp16/bf16).

    Returns ``(q, scale)``: ``scale = min(max|x|, clip) / 127`` (1 for an all-zero row) as
    float32 [..., 1] and ``q = saturate(round_half_even(x / scale))`` as int8 [..., K].
    """
    return _QUANTIZE(x, clip)


def scaled_int8_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                   bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(a @ b.T) * a_scale * b_scale + bias`` for int8 ``a`` [M, K] and ``b`` [N, K].

    The products are summed exactly in int32; ``a_scale`` is float32 [M, 1], ``b_scale`` float32
    [N] (per output channel) or [1]; the scaling and bias run in float32 and round once to
    ``out_dtype`` (float32, float16 or bfloat16). On the CPU, B's packed form is cached per
    tensor version like the conv weights (torch_ext._C.clear_conv_weight_cache() frees it).
    """
    return _MM(a, b, a_scale, b_scale, bias, out_dtype)


@torch.library.register_fake("torch_ext::quantize_per_token")
def _quantize_per_token_fake(x, clip=None):
    torch._check(x.dim() >= 1, lambda: "x must have at least one dimension")
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.register_fake("torch_ext::scaled_int8_mm")
def _scaled_int8_mm_fake(a, b, a_scale, b_scale, bias, out_dtype):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "a and b must be 2-D")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
