"""weight_only_linear / dequantize_weight: vs float64 references across the coverage (bits,
groups, symmetric, odd shapes, partial last group, every CPU ISA, both kernel paths), opcheck,
torch.compile, gradients, bad inputs."""

import pytest
import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext import reference
from torch_ext.ops import dequantize_weight, weight_only_linear
from torch_ext.quant import quantize_weight
from torch_ext.testing import assert_close_to_reference, fresh_seed, poisoned_outputs, random_tensor

# A sum of K products accumulated in fp32 and rounded once: a little above the elementwise bound.
BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
CUDA_DTYPES = [torch.float16, torch.bfloat16]
# Rows of x on either side of the CPU's switch from the fused kernel to dequantize + GEMM (64).
ROWS = [1, 2, 3, 5, 6, 16, 65]  # 5, 6: whole 4-row blocks and a 1- or 2-row tail pass


def _quantized(n, k, bits, group_size, symmetric, seed, device="cpu", scale_dtype=None):
    w = random_tensor((n, k), torch.float32, "cpu", seed)
    return quantize_weight(w, bits, group_size, symmetric, scale_dtype=scale_dtype).to(device)


def _check_linear(x, qw, bias, what):
    with poisoned_outputs():
        y = weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size)
    ref = reference.quant.weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size)
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], qw.out_features)
    assert_close_to_reference(y, ref, x.dtype, what, BOUNDS[x.dtype])


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("symmetric", [False, True])
def test_linear_matches_reference_cpu(cpu_isa, bits, group_size, symmetric):
    seed = fresh_seed()
    n, k = 37, 200  # neither a multiple of the 16-wide tile nor of the group
    qw = _quantized(n, k, bits, group_size, symmetric, seed)
    for i, dtype in enumerate(CPU_DTYPES):
        for m in ROWS:
            x = random_tensor((m, k), dtype, "cpu", seed + 7 * m + i)
            bias = random_tensor((n,), dtype, "cpu", seed + 1) if m % 2 else None
            _check_linear(x, qw, bias, f"{cpu_isa} {bits}-bit g{group_size} sym={symmetric} m={m} {dtype} seed {seed}")


@pytest.mark.parametrize("n,k,group_size", [(24, 10944, 128), (40, 176, 128), (7, 16, 16), (16, 48, 32), (3, 5, -1)])
def test_linear_odd_shapes(device, n, k, group_size):
    """Partial last groups (K = 10944 at 128: 85.5 groups), N and K not multiples of 16."""
    seed = fresh_seed()
    for bits in (4, 8):
        qw = _quantized(n, k, bits, group_size, False, seed, device)
        for dtype in (CPU_DTYPES if device == "cpu" else CUDA_DTYPES):
            for m in (1, 9, 40):
                x = random_tensor((m, k), dtype, device, seed + m)
                _check_linear(x, qw, None, f"{n}x{k} g{group_size} {bits}-bit m={m} {dtype} seed {seed}")


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_cuda(bits):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    for group_size in (32, 128, -1):
        for symmetric in (False, True):
            qw = _quantized(100, 4096 + 48, bits, group_size, symmetric, seed, "cuda", torch.float16)
            for dtype in CUDA_DTYPES:  # bf16 x with fp16 scales: the op converts the scales
                for m in (1, 7, 16, 64, 300, 600):
                    x = random_tensor((m, 4096 + 48), dtype, "cuda", seed + m)
                    bias = random_tensor((100,), dtype, "cuda", seed + 3)
                    _check_linear(x, qw, bias, f"cuda {bits}-bit g{group_size} sym={symmetric} m={m} {dtype}")


