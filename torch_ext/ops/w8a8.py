"""W8A8 building blocks: per-token int8 quantization of activations and the scaled int8 GEMM,
with their fake kernels. Neither is differentiable (integer outputs / inputs)."""

from __future__ import annotations

import torch

from torch_ext.ops._dispatch import call_differentiable
from torch_ext.ops._gemm_dtype import grad_through_weight

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


_INT8_LINEAR = torch.ops.torch_ext.int8_linear


def int8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
                outlier_threshold: float = 6.0) -> torch.Tensor:
    """LLM.int8() linear layer: ``x @ (w_q * w_scale[:, None]).T + bias``.

    ``x`` [..., K] is quantized per token to int8 and multiplied with the int8 weight ``w_q``
    [N, K] (per-output-channel float32 scales ``w_scale`` [N]), except the input features whose
    magnitude exceeds ``outlier_threshold`` somewhere in ``x``: those go through a 16-bit
    matmul with their weight columns dequantized on the fly. At most max(64, K / 64) features
    (the largest) take that path: a fixed count keeps shapes static, so no device-to-host
    synchronization is needed on CUDA. ``outlier_threshold <= 0`` disables the decomposition. Differentiable in ``x`` (straight-through: the gradient uses
    the dequantized weight) and ``bias``.
    """
    return call_differentiable(_INT8_LINEAR, x, w_q, w_scale, bias, outlier_threshold)


@torch.library.register_fake("torch_ext::int8_linear")
def _int8_linear_fake(x, w_q, w_scale, bias, outlier_threshold):
    torch._check(w_q.dim() == 2, lambda: "w_q must be [N, K]")
    return x.new_empty((*x.shape[:-1], w_q.shape[0]))


def _int8_linear_setup(ctx, inputs, output) -> None:
    x, w_q, w_scale, bias, _ = inputs
    ctx.save_for_backward(w_q, w_scale)
    ctx.has_bias = bias is not None


def _int8_linear_backward(ctx, grad_y: torch.Tensor):
    w_q, w_scale = ctx.saved_tensors
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_through_weight(grad_y, lambda compute: (w_q.float() * w_scale.reshape(-1, 1)).to(compute))
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(dim=0)
    return grad_x, None, None, grad_bias, None


torch.library.register_autograd("torch_ext::int8_linear", _int8_linear_backward, setup_context=_int8_linear_setup)


_FP8_MM = torch.ops.torch_ext.scaled_fp8_mm
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def scaled_fp8_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``(a @ b.T) * a_scale * b_scale + bias`` for float8_e4m3fn ``a`` [M, K] and ``b`` [N, K].

    ``a_scale`` float32 [M, 1] (per row) or one element, ``b_scale`` float32 [N] or [1];
    products exact, sums in float32, one rounding to ``out_dtype``. CPU: a float32 GEMM of the
    widened operands (for tests and CPU users).
    """
    return _FP8_MM(a, b, a_scale, b_scale, bias, out_dtype)


def quantize_fp8_per_row(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``x`` [..., K] scaled into e4m3's range: (float8_e4m3fn [..., K], float32 scale [..., 1]),
    scale = max|row| / 448 (1 for an all-zero row), values rounded to nearest even by the cast."""
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return (x.float() / scale).to(torch.float8_e4m3fn), scale


@torch.library.register_fake("torch_ext::scaled_fp8_mm")
def _scaled_fp8_mm_fake(a, b, a_scale, b_scale, bias, out_dtype):
    torch._check(a.dim() == 2 and b.dim() == 2, lambda: "a and b must be 2-D")
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)
