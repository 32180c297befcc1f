"""Weight-only quantized linear suite: ``weight_only_linear`` against F.linear in the
activation dtype, ATen's int4 kernels (``_weight_int4pack_mm_for_cpu`` / ``_weight_int4pack_mm``)
and dequantize + F.linear, on the linear layers of ../shared/reference/shapes.md.

On the CPU there is no cache flush between repetitions, and a quantized 4096 x 4096 weight
(8.5 MB) fits in a 32 MB L3 while its bf16 original (32 MB) does not. So every method here
cycles through its own copies of the weight, enough to span twice the last-level cache: each
call reads its weight from memory, as it would in a model whose other layers run in between.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F

from ..case import Case, register_suite
from ..timer import last_level_cache_bytes

# (N, K) from shapes.md: Llama-3-8B q/o, gate/up, down; Llama-2-70B 8192 x 8192 (GPU).
_CPU_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
_CUDA_SHAPES = ((4096, 4096), (8192, 8192), (28672, 8192), (8192, 28672))
_CPU_ROWS = (1, 4, 16, 64, 256, 1024)
_CUDA_ROWS = (1, 4, 16, 64, 256, 1024, 4096)
_QUICK = {"cpu": ((4096, 4096, 1), (4096, 4096, 16), (4096, 4096, 256)),
          "cuda": ((8192, 8192, 1), (8192, 8192, 64), (8192, 8192, 4096))}
_DTYPES = {"cpu": (torch.bfloat16,), "cuda": (torch.float16, torch.bfloat16)}
_SHORT = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
GROUP = 128


def _copies(device: str, nbytes: int) -> int:
    """Copies of a weight whose rotation spans twice the CPU's last-level cache (1 on CUDA,
    where the harness flushes L2 instead)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, math.ceil(2 * last_level_cache_bytes(torch.device("cpu")) / nbytes))


def _rotating(fn, copies):
    """x -> fn(x, *copies[i]) with i cycling over the copies, one per call."""
    order = itertools.cycle(range(len(copies)))
    return lambda x: fn(x, *copies[next(order)])


def _int4pack(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, device: str):
    """ATen tinygemm operands computing the same function: (q - 8) * s + (8 - z) * s."""
    zero_offsets = (8 - zeros.float()) * scales.float()
    scales_and_zeros = torch.stack([scales.float(), zero_offsets], dim=-1).to(torch.bfloat16).contiguous()
    if torch.device(device).type == "cpu":
        packed = torch._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    else:
        packed_bytes = (q[:, 1::2] << 4 | q[:, ::2]).to(torch.uint8).to(device)
        packed = torch._convert_weight_to_int4pack(packed_bytes, 8)
    return packed, scales_and_zeros.to(device)