@pytest.mark.cuda
@pytest.mark.parametrize("bits", [4, 8])
def test_linear_hopper_batch(monkeypatch, hopper_build, bits):
    """The batch GEMM on wgmma (TORCH_EXT_WO_WGMMA=1, asserted from the kernel's template name)
    over the same groups and tails as test_linear_cuda, plus N past a CTA's 256 features and an
    unaligned x; 16 < M <= 256 (decode sizes keep the mma.sync kernel, larger M dequantize + cuBLAS)."""
    monkeypatch.setenv("TORCH_EXT_WO_WGMMA", "1")
    seed = fresh_seed()
    x = random_tensor((64, 4096 + 48), torch.bfloat16, "cuda", seed)
    qw = _quantized(100, 4096 + 48, bits, 128, False, seed, "cuda", torch.bfloat16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.torch_ext.weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, 128)
        torch.cuda.synchronize()
    assert "true>" in " ".join(e.name for e in prof.events() if "linear_kernel" in e.name)
    for group_size in (32, 128, -1):
        for symmetric in (False, True):
            qw = _quantized(300, 4096 + 48, bits, group_size, symmetric, seed, "cuda", torch.float16)
            for dtype in CUDA_DTYPES:
                for m in (17, 64, 100, 256):
                    x = random_tensor((m, 4096 + 48), dtype, "cuda", seed + m)
                    bias = random_tensor((300,), dtype, "cuda", seed + 3)
                    _check_linear(x, qw, bias, f"hopper {bits}-bit g{group_size} sym={symmetric} m={m} {dtype}")
    wide = random_tensor((40, 4096 + 56), torch.bfloat16, "cuda", seed)
    qw = _quantized(300, 4096 + 48, bits, 128, False, seed, "cuda", torch.bfloat16)
    _check_linear(wide[:, 3:4096 + 51], qw, None, f"hopper unaligned x seed {seed}")


def test_linear_strided_and_batched_x(device):
    seed = fresh_seed()
    qw = _quantized(48, 96, 4, 32, False, seed, device)
    dtype = torch.bfloat16
    wide = random_tensor((5, 160), dtype, device, seed)
    _check_linear(wide[:, 10:106], qw, None, f"row stride 160, offset 10, seed {seed}")
    _check_linear(random_tensor((2, 3, 96), dtype, device, seed + 1), qw, None, f"3-D x, seed {seed}")
    _check_linear(random_tensor((96,), dtype, device, seed + 2), qw, None, f"1-D x, seed {seed}")


@pytest.mark.parametrize("bits", [4, 8])
def test_linear_16bit_x_with_outlier_features_cpu(cpu_isa, bits):
    """With AVX512-VNNI, 16-bit x is rounded to int16 per span of up to 128 columns, scaled to
    the span's largest |x| (quant/weight_only_cpu_vnni.cpp): a few features 100x the others (the
    outliers of LLM.int8()) coarsen the rest of their span and still stay in the dtype's bound.
    Spans of 1, 3, 8 tiles (group 16, per channel at K = 48, group 128)."""
    seed = fresh_seed()
    for k, group_size in ((512, 128), (48, -1), (64, 16)):
        qw = _quantized(40, k, bits, group_size, False, seed)
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 2, 3):
                x = random_tensor((m, k), dtype, "cpu", seed + m)
                x[:, 5::37] *= 100
                _check_linear(x, qw, None, f"{cpu_isa} {bits}-bit K={k} g{group_size} m={m} {dtype} seed {seed}")


def test_linear_non_finite_x_gives_non_finite_rows_cpu(cpu_isa):
    """A NaN or an infinity in a row of x makes that row of y non-finite (every output sums over
    all of x), as F.linear does; the other rows are unaffected."""
    seed = fresh_seed()
    qw = _quantized(24, 64, 4, 32, False, seed)
    for dtype in CPU_DTYPES:
        x = random_tensor((3, 64), dtype, "cpu", seed)
        x[0, 5], x[1, 40] = float("nan"), float("inf")
        y = weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, 4, 32)
        assert not torch.isfinite(y[:2]).any(), f"{cpu_isa} {dtype}"
        ref = reference.quant.weight_only_linear(x[2:], qw.qweight, qw.scales, qw.zeros, None, 4, 32)
        assert_close_to_reference(y[2:], ref, dtype, f"{cpu_isa} {dtype} finite row", BOUNDS[dtype])


@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_linear_any_scale_dtype_cpu(scale_dtype):
    seed = fresh_seed()
    qw = _quantized(33, 64, 4, 32, False, seed, scale_dtype=scale_dtype)
    for dtype in CPU_DTYPES:
        _check_linear(random_tensor((3, 64), dtype, "cpu", seed), qw, None, f"scales {scale_dtype} x {dtype}")


