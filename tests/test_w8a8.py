"""quantize_per_token and scaled_int8_mm: exact against references (integer sums, rounding),
tails, every CPU ISA, scale forms, out dtypes, opcheck, torch.compile, bad inputs."""

import os

import pytest
import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext.ops import int8_linear, quantize_per_token, scaled_int8_mm
from torch_ext.testing import assert_close_to_reference, fresh_seed, poisoned_outputs, random_tensor

OUT_BOUNDS = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _int8(shape, seed, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8).to(device)


def _reference_quantize(x: torch.Tensor, clip=None):
    x64 = x.double().cpu()
    amax = x64.abs().amax(dim=-1, keepdim=True)
    if clip is not None:
        amax = amax.clamp(max=clip)
    # The scale is computed in fp32, as the op stores it; the division too (x / scale).
    scale = torch.where(amax > 0, amax.float() / 127, torch.ones_like(amax, dtype=torch.float32))
    q = torch.round(x.float().cpu() / scale).clamp(-128, 127).to(torch.int8)
    return q, scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_per_token_exact(cpu_isa, dtype):
    seed = fresh_seed()
    for shape in ((1, 1), (3, 17), (2, 5, 100), (8, 4096)):
        x = random_tensor(shape, dtype, "cpu", seed, scale=3.0)
        for clip in (None, 1.5):
            with poisoned_outputs():
                q, scale = quantize_per_token(x, clip)
            q_ref, scale_ref = _reference_quantize(x, clip)
            assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (*shape[:-1], 1)
            assert torch.equal(scale, scale_ref), f"{shape} {dtype} clip={clip} seed {seed}"
            assert torch.equal(q, q_ref), f"{shape} {dtype} clip={clip} seed {seed}"


def test_quantize_per_token_zero_rows_and_strides():
    x = torch.zeros(2, 8)
    q, scale = quantize_per_token(x)
    assert torch.equal(scale, torch.ones(2, 1)) and torch.equal(q, torch.zeros(2, 8, dtype=torch.int8))
    wide = random_tensor((4, 40), torch.float32, "cpu", fresh_seed())
    q, scale = quantize_per_token(wide[:, 5:25])
    q_ref, scale_ref = _reference_quantize(wide[:, 5:25])
    assert torch.equal(q, q_ref) and torch.equal(scale, scale_ref)


def test_scaled_int8_mm_sums_exactly(cpu_isa):
    """Unit scales and small enough sums: the fp32 result is the exact integer dot product."""
    seed = fresh_seed()
    # M <= 16 runs B unpacked in passes of 4 (AVX-512) or 2 (AVX2) rows of A: whole passes and tails.
    for m, n, k in ((1, 1, 1), (5, 17, 33), (7, 70, 130), (8, 40, 100), (12, 9, 64), (13, 64, 256), (3, 100, 7),
                    (37, 33, 1000)):
        a, b = _int8((m, k), seed), _int8((n, k), seed + 1)
        with poisoned_outputs():
            out = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32)
        exact = (a.long() @ b.long().t()).float()
        assert torch.equal(out, exact), f"{m}x{n}x{k} seed {seed}"
    # Rows of A and B further apart than K (slices of wider tensors), on both paths (M <= 16: B unpacked).
    for m in (2, 16, 17):
        a, b = _int8((m, 100), seed + 2)[:, 3:70], _int8((45, 90), seed + 3)[:, 10:77]
        out = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(45), None, torch.float32)
        assert torch.equal(out, (a.long() @ b.long().t()).float()), f"strided m={m} seed {seed}"


