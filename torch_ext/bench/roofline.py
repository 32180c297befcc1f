"""Measured machine peaks (memory bandwidth, matmul throughput) and %-of-roofline.

Peaks are *measured*, not taken from data sheets: a large device copy for
bandwidth and a large ``torch.mm`` per dtype for compute. They are measured
once per process per (device, mode) and cached.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .timer import InputSets, TimerConfig, available_memory_bytes, last_level_cache_bytes, measure

_CACHE: dict[tuple[str, bool], Roofline] = {}

# Buffer bytes for the copy, per side (source and destination).
_COPY_BYTES_CUDA = 256 * 2**20
_COPY_BYTES_CPU = {True: 128 * 2**20, False: 512 * 2**20}
# Square matmul size per (device type, quick).
_MM_SIZE = {("cuda", True): 4096, ("cuda", False): 8192, ("cpu", True): 1024, ("cpu", False): 2048}
_MM_DTYPES = {
    "cuda": (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.float8_e4m3fn),
    "cpu": (torch.float32, torch.bfloat16, torch.int8),
}


@dataclass(frozen=True)
class Roofline:
    """Measured peaks of one device."""

    device: str
    bandwidth_gbs: float | None
    # CPU only: copy bandwidth of a buffer that stays in the last-level cache. Cases whose
    # rotated inputs fit in that cache are held against it instead of DRAM bandwidth.
    cache_bandwidth_gbs: float | None = None
    peak_tflops: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "bandwidth_gbs": self.bandwidth_gbs,
            "cache_bandwidth_gbs": self.cache_bandwidth_gbs,
            "peak_tflops": dict(self.peak_tflops),
            "details": dict(self.details),
        }


def measure_roofline(device: str, quick: bool) -> Roofline:
    """Measure (or return the cached) peaks of ``device``; quick mode uses smaller problems."""
    key = (str(torch.device(device)), quick)
    if key not in _CACHE:
        _CACHE[key] = _measure(torch.device(device), quick)
    return _CACHE[key]


def _measure(dev: torch.device, quick: bool) -> Roofline:
    config = TimerConfig(budget_s=0.1, warmup_s=0.02, min_reps=3) if quick else TimerConfig(0.5, 0.1)
    details: dict[str, Any] = {}
    bandwidth = None
    try:
        bandwidth, copy_bytes = _copy_bandwidth_gbs(dev, quick, config)
        details["copy_bytes_per_side"] = copy_bytes
    except Exception as exc:  # the report should still be written without a roof
        details["bandwidth_error"] = f"{type(exc).__name__}: {exc}"
    cache_bandwidth = None
    if dev.type == "cpu":
        try:
            cache_bandwidth, cache_copy_bytes = _copy_bandwidth_gbs(dev, quick, config, in_cache=True)
            details["cache_copy_bytes_per_side"] = cache_copy_bytes
        except Exception as exc:
            details["cache_bandwidth_error"] = f"{type(exc).__name__}: {exc}"
    peaks: dict[str, float] = {}
    size = _MM_SIZE[(dev.type, quick)]
    details["mm_size"] = size
    for dtype in _MM_DTYPES.get(dev.type, (torch.float32,)):
        name = dtype_name(dtype)
        try:
            peaks[name] = _matmul_tflops(dev, dtype, size, config)
        except Exception as exc:
            details[f"mm_{name}_error"] = f"{type(exc).__name__}: {exc}"
    if dev.type == "cuda":
        details["float32_matmul"] = "IEEE fp32 (TF32 disabled)"
    return Roofline(device=str(dev), bandwidth_gbs=bandwidth, cache_bandwidth_gbs=cache_bandwidth,
                    peak_tflops=peaks, details=details)


def _copy_bandwidth_gbs(dev: torch.device, quick: bool, config: TimerConfig,
                        in_cache: bool = False) -> tuple[float, int]:
    """Bandwidth of ``dst.copy_(src)``, counting one read and one write per byte.

    By default the buffers are several times the last-level cache (DRAM/HBM bandwidth);
    ``in_cache`` sizes both together at half the cache instead.
    """
    llc = last_level_cache_bytes(dev)
    if in_cache:
        nbytes = max(llc // 4, 2**20)
    else:
        base = _COPY_BYTES_CUDA if dev.type == "cuda" else _COPY_BYTES_CPU[quick]
        nbytes = min(max(base, 4 * llc), available_memory_bytes(dev) // 4)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=dev)
    dst = torch.zeros_like(src)  # zeros (not empty) so pages are touched before timing
    stats = measure(lambda s, d: d.copy_(s), InputSets([(src, dst)], dev), config)
    return 2 * src.nbytes / stats.median_s / 1e9, src.nbytes


def _matmul_tflops(dev: torch.device, dtype: torch.dtype, n: int, config: TimerConfig) -> float:
    """The best dense n x n x n product torch offers for dtype: torch.mm, torch._int_mm for int8
    (int32 sums), torch._scaled_mm for fp8 (CUDA sm_89+; it raises elsewhere and the peak is
    left out). Random data: zeros run faster on some GPUs."""
    if dtype == torch.int8:
        a = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev)
        b = torch.randint(-128, 128, (n, n), dtype=torch.int8, device=dev).t()  # column-major, as _int_mm wants
        fn = torch._int_mm
    elif dtype == torch.float8_e4m3fn:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype).t()
        one = torch.ones((), device=dev)
        fn = lambda a, b: torch._scaled_mm(a, b, one, one, out_dtype=torch.bfloat16)  # noqa: E731
    else:
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        fn = torch.mm
    with ieee_fp32(torch.backends.cuda.matmul, torch.backends.cuda.matmul) if dev.type == "cuda" \
            else contextlib.nullcontext():
        stats = measure(fn, InputSets([(a, b)], dev), config)
    return 2 * n**3 / stats.median_s / 1e12


@contextlib.contextmanager
def ieee_fp32(backend: Any, legacy: Any) -> Iterator[None]:
    """TF32 off for a torch backend while the block runs (IEEE fp32 products and sums): its
    ``fp32_precision = "ieee"`` where torch has it, else ``legacy.allow_tf32 = False`` (newer
    torch raises if the two flags are mixed). E.g. (cuda.matmul, cuda.matmul): the fp32 peak is
    a true fp32 peak; (cudnn.conv, cudnn): F.conv2d at our fp32 kernels' precision."""
    owner, attr, value = (backend, "fp32_precision", "ieee") if hasattr(backend, "fp32_precision") \
        else (legacy, "allow_tf32", False)
    saved = getattr(owner, attr)
    setattr(owner, attr, value)
    try:
        yield
    finally:
        setattr(owner, attr, saved)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).removeprefix("torch.")