def test_empty_inputs(device):
    qw = _quantized(20, 32, 4, 16, False, fresh_seed(), device)
    dtype = torch.bfloat16
    y = weight_only_linear(torch.empty(0, 32, dtype=dtype, device=device), qw.qweight, qw.scales, qw.zeros, None, 4,
                           16)
    assert y.shape == (0, 20)
    # K = 0: an empty sum, the bias or zeros (as F.linear), on the direct and the panel paths.
    bias = random_tensor((20,), dtype, device, fresh_seed())
    qweight = torch.zeros(2, 0, 32, dtype=torch.int32, device=device)  # [ceil(20 / 16), ceil(0 / 16), words]
    scales = torch.ones(1, 20, dtype=dtype, device=device)  # one (empty) group
    for group_size in (32, -1):
        for rows in (3, 100):
            x = torch.empty(rows, 0, dtype=dtype, device=device)
            with poisoned_outputs():
                got = weight_only_linear(x, qweight, scales, scales, bias, 4, group_size)
                no_bias = weight_only_linear(x, qweight, scales, scales, None, 4, group_size)
            assert torch.equal(got, bias.expand(rows, 20)) and torch.equal(no_bias, torch.zeros(rows, 20, dtype=dtype,
                                                                                                 device=device))


def test_tiny_fp16_groups_quantize_without_nan():
    """A group whose scale underflows in fp16 (values ~1e-7) dequantizes to zeros, not NaN."""
    seed = fresh_seed()
    w = random_tensor((4, 64), torch.float16, "cpu", seed)
    w[1, 32:] = w[1, 32:] * 1e-7
    qw = quantize_weight(w, bits=4, group_size=32)
    assert torch.isfinite(qw.zeros.float()).all() and (qw.scales.float() > 0).all()
    dense = torch.ops.torch_ext.dequantize_weight(qw.qweight, qw.scales, qw.zeros, 4, 32)
    assert torch.isfinite(dense.float()).all() and dense[1, 32:].abs().max() <= 1e-6


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [16, 128, -1])
def test_dequantize_matches_reference(cpu_isa, device, bits, group_size):
    seed = fresh_seed()
    for n, k in ((37, 100), (64, 256)):
        for symmetric in (False, True):
            for scale_dtype in (torch.float32, torch.bfloat16, torch.float16):
                qw = _quantized(n, k, bits, group_size, symmetric, seed, device, scale_dtype)
                with poisoned_outputs():
                    w = dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k)
                ref = reference.quant.dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits, group_size, k)
                assert w.dtype == scale_dtype and w.shape == (n, k)
                # One rounding of (q - z) * s to the scales' dtype.
                assert_close_to_reference(w, ref, scale_dtype, f"{n}x{k} {scale_dtype} seed {seed}")


def test_dequantize_default_in_features_is_padded_k():
    qw = _quantized(20, 40, 4, 16, False, fresh_seed())
    w = dequantize_weight(qw.qweight, qw.scales, qw.zeros, 4, 16)
    assert w.shape == (20, 48)
    assert torch.equal(w[:, 40:], torch.zeros(20, 8))  # padded columns hold the zero point


def test_opcheck(device):
    seed = fresh_seed()
    dtype = torch.bfloat16
    for bits in (4, 8):
        qw = _quantized(40, 96, bits, 32, False, seed, device)
        for m in (1, 40):
            x = random_tensor((m, 96), dtype, device, seed)
            bias = random_tensor((40,), dtype, device, seed + 1)
            torch.library.opcheck(torch.ops.torch_ext.weight_only_linear,
                                  (x, qw.qweight, qw.scales, qw.zeros, bias, bits, 32))
            torch.library.opcheck(torch.ops.torch_ext.weight_only_linear,
                                  (x.requires_grad_(), qw.qweight, qw.scales, None, None, bits, 32))
        torch.library.opcheck(torch.ops.torch_ext.dequantize_weight, (qw.qweight, qw.scales, qw.zeros, bits, 32, 96))


