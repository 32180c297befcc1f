"""Timing of one callable: input rotation, warm-up, adaptive repetitions, statistics.

CPU calls are timed with ``time.perf_counter`` around each call (CPU torch ops
are synchronous). CUDA calls are timed with a pair of CUDA events per
repetition, recorded on the current stream and read after one final
synchronize, so host overhead between repetitions is not counted.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import numpy as np
import torch

# The rotated working set should exceed the last-level cache this many times over.
_CACHE_MULTIPLE = 2
_MAX_SETS = 8
# Input sets may use at most this fraction of free memory: the rest is for
# outputs, baseline temporaries and the allocator's slack.
_MEMORY_FRACTION = 0.25
_FLUSH_BYTES = 256 * 2**20
_CPU_CACHE_FALLBACK = 32 * 2**20


@dataclass(frozen=True)
class Stats:
    """Summary of per-repetition times, in seconds."""

    median_s: float
    p10_s: float
    p90_s: float
    min_s: float
    mean_s: float
    reps: int

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> Stats:
        """Summarise a non-empty sequence of per-call times (seconds)."""
        if len(samples) == 0:
            raise ValueError("no timing samples")
        arr = np.asarray(samples, dtype=np.float64)
        p10, median, p90 = np.percentile(arr, [10, 50, 90])
        return cls(
            median_s=float(median),
            p10_s=float(p10),
            p90_s=float(p90),
            min_s=float(arr.min()),
            mean_s=float(arr.mean()),
            reps=len(arr),
        )

    def to_json(self) -> dict[str, float | int]:
        """Times in microseconds, for reports."""
        return {
            "median_us": self.median_s * 1e6,
            "p10_us": self.p10_s * 1e6,
            "p90_us": self.p90_s * 1e6,
            "min_us": self.min_s * 1e6,
            "mean_us": self.mean_s * 1e6,
            "reps": self.reps,
        }


@dataclass(frozen=True)
class TimerConfig:
    """How long to spend on one measurement.

    ``budget_s`` is the target for the timed repetitions, ``warmup_s`` for the
    warm-up (which also estimates the per-call time used to pick the count).
    """

    budget_s: float
    warmup_s: float
    min_reps: int = 5
    max_reps: int = 1000

    @classmethod
    def for_mode(cls, quick: bool) -> TimerConfig:
        """About 0.15 s per measurement in quick mode, about 1 s otherwise."""
        return cls(budget_s=0.12, warmup_s=0.03) if quick else cls(budget_s=0.8, warmup_s=0.2)


@dataclass
class InputSets:
    """Argument tuples rotated across repetitions, plus an optional cache-flush buffer."""

    sets: list[tuple]
    device: torch.device
    flush: torch.Tensor | None = None

    def args(self, i: int) -> tuple:
        """Arguments for repetition ``i``."""
        return self.sets[i % len(self.sets)]


def prepare_inputs(make_inputs: Callable[[int], tuple], device: str | torch.device) -> InputSets:
    """Build enough input sets (seeds 0, 1, ...) that rotating them defeats the cache.

    The count is ``ceil(2 * LLC / bytes_per_set)`` capped at 8 and by free memory.
    On CUDA, if the rotated sets still fit twice in L2 (memory-capped, or tiny
    inputs), a buffer is overwritten before every repetition to flush L2. On
    CPU no flush is done: writing a multiple of the LLC would cost far more than
    the small ops it would protect, so tiny CPU cases are measured cache-warm.
    """
    dev = torch.device(device)
    first = make_inputs(0)
    per_set = tensor_bytes(first)
    cache = last_level_cache_bytes(dev)
    count = sets_needed(per_set, cache, available_memory_bytes(dev))
    sets = [first] + [make_inputs(seed) for seed in range(1, count)]
    flush = None
    if dev.type == "cuda" and count * per_set < _CACHE_MULTIPLE * cache:
        flush_bytes = max(_FLUSH_BYTES, 4 * cache)
        if flush_bytes < available_memory_bytes(dev):
            flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device=dev)
    return InputSets(sets=sets, device=dev, flush=flush)


def sets_needed(bytes_per_set: int, cache_bytes: int, free_bytes: int) -> int:
    """Number of input sets whose rotation exceeds the cache, within the memory cap."""
    if bytes_per_set <= 0:
        return 1
    wanted = math.ceil(_CACHE_MULTIPLE * cache_bytes / bytes_per_set)
    fits = int(free_bytes * _MEMORY_FRACTION) // bytes_per_set
    return max(1, min(wanted, _MAX_SETS, fits))


def tensor_bytes(obj: Any) -> int:
    """Total bytes of the tensors in ``obj`` (nested tuples, lists and dicts)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(tensor_bytes(item) for item in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(item) for item in obj.values())
    return 0


