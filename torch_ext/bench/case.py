"""Benchmark cases and the registry of suites that produce them.

A *suite* is a function ``(device, quick) -> list[Case]`` registered under an
op-family name with :func:`register_suite`. The runner calls every selected
suite once per device and measures the cases it returns.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import torch

SuiteFn = Callable[[str, bool], "list[Case]"]

_SUITES: dict[str, SuiteFn] = {}


@dataclass
class Case:
    """One shape of one op on one device, compared against baselines.

    Attributes:
        family: op family (the suite name, e.g. ``"activation"``).
        op: op name (e.g. ``"silu_and_mul"``).
        label: human-readable shape description (e.g. ``"T=4096 d=11008 bf16"``).
        make_inputs: ``seed -> tuple`` of fresh arguments on ``device``; called
            several times with different seeds so the harness can rotate input
            sets and defeat the caches.
        ours: the implementation under test, called as ``ours(*inputs)``.
        baselines: name -> reference implementation with the same signature.
        flops: useful floating-point operations per call (0 if not meaningful).
        bytes: minimum bytes that one call must move to/from memory.
        device: torch device string the inputs live on.
        primary_baseline: baseline used for the headline ratio; defaults to the
            first entry of ``baselines``.
        notes: extra facts about the case copied into its JSON record (e.g. the
            workspace memory each method needs).
        working_set_bytes: bytes one method cycles through across calls, when the case
            rotates data itself (the quant suite's weight copies live in closures, not in
            the input sets); decides whether the CPU roofline is the cache's or DRAM's.
            Default: the rotated input sets.
        compute_dtype: the dtype of the case's arithmetic, whose measured matmul peak its
            %-of-roofline uses, where that is not the first floating-point input's (the int8
            and fp8 GEMMs, whose first float inputs are their fp32 scales).
    """

    family: str
    op: str
    label: str
    make_inputs: Callable[[int], tuple]
    ours: Callable[..., Any]
    baselines: dict[str, Callable[..., Any]] = field(default_factory=dict)
    flops: float = 0.0
    bytes: float = 0.0
    device: str = "cpu"
    primary_baseline: str | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    working_set_bytes: int | None = None
    compute_dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if self.primary_baseline is None and self.baselines:
            self.primary_baseline = next(iter(self.baselines))
        if self.primary_baseline is not None and self.primary_baseline not in self.baselines:
            raise ValueError(
                f"primary_baseline {self.primary_baseline!r} is not one of {list(self.baselines)}"
            )


def with_backward(fn: Callable[..., Any], extra_leaves: tuple = ()) -> Callable[..., Any]:
    """``fn``'s forward, then the gradients of its floating-point tensor arguments and of
    ``extra_leaves`` (e.g. weights held in a closure) for a grad_out of ones: the method timed by
    forward+backward cases."""
    def run(*args):
        args = tuple(a.detach().requires_grad_() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                     for a in args)
        out = fn(*args)
        leaves = tuple(a for a in args if isinstance(a, torch.Tensor) and a.requires_grad) + tuple(extra_leaves)
        return torch.autograd.grad(out, leaves, torch.ones_like(out))
    return run


def with_cpu_amx(mode: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with the CPU kernels' AMX mode (``torch_ext._C.set_cpu_amx``) set to ``mode`` for the
    call, so that one process times both sides of the switch."""
    from torch_ext import _C

    def run(*args):
        before = _C.cpu_amx()
        _C.set_cpu_amx(mode)
        try:
            return fn(*args)
        finally:
            _C.set_cpu_amx(before)
    return run


def on_amx_tiles(case: Case, default_name: str) -> Case:
    """``case`` with our op on the CPU's AMX tiles (op name + " AMX"), its own default kernel (AMX
    off) added to the baselines as ``default_name``: the measurement that decides whether AMX
    becomes the default."""
    return replace(case, op=f"{case.op} AMX", ours=with_cpu_amx("on", case.ours),
                   baselines={**case.baselines, default_name: with_cpu_amx("off", case.ours)},
                   primary_baseline=case.primary_baseline)


def register_suite(family: str) -> Callable[[SuiteFn], SuiteFn]:
    """Decorator registering ``fn(device, quick) -> list[Case]`` as suite ``family``.

    Re-registering the same function (e.g. after a module reload) is allowed;
    registering a different function under a taken name raises ``ValueError``.
    """

    def decorator(fn: SuiteFn) -> SuiteFn:
        existing = _SUITES.get(family)
        if existing is not None and _qualified_name(existing) != _qualified_name(fn):
            raise ValueError(
                f"suite {family!r} is already registered by {_qualified_name(existing)}"
            )
        _SUITES[family] = fn
        return fn

    return decorator


def unregister_suite(family: str) -> None:
    """Remove suite ``family`` from the registry (no error if absent)."""
    _SUITES.pop(family, None)


def registered_suites() -> dict[str, SuiteFn]:
    """A snapshot of the registry: family -> suite function."""
    return dict(_SUITES)


@contextlib.contextmanager
def isolated_registry() -> Iterator[None]:
    """Restore the registry to its current content on exit.

    Lets tests register throw-away suites without leaking them into later runs.
    """
    saved = dict(_SUITES)
    try:
        yield
    finally:
        _SUITES.clear()
        _SUITES.update(saved)


def _qualified_name(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