def test_compile_fullgraph(device):
    seed = fresh_seed()
    qw = _quantized(40, 96, 4, 32, False, seed, device)
    x = random_tensor((3, 96), torch.bfloat16, device, seed)

    def f(x):
        return torch.relu(weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, 4, 32)) * 2

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    torch.testing.assert_close(compiled(x), f(x))


@pytest.mark.filterwarnings("ignore:Input #.* is not a double precision")
def test_gradcheck_x_and_bias():
    """The op is linear in x: a fp32 gradcheck with step 1e-2 is exact up to fp32 rounding."""
    seed = fresh_seed()
    qw = _quantized(12, 40, 4, 16, False, seed)
    x = random_tensor((3, 40), torch.float32, "cpu", seed).requires_grad_()
    bias = random_tensor((12,), torch.float32, "cpu", seed + 1).requires_grad_()
    fn = lambda x, b: weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, b, 4, 16)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, bias), eps=1e-2, atol=1e-3, rtol=1e-3, fast_mode=False)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_backward_matches_dense(device, dtype):
    """Every x dtype: on the CPU, 16-bit x whose GEMM torch runs slowly in that dtype takes the
    gradient's GEMM in fp32 (torch_ext/ops/_gemm_dtype.py)."""
    if device == "cuda" and dtype == torch.float32:
        pytest.skip("x is fp16 / bf16 on CUDA")
    seed = fresh_seed()
    qw = _quantized(24, 64, 8, 32, True, seed, device)
    x = random_tensor((2, 5, 64), dtype, device, seed).requires_grad_()
    grad_y = random_tensor((2, 5, 24), dtype, device, seed + 1)
    weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, 8, 32).backward(grad_y)
    ref = grad_y.double().cpu() @ reference.quant.dequantize_weight(qw.qweight, qw.scales, qw.zeros, 8, 32, 64)
    assert_close_to_reference(x.grad, ref, dtype, f"grad x, seed {seed}", BOUNDS[dtype])


def _bad_call(**overrides):
    qw = _quantized(20, 64, 4, 32, False, 1)
    args = dict(x=torch.randn(2, 64), qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bias=None, bits=4,
                group_size=32)
    args.update(overrides)
    return torch.ops.torch_ext.weight_only_linear(*args.values())


@pytest.mark.parametrize("overrides,message", [
    (dict(x=torch.randn(2, 80)), "K = 80 needs 5"),
    (dict(bits=3), "bits must be 4 or 8, got 3"),
    (dict(group_size=24), "group_size must be -1 .* multiple of 16, got 24"),
    (dict(group_size=16), r"scales must be \[ceil\(K / group_size\), N\] = \[4, 20\]"),
    (dict(x=torch.randn(2, 64, dtype=torch.float64)), "x must have dtype"),
    (dict(x=torch.randn(2, 64).to(torch.int32)), "x must have dtype"),
    (dict(bias=torch.randn(20, dtype=torch.bfloat16)), "bias must have the dtype of x"),
    (dict(bias=torch.randn(21)), r"bias must be \[N\] = \[20\]"),
    (dict(scales=torch.randn(2, 40)), "scales has N = 40"),
    (dict(zeros=torch.zeros(2, 19)), "zeros must have the shape of scales"),
    (dict(qweight=torch.zeros(2, 4, 32, dtype=torch.int64)), "qweight must have dtype torch.int32"),
    (dict(qweight=torch.zeros(2, 4, 64, dtype=torch.int32)), r"qweight must be \[ceil\(N/16\), ceil\(K/16\), 32\]"),
])
def test_bad_inputs_raise_clear_errors(overrides, message):
    with pytest.raises(RuntimeError, match=message):
        _bad_call(**overrides)


@pytest.mark.parametrize("bits", [4, 8])
def test_one_hot_rows_give_the_dequantized_weight_bitwise(device, bits):
    """With x = identity rows, each output is one weight times 1. On CUDA, y must equal
    dequantize_weight's output bit for bit (both round (q - zero) * scale once to the same
    dtype): this pins the register dequantization and the fragment maps directly. The CPU
    kernel computes s * q - s * z * sum(x) (zero points applied per group), so there it agrees
    to rounding only."""
    seed = fresh_seed()
    for dtype in (CPU_DTYPES if device == "cpu" else CUDA_DTYPES):
        n, k = 40, 48
        qw = _quantized(n, k, bits, 16, False, seed, device, dtype)
        x = torch.eye(k, dtype=dtype, device=device)
        y = weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, 16)
        w = dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits, 16, k)
        if device == "cuda":
            assert torch.equal(y, w.t()), f"{bits}-bit {dtype} seed {seed}"
        else:
            torch.testing.assert_close(y, w.t(), msg=f"{bits}-bit {dtype} seed {seed}")


