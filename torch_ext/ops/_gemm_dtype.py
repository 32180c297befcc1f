"""The dtype in which a backward formula written with torch ops should run its GEMM.

torch's CPU GEMMs in fp16 run at about 2 GFLOP/s, and in bf16 at 32-46 GFLOP/s on CPUs without
AVX512_BF16 or AMX-BF16 (against 134-168 in fp32, measured on an AVX-512 Xeon VM, docs/perf/moe.md),
so on those CPUs the 16-bit layers' input gradients are computed in fp32 and rounded once
(csrc/common/cpu/gemm_dtype.h makes the same choice for the C++ ops).
"""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _cpu_bf16_gemm_native() -> bool:
    from torch_ext import _C

    return _C.cpu_bf16_gemm_native()


def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """fp32 for a 16-bit GEMM on a CPU where torch's GEMM in that dtype is slow, else ``dtype``."""
    if device.type != "cpu" or dtype not in (torch.float16, torch.bfloat16):
        return dtype
    if dtype == torch.bfloat16 and _cpu_bf16_gemm_native():
        return dtype
    return torch.float32


def grad_through_weight(grad_y: torch.Tensor, dense_weight) -> torch.Tensor:
    """``grad_y @ W`` in grad_y's dtype for a linear layer's input gradient, the GEMM in
    :func:`gemm_dtype`; ``dense_weight(dtype)`` returns W [N, K] in that dtype."""
    compute = gemm_dtype(grad_y.dtype, grad_y.device)
    return (grad_y.to(compute) @ dense_weight(compute)).to(grad_y.dtype)
