"""One call of our implementation per case inside the CUDA profiler's capture window, for `ncu`.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight ... \\
        python -m torch_ext bench --profile-once --device cuda --quick

Each case's inputs are built and the op warmed up (compiles, autotuning, lazy allocations)
outside the window; only the measured call runs between cudaProfilerStart and cudaProfilerStop,
so the report holds our kernels alone, in the order this prints the cases.
"""

from __future__ import annotations

import torch

from .case import Case

_WARMUP_CALLS = 2


def profile_once(cases: list[Case]) -> int:
    """Run each CUDA case's `ours` once in the capture window; 1 if any case failed."""
    failed = 0
    for index, case in enumerate(c for c in cases if torch.device(c.device).type == "cuda"):
        try:
            inputs = case.make_inputs(0)
            for _ in range(_WARMUP_CALLS):
                case.ours(*inputs)
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
            case.ours(*inputs)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
            print(f"[{index}] {case.op} {case.label}: profiled", flush=True)
        except Exception as exc:  # one broken case must not hide the others' profiles
            failed = 1
            print(f"[{index}] {case.op} {case.label}: FAILED {type(exc).__name__}: {exc}", flush=True)
        finally:
            torch.cuda.empty_cache()
    return failed