def last_level_cache_bytes(device: torch.device) -> int:
    """L2 size on CUDA, the largest CPU data/unified cache (per instance) on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return _cpu_cache_bytes()


@functools.lru_cache(maxsize=1)
def _cpu_cache_bytes() -> int:
    best = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            best = max(best, _parse_size((index / "size").read_text().strip()))
        except (OSError, ValueError):
            continue
    return best or _CPU_CACHE_FALLBACK


def _parse_size(text: str) -> int:
    """Parse sysfs sizes such as ``32768K`` or ``1M``."""
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    if text and text[-1].upper() in units:
        return int(text[:-1]) * units[text[-1].upper()]
    return int(text)


def available_memory_bytes(device: torch.device) -> int:
    """Memory that new tensors on ``device`` can use right now."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # Blocks cached by PyTorch's allocator are reusable but not "free" to the driver.
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def measure(
    fn: Callable[..., Any],
    inputs: InputSets,
    config: TimerConfig,
    timed_context: ContextManager[Any] | None = None,
) -> Stats:
    """Warm ``fn`` up, then time enough repetitions to fill ``config.budget_s``.

    ``timed_context`` (e.g. a telemetry sampler) is entered around the timed
    repetitions only, not the warm-up.
    """
    per_rep = _warm_up(fn, inputs, config)
    reps = int(min(config.max_reps, max(config.min_reps, config.budget_s / max(per_rep, 1e-9))))
    with timed_context if timed_context is not None else contextlib.nullcontext():
        if inputs.device.type == "cuda":
            samples = _time_cuda(fn, inputs, reps)
        else:
            samples = _time_cpu(fn, inputs, reps)
    return Stats.from_samples(samples)


def _warm_up(fn: Callable[..., Any], inputs: InputSets, config: TimerConfig) -> float:
    """Run ``fn`` until ``config.warmup_s`` has passed; return wall seconds per repetition.

    The first call (lazy initialisation, allocator growth) is excluded from the
    estimate; later calls run in doubling batches so that the estimate for
    fast ops is not dominated by synchronisation overhead.
    """
    _run_once(fn, inputs, 0)
    calls, spent, batch = 1, 0.0, 1
    while True:
        _sync(inputs.device)
        start = time.perf_counter()
        for i in range(batch):
            _run_once(fn, inputs, calls + i)
        _sync(inputs.device)
        elapsed = time.perf_counter() - start
        calls += batch
        spent += elapsed
        if spent >= config.warmup_s or calls >= config.max_reps:
            return elapsed / batch
        batch *= 2


def _run_once(fn: Callable[..., Any], inputs: InputSets, i: int) -> None:
    if inputs.flush is not None:
        inputs.flush.zero_()
    fn(*inputs.args(i))


def _time_cpu(fn: Callable[..., Any], inputs: InputSets, reps: int) -> list[float]:
    samples = []
    for i in range(reps):
        args = inputs.args(i)
        if inputs.flush is not None:
            inputs.flush.zero_()
        start = time.perf_counter()
        out = fn(*args)
        end = time.perf_counter()
        # Free the output outside the timed region.
        del out
        samples.append(end - start)
    return samples


def _time_cuda(fn: Callable[..., Any], inputs: InputSets, reps: int) -> list[float]:
    with torch.cuda.device(inputs.device):
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            args = inputs.args(i)
            if inputs.flush is not None:
                inputs.flush.zero_()
            starts[i].record()
            out = fn(*args)
            ends[i].record()
            del out
        torch.cuda.synchronize()
        return [start.elapsed_time(end) * 1e-3 for start, end in zip(starts, ends)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