def test_scaled_int8_mm_b_packed_per_task_or_cached(cpu_isa):
    """More than 16 rows pack B: per task into the thread's buffer on a weight's first call (or
    for a weight the packed-weight cache has no room for), whole into the cache on its second.
    Both are exact and give the same bits, at every ISA level, with the AMX tiles off (test_amx.py
    covers them)."""
    seed = fresh_seed()
    previous_amx = torch_ext._C.cpu_amx()
    torch_ext._C.set_cpu_amx("off")
    try:
        for m, n, k in ((17, 70, 130), (40, 33, 300), (24, 100, 7)):
            torch_ext._C.clear_conv_weight_cache()
            a, b = _int8((m, k), seed), _int8((n, k), seed + 1)
            first = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32)
            assert torch_ext._C.conv_weight_cache_bytes() == 0
            second = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32)
            assert torch_ext._C.conv_weight_cache_bytes() > 0
            exact = (a.long() @ b.long().t()).float()
            assert torch.equal(first, exact) and torch.equal(second, exact), f"{cpu_isa} {m}x{n}x{k} seed {seed}"
    finally:
        torch_ext._C.set_cpu_amx(previous_amx)
        torch_ext._C.clear_conv_weight_cache()


def test_scaled_int8_mm_epilogue_rounds_each_step(cpu_isa):
    """float(acc) * a_scale, * b_scale, + bias, each rounded in fp32 (no fused multiply-add), on
    the few-row path (B unpacked) and the packed one alike: bit for bit the same float32 steps
    done with torch ops (exact integer sums, K small)."""
    seed = fresh_seed()
    for m in (5, 37):
        a, b = _int8((m, 200), seed), _int8((70, 200), seed + 1)
        a_scale = random_tensor((m, 1), torch.float32, "cpu", seed + 2).abs() + 0.01
        b_scale = random_tensor((70,), torch.float32, "cpu", seed + 3).abs() + 0.01
        bias = random_tensor((70,), torch.float32, "cpu", seed + 4)
        with poisoned_outputs():
            out = scaled_int8_mm(a, b, a_scale, b_scale, bias, torch.float32)
        steps = (a.long() @ b.long().t()).float() * a_scale
        steps = steps * b_scale
        steps = steps + bias
        assert torch.equal(out, steps), f"m={m} seed {seed}"


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_scaled_int8_mm_matches_reference(cpu_isa, out_dtype):
    seed = fresh_seed()
    for m, n, k in ((4, 24, 64), (9, 50, 77), (64, 128, 512)):
        a, b = _int8((m, k), seed), _int8((n, k), seed + 1)
        a_scale = random_tensor((m, 1), torch.float32, "cpu", seed + 2).abs() * 1e-3 + 1e-4
        for per_channel in (True, False):
            b_scale = random_tensor((n if per_channel else 1,), torch.float32, "cpu", seed + 3).abs() * 1e-2 + 1e-3
            for bias in (None, random_tensor((n,), torch.bfloat16, "cpu", seed + 4)):
                with poisoned_outputs():
                    out = scaled_int8_mm(a, b, a_scale, b_scale, bias, out_dtype)
                ref = (a.double() @ b.double().t()) * a_scale.double() * b_scale.double()
                if bias is not None:
                    ref = ref + bias.double()
                assert out.dtype == out_dtype
                assert_close_to_reference(out, ref, out_dtype, f"{m}x{n}x{k} per_channel={per_channel} seed {seed}",
                                          OUT_BOUNDS[out_dtype])


def test_scaled_int8_mm_cached_packing_follows_writes():
    """B's packed form is cached per tensor version: an in-place write must be seen. M = 20 packs
    (and caches from the second call); M = 3 uses the cached form when there is one, else reads
    B unpacked."""
    seed = fresh_seed()
    a, b = _int8((20, 40), seed), _int8((20, 40), seed + 1)
    ones_a, ones_b = torch.ones(20, 1), torch.ones(20)
    exact = lambda rows: (a[:rows].long() @ b.long().t()).float()  # noqa: E731
    for _ in range(3):  # the second call caches
        assert torch.equal(scaled_int8_mm(a, b, ones_a, ones_b), exact(20))
    assert torch.equal(scaled_int8_mm(a[:3], b, ones_a[:3], ones_b), exact(3))  # the cached form
    b.copy_(_int8((20, 40), seed + 2))
    assert torch.equal(scaled_int8_mm(a[:3], b, ones_a[:3], ones_b), exact(3))  # stale: unpacked
    assert torch.equal(scaled_int8_mm(a, b, ones_a, ones_b), exact(20))


