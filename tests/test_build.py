"""The compiled module: build_info, CPU ISA selection, and the host copies of bit tricks."""

import subprocess
import sys

import pytest
import torch

import torch_ext
from torch_ext import _C


def test_build_info_fields():
    info = torch_ext.build_info()
    assert info["version"] == torch_ext.__version__
    assert info["torch_version"] == torch.__version__.split("+")[0]
    assert "scalar" in info["cpu_isas_compiled"]
    assert info["cpu_isa_selected"] in info["cpu_isas_compiled"]
    assert info["ops"]["silu_and_mul"]["cpu"]
    assert info["ops"]["silu_and_mul_backward"]["cpu"]
    if info["cuda"]:
        assert info["ops"]["silu_and_mul"]["cuda"]
        assert info["cuda_archs"], "a CUDA build lists its GPU targets"


def test_set_cpu_isa_round_trip():
    default = _C.cpu_isa()
    try:
        assert _C.set_cpu_isa("scalar") == "scalar"
        assert torch_ext.build_info()["cpu_isa_selected"] == "scalar"
    finally:
        _C.set_cpu_isa(default)
    assert _C.cpu_isa() == default
    with pytest.raises(ValueError, match="expected 'scalar', 'avx2' or 'avx512', got 'sse9'"):
        _C.set_cpu_isa("sse9")


def test_cpu_isa_environment_variable():
    code = "import torch_ext; print(torch_ext._C.cpu_isa())"
    out = subprocess.run([sys.executable, "-c", code], env={**__import__("os").environ, "TORCH_EXT_CPU_ISA": "scalar"},
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "scalar"


def _all_float_patterns_sample() -> torch.Tensor:
    """Every half value as float, plus random bit patterns and the awkward cases."""
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    random_bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    special = torch.tensor([0.0, -0.0, 65504.0, 65519.99, 65520.0, 65536.0, 6e-8, 2.98e-8, 2.99e-8, 5.96e-8,
                            6.1e-5, 1e-40, -1e-40, 3.4e38, float("inf"), float("-inf")])
    # Exact rounding ties for bf16 and fp16.
    ties = torch.tensor([0x3F808000, 0x3F818000, 0x3F801000, 0x3F803000], dtype=torch.int32).view(torch.float32)
    return torch.cat([halves, random_bits, special, ties])


def test_float_to_half_matches_torch():
    values = _all_float_patterns_sample()
    values = values[~torch.isnan(values)]
    ours = torch.frombuffer(bytearray(_C._testing.float_to_half(values.numpy().tobytes())), dtype=torch.float16)
    expected = values.to(torch.float16)
    assert torch.equal(ours.view(torch.int16), expected.view(torch.int16))


def test_float_to_bfloat16_matches_torch():
    values = _all_float_patterns_sample()
    values = values[~torch.isnan(values)]
    ours = torch.frombuffer(bytearray(_C._testing.float_to_bfloat16(values.numpy().tobytes())), dtype=torch.bfloat16)
    assert torch.equal(ours.view(torch.int16), values.to(torch.bfloat16).view(torch.int16))


def test_nan_stays_nan():
    nans = torch.tensor([0x7FC00000, 0x7F800001, 0xFFFFFFFF - 2**32], dtype=torch.int64).to(torch.int32)
    values = nans.view(torch.float32)
    for convert, dtype in ((_C._testing.float_to_half, torch.float16), (_C._testing.float_to_bfloat16, torch.bfloat16)):
        out = torch.frombuffer(bytearray(convert(values.numpy().tobytes())), dtype=dtype)
        assert torch.isnan(out.float()).all()


def test_half_to_float_exhaustive():
    halves = torch.arange(0, 1 << 16, dtype=torch.int32).to(torch.int16)
    ours = torch.frombuffer(bytearray(_C._testing.half_to_float(halves.numpy().tobytes())), dtype=torch.float32)
    expected = halves.view(torch.float16).float()
    same = (ours.view(torch.int32) == expected.view(torch.int32)) | (torch.isnan(ours) & torch.isnan(expected))
    assert same.all()


def test_cuda_kernels_built_where_expected():
    """scripts/run_tests.sh sets TORCH_EXT_EXPECT_CUDA_BUILD where nvcc and a CUDA torch exist."""
    import os

    if not os.environ.get("TORCH_EXT_EXPECT_CUDA_BUILD"):
        pytest.skip("CUDA build not expected in this environment")
    info = torch_ext.build_info()
    assert info["cuda"], "nvcc and a CUDA torch are present, but the CUDA kernels were not built"
    # The archs asked for (scripts/gpu_check.sh builds only 9.0a), else setup.py's default.
    asked = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    for arch in asked.replace(" ", ";").split(";"):
        if arch:
            assert "sm_" + arch.split("+")[0].replace(".", "") in info["cuda_archs"], (asked, info["cuda_archs"])
    assert all(kernels["cuda"] for kernels in info["ops"].values())
