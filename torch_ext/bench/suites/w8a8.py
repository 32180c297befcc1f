"""W8A8 suite: ``scaled_int8_mm`` against F.linear (fp32 and bf16 on the CPU, bf16 on CUDA) and
``torch._int_mm``; ``quantize_per_token`` against the same math in torch ops; ``int8_linear``
against F.linear and its decomposition in torch ops; ``scaled_fp8_mm``. Shapes from
../shared/reference/shapes.md (Llama-3-8B q/o and gate/up)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ... import _C
from ..case import Case, on_amx_tiles, register_suite

_MM_SHAPES = {"cpu": ((4096, 4096), (14336, 4096)), "cuda": ((4096, 4096), (8192, 8192))}
_MM_ROWS = {"cpu": (1, 16, 256, 1024), "cuda": (1, 16, 256, 2048, 4096)}
_QUICK_MM = {"cpu": ((4096, 4096, 256),), "cuda": ((8192, 8192, 4096),)}
_TOKENS = (1, 64, 4096)
_QUICK_TOKENS = (64,)


def _mm_case(device: str, n: int, k: int, m: int) -> Case:
    kind = torch.device(device).type

    def make_inputs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int8)
        x = torch.randn(m, k, generator=gen)
        w = torch.randn(n, k, generator=gen)
        tensors = (a, b, torch.rand(m, 1, generator=gen), torch.rand(n, generator=gen), x.bfloat16(), w.bfloat16())
        if kind == "cpu":
            tensors += (x, w)
        return tuple(t.to(device) for t in tensors)

    baselines = {"F.linear bf16": lambda a, b, sa, sb, xb, wb, *_: F.linear(xb, wb)}
    if kind == "cpu":
        baselines = {"F.linear fp32": lambda a, b, sa, sb, xb, wb, x, w: F.linear(x, w), **baselines}
    if kind == "cpu" or m > 16:  # torch._int_mm on CUDA needs more than 16 rows
        baselines["torch._int_mm"] = lambda a, b, *_: torch._int_mm(a, b.t())
    return Case(
        family="w8a8", op="scaled_int8_mm", label=f"M={m} {n}x{k} -> bf16",
        make_inputs=make_inputs,
        ours=lambda a, b, sa, sb, *_: torch.ops.torch_ext.scaled_int8_mm(a, b, sa, sb, None, torch.bfloat16),
        baselines=baselines,
        flops=2.0 * m * n * k, bytes=float(m * k + n * k + 2 * m * n), device=device,
        compute_dtype=torch.int8,
    )


def _fp8_case(device: str, n: int, k: int, m: int) -> Case:
    """scaled_fp8_mm against F.linear bf16 and torch._scaled_mm (CUDA, sm_89+) or the same math in
    torch ops (CPU, where ours is a reference-grade fp32 GEMM of the widened values)."""

    def make_inputs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        x, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
        tensors = (x.to(torch.float8_e4m3fn), w.to(torch.float8_e4m3fn), torch.rand(m, 1, generator=gen),
                   torch.rand(1, n, generator=gen), x.bfloat16(), w.bfloat16())
        return tuple(t.to(device) for t in tensors)

    return Case(
        family="w8a8", op="scaled_fp8_mm", label=f"M={m} {n}x{k} e4m3 -> bf16",
        make_inputs=make_inputs,
        ours=lambda a, b, sa, sb, *_: torch.ops.torch_ext.scaled_fp8_mm(a, b, sa, sb.reshape(-1), None,
                                                                          torch.bfloat16),
        baselines={"F.linear bf16": lambda a, b, sa, sb, xb, wb: F.linear(xb, wb),
                   **({"torch._scaled_mm": lambda a, b, sa, sb, *_: torch._scaled_mm(a, b.t(), sa, sb,
                                                                                    out_dtype=torch.bfloat16)}
                      if torch.device(device).type == "cuda" else
                      {"torch ops (widen, matmul, scale)": lambda a, b, sa, sb, *_:
                       ((a.float() @ b.float().t()) * sa * sb).bfloat16()})},
        flops=2.0 * m * n * k, bytes=float(m * k + n * k + 2 * m * n), device=device,
        compute_dtype=torch.float8_e4m3fn,
    )


def _int8_linear_case(device: str, n: int, k: int, m: int) -> Case:
    """int8_linear (LLM.int8() with 4 planted outlier features) against F.linear and the same
    decomposition written with torch ops."""
    from torch_ext.ops.w8a8 import quantize_per_token, scaled_int8_mm

    dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16

    def make_inputs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(m, k, generator=gen)
        x[:, :4] *= 50.0
        w = torch.randn(n, k, generator=gen)
        w_q, w_scale = quantize_per_token(w)
        return tuple(t.to(device) for t in (x.to(dtype), w_q, w_scale.reshape(-1), w.to(dtype)))

    def torch_decomposition(x, w_q, w_scale, w):
        outliers = (x.abs().amax(0) > 6.0).nonzero().squeeze(1)
        regular = x.index_fill(1, outliers, 0)
        x_q, x_scale = quantize_per_token(regular)
        y = scaled_int8_mm(x_q, w_q, x_scale, w_scale, None, x.dtype)
        columns = (w_q.index_select(1, outliers).float() * w_scale[:, None]).to(x.dtype)
        return y + x.index_select(1, outliers) @ columns.t()

    return Case(
        family="w8a8", op="int8_linear", label=f"M={m} {n}x{k} {str(dtype).split('.')[-1]}, 4 outliers",
        make_inputs=make_inputs,
        ours=lambda x, w_q, w_scale, w: torch.ops.torch_ext.int8_linear(x, w_q, w_scale, None, 6.0),
        baselines={f"F.linear {str(dtype).split('.')[-1]}": lambda x, w_q, w_scale, w: F.linear(x, w),
                   "the decomposition in torch ops": torch_decomposition},
        flops=2.0 * m * n * k, bytes=float(n * k + m * k * 5 + m * n * 4), device=device,
        compute_dtype=torch.int8,  # the GEMM is int8; the outlier columns are a sliver
    )


def _torch_quantize(x: torch.Tensor):
    scale = x.abs().amax(dim=-1, keepdim=True).float() / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.round(x.float() / scale).clamp(-128, 127).to(torch.int8), scale


def _quantize_case(device: str, tokens: int, k: int, dtype: torch.dtype) -> Case:
    def make_inputs(seed: int):
        return (torch.randn(tokens, k, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device),)

    element = torch.empty((), dtype=dtype).element_size()
    return Case(
        family="w8a8", op="quantize_per_token", label=f"T={tokens} K={k} {str(dtype).split('.')[-1]}",
        make_inputs=make_inputs, ours=lambda x: torch.ops.torch_ext.quantize_per_token(x, None),
        baselines={"torch ops (amax, div, round, clamp)": _torch_quantize},
        bytes=float(tokens * k * (element + 1) + tokens * 4), device=device,
    )


@register_suite("w8a8")
def w8a8_suite(device: str, quick: bool) -> list[Case]:
    kind = torch.device(device).type
    if kind not in _MM_SHAPES:
        return []
    if quick:
        mm = [(n, k, m) for n, k, m in _QUICK_MM[kind]]
        quant = [(t, 4096, torch.bfloat16) for t in _QUICK_TOKENS]
    else:
        mm = [(n, k, m) for n, k in _MM_SHAPES[kind] for m in _MM_ROWS[kind]]
        quant = [(t, k, dtype) for dtype in (torch.float32, torch.bfloat16) for t in _TOKENS for k in (4096, 14336)]
    cases = [_mm_case(device, n, k, m) for n, k, m in mm] + [_quantize_case(device, t, k, d) for t, k, d in quant]
    if kind == "cpu" and _C.build_info()["cpu_amx_int8_detected"]:
        # AMX-INT8 (the default where detected) against the AVX512-VNNI kernel; M <= 16 reads B unpacked.
        cases += [on_amx_tiles(_mm_case(device, n, k, m), "scaled_int8_mm on AVX512-VNNI") for n, k, m in mm if m > 16]
        cases += [on_amx_tiles(_fp8_case(device, n, k, m), "scaled_fp8_mm on AVX512_BF16") for n, k, m in mm if m > 16]
    cases += [_int8_linear_case(device, n, k, m) for n, k, m in mm]
    if kind == "cpu" or torch.cuda.get_device_capability(device) >= (8, 9):
        cases += [_fp8_case(device, n, k, m) for n, k, m in mm]
    return cases