def test_scaled_int8_mm_with_inference_tensors():
    """B made under torch.inference_mode (no version counter): never cached, packed per call."""
    seed = fresh_seed()
    a = _int8((20, 40), seed)
    ones_a, ones_b = torch.ones(20, 1), torch.ones(20)
    with torch.inference_mode():
        b = _int8((20, 40), seed + 1)
        for step in range(4):
            if step == 3:
                b.copy_(_int8((20, 40), seed + 2))
            for rows in (20, 3):
                assert torch.equal(scaled_int8_mm(a[:rows], b, ones_a[:rows], ones_b),
                                   (a[:rows].long() @ b.long().t()).float()), f"step {step}, {rows} rows"


def test_w8a8_round_trip_approximates_float_linear():
    seed = fresh_seed()
    x = random_tensor((16, 256), torch.float32, "cpu", seed)
    w = random_tensor((64, 256), torch.float32, "cpu", seed + 1)
    xq, xs = quantize_per_token(x)
    wq, ws = quantize_per_token(w)
    out = scaled_int8_mm(xq, wq, xs, ws.reshape(-1))
    assert_close_to_reference(out, x.double() @ w.double().t(), torch.float32, f"seed {seed}", 2e-2)


def test_opcheck():
    seed = fresh_seed()
    x = random_tensor((5, 48), torch.bfloat16, "cpu", seed)
    torch.library.opcheck(torch.ops.torch_ext.quantize_per_token, (x, None))
    torch.library.opcheck(torch.ops.torch_ext.quantize_per_token, (x, 0.5))
    a, b = _int8((5, 48), seed), _int8((24, 48), seed + 1)
    torch.library.opcheck(torch.ops.torch_ext.scaled_int8_mm,
                          (a, b, torch.rand(5, 1), torch.rand(24), torch.randn(24), torch.bfloat16))


def test_compile_fullgraph():
    seed = fresh_seed()
    w = _int8((24, 48), seed)
    w_scale = torch.rand(24) * 1e-2

    def f(x):
        xq, xs = quantize_per_token(x)
        return torch.relu(scaled_int8_mm(xq, w, xs, w_scale, None, torch.float32))

    x = random_tensor((5, 48), torch.float32, "cpu", seed)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


@pytest.mark.parametrize("args,message", [
    (dict(a=torch.zeros(2, 8)), "a must have dtype torch.int8"),
    (dict(b=torch.zeros(3, 8, dtype=torch.int32)), "b must have dtype torch.int8"),
    (dict(b=torch.zeros(3, 9, dtype=torch.int8)), "must share K"),
    (dict(a_scale=torch.ones(3, 1)), r"a_scale must be \[M, 1\] = \[2, 1\]"),
    (dict(b_scale=torch.ones(2)), r"b_scale must be \[N\] = \[3\] or \[1\]"),
    (dict(a_scale=torch.ones(2, 1, dtype=torch.float64)), "a_scale must have dtype torch.float32"),
    (dict(bias=torch.ones(4)), r"bias must be \[N\] = \[3\]"),
    (dict(out_dtype=torch.int32), "out_dtype must be"),
])
def test_scaled_int8_mm_bad_inputs(args, message):
    call = dict(a=torch.zeros(2, 8, dtype=torch.int8), b=torch.zeros(3, 8, dtype=torch.int8), a_scale=torch.ones(2, 1),
                b_scale=torch.ones(3), bias=None, out_dtype=torch.float32)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.scaled_int8_mm(*call.values())


def test_quantize_per_token_bad_inputs():
    with pytest.raises(RuntimeError, match="x must have dtype"):
        quantize_per_token(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="clip must be positive"):
        quantize_per_token(torch.zeros(2, 3), -1.0)