def test_dequantize_compile_fullgraph():
    qw = _quantized(40, 96, 4, 32, False, fresh_seed())
    f = lambda: dequantize_weight(qw.qweight, qw.scales, qw.zeros, 4, 32, 96) * 2  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(), f())


@pytest.mark.parametrize("overrides,message", [
    (dict(bits=2), "bits must be 4 or 8, got 2"),
    (dict(group_size=0), "group_size must be -1 .* multiple of 16, got 0"),
    (dict(in_features=200), "K = 200 needs 13"),
    (dict(in_features=0), "in_features must be positive, got 0"),
    (dict(qweight=torch.zeros(2, 4, dtype=torch.int32)), r"qweight must be \[ceil\(N/16\), ceil\(K/16\), words\]"),
    (dict(scales=torch.randn(2, 20).to(torch.int32)), "scales must have dtype"),
])
def test_dequantize_bad_inputs(overrides, message):
    qw = _quantized(20, 64, 4, 32, False, 1)
    args = dict(qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bits=4, group_size=32, in_features=64)
    args.update(overrides)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.dequantize_weight(*args.values())


# ---------------------------------------------------------------------------------------------
# bf16 x of 8-1024 rows on AMX-BF16 tiles (csrc/quant/weight_only_cpu_amx.cpp; exact B below 64
# rows, scaled B from 64): on the emulated tiles everywhere the CPU has AVX-512 with AVX512_VBMI and
# AVX512_BF16, on the hardware where it has AMX.

_INFO = torch_ext._C.build_info()
needs_vbmi = pytest.mark.skipif(not (_INFO["cpu_avx512_vbmi_detected"] and _INFO["cpu_avx512_bf16_active"]),
                                reason="the AMX weight-only kernel builds its B tiles with AVX512_VBMI and BF16")
AMX_SCALED_ROWS = 64