class _Layer:
    """One quantized layer and every method's rotated copies of its weight. Built on first
    use and shared by the cases of one shape (only one layer lives at a time: _layer's cache)."""

    def __init__(self, device: str, n: int, k: int, dtype: torch.dtype) -> None:
        from torch_ext.quant import quantize_weight, unpack_qweight  # lazily: needs the extension

        kind = torch.device(device).type
        gen = torch.Generator().manual_seed(n * 31 + k)
        dense = (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        qw = quantize_weight(dense, bits=4, group_size=GROUP).to(device)
        q = unpack_qweight(qw.qweight.cpu(), 4, n, k)
        dense = dense.to(device)
        self.weight_bytes = qw.nbytes()
        self.dense_bytes = dense.numel() * dense.element_size()
        self.ours_copies = [(qw.qweight.clone(), qw.scales.clone(), qw.zeros.clone())
                            for _ in range(_copies(device, self.weight_bytes))]
        self.methods = {"ours": _rotating(self._ours, self.ours_copies)}
        self.methods[f"F.linear {_SHORT[dtype]}"] = _rotating(
            F.linear, [(dense.clone(),) for _ in range(_copies(device, self.dense_bytes))])
        if dtype == torch.bfloat16:
            packed, sz = _int4pack(q, qw.scales.cpu(), qw.zeros.cpu(), device)
            copies = [(packed.clone(), sz.clone()) for _ in range(_copies(device, self.weight_bytes))]
            if kind == "cpu":
                self.methods["torch._weight_int4pack_mm_for_cpu"] = _rotating(
                    lambda x, p, s: torch._weight_int4pack_mm_for_cpu(x, p, GROUP, s), copies)
            else:
                self.methods["torch._weight_int4pack_mm"] = _rotating(
                    lambda x, p, s: torch._weight_int4pack_mm(x, p, GROUP, s), copies)
        if kind == "cuda":
            group_of_k = torch.arange(k, device=device) // GROUP
            operands = (q.to(device=device, dtype=torch.uint8), qw.scales.t()[:, group_of_k].to(dtype).contiguous(),
                        qw.zeros.t()[:, group_of_k].to(dtype).contiguous())
            self.methods["dequantize + F.linear"] = _rotating(
                lambda x, q_int, s, z: F.linear(x, (q_int.to(x.dtype) - z) * s), [operands])

    @staticmethod
    def _ours(x, qweight, scales, zeros):
        return torch.ops.torch_ext.weight_only_linear(x, qweight, scales, zeros, None, 4, GROUP)


@functools.lru_cache(maxsize=1)
def _layer(device: str, n: int, k: int, dtype: torch.dtype) -> _Layer:
    return _Layer(device, n, k, dtype)


def _method(device: str, n: int, k: int, dtype: torch.dtype, name: str):
    return lambda x: _layer(device, n, k, dtype).methods[name](x)


def _case(device: str, n: int, k: int, m: int, dtype: torch.dtype) -> Case:
    kind = torch.device(device).type
    names = [f"F.linear {_SHORT[dtype]}"]
    if dtype == torch.bfloat16:
        names.append("torch._weight_int4pack_mm_for_cpu" if kind == "cpu" else "torch._weight_int4pack_mm")
    if kind == "cuda":
        names.append("dequantize + F.linear")

    def make_inputs(seed: int):
        return (torch.randn(m, k, generator=torch.Generator().manual_seed(seed), dtype=dtype).to(device),)

    element = torch.empty((), dtype=dtype).element_size()
    weight_bytes = n * (k // 2) + 2 * 2 * n * math.ceil(k / GROUP)  # 4-bit values, fp16/bf16 scales and zeros
    return Case(
        family="quant", op="weight_only_linear", label=f"M={m} {n}x{k} int4 g{GROUP} {_SHORT[dtype]}",
        make_inputs=make_inputs, ours=_method(device, n, k, dtype, "ours"),
        baselines={name: _method(device, n, k, dtype, name) for name in names},
        flops=2.0 * m * n * k,
        bytes=float(weight_bytes + (m * k + m * n) * element),  # the packed weight once, x in, y out
        device=device,
        notes={"weight_copies_rotated_cpu": "each method cycles through its own copies spanning 2x the LLC"},
        working_set_bytes=_copies(device, weight_bytes) * weight_bytes,
    )


def _dequantize_case(device: str, n: int, k: int) -> Case:
    """dequantize_weight against the same (q - z) * s written with torch ops on unpacked q."""
    from torch_ext.quant import quantize_weight, unpack_qweight

    group_of_k = torch.arange(k) // GROUP

    def make_inputs(seed: int):
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.bfloat16)
        qw = quantize_weight(w, bits=4, group_size=GROUP)
        q = unpack_qweight(qw.qweight, 4, n, k).to(torch.uint8)
        tensors = (qw.qweight, qw.scales, qw.zeros, q, qw.scales.t()[:, group_of_k].contiguous(),
                   qw.zeros.t()[:, group_of_k].contiguous())
        return tuple(t.to(device) for t in tensors)

    return Case(
        family="quant", op="dequantize_weight", label=f"{n}x{k} int4 g{GROUP} -> bf16",
        make_inputs=make_inputs,
        ours=lambda qweight, scales, zeros, *_: torch.ops.torch_ext.dequantize_weight(qweight, scales, zeros, 4,
                                                                                      GROUP, k),
        baselines={"torch ops ((q - z) * s)": lambda _q, _s, _z, q, s, z: (q.to(s.dtype) - z) * s},
        bytes=float(n * k // 2 + 4 * n * (k // GROUP) + 2 * n * k), device=device,
    )


@register_suite("quant")
def quant_suite(device: str, quick: bool) -> list[Case]:
    """weight_only_linear and dequantize_weight cases for ``device`` (4-bit, group 128)."""
    kind = torch.device(device).type
    if kind not in _DTYPES:
        return []
    if quick:
        return [_case(device, n, k, m, torch.bfloat16) for n, k, m in _QUICK[kind]] + [_dequantize_case(device, 4096,
                                                                                                       4096)]
    shapes, rows = (_CPU_SHAPES, _CPU_ROWS) if kind == "cpu" else (_CUDA_SHAPES, _CUDA_ROWS)
    linear = [_case(device, n, k, m, dtype) for dtype in _DTYPES[kind] for n, k in shapes for m in rows]
    return linear + [_dequantize_case(device, n, k) for n, k in shapes]
