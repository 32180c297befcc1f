"""scaled_fp8_mm (e4m3) and FP8Linear: against float64 references of the e4m3-rounded values,
scale forms, out dtypes, opcheck, torch.compile, gradients, bad inputs."""

import pytest
import torch

import torch_ext
from torch_ext.ops import quantize_fp8_per_row, scaled_fp8_mm
from torch_ext.testing import assert_close_to_reference, fresh_seed, poisoned_outputs, random_tensor

# fp32 sums of exact products, then scales: a little above fp32's elementwise bound.
BOUNDS = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _e4m3(shape, seed, scale=8.0):
    return (random_tensor(shape, torch.float32, "cpu", seed) * scale).to(torch.float8_e4m3fn)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_fp8_mm_matches_reference(out_dtype):
    seed = fresh_seed()
    for m, n, k in ((1, 8, 16), (5, 17, 33), (64, 96, 300)):
        a, b = _e4m3((m, k), seed), _e4m3((n, k), seed + 1)
        for a_scale in (torch.rand(m, 1) + 0.1, torch.rand(1) + 0.1):
            for b_scale in (torch.rand(n) + 0.1, torch.rand(1) + 0.1):
                for bias in (None, random_tensor((n,), torch.float32, "cpu", seed + 2)):
                    with poisoned_outputs():
                        out = scaled_fp8_mm(a, b, a_scale, b_scale, bias, out_dtype)
                    # The reference widens the same e4m3 values (exact in float64).
                    ref = (a.double() @ b.double().t()) * a_scale.double().reshape(-1, 1) * b_scale.double()
                    if bias is not None:
                        ref = ref + bias.double()
                    assert_close_to_reference(out, ref, out_dtype, f"{m}x{n}x{k} seed {seed}", BOUNDS[out_dtype])


def _small_e4m3(shape, gen):
    """Integers in [-8, 8]: exact in e4m3, and every partial sum of their products exact in fp32."""
    return torch.randint(-8, 9, shape, generator=gen).float().to(torch.float8_e4m3fn)


def _check_exact_sums():
    """Exact sums: the result is bit for bit the widening path's (fp32 GEMM of exact products, then
    the epilogue in the contract's order), whatever the kernel's summation order. Tails in M (rows
    of 4 and of 32), N (16-column blocks, pairs of them, groups of 4), odd K (a last pair with a
    zero), per-row / per-tensor scales, strided A, every out dtype."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in ((1, 8, 16), (5, 17, 33), (37, 70, 131), (64, 96, 300), (3, 5, 1), (33, 48, 64)):
        a_wide, b = _small_e4m3((m, k + 6), gen), _small_e4m3((n, k), gen)
        a = a_wide[:, 3:3 + k]
        for a_scale in (torch.rand(m, 1, generator=gen) + 0.1, torch.rand(1, generator=gen) + 0.1):
            b_scale, bias = torch.rand(n, generator=gen) + 0.1, torch.randn(n, generator=gen)
            for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
                with poisoned_outputs():
                    out = scaled_fp8_mm(a, b, a_scale, b_scale, bias, out_dtype)
                widened = (a.float() @ b.float().t()) * a_scale.reshape(-1, 1) * b_scale + bias
                assert torch.equal(out, widened.to(out_dtype)), f"{m}x{n}x{k} {out_dtype} seed {seed}"


def test_cpu_kernels_sum_exactly(cpu_isa):
    """The bf16 dot-product kernel (AVX512_BF16 CPUs) and the widening path (the others)."""
    _check_exact_sums()


def test_cpu_kernel_on_amx_tiles(amx):
    """The packed-B product on AMX-BF16 tiles (emulated, or the hardware's)."""
    if not torch_ext._C.build_info()["cpu_avx512_bf16_active"]:
        pytest.skip("the bf16 kernels (and their AMX paths) need AVX512_BF16")
    before = torch_ext._C.amx_emulated_dot_products()
    _check_exact_sums()
    assert (torch_ext._C.amx_emulated_dot_products() > before) == (amx == "emulate")


def test_cpu_every_e4m3_code(cpu_isa):
    """All 256 codes of B (zeros, subnormals, both signs, 448, the NaN codes) against one-hot rows of
    A: out[i, n] = b[n, i] exactly, as the widening path gives it (0 x NaN poisons a column there
    too). 16 rows read B as it is (its codes widened in registers), 32 rows the packed B."""
    b = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(16, 16).view(torch.float8_e4m3fn)
    for rows in (16, 32):
        a = torch.eye(16).repeat(rows // 16, 1).to(torch.float8_e4m3fn)
        out = scaled_fp8_mm(a, b, torch.ones(rows, 1), torch.ones(16), None, torch.float32)
        torch.testing.assert_close(out, a.float() @ b.float().t(), rtol=0, atol=0, equal_nan=True)


def test_cpu_nan_codes_and_cached_weight():
    """A NaN code (0x7F) poisons its row only; the packed weight cached for B follows in-place writes."""
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    a, b = _small_e4m3((6, 40), gen), _small_e4m3((20, 40), gen)
    a.view(torch.uint8)[2, 7] = 0x7F
    ones_a, ones_b = torch.ones(6, 1), torch.ones(20)
    out = scaled_fp8_mm(a, b, ones_a, ones_b, None, torch.float32)
    assert torch.isnan(out[2]).all() and torch.isfinite(out[torch.arange(6) != 2]).all(), f"seed {seed}"
    a.view(torch.uint8)[2, 7] = 0
    assert torch.equal(scaled_fp8_mm(a, b, ones_a, ones_b, None, torch.float32), a.float() @ b.float().t())
    b.view(torch.uint8)[3].fill_(0x38)  # 1.0: a new weight value in place
    assert torch.equal(scaled_fp8_mm(a, b, ones_a, ones_b, None, torch.float32), a.float() @ b.float().t())


def test_quantize_fp8_per_row_round_trip():
    seed = fresh_seed()
    x = random_tensor((6, 200), torch.float32, "cpu", seed, scale=5.0)
    q, scale = quantize_fp8_per_row(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    # Each row's largest magnitude maps to e4m3's 448 exactly: the whole range is used.
    assert torch.equal(scale, x.abs().amax(-1, keepdim=True) / 448)
    assert torch.equal(q.float().abs().amax(-1), torch.full((6,), 448.0))
    # e4m3 keeps 3 mantissa bits: relative rounding error up to 2^-4 per element.
    assert_close_to_reference(q.float() * scale, x.double(), torch.float32, f"seed {seed}", 4e-2)


def test_fp8_linear_module_gradients_and_compile():
    seed = fresh_seed()
    torch.manual_seed(seed % 2**31)
    linear = torch.nn.Linear(128, 48)
    module = torch_ext.nn.FP8Linear.from_linear(linear)
    x = random_tensor((2, 3, 128), torch.float32, "cpu", seed).requires_grad_()
    with poisoned_outputs():
        y = module(x)
    # Exactly what the module defines: x quantized per row to e4m3, times the e4m3 weight, in float64.
    x_q, x_scale = quantize_fp8_per_row(x.detach().reshape(-1, 128))
    exact = ((x_q.double() * x_scale.double()) @ (module.w_q.double() * module.w_scale.double().reshape(-1, 1)).t()
             + module.bias.double())
    assert_close_to_reference(y.reshape(-1, 48), exact, torch.float32, f"seed {seed}", 1e-5)
    assert_close_to_reference(y, linear(x).double(), torch.float32, f"against float, seed {seed}", 6e-2)
    grad_y = random_tensor(y.shape, torch.float32, "cpu", seed + 1)
    y.backward(grad_y)
    weight = module.w_q.double() * module.w_scale.double().reshape(-1, 1)
    assert_close_to_reference(x.grad, grad_y.double() @ weight, torch.float32, f"grad, seed {seed}", 1e-5)
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x.detach()), module(x.detach()))


def test_quantize_model_fp8_method():
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 8))
    torch_ext.quant.quantize_model(model, method="fp8")
    assert all(isinstance(layer, torch_ext.nn.FP8Linear) for layer in model)