def _amx_tile_products(m, n, k, bits=4):
    """TDPBF16PS of one call on the tiles: per step of 32 k, per 16-row tile row of W, and per
    16-row block of each 32-row chunk of x (exact B skips a chunk's empty second block; scaled B,
    which 8-bit weights always take, does not)."""
    steps = -(-(-(-k // 16)) // 2)
    scaled = m >= AMX_SCALED_ROWS or bits == 8
    row_blocks = sum(2 if scaled or min(32, m - c) > 16 else 1 for c in range(0, m, 32))
    return steps * -(-n // 16) * row_blocks


def _linear_counting_tile_products(x, qw, bias):
    before = torch_ext._C.amx_emulated_dot_products()
    with poisoned_outputs():
        y = weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, bias, qw.bits, qw.group_size)
    return y, torch_ext._C.amx_emulated_dot_products() - before


@needs_vbmi
@pytest.mark.parametrize("m,n,k,group_size", [
    (8, 37, 200, 32),     # exact B: one row block; an odd count of tile rows; K past whole steps
    (16, 48, 96, -1),     # per channel: one group over K
    (17, 40, 160, 64),    # two row blocks
    (33, 33, 200, 128),   # two chunks (the second reads the B tiles the first dequantized)
    (40, 16, 8448, 128),  # x's slice over 512 KB: K in three blocks of whole groups
    (70, 20, 256, 128),   # scaled B: three chunks, the last of 6 rows
    (128, 16, 48, -1),    # an odd count of weight tiles: the last step's second half is padding
    (96, 32, 6144, 128),  # K in three blocks: the C tiles reloaded from the sums
    (160, 2720, 64, 32),  # 85 pairs of tile rows: several blocks of pairs per thread
    (512, 4096, 32, 32),  # y of 4 MB: written with streaming stores
    (520, 4100, 32, 32),  # y over 4 MB with rows of 4100: ordinary stores, the last pair partial
])
@pytest.mark.parametrize("bits", [4, 8])
def test_amx_tiles_match_reference(amx, m, n, k, group_size, bits):
    seed = fresh_seed()
    for symmetric in (False, True):
        qw = _quantized(n, k, bits, group_size, symmetric, seed)
        x = random_tensor((m, k), torch.bfloat16, "cpu", seed + 1)
        bias = random_tensor((n,), torch.bfloat16, "cpu", seed + 2) if symmetric else None
        y, ran = _linear_counting_tile_products(x, qw, bias)
        ref = reference.quant.weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, bias, bits, group_size)
        what = f"{amx} {bits}-bit {m}x{n}x{k} g{group_size} sym={symmetric} seed {seed}"
        assert_close_to_reference(y, ref, torch.bfloat16, what, BOUNDS[torch.bfloat16])
        assert ran == (_amx_tile_products(m, n, k, bits) if amx == "emulate" else 0), f"{what}: {ran} tile products"


@needs_vbmi
def test_amx_tiles_only_where_they_apply(amx):
    """The other kernels keep: fp16 or fp32 x, groups of an odd count of 16-column tiles (a tile
    step of 32 k would straddle two), fewer than 8 or more than 1024 rows."""
    seed = fresh_seed()
    cases = [(16, torch.float16, 4, 32), (16, torch.float32, 8, 32), (16, torch.bfloat16, 8, 48),
             (16, torch.bfloat16, 4, 48), (7, torch.bfloat16, 8, 32), (1025, torch.bfloat16, 4, 32)]
    for m, dtype, bits, group_size in cases:
        qw = _quantized(24, 96, bits, group_size, False, seed)
        x = random_tensor((m, 96), dtype, "cpu", seed + m)
        y, ran = _linear_counting_tile_products(x, qw, None)
        ref = reference.quant.weight_only_linear(x, qw.qweight, qw.scales, qw.zeros, None, bits, group_size)
        what = f"m={m} {dtype} {bits}-bit g{group_size} seed {seed}"
        assert_close_to_reference(y, ref, dtype, what, BOUNDS[dtype])
        assert ran == 0, what


@needs_vbmi
@pytest.mark.parametrize("bits", [4, 8])
def test_amx_one_hot_rows_give_the_dequantized_weight_bitwise(amx, bits):
    """Exact B (4 bits, 48 rows): the tiles sum x (128 + q) exactly and the group's end computes
    s * (C - (128 + z) X) with one FMA for the zero, for x = identity rows s * (q - z) rounded once
    like the dequantized weight. Scaled B (64 rows, or 8 bits): B is the dequantized weight in
    bf16."""
    seed = fresh_seed()
    n = 40
    for k in (48, 64):
        for symmetric in (False, True):
            qw = _quantized(n, k, bits, 32, symmetric, seed, scale_dtype=torch.bfloat16)
            y, ran = _linear_counting_tile_products(torch.eye(k, dtype=torch.bfloat16), qw, None)
            w = dequantize_weight(qw.qweight, qw.scales, qw.zeros, bits, 32, k)
            assert torch.equal(y, w.t()), f"{bits}-bit k={k} sym={symmetric} seed {seed}"
            assert ran == (_amx_tile_products(k, n, k, bits) if amx == "emulate" else 0)


@needs_vbmi
@pytest.mark.parametrize("m", [20, 70])  # exact and scaled B
def test_amx_non_finite_x_gives_non_finite_rows(amx, m):
    seed = fresh_seed()
    qw = _quantized(24, 64, 4, 32, False, seed)
    x = random_tensor((m, 64), torch.bfloat16, "cpu", seed)
    x[0, 5], x[17, 40] = float("nan"), float("inf")
    y, _ = _linear_counting_tile_products(x, qw, None)
    assert not torch.isfinite(y[[0, 17]]).any()
    finite = [r for r in range(m) if r not in (0, 17)]
    ref = reference.quant.weight_only_linear(x[finite], qw.qweight, qw.scales, qw.zeros, None, 4, 32)
    assert_close_to_reference(y[finite], ref, torch.bfloat16, f"finite rows, seed {seed}", BOUNDS[torch.bfloat16])