def _outlier_batch(seed, m=16, k=256, columns=(3, 77, 200), magnitude=60.0):
    x = random_tensor((m, k), torch.float32, "cpu", seed)
    x[:, list(columns)] *= magnitude
    return x


def _int8_weight(n, k, seed):
    w = random_tensor((n, k), torch.float32, "cpu", seed)
    w_q, w_scale = quantize_per_token(w)
    return w_q, w_scale.reshape(-1), w_q.double() * w_scale.double()


def test_int8_linear_without_outliers_is_the_int8_path():
    seed = fresh_seed()
    x = random_tensor((2, 7, 96), torch.bfloat16, "cpu", seed)
    w_q, w_scale, _ = _int8_weight(40, 96, seed + 1)
    bias = random_tensor((40,), torch.bfloat16, "cpu", seed + 2)
    xq, xs = quantize_per_token(x.reshape(-1, 96))
    plain = scaled_int8_mm(xq, w_q, xs, w_scale, bias, torch.bfloat16).reshape(2, 7, 40)
    for threshold in (0.0, 1e6):  # disabled, or no feature above it
        assert torch.equal(int8_linear(x, w_q, w_scale, bias, threshold), plain)


def test_int8_linear_outlier_decomposition_beats_plain_int8():
    """LLM.int8()'s point: a few large input features wreck per-token int8 scales; routing them
    through 16 bits restores accuracy. Measured over 40 seeds (error against x @ the int8
    weight dequantized, i.e. the activation quantization alone): decomposed 0.0008-0.0014,
    plain int8 0.026-0.035, ratio >= 21; asserted at 5x."""
    seed = fresh_seed()
    x = _outlier_batch(seed)
    w_q, w_scale, w = _int8_weight(64, 256, seed + 1)
    ref = x.double() @ w.t()
    error = lambda y: ((y.double() - ref).norm() / ref.norm()).item()  # noqa: E731
    decomposed, plain = error(int8_linear(x, w_q, w_scale, None, 6.0)), error(int8_linear(x, w_q, w_scale, None, 0.0))
    assert decomposed * 5 < plain, f"decomposed {decomposed:.4f} vs plain {plain:.4f}, seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("per_tensor", [False, True], ids=["per-channel", "per-tensor"])
def test_int8_linear_equals_its_definition(dtype, per_tensor):
    """The decomposition step by step in float64, none of our kernels involved: features whose
    |x| exceeds the threshold in any row (one in the CPU kernels' vector chunks, one in the tail
    past 256 columns) go through a 16-bit product with their dequantized weight columns, the
    rest (zeroed there) through per-token int8 quantization (the reference above) and an exact
    integer product scaled by both scales; the two parts summed before the one rounding to x's
    dtype. A per-tensor weight scale ([1]) serves every column of the outlier product too."""
    seed = fresh_seed()
    k = 300
    x = _outlier_batch(seed, m=5, k=k, columns=(7, 290), magnitude=40.0).to(dtype)
    w_q, w_scale, _ = _int8_weight(33, k, seed + 1)
    if per_tensor:
        w_scale = w_scale[:1].clone()
    outliers = (x.abs().amax(0) > 6.0).nonzero().squeeze(1)
    assert set(outliers.tolist()) >= {7, 290}
    expected = _int8_linear_definition(x, w_q, w_scale, outliers)
    with poisoned_outputs():
        got = int8_linear(x, w_q, w_scale, None, 6.0)
    assert got.dtype == dtype
    assert_close_to_reference(got, expected, dtype, f"int8_linear (seed {seed})")


def _int8_linear_definition(x, w_q, w_scale, outliers):
    """int8_linear in float64 for a given outlier set (ascending columns)."""
    xq, xs = _reference_quantize(x.index_fill(1, outliers, 0))
    w_columns = w_scale.double().expand(w_q.shape[0])
    return ((xq.double() @ w_q.double().t()) * xs.double() * w_columns
            + x[:, outliers].double() @ (w_q[:, outliers].double() * w_columns[:, None]).t())


