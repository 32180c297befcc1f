"""The Hopper wgmma GEMM behind scaled_int8_mm and scaled_fp8_mm (csrc/quant/w8a8_wgmma.cu): on a
compute capability 9.0 GPU with an sm_90a build (unless TORCH_EXT_WGMMA=0), problems that fill
the GPU with its tiles (128 x 256 int8, 128 x 128 fp8) run it (checked through the profiler's
kernel names); otherwise the mma.sync kernels do. int8 must give the same bits as they do (exact int32
sums, the same epilogue); e4m3 the same bits on small integers (every partial sum exact, even in
the about 14 significant bits Hopper's fp8 tensor cores keep while they sum a k block, DeepSeek-V3
report 3.3.2) and, on random values, a bound that allows that: each 128-deep k block is promoted
to fp32, so the error is that of 14-bit sums of 128 products, about 2^-14 relative per block.
Shapes with M, N and K tails. Its copy-engine variant (csrc/quant/w8a8_wgmma_tma.cu,
TORCH_EXT_WGMMA_TMA=1: 2-CTA clusters, B multicast) must give the same bits as the cp.async
kernel. The index math and the variant's barrier protocol run on the CPU in
test_cuda_index_sim.py."""

import pytest
import torch

from torch_ext.ops import scaled_fp8_mm, scaled_int8_mm
from torch_ext.testing import assert_close_to_reference, fresh_seed, poisoned_outputs

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("hopper_build")]

# ceil(M / 128) x ceil(N / 256) tiles >= 132 SMs; K a multiple of 16 (16-byte rows) but not of
# 128, in 8, 9 and 1 k blocks (fp8 promotes k blocks in pairs, an odd one alone); N odd: an odd
# output row stride, no paired stores.
SHAPES = ((1100, 3901, 1008), (1100, 3901, 1136), (1100, 3901, 112), (2048, 4096, 4096))


def _kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return " ".join(event.name for event in prof.events())


def _both_paths(monkeypatch, fn):
    """fn() through the wgmma kernel (the default: asserted from the kernel names), then through
    mma.sync (TORCH_EXT_WGMMA=0)."""
    monkeypatch.delenv("TORCH_EXT_WGMMA", raising=False)
    with poisoned_outputs():
        names = _kernel_names(fn)
        assert "wgmma_mm_kernel" in names, names
        wgmma = fn()
    monkeypatch.setenv("TORCH_EXT_WGMMA", "0")
    assert "wgmma_mm_kernel" not in _kernel_names(fn)
    with poisoned_outputs():
        plain = fn()
    return wgmma, plain


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_wgmma_equals_mma_sync(monkeypatch, out_dtype):
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for m, n, k in SHAPES:
        a = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        # Sums reach ~1e6: scales of ~1e-3 keep fp16 outputs finite.
        a_scale = (torch.rand(m, 1, generator=gen, device="cuda") + 0.1) * 1e-3
        b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
        bias = torch.randn(n, generator=gen, device="cuda")
        dots = a.double() @ b.double().t()  # exact in float64
        for scale, add in ((b_scale, bias), (b_scale[:1], None)):
            wgmma, plain = _both_paths(monkeypatch, lambda: scaled_int8_mm(a, b, a_scale, scale, add, out_dtype))
            assert torch.equal(wgmma, plain), f"{m}x{n}x{k} -> {out_dtype} seed {seed}"
            ref = dots * a_scale.double() * scale.double() + (add.double() if add is not None else 0.0)
            assert_close_to_reference(wgmma, ref, out_dtype, f"{m}x{n}x{k} seed {seed}",
                                      {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype])


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_fp8_wgmma(monkeypatch, out_dtype):
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for m, n, k in SHAPES:
        a_scale = torch.rand(m, 1, generator=gen, device="cuda") + 0.1
        b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
        bias = torch.randn(n, generator=gen, device="cuda")
        # Integers -4..4: products <= 16, a k block's sum below 2^11: exact at 14 bits too.
        small = lambda shape: torch.randint(-4, 5, shape, generator=gen, device="cuda").float()  # noqa: E731
        a, b = small((m, k)).to(torch.float8_e4m3fn), small((n, k)).to(torch.float8_e4m3fn)
        wgmma, plain = _both_paths(monkeypatch, lambda: scaled_fp8_mm(a, b, a_scale, b_scale, bias, out_dtype))
        assert torch.equal(wgmma, plain), f"{m}x{n}x{k} -> {out_dtype} seed {seed}"
        a = (torch.randn(m, k, generator=gen, device="cuda") * 8).to(torch.float8_e4m3fn)
        b = (torch.randn(n, k, generator=gen, device="cuda") * 8).to(torch.float8_e4m3fn)
        monkeypatch.setenv("TORCH_EXT_WGMMA", "1")  # (_both_paths left the mma.sync path on)
        run = lambda: scaled_fp8_mm(a, b, a_scale[:1, :1].reshape(1), b_scale, None, out_dtype)  # noqa: E731
        assert "wgmma_mm_kernel" in _kernel_names(run)
        with poisoned_outputs():
            out = run()
        ref = (a.double() @ b.double().t()) * a_scale[0, 0].double() * b_scale.double()
        bound = {torch.float32: 2e-4, torch.bfloat16: 8e-3}[out_dtype]  # 14-bit block sums (module doc)
        assert_close_to_reference(out, ref, out_dtype, f"{m}x{n}x{k} seed {seed}", bound)