def inputs_dtype(args: Any) -> torch.dtype | None:
    """dtype of the first floating-point tensor in ``args`` (nested tuples/lists/dicts)."""
    if isinstance(args, torch.Tensor):
        return args.dtype if args.is_floating_point() else None
    items = args.values() if isinstance(args, dict) else args if isinstance(args, (tuple, list)) else ()
    for item in items:
        found = inputs_dtype(item)
        if found is not None:
            return found
    return None


def achieved(flops: float, nbytes: float, seconds: float) -> tuple[float, float]:
    """(TFLOP/s, GB/s) achieved by a call taking ``seconds``."""
    return flops / seconds / 1e12, nbytes / seconds / 1e9


def roofline_percent(
    roof: Roofline, flops: float, nbytes: float, seconds: float, dtype: str | None,
    cache_resident: bool = False,
) -> float | None:
    """Percent of the roofline: the larger of the compute and bandwidth fractions.

    The compute fraction is only used when ``flops > 0`` and a peak for
    ``dtype`` was measured; returns ``None`` when neither fraction is known.
    ``cache_resident`` cases are held against the cache bandwidth where one was measured.
    """
    tflops, gbs = achieved(flops, nbytes, seconds)
    fractions = []
    if flops > 0 and dtype is not None and roof.peak_tflops.get(dtype):
        fractions.append(tflops / roof.peak_tflops[dtype])
    bandwidth = roof.cache_bandwidth_gbs if cache_resident and roof.cache_bandwidth_gbs else roof.bandwidth_gbs
    if nbytes > 0 and bandwidth:
        fractions.append(gbs / bandwidth)
    return 100.0 * max(fractions) if fractions else None