def test_int8_linear_caps_the_outlier_features():
    """More features above the threshold than max_outlier_features(K) = 64 (K = 100): the 64
    largest column maxima take the 16-bit path, equal maxima the lower column first (the rule the
    CUDA selection kernel follows too); the rest stay in int8."""
    seed = fresh_seed()
    k, n = 100, 24
    x = random_tensor((6, k), torch.float32, "cpu", seed)
    big = torch.randperm(k, generator=torch.Generator().manual_seed(seed % 2**31))[:80]
    levels = torch.tensor([20.0, 30.0, 40.0, 50.0])[torch.arange(80) % 4]  # 20 columns per level: ties
    x[0, big] = levels
    x[1:, big] = x[1:, big].clamp(-1, 1)
    w_q, w_scale, _ = _int8_weight(n, k, seed + 1)
    column_max = x.abs().amax(0)
    order = torch.sort(column_max, stable=True, descending=True).indices[:64]
    outliers = order.sort().values
    assert (column_max[outliers] >= 20).all() and int((column_max[outliers] == 20).sum()) == 4
    with poisoned_outputs():
        got = int8_linear(x, w_q, w_scale, None, 6.0)
    assert_close_to_reference(got, _int8_linear_definition(x, w_q, w_scale, outliers), torch.float32,
                              f"int8_linear cap (seed {seed})")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_int8_linear_cuda_matches_cpu_bitwise(dtype):
    """The CUDA decomposition (column maxima over row splits, selection into fixed slots with no
    host sync, masked quantization, the GEMM, the outlier product) computes the CPU's result bit
    for bit: no outliers, a few, more than the cap (ties at its boundary), per-tensor scale,
    unaligned K, one row and many (several row splits)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    for m, n, k, columns, per_tensor in ((1, 70, 300, (), False), (1, 64, 4096, (5, 4000), False),
                                         (5, 33, 130, tuple(range(0, 130, 2)), True),
                                         (300, 48, 1000, (7, 290, 999), False), (2048, 40, 520, (1, 2, 3), True)):
        x = _outlier_batch(seed, m=m, k=k, columns=columns, magnitude=40.0) if columns else \
            random_tensor((m, k), torch.float32, "cpu", seed)
        if len(columns) > 64:  # ties at the cap
            x[0, list(columns)] = torch.tensor([50.0, 60.0])[torch.arange(len(columns)) % 2]
        x = x.to(dtype)
        w_q, w_scale, _ = _int8_weight(n, k, seed + 1)
        if per_tensor:
            w_scale = w_scale[:1].clone()
        bias = random_tensor((n,), torch.float32, "cpu", seed + 2)
        cpu = int8_linear(x, w_q, w_scale, bias, 6.0)
        with poisoned_outputs():
            gpu = int8_linear(x.cuda(), w_q.cuda(), w_scale.cuda(), bias.cuda(), 6.0)
        assert torch.equal(gpu.cpu(), cpu), f"{m}x{n}x{k} {len(columns)} outliers {dtype} seed {seed}"


@pytest.mark.cuda
def test_int8_linear_cuda_graph_capture():
    """The CUDA decomposition finds its outlier features on the device (no host sync): it captures
    in a CUDA graph, and a replay on new x (other outlier columns) equals the eager result."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    w_q, w_scale, _ = _int8_weight(48, 320, seed + 1)
    w_q, w_scale = w_q.cuda(), w_scale.cuda()
    x = _outlier_batch(seed, m=4, k=320, columns=(5, 100), magnitude=40.0).to(torch.bfloat16).cuda()
    int8_linear(x, w_q, w_scale, None, 6.0)  # warm-up: allocations outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = int8_linear(x, w_q, w_scale, None, 6.0)
    x.copy_(_outlier_batch(seed + 3, m=4, k=320, columns=(7, 300, 301), magnitude=50.0).to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, int8_linear(x, w_q, w_scale, None, 6.0)), f"seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_gradients_straight_through(dtype):
    seed = fresh_seed()
    x = _outlier_batch(seed, m=4, k=64, columns=(5,)).to(dtype).requires_grad_()
    w_q, w_scale, w = _int8_weight(24, 64, seed + 1)
    bias = random_tensor((24,), dtype, "cpu", seed + 2).requires_grad_()
    grad_y = random_tensor((4, 24), dtype, "cpu", seed + 3)
    int8_linear(x, w_q, w_scale, bias, 6.0).backward(grad_y)
    fp32 = dtype == torch.float32
    assert_close_to_reference(x.grad, grad_y.double() @ w, dtype, f"grad x, seed {seed}", 1e-5 if fp32 else None)
    assert_close_to_reference(bias.grad, grad_y.double().sum(0), dtype, f"grad bias, seed {seed}", 1e-6 if fp32 else None)


