"""The CPU int8 GEMM on AMX tiles (csrc/quant/w8a8_cpu_amx.cpp): exact sums, the same bits as
the VNNI / portable kernels across tails, scale forms, bias and out dtypes, and the tile-product
count its blocking implies. Runs on emulated tiles everywhere (mode "emulate": the kernel's own
code with every tile instruction in scalar code, checked for the shapes the hardware requires)
and on the hardware tiles where the CPU has AMX-INT8 (mode "on"; the `amx` fixture, conftest.py).
The bf16 attention kernels on the tiles: test_block_sparse_attention.py."""

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext import _C
from torch_ext.ops import int8_linear, quantize_per_token, scaled_int8_mm
from torch_ext.testing import fresh_seed, poisoned_outputs, random_tensor

_INFO = _C.build_info()
pytestmark = pytest.mark.skipif(not _INFO["cpu_amx_compiled"] or _INFO["cpu_isa_detected"] != "avx512",
                                reason="the AMX kernels need a build with them and an AVX-512 CPU")


ROOT = Path(__file__).resolve().parents[1]


def _int8(shape, gen):
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)


def _with_amx(mode, fn):
    previous = _C.cpu_amx()
    _C.set_cpu_amx(mode)
    try:
        return fn()
    finally:
        _C.set_cpu_amx(previous)


def _tile_products(m, n, k):
    """TDPBSSDs of one call whose row panel holds every row: per 32-row block and 64 k, 2 for each
    16-column block (a last odd block alone: the pair's second products are skipped)."""
    return 2 * -(-m // 32) * -(-n // 16) * -(-k // 64)


def test_sums_exactly_and_runs_the_tiles(amx):
    """Unit scales, fp32 out: the exact integer dot products. Rows past whole 32-row blocks,
    columns past whole 16- and 32-column blocks, K past whole 64-k tiles and below one tile."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in ((17, 16, 64), (33, 45, 63), (70, 100, 130), (20, 17, 4), (64, 64, 1000), (40, 33, 260)):
        a, b = _int8((m, k), gen), _int8((n, k), gen)
        before = _C.amx_emulated_dot_products()
        with poisoned_outputs():
            out = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32)
        ran = _C.amx_emulated_dot_products() - before
        assert torch.equal(out, (a.long() @ b.long().t()).float()), f"{m}x{n}x{k} seed {seed}"
        assert ran == (_tile_products(m, n, k) if amx == "emulate" else 0), f"{m}x{n}x{k}: {ran} tile products"


def test_strided_rows(amx):
    """A and B as row slices of wider tensors (row strides past K): the A copy and the packing read
    through the strides."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    a_wide, b_wide = _int8((50, 140), gen), _int8((40, 150), gen)
    a, b = a_wide[:, 5:105], b_wide[:, 17:117]
    out = scaled_int8_mm(a, b, torch.ones(50, 1), torch.ones(40), None, torch.float32)
    assert torch.equal(out, (a.long() @ b.long().t()).float()), f"seed {seed}"


def test_row_panels():
    """K = 8192: a 1 MB row panel holds 128 rows, so 300 rows take three panels (on B packed whole
    and cached: the weight's second call; the first packs B per task)."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    m, n, k = 300, 20, 8192
    a, b = _int8((m, k), gen), _int8((n, k), gen)
    for call in ("first", "second"):
        out = _with_amx("emulate", lambda: scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32))
        assert torch.equal(out, (a.long() @ b.long().t()).float()), f"{call} call, seed {seed}"


def test_b_packed_per_task_or_cached_gives_the_same_bits(amx):
    """B packed per task into the thread's buffer (a weight's first call; an inference tensor,
    never cached; a weight the full cache has no room for) or packed whole into the cache (its
    second call while the cache has room): the same bits, and the cache grows only for the second."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in ((40, 45, 130), (70, 33, 200)):
        _C.clear_conv_weight_cache()
        a, b = _int8((m, k), gen), _int8((n, k), gen)
        a_scale = random_tensor((m, 1), torch.float32, "cpu", seed + 2).abs() * 1e-3 + 1e-4
        b_scale = random_tensor((n,), torch.float32, "cpu", seed + 3).abs() * 1e-2 + 1e-3
        bias = random_tensor((n,), torch.bfloat16, "cpu", seed + 4)
        with torch.inference_mode():
            b_inference = b.clone()
            from_inference = scaled_int8_mm(a, b_inference, a_scale, b_scale, bias, torch.bfloat16)
        first = scaled_int8_mm(a, b, a_scale, b_scale, bias, torch.bfloat16)
        assert _C.conv_weight_cache_bytes() == 0, "neither an inference tensor nor a first call is cached"
        second = scaled_int8_mm(a, b, a_scale, b_scale, bias, torch.bfloat16)
        assert _C.conv_weight_cache_bytes() > 0, "the second call caches B packed"
        off = _with_amx("off", lambda: scaled_int8_mm(a, b, a_scale, b_scale, bias, torch.bfloat16))
        what = f"{amx} {m}x{n}x{k} seed {seed}"
        assert torch.equal(first, second) and torch.equal(first, from_inference) and torch.equal(first, off), what
    _C.clear_conv_weight_cache()


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_same_bits_as_the_avx512_kernels(amx, out_dtype):
    """The epilogue (scales, bias, rounding) is the VNNI path's, and integer sums are exact on
    both: the outputs agree bit for bit."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in ((24, 50, 77), (65, 128, 512)):
        a, b = _int8((m, k), gen), _int8((n, k), gen)
        a_scale = random_tensor((m, 1), torch.float32, "cpu", seed + 2).abs() * 1e-3 + 1e-4
        for per_channel in (True, False):
            b_scale = random_tensor((n if per_channel else 1,), torch.float32, "cpu", seed + 3).abs() * 1e-2 + 1e-3
            for bias in (None, random_tensor((n,), torch.bfloat16, "cpu", seed + 4)):
                out = scaled_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
                ref = _with_amx("off", lambda: scaled_int8_mm(a, b, a_scale, b_scale, bias, out_dtype))
                what = f"{m}x{n}x{k} per_channel={per_channel} bias={bias is not None} seed {seed}"
                assert torch.equal(out, ref), what


def test_int8_linear_on_the_tiles(amx):
    """LLM.int8() (outlier columns through 16 bits, the rest through the int8 GEMM) with more
    rows than the unpacked path takes: the same bits with and without the tiles."""
    seed = fresh_seed()
    x = random_tensor((3, 12, 160), torch.bfloat16, "cpu", seed)
    x[..., 7] *= 40  # an outlier feature
    w_q, w_scale = quantize_per_token(random_tensor((72, 160), torch.float32, "cpu", seed + 1))
    bias = random_tensor((72,), torch.bfloat16, "cpu", seed + 2)
    for threshold in (0.0, 6.0):
        before = _C.amx_emulated_dot_products()
        out = int8_linear(x, w_q, w_scale.reshape(-1), bias, threshold)
        ran = _C.amx_emulated_dot_products() - before
        ref = _with_amx("off", lambda: int8_linear(x, w_q, w_scale.reshape(-1), bias, threshold))
        assert torch.equal(out, ref), f"threshold {threshold} seed {seed}"
        assert ran == (_tile_products(36, 72, 160) if amx == "emulate" else 0)


def test_opcheck_on_the_tiles(amx):
    gen = torch.Generator().manual_seed(fresh_seed())
    a, b = _int8((40, 96), gen), _int8((24, 96), gen)
    torch.library.opcheck(torch.ops.torch_ext.scaled_int8_mm,
                          (a, b, torch.rand(40, 1) + 0.1, torch.rand(24) + 0.1, torch.randn(24), torch.bfloat16))


def test_mode_switch():
    assert _C.cpu_amx() in ("off", "on", "emulate")
    assert _INFO["cpu_amx_mode"] in ("off", "on", "emulate")
    with pytest.raises(ValueError, match="expected 'off', 'on' or 'emulate'"):
        _C.set_cpu_amx("sometimes")
    if not _INFO["cpu_amx_int8_detected"]:
        with pytest.raises(ValueError, match="does not provide AMX-INT8"):
            _C.set_cpu_amx("on")
    assert _with_amx("emulate", _C.cpu_amx) == "emulate"


def test_other_isa_levels_ignore_the_mode():
    """The AMX kernels are compiled at the AVX-512 level: capped at AVX2, the mode changes nothing."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    a, b = _int8((33, 70), gen), _int8((20, 70), gen)
    default = _C.cpu_isa()
    _C.set_cpu_isa("avx2")
    try:
        before = _C.amx_emulated_dot_products()
        out = _with_amx("emulate", lambda: scaled_int8_mm(a, b, torch.ones(33, 1), torch.ones(20), None, torch.float32))
        assert _C.amx_emulated_dot_products() == before
    finally:
        _C.set_cpu_isa(default)
    assert torch.equal(out, (a.long() @ b.long().t()).float()), f"seed {seed}"


