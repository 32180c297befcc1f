"""`python -m torch_ext check`: a fast self-test of every op against its float64 reference
on every device present. Op families add their cases with @register_check."""

from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch

from torch_ext import reference
from torch_ext.testing import available_devices, check_against_reference, random_tensor


@dataclasses.dataclass(frozen=True)
class Check:
    op: str
    dtypes: tuple[torch.dtype, ...]
    run: Callable[[str, torch.dtype], float]  # (device, dtype) -> relative error; raises on failure


_CHECKS: list[Check] = []


def register_check(op: str, dtypes: tuple[torch.dtype, ...]):
    def decorator(fn: Callable[[str, torch.dtype], float]):
        _CHECKS.append(Check(op, dtypes, fn))
        return fn
    return decorator


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@register_check("silu_and_mul", _FLOAT_DTYPES)
def _silu_and_mul(device: str, dtype: torch.dtype) -> float:
    return check_against_reference(
        torch.ops.torch_ext.silu_and_mul, reference.silu_and_mul,
        lambda seed: (random_tensor((37, 2 * 1001), dtype, device, seed, scale=3.0),),
        dtype, "silu_and_mul")


@register_check("silu_and_mul_backward", _FLOAT_DTYPES)
def _silu_and_mul_backward(device: str, dtype: torch.dtype) -> float:
    return check_against_reference(
        torch.ops.torch_ext.silu_and_mul_backward, reference.silu_and_mul_backward,
        lambda seed: (random_tensor((37, 1001), dtype, device, seed),
                      random_tensor((37, 2 * 1001), dtype, device, seed + 1, scale=3.0)),
        dtype, "silu_and_mul_backward")


@register_check("im2win_conv2d", _FLOAT_DTYPES)
def _im2win_conv2d(device: str, dtype: torch.dtype) -> float:
    def make(seed):
        return (random_tensor((2, 6, 13, 11), dtype, device, seed), random_tensor((8, 3, 3, 2), dtype, device, seed + 1),
                random_tensor((8,), dtype, device, seed + 2), [2, 1], [1, 1], [1, 2], 2)

    bound = 1e-5 if dtype == torch.float32 else None
    return check_against_reference(torch.ops.torch_ext.im2win_conv2d, reference.conv2d, make, dtype,
                                   "im2win_conv2d", bound)


@register_check("block_sparse_attention", (torch.float16, torch.bfloat16))
def _block_sparse_attention(device: str, dtype: torch.dtype) -> float:
    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        dense = torch.rand(1, 4, 3, 6, generator=gen) < 0.6
        counts = dense.sum(-1, dtype=torch.int32)
        indices = dense.to(torch.uint8).sort(dim=-1, descending=True, stable=True).indices.int()
        return (random_tensor((1, 4, 150, 64), dtype, device, seed), random_tensor((1, 2, 170, 64), dtype, device, seed + 1),
                random_tensor((1, 2, 170, 64), dtype, device, seed + 2), counts.to(device), indices.to(device),
                64, 32, True, 0.125)

    return check_against_reference(lambda *a: torch.ops.torch_ext.block_sparse_attention(*a)[0],
                                   lambda *a: reference.attention.block_sparse_attention(*a)[0], make, dtype,
                                   "block_sparse_attention")


@register_check("weight_only_linear", (torch.float16, torch.bfloat16))
def _weight_only_linear(device: str, dtype: torch.dtype) -> float:
    from torch_ext.quant import quantize_weight

    def make(seed):
        qw = quantize_weight(random_tensor((72, 200), torch.float32, device, seed), bits=4, group_size=64)
        return (random_tensor((5, 200), dtype, device, seed + 1), qw.qweight, qw.scales.to(dtype), qw.zeros.to(dtype),
                random_tensor((72,), dtype, device, seed + 2), 4, 64)

    return check_against_reference(torch.ops.torch_ext.weight_only_linear, reference.quant.weight_only_linear, make,
                                   dtype, "weight_only_linear")


@register_check("scaled_int8_mm", (torch.float32, torch.bfloat16))
def _scaled_int8_mm(device: str, dtype: torch.dtype) -> float:
    def make(seed):
        gen = torch.Generator().manual_seed(seed)
        a, b = (torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(device)
                for shape in ((37, 300), (70, 300)))
        return (a, b, torch.rand(37, 1, generator=gen).to(device) + 0.1, torch.rand(70, generator=gen).to(device) + 0.1,
                random_tensor((70,), torch.float32, device, seed), dtype)

    def expected(a, b, a_scale, b_scale, bias, out_dtype):
        return (a.double() @ b.double().t()) * a_scale * b_scale + bias

    return check_against_reference(torch.ops.torch_ext.scaled_int8_mm, expected, make, dtype, "scaled_int8_mm")


@register_check("fused_moe", (torch.float32, torch.bfloat16))
def _fused_moe(device: str, dtype: torch.dtype) -> float:
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.float16  # CUDA's fp32 is the ATen composition; fp16 checks the kernels

    def make(seed):
        weights, ids = torch.ops.torch_ext.moe_route(random_tensor((9, 6), torch.float32, device, seed), 2, True,
                                                      "softmax", 1, 1, None, 1.0)
        return (random_tensor((9, 64), dtype, device, seed + 1),
                random_tensor((6, 96, 64), dtype, device, seed + 2, scale=0.125),
                random_tensor((6, 64, 48), dtype, device, seed + 3, scale=0.15), weights, ids, "silu")

    return check_against_reference(torch.ops.torch_ext.fused_moe, reference.moe.fused_moe, make, dtype, "fused_moe")


def run_checks(devices: list[str] | None = None) -> int:
    """Run every check on every device; print a table; return the number of failures."""
    failures = 0
    rows = []
    for device in devices or available_devices():
        for check in _CHECKS:
            for dtype in check.dtypes:
                try:
                    error = check.run(device, dtype)
                    rows.append((check.op, device, str(dtype).replace("torch.", ""), f"{error:.2e}", "ok"))
                except Exception as exc:  # a failing op must not stop the other checks
                    failures += 1
                    rows.append((check.op, device, str(dtype).replace("torch.", ""), "-", f"FAIL: {exc}"))
    widths = [max(len(str(r[i])) for r in rows + [("op", "device", "dtype", "rel.err", "result")]) for i in range(4)]
    header = ("op", "device", "dtype", "rel.err", "result")
    for row in [header] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(row[:4], widths)) + "  " + row[4])
    print(f"{len(rows) - failures} passed, {failures} failed")
    return failures


def main() -> int:
    return 1 if run_checks() else 0


if __name__ == "__main__":
    sys.exit(main())