def test_backward_gemm_dtype():
    """The input gradients' GEMM dtype: fp32 for fp16 on the CPU, and for bf16 where the CPU has
    neither AVX512_BF16 nor AMX-BF16 (torch's bf16 GEMM is slow there); unchanged elsewhere."""
    from torch_ext.ops._gemm_dtype import gemm_dtype

    cpu = torch.device("cpu")
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else None
    assert gemm_dtype(torch.float16, cpu) == torch.float32 and gemm_dtype(torch.float32, cpu) == torch.float32
    if flags is not None:
        native = "avx512_bf16" in flags or "amx_bf16" in flags
        assert gemm_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if native else torch.float32)
    assert gemm_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16


def test_int8_linear_opcheck_and_compile():
    seed = fresh_seed()
    x = _outlier_batch(seed, m=5, k=48, columns=(2,))
    w_q, w_scale, _ = _int8_weight(24, 48, seed + 1)
    torch.library.opcheck(torch.ops.torch_ext.int8_linear, (x, w_q, w_scale, torch.randn(24), 6.0))
    f = lambda x: torch.relu(int8_linear(x, w_q, w_scale, None, 6.0))  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))


def test_int8_linear_module_and_state_dict():
    import io

    seed = fresh_seed()
    linear = torch.nn.Linear(96, 40)
    with torch.no_grad():
        linear.weight.copy_(random_tensor((40, 96), torch.float32, "cpu", seed))
    module = torch_ext.nn.Int8Linear.from_linear(linear)
    x = _outlier_batch(seed + 1, m=3, k=96, columns=(10,))
    assert_close_to_reference(module(x), linear(x).double(), torch.float32, f"seed {seed}", 2e-2)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh = torch_ext.nn.Int8Linear(96, 40)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("module_class", ["Int8Linear", "FP8Linear"])