def test_emulated_tiles_are_the_instructions(tmp_path):
    """tests/cpp/amx_tiles_check.cpp: the emulated TDPBSSD and TDPBF16PS, loads and stores against
    the instruction set reference's definitions on random shapes and strides, the faults, and (on a
    CPU with AMX) the hardware tiles on every problem: the same bits for int8, fp32 sums within a
    rounding bound for bf16."""
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    binary = tmp_path / "amx_tiles_check"
    sources = [ROOT / "tests/cpp/amx_tiles_check.cpp", ROOT / "csrc/common/cpu/amx.cpp",
               ROOT / "csrc/common/cpu/isa.cpp"]
    subprocess.run([compiler, "-O2", "-std=c++20", f"-I{ROOT / 'csrc'}", f"-I{ROOT / 'tests/cpp'}", "-mamx-tile",
                    "-mamx-int8", "-mamx-bf16", *map(str, sources), "-o", str(binary)],
                   check=True, capture_output=True, text=True)
    seed = fresh_seed()
    out = subprocess.run([str(binary), "300", str(seed)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"seed {seed}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert "all ok" in out.stdout
    if _INFO["cpu_amx_int8_detected"]:
        assert "300 on hardware tiles" in out.stdout, out.stdout


def test_environment_switch():
    """TORCH_EXT_CPU_AMX read at start: "emulate" as asked; "1" where the CPU has AMX, else off; unset or
    junk: the default, on where the CPU has AMX."""
    import os
    import sys

    available = "on" if _INFO["cpu_amx_int8_detected"] else "off"
    for value, expected in (("emulate", "emulate"), ("1", available), ("0", "off"), ("sometimes", available),
                            (None, available)):
        env = {name: setting for name, setting in os.environ.items() if name != "TORCH_EXT_CPU_AMX"}
        if value is not None:
            env["TORCH_EXT_CPU_AMX"] = value
        result = subprocess.run([sys.executable, "-c", "import torch_ext; print(torch_ext._C.cpu_amx())"], env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert result.stdout.strip() == expected, f"TORCH_EXT_CPU_AMX={value}: {result.stdout}"
