"""The CUDA kernels' index math, checked on the CPU: compiles tests/cpp/im2win_cuda_sim.cpp
(torch-free; it includes csrc/conv/im2win_index.h) and runs it on fresh random geometries."""

import shutil
import subprocess
from pathlib import Path

import pytest

from torch_ext.testing import fresh_seed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def simulator(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("sim") / "im2win_cuda_sim"
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'csrc'}", str(ROOT / "tests/cpp/im2win_cuda_sim.cpp"),
                    "-o", str(binary)], check=True, capture_output=True, text=True)
    return binary


def test_im2win_cuda_kernels_simulated(simulator):
    seed = fresh_seed()
    out = subprocess.run([str(simulator), "200", str(seed)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"seed {seed}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "all ok" in out.stdout


@pytest.fixture(scope="module")
def weight_only_simulator(tmp_path_factory) -> Path:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path_factory.mktemp("sim") / "weight_only_cuda_sim"
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'csrc'}",
                    str(ROOT / "tests/cpp/weight_only_cuda_sim.cpp"), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    return binary


def test_weight_only_cuda_kernels_simulated(weight_only_simulator):
    """Register dequantization bit for bit, and linear_kernel / split-K / dequantize_kernel run
    thread by thread on random problems against an exact reference (csrc/quant/weight_only_cuda_index.h)."""
    seed = fresh_seed()
    out = subprocess.run([str(weight_only_simulator), "200", str(seed)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"seed {seed}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "all ok" in out.stdout