def test_module_dtype_casts_keep_the_quantized_weight(module_class):
    """.to(bfloat16) / .half() cast the bias only: the 8-bit weight (fp8 counts as floating) and its
    float32 scales keep their dtypes, and the module still runs."""
    linear = torch.nn.Linear(64, 24)
    module = getattr(torch_ext.nn, module_class).from_linear(linear)
    weight_dtype = module.w_q.dtype
    x = random_tensor((3, 64), torch.bfloat16, "cpu", fresh_seed())
    expected = module(x.float())
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half(), lambda m: m.float()):
        module = cast(module)
        assert module.w_q.dtype == weight_dtype and module.w_scale.dtype == torch.float32
    module = module.to(torch.bfloat16)
    assert module.bias.dtype == torch.bfloat16
    assert_close_to_reference(module(x), expected.double(), torch.bfloat16, module_class, 2e-2)
    module.share_memory()  # the kept buffers take the rest of what _apply does
    assert module.w_q.is_shared() and module.w_scale.is_shared()


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_cpu_bitwise(dtype):
    """The CUDA kernels compute the CPU kernels' formulas with the same roundings: equal bits."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    for m, n, k in ((1, 8, 16), (5, 17, 33), (37, 70, 130), (300, 200, 1000), (2048, 256, 512)):
        x = random_tensor((m, k), dtype, "cpu", seed, scale=3.0)
        for clip in (None, 2.0):
            q_cpu, s_cpu = quantize_per_token(x, clip)
            q_gpu, s_gpu = quantize_per_token(x.cuda(), clip)
            assert torch.equal(q_gpu.cpu(), q_cpu) and torch.equal(s_gpu.cpu(), s_cpu), f"{m}x{k} {dtype} seed {seed}"
        b = _int8((n, k), seed + 1)
        b_scale = torch.rand(n) + 0.1
        bias = random_tensor((n,), torch.float32, "cpu", seed + 2)
        for out_dtype in (torch.float32, torch.bfloat16):
            cpu = scaled_int8_mm(q_cpu, b, s_cpu, b_scale, bias, out_dtype)
            gpu = scaled_int8_mm(q_cpu.cuda(), b.cuda(), s_cpu.cuda(), b_scale.cuda(), bias.cuda(), out_dtype)
            assert torch.equal(gpu.cpu(), cpu), f"{m}x{n}x{k} -> {out_dtype} seed {seed}"


def test_quantize_model_int8_method():
    seed = fresh_seed()
    torch.manual_seed(seed % 2**31)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32))
    x = random_tensor((4, 64), torch.float32, "cpu", seed)
    expected = model(x).detach()
    torch_ext.quant.quantize_model(model, method="int8", skip=lambda name: name == "2")
    assert isinstance(model[0], torch_ext.nn.Int8Linear) and type(model[2]) is torch.nn.Linear
    assert_close_to_reference(model(x), expected.double(), torch.float32, f"seed {seed}", 2e-2)
    with pytest.raises(ValueError, match="method must be one of"):
        torch_ext.quant.quantize_model(model, method="int3")


@pytest.mark.parametrize("args,message", [
    (dict(x=torch.zeros(2, 8, dtype=torch.int8)), "x must have dtype"),
    (dict(w_q=torch.zeros(3, 8)), "w_q must have dtype torch.int8"),
    (dict(w_q=torch.zeros(3, 9, dtype=torch.int8)), r"w_q must be \[N, K\] with K = x.size\(-1\) = 8"),
    (dict(w_scale=torch.ones(2)), "w_scale must hold N = 3 per-channel scales or one per-tensor scale"),
    (dict(w_scale=torch.ones(3, dtype=torch.float16)), "w_scale must have dtype torch.float32, got torch.float16"),
    (dict(bias=torch.ones(4)), r"bias must be \[N\] = \[3\]"),
])
def test_int8_linear_bad_inputs(args, message):
    call = dict(x=torch.randn(2, 8), w_q=torch.zeros(3, 8, dtype=torch.int8), w_scale=torch.ones(3), bias=None,
                outlier_threshold=6.0)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.int8_linear(*call.values())


def test_kernels_without_avx512_extensions():
    """TORCH_EXT_CPU_AVX512_EXTENSIONS=0: the AVX-512 level without VNNI (the unpacked path's
    vpmaddwd kernel and the packed portable one), as on a CPU that lacks it; exact sums."""
    import subprocess
    import sys

    script = """
import torch, torch_ext
from torch_ext.ops import scaled_int8_mm
g = torch.Generator().manual_seed(%d)
for m, n, k in ((1, 7, 100), (5, 33, 64), (16, 9, 130), (20, 17, 70)):
    a = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    out = scaled_int8_mm(a, b, torch.ones(m, 1), torch.ones(n), None, torch.float32)
    assert torch.equal(out, (a.long() @ b.long().t()).float()), (m, n, k)
print("ok", torch_ext._C.cpu_isa())
""" % fresh_seed()
    env = {**os.environ, "TORCH_EXT_CPU_AVX512_EXTENSIONS": "0"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("ok")