@pytest.mark.parametrize("rows", [5, 40])  # the CPU's few-row path (B as it is), the packed one
def test_opcheck(rows):
    seed = fresh_seed()
    a, b = _e4m3((rows, 48), seed), _e4m3((24, 48), seed + 1)
    # opcheck's test_schema compares inputs before and after with arithmetic torch does not
    # implement for float8 ("mul_cpu_reduced_float" not implemented): the other checks run.
    torch.library.opcheck(torch.ops.torch_ext.scaled_fp8_mm,
                          (a, b, torch.rand(rows, 1), torch.rand(24), torch.randn(24), torch.bfloat16),
                          test_utils=("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("args,message", [
    (dict(a=torch.zeros(2, 8, dtype=torch.int8)), "a must have dtype torch.float8_e4m3fn"),
    (dict(b=torch.zeros(3, 9).to(torch.float8_e4m3fn)), "must share K"),
    (dict(a_scale=torch.ones(3, 1)), r"a_scale must be \[M, 1\] = \[2, 1\] or one element"),
    (dict(b_scale=torch.ones(2)), r"b_scale must be \[N\] = \[3\] or \[1\]"),
    (dict(out_dtype=torch.int8), "out_dtype must be"),
])
def test_bad_inputs(args, message):
    call = dict(a=torch.zeros(2, 8).to(torch.float8_e4m3fn), b=torch.zeros(3, 8).to(torch.float8_e4m3fn),
                a_scale=torch.ones(2, 1), b_scale=torch.ones(3), bias=None, out_dtype=torch.float32)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.scaled_fp8_mm(*call.values())


@pytest.mark.cuda
def test_cuda_matches_cpu():
    """Small integer e4m3 values keep every partial sum exact: the GPU must match the CPU bit for
    bit whatever the tensor cores' summation order; random values within fp32 summation error."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability() < (8, 9):
        with pytest.raises(RuntimeError, match="needs FP8 tensor cores"):
            scaled_fp8_mm(_e4m3((4, 32), 1).cuda(), _e4m3((8, 32), 2).cuda(), torch.ones(4, 1, device="cuda"),
                          torch.ones(8, device="cuda"))
        return
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    for m, n, k in ((1, 8, 16), (5, 17, 33), (37, 70, 130), (2048, 256, 512)):
        small = lambda shape: torch.randint(-8, 9, shape, generator=gen).float().to(torch.float8_e4m3fn)  # noqa: E731
        a, b = small((m, k)), small((n, k))
        a_scale, b_scale, bias = torch.rand(m, 1) + 0.1, torch.rand(n) + 0.1, torch.randn(n)
        for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
            cpu = scaled_fp8_mm(a, b, a_scale, b_scale, bias, out_dtype)
            gpu = scaled_fp8_mm(a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda(), bias.cuda(), out_dtype)
            assert torch.equal(gpu.cpu(), cpu), f"{m}x{n}x{k} {out_dtype} seed {seed}"
        a, b = _e4m3((m, k), seed), _e4m3((n, k), seed + 1)
        gpu = scaled_fp8_mm(a.cuda(), b.cuda(), a_scale.cuda(), b_scale.cuda(), None, torch.float32)
        ref = (a.double() @ b.double().t()) * a_scale.double() * b_scale.double()
        assert_close_to_reference(gpu, ref, torch.float32, f"{m}x{n}x{k} seed {seed}", 1e-5)
