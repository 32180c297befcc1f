"""Shared fixtures: device and CPU-ISA parametrization.

`device` runs a test on the CPU always and on CUDA when a GPU is present (skipped, never
failed, without one). `cpu_isa` runs it once per CPU ISA level this machine supports, so
the AVX2 and scalar paths are proven on an AVX-512 CI machine too. `hopper_build` skips a test
of the Hopper-only (sm_90a, wgmma) kernels unless a compute capability 9.0 GPU and a build with
sm_90a code are there.

A kernel fault (an illegal address, or the trap with which the Hopper pipelines end a wait that
would hang) leaves the process's CUDA context broken: every later CUDA test in it would fail for
that one. After a failed test whose context is broken, an xdist worker exits (xdist starts a
fresh one for the remaining tests) and a plain session stops with the reason.
"""

import os
import sys

import pytest
import torch

import torch_ext

_ISA_ORDER = ["scalar", "avx2", "avx512"]


def _supported_isas() -> list[str]:
    info = torch_ext.build_info()
    best = _ISA_ORDER.index(info["cpu_isa_detected"])
    return [isa for isa in info["cpu_isas_compiled"] if _ISA_ORDER.index(isa) <= best]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    return request.param


@pytest.fixture(params=_supported_isas())
def cpu_isa(request):
    """Cap the CPU kernels at one ISA level for the test, then restore the default."""
    default = torch_ext._C.cpu_isa()
    torch_ext._C.set_cpu_isa(request.param)
    yield request.param
    torch_ext._C.set_cpu_isa(default)


@pytest.fixture(params=["emulate", "on"])
def amx(request):
    """The CPU kernels' AMX mode for the test ("emulate": the AMX kernels on tiles emulated in
    scalar code, on any AVX-512 CPU; "on": the hardware tiles, where the CPU has them), then the
    mode before."""
    info = torch_ext._C.build_info()
    if not info["cpu_amx_compiled"] or info["cpu_isa_detected"] != "avx512":
        pytest.skip("the AMX kernels need a build with them and an AVX-512 CPU")
    if request.param == "on" and not info["cpu_amx_int8_detected"]:
        pytest.skip("this CPU has no AMX tiles")
    previous = torch_ext._C.cpu_amx()
    torch_ext._C.set_cpu_amx(request.param)
    yield request.param
    torch_ext._C.set_cpu_amx(previous)


@pytest.fixture
def hopper_build():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("not a compute capability 9.0 GPU")
    if "sm_90a" not in torch_ext.build_info()["cuda_archs"]:
        pytest.skip("this build has no sm_90a code")


def _broken_cuda_context() -> str | None:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    try:
        torch.cuda.synchronize()
    except RuntimeError as error:
        return str(error)
    return None


@pytest.hookimpl(trylast=True)
def pytest_runtest_logreport(report):
    if report.when != "call" or not report.failed:
        return
    reason = _broken_cuda_context()
    if reason is None:
        return
    message = f"CUDA context broken after {report.nodeid}: {reason}"
    if os.environ.get("PYTEST_XDIST_WORKER"):
        print(message, file=sys.stderr, flush=True)
        os._exit(3)
    pytest.exit(message, returncode=3)