@pytest.mark.parametrize("pair", ["wgmma_vs_mma_sync", "tma_vs_wgmma"])
def test_strided_operands(monkeypatch, pair):
    """Row strides other than K (views into wider buffers, A's base 16 bytes in: what the tensor
    maps allow): the wgmma kernel gives the mma.sync kernel's bits, its copy-engine variant the
    wgmma kernel's."""
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, n, k = 1100, 3900, 1008
    a = torch.randint(-128, 128, (m, k + 32), generator=gen, device="cuda", dtype=torch.int8)[:, 16:16 + k]
    b = torch.randint(-128, 128, (n, k + 16), generator=gen, device="cuda", dtype=torch.int8)[:, :k]
    a_scale = torch.rand(m, 1, generator=gen, device="cuda") + 0.1
    b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
    compare = _both_paths if pair == "wgmma_vs_mma_sync" else _tma_and_ring
    first, second = compare(monkeypatch, lambda: scaled_int8_mm(a, b, a_scale, b_scale, None, torch.bfloat16))
    assert torch.equal(first, second), f"{pair} seed {seed}"


def test_wgmma_tails_for_sanitizers(monkeypatch):
    """M, N, K tails through the wgmma kernel without the profiler (scripts/gpu_check.sh runs this
    one under compute-sanitizer memcheck and racecheck): the same bits as the mma.sync kernel."""
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, n, k = SHAPES[0]
    a = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    a_scale = (torch.rand(m, 1, generator=gen, device="cuda") + 0.1) * 1e-3  # finite fp16 outputs
    b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TORCH_EXT_WGMMA", flag)
        with poisoned_outputs():
            results.append(scaled_int8_mm(a, b, a_scale, b_scale, None, torch.float16))
            results.append(scaled_fp8_mm((a // 32).float().to(torch.float8_e4m3fn),
                                         (b // 32).float().to(torch.float8_e4m3fn), a_scale, b_scale, None,
                                         torch.float32))  # -4..3: exact sums (see test_fp8_wgmma)
    for wgmma, plain in zip(results[:2], results[2:]):
        assert torch.equal(wgmma, plain), f"seed {seed}"


def _tma_and_ring(monkeypatch, fn, check_names=True):
    """fn() through the copy-engine variant (TORCH_EXT_WGMMA_TMA=1: 2-CTA clusters, B multicast),
    then through the cp.async wgmma kernel; both asserted from the kernel names unless the caller
    runs under a sanitizer (no profiler there)."""
    monkeypatch.delenv("TORCH_EXT_WGMMA", raising=False)
    results = []
    for flag, name in (("1", "tma_mm_kernel"), ("0", "wgmma_mm_kernel")):
        monkeypatch.setenv("TORCH_EXT_WGMMA_TMA", flag)
        if check_names:
            assert name in _kernel_names(fn)
        with poisoned_outputs():
            results.append(fn())
    return results


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_tma_kernel_equals_ring_kernel(monkeypatch, out_dtype):
    """The copy-engine variant issues the same wgmma k blocks on the same shared-memory layout as
    the cp.async kernel: the same bits, int8 and e4m3 (random values: the same 14-bit block sums
    and promotions in the same order). SHAPES have 9 m blocks: the last cluster's second CTA lies
    past M; N and K tails come as zeros from the copy engine."""
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    for m, n, k in SHAPES:
        a = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        b = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
        a_scale = (torch.rand(m, 1, generator=gen, device="cuda") + 0.1) * 1e-3  # finite fp16 outputs
        b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
        bias = torch.randn(n, generator=gen, device="cuda")
        tma, ring = _tma_and_ring(monkeypatch, lambda: scaled_int8_mm(a, b, a_scale, b_scale, bias, out_dtype))
        assert torch.equal(tma, ring), f"int8 {m}x{n}x{k} -> {out_dtype} seed {seed}"
        ref = (a.double() @ b.double().t()) * a_scale.double() * b_scale.double() + bias.double()
        assert_close_to_reference(tma, ref, out_dtype, f"{m}x{n}x{k} seed {seed}",
                                  {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[out_dtype])
        a8 = (torch.randn(m, k, generator=gen, device="cuda") * 8).to(torch.float8_e4m3fn)
        b8 = (torch.randn(n, k, generator=gen, device="cuda") * 8).to(torch.float8_e4m3fn)
        tma, ring = _tma_and_ring(monkeypatch, lambda: scaled_fp8_mm(a8, b8, a_scale * 1e3, b_scale, None, out_dtype))
        assert torch.equal(tma, ring), f"e4m3 {m}x{n}x{k} -> {out_dtype} seed {seed}"


def test_tma_tails_for_sanitizers(monkeypatch):
    """M, N, K tails through the copy-engine variant without the profiler (run under
    compute-sanitizer memcheck and racecheck by scripts/gpu_check.sh): the same bits as the
    cp.async kernel, int8 and e4m3."""
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, n, k = SHAPES[0]
    a = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
    b = torch.randint(-128, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    a_scale = (torch.rand(m, 1, generator=gen, device="cuda") + 0.1) * 1e-3
    b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
    tma, ring = _tma_and_ring(monkeypatch, lambda: scaled_int8_mm(a, b, a_scale, b_scale, None, torch.float16),
                              check_names=False)
    assert torch.equal(tma, ring), f"int8 seed {seed}"
    a8, b8 = (a // 32).float().to(torch.float8_e4m3fn), (b // 32).float().to(torch.float8_e4m3fn)
    tma, ring = _tma_and_ring(monkeypatch, lambda: scaled_fp8_mm(a8, b8, a_scale, b_scale, None, torch.float32),
                              check_names=False)
    assert torch.equal(tma, ring), f"e4m3 seed {seed}"


def test_tma_falls_back_where_tensor_maps_cannot_describe(monkeypatch):
    """An expanded B (row stride 0: every row the same weights) passes the 16-byte checks of the
    wgmma kernels but no tensor map can describe it: with TORCH_EXT_WGMMA_TMA=1 the cp.async
    kernel runs instead (nothing launched on the copy engine, no error), with its bits."""
    seed = fresh_seed()
    gen = torch.Generator(device="cuda").manual_seed(seed)
    m, n, k = SHAPES[0]
    a = torch.randint(-128, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
    b = torch.randint(-128, 128, (1, k), generator=gen, device="cuda", dtype=torch.int8).expand(n, k)
    a_scale = torch.rand(m, 1, generator=gen, device="cuda") + 0.1
    b_scale = torch.rand(n, generator=gen, device="cuda") + 0.1
    run = lambda: scaled_int8_mm(a, b, a_scale, b_scale, None, torch.bfloat16)  # noqa: E731
    monkeypatch.setenv("TORCH_EXT_WGMMA_TMA", "1")
    names = _kernel_names(run)
    assert "wgmma_mm_kernel" in names and "tma_mm_kernel" not in names, names
    with poisoned_outputs():
        fallback = run()
    monkeypatch.setenv("TORCH_EXT_WGMMA_TMA", "0")
    with poisoned_outputs():
        assert torch.equal(fallback, run()), f"seed {seed}"
