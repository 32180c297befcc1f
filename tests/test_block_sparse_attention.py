"""block_sparse_attention forward and backward against dense float64 attention under the expanded
mask: head dims 32-256, causal (bottom-right) or not, GQA/MQA, Sq != Sk, lengths 1000 and 4097, block
sizes, empty query blocks, every CPU ISA; masks (dense, causal, sliding window, FlexAttention's
BlockMask), opcheck, torch.compile, gradcheck and bad inputs."""

import pytest
import torch

import torch_ext  # noqa: F401
from torch_ext.attention import BlockSparseMask
from torch_ext.ops import block_sparse_attention
from torch_ext.reference import attention as ref
from torch_ext.testing import RELATIVE_ERROR_BOUNDS, assert_close_to_reference, fresh_seed, poisoned_outputs, \
    random_tensor

_OP = torch.ops.torch_ext.block_sparse_attention
_BACKWARD = torch.ops.torch_ext.block_sparse_attention_backward
# lse (and the backward's delta) are fp32 by design, so float64 gradients carry fp32-level error.
_GRAD_BOUNDS = {torch.float64: 1e-6, torch.float32: 4e-6, torch.bfloat16: 1e-2}


def _random_mask(batch, heads, seq_q, seq_kv, block_q, block_kv, density, seed, empty_block=False):
    nq, nk = -(-seq_q // block_q), -(-seq_kv // block_kv)
    gen = torch.Generator().manual_seed(seed)
    dense = torch.rand(batch, heads, nq, nk, generator=gen) < density
    if empty_block:
        dense[:, :, nq // 2] = False
    mask = BlockSparseMask.from_dense(dense, block_q, block_kv, seq_q, seq_kv)
    # Lists in descending order with junk in the unused slots: the op takes any order, reads only counts.
    listed = torch.arange(nk) < mask.kv_counts.unsqueeze(-1)
    descending = mask.kv_indices.long().masked_fill(~listed, -1).sort(dim=-1, descending=True).values
    lists = torch.where(listed, descending, 12345).int()
    return BlockSparseMask(mask.kv_counts, lists, block_q, block_kv, seq_q, seq_kv)


def _inputs(batch, heads_q, heads_kv, seq_q, seq_kv, dim, dtype, seed, transposed=False):
    def make(heads, seq, s):
        if transposed:  # [B, S, H, D] storage, as projections produce it
            return random_tensor((batch, seq, heads, dim), dtype, "cpu", s).transpose(1, 2)
        return random_tensor((batch, heads, seq, dim), dtype, "cpu", s)
    return make(heads_q, seq_q, seed), make(heads_kv, seq_kv, seed + 1), make(heads_kv, seq_kv, seed + 2)


def _check(batch, heads_q, heads_kv, seq_q, seq_kv, dim, block_q, block_kv, causal, dtype, density, backward=True,
           mask_heads=None, transposed=False, empty_block=False, device="cpu", bounds=None):
    """bounds: (forward, gradients) relative error bounds instead of the dtype's."""
    seed = fresh_seed()
    what = (f"B={batch} H={heads_q}/{heads_kv} Sq={seq_q} Sk={seq_kv} D={dim} blocks={block_q}/{block_kv} "
            f"causal={causal} {dtype} density={density} seed {seed}")
    q, k, v = (t.to(device) for t in _inputs(batch, heads_q, heads_kv, seq_q, seq_kv, dim, dtype, seed, transposed))
    mask = _random_mask(batch, mask_heads or heads_q, seq_q, seq_kv, block_q, block_kv, density, seed, empty_block)
    scale = float(torch.tensor(dim ** -0.5, dtype=torch.float32))  # the kernels take scale as fp32
    args = (mask.kv_counts, mask.kv_indices, block_q, block_kv, causal, scale)
    device_args = (mask.kv_counts.to(device), mask.kv_indices.to(device), *args[2:])
    forward_bound, grad_bound = bounds or (None, _GRAD_BOUNDS[dtype])
    with poisoned_outputs():
        out, lse = _OP(q, k, v, *device_args)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_(backward) for t in (q, k, v))
    ref_out, ref_lse = ref.block_sparse_attention(q64, k64, v64, *args)
    assert_close_to_reference(out, ref_out, dtype, f"out {what}", bound=forward_bound)
    lse = lse.cpu()
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)), f"lse -inf rows {what}"
    finite = torch.isfinite(ref_lse)
    assert_close_to_reference(lse[finite], ref_lse[finite], torch.float32, f"lse {what}", bound=1e-6)
    if not backward:
        return
    grad_out = random_tensor(out.shape, dtype, "cpu", seed + 3)
    with poisoned_outputs():
        grads = _BACKWARD(grad_out.to(device), q, k, v, out, lse.to(device), *device_args)
    ref_out.backward(grad_out.double())
    for name, got, want in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad)):
        assert_close_to_reference(got, want, dtype, f"{name} {what}", bound=grad_bound)


# (B, Hq, Hk, Sq, Sk, D, block_q, block_kv, causal, dtype, density)
_ISA_CASES = [
    (1, 2, 1, 100, 130, 64, 64, 16, False, torch.float32, 0.5),
    (2, 4, 2, 77, 200, 96, 16, 64, True, torch.bfloat16, 0.6),
    (1, 2, 2, 130, 100, 32, 128, 32, True, torch.float64, 0.7),
    (1, 1, 1, 64, 256, 256, 64, 128, False, torch.float32, 0.5),
]


@pytest.mark.parametrize("case", _ISA_CASES, ids=lambda c: f"D{c[5]}-{c[6]}x{c[7]}-{'causal' if c[8] else 'full'}-{str(c[9])[6:]}")
def test_every_isa(cpu_isa, case):
    _check(*case)


@pytest.mark.parametrize("dim", [32, 64, 96, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims(dim, causal):
    _check(1, 2, 1, 150, 150, dim, 64, 32, causal, torch.float32, 0.6)


@pytest.mark.parametrize("block_q,block_kv", [(64, 16), (64, 32), (128, 64), (128, 128), (48, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_sizes_gqa_mqa(block_q, block_kv, dtype):
    _check(1, 4, 2, 200, 333, 64, block_q, block_kv, True, dtype, 0.5)
    _check(1, 4, 1, 333, 200, 128, block_q, block_kv, False, dtype, 0.4, mask_heads=1)


# fp16 / bf16 on the GPU: P is rounded to the io dtype before P V, as FlashAttention does.
_CUDA_BOUNDS = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.2e-2, 2.5e-2)}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim,block_q,block_kv", [(64, 64, 16), (128, 64, 32), (64, 128, 64), (128, 128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_forward_backward(dtype, dim, block_q, block_kv, causal):
    """The CUDA kernels against float64 over head dims, block sizes, GQA, Sq != Sk, odd lengths,
    [B, S, H, D] strides and an empty query block."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check(1, 4, 2, 200, 333, dim, block_q, block_kv, causal, dtype, 0.5, device="cuda", transposed=causal,
           empty_block=True, bounds=_CUDA_BOUNDS[dtype])
    _check(2, 2, 1, 333, 150, dim, block_q, block_kv, causal, dtype, 0.4, device="cuda", mask_heads=1,
           bounds=_CUDA_BOUNDS[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim,block_q,block_kv", [(64, 64, 16), (128, 64, 32), (64, 128, 64), (128, 128, 128)])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_forward(monkeypatch, hopper_build, dtype, dim, block_q, block_kv, causal):
    """The wgmma forward (TORCH_EXT_ATTENTION_WGMMA=1, asserted from the kernel names) against float64
    over the CUDA test's cases, its lse feeding the mma.sync backward."""
    monkeypatch.setenv("TORCH_EXT_ATTENTION_WGMMA", "1")
    q = torch.randn(1, 2, 100, dim, device="cuda", dtype=dtype)
    mask = BlockSparseMask.causal(100, 100, block_q, block_kv, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        block_sparse_attention(q, q, q, mask, causal=True)
        torch.cuda.synchronize()
    assert "fwd_wgmma_kernel" in " ".join(event.name for event in prof.events())
    _check(1, 4, 2, 200, 333, dim, block_q, block_kv, causal, dtype, 0.5, device="cuda", transposed=causal,
           empty_block=True, bounds=_CUDA_BOUNDS[dtype])
    _check(2, 2, 1, 333, 150, dim, block_q, block_kv, causal, dtype, 0.4, device="cuda", mask_heads=1,
           bounds=_CUDA_BOUNDS[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim,block_q,block_kv", [(64, 64, 64), (128, 64, 128), (64, 128, 128), (128, 128, 64),
                                                  (128, 64, 32)])
@pytest.mark.parametrize("causal", [False, True])
def test_hopper_backward(monkeypatch, hopper_build, dtype, dim, block_q, block_kv, causal):
    """The wgmma backward (TORCH_EXT_ATTENTION_WGMMA_BWD=1: dQ on wgmma, dK / dV on wgmma for key
    blocks of 64 and 128, mma.sync for 32) against float64 over the CUDA test's cases: GQA,
    Sq != Sk, odd lengths (partial sub-tiles, causal diagonals inside a step), [B, S, H, D]
    strides, an empty query block, a dense mask (steps without a predicate)."""
    monkeypatch.setenv("TORCH_EXT_ATTENTION_WGMMA_BWD", "1")
    _check(1, 4, 2, 200, 333, dim, block_q, block_kv, causal, dtype, 0.5, device="cuda", transposed=causal,
           empty_block=True, bounds=_CUDA_BOUNDS[dtype])
    _check(2, 2, 1, 333, 150, dim, block_q, block_kv, causal, dtype, 0.4, device="cuda", mask_heads=1,
           bounds=_CUDA_BOUNDS[dtype])
    _check(1, 2, 2, 256, 256, dim, block_q, block_kv, causal, dtype, 1.0, device="cuda", bounds=_CUDA_BOUNDS[dtype])


@pytest.mark.cuda
@pytest.mark.parametrize("block_kv", [32, 64, 128])
def test_hopper_backward_runs_wgmma_kernels(monkeypatch, hopper_build, block_kv):
    """Which kernels TORCH_EXT_ATTENTION_WGMMA_BWD=1 runs (from the profiler, so apart from the
    numeric test, which the sanitizers run: CUPTI does not run under them)."""
    monkeypatch.setenv("TORCH_EXT_ATTENTION_WGMMA_BWD", "1")
    q = torch.randn(1, 2, 100, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    mask = BlockSparseMask.causal(100, 100, 64, block_kv, device="cuda")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        block_sparse_attention(q, q, q, mask, causal=True).sum().backward()
        torch.cuda.synchronize()
    names = " ".join(event.name for event in prof.events())
    assert "dq_wgmma_kernel" in names
    assert ("dkdv_wgmma_kernel" in names) == (block_kv >= 64)


@pytest.mark.parametrize("dim", [32, 48, 128, 256])
@pytest.mark.parametrize("block_kv", [16, 48, 80])
def test_bf16_head_dims_and_key_blocks(cpu_isa, dim, block_kv):
    """bf16 at every head dim kind: multiples of 32 take the AVX512_BF16 forward where the CPU has it
    (P rounded to bf16 for P V, within the bf16 bound: measured ~2.1e-3 against ~1.7e-3 for the
    output's own rounding), 48 the widening kernel; key blocks of 1, 3 and 5 vectors (the 4-, 2- and
    1-vector tiles, an odd number of 16-key halves when P is rounded in 32s), partial last blocks."""
    _check(1, 2, 1, 131, 203, dim, 64, block_kv, True, torch.bfloat16, 0.7, backward=False)
    _check(1, 2, 2, 97, 150, dim, 32, block_kv, False, torch.bfloat16, 0.7, backward=False, transposed=True)


@pytest.mark.parametrize("dim", [32, 48, 128, 256])
@pytest.mark.parametrize("block_kv", [16, 48, 80])
def test_bf16_backward_head_dims_and_key_blocks(cpu_isa, dim, block_kv):
    """The bf16 backward against float64: multiples of 32 take the AVX512_BF16 backward where the
    CPU has it (all five products with vdpbf16ps, P and dS rounded to bf16), 48 and the lower ISAs
    the widening kernel; key blocks of 1, 3 and 5 vectors, partial blocks, odd active row counts
    (97 rows, causal diagonals), GQA, [B, S, H, D] strides and MoBA-free random masks."""
    _check(1, 2, 1, 131, 203, dim, 64, block_kv, True, torch.bfloat16, 0.7)
    _check(1, 4, 2, 97, 150, dim, 32, block_kv, False, torch.bfloat16, 0.7, transposed=True)


@pytest.mark.parametrize("dim", [32, 128, 256])
@pytest.mark.parametrize("block_kv", [16, 48, 64, 80])
def test_bf16_on_amx_tiles(amx, dim, block_kv):
    """The bf16 forward and backward with all their products on AMX-BF16 tiles (PairMatmul in
    block_sparse_attention_cpu_bf16.cpp; emulated tiles everywhere, the hardware's where the CPU
    has them) against float64: the AVX512_BF16 cases above (partial key blocks and pair steps,
    odd active row counts, GQA, strides) and 128-row query blocks; with 64-key blocks the
    forward takes runs of whole blocks as one group (V in segments) between causal diagonals
    and short last blocks, which go alone."""
    if not torch_ext._C.build_info()["cpu_avx512_bf16_active"]:
        pytest.skip("the bf16 kernels (and their AMX paths) need AVX512_BF16")
    before = torch_ext._C.amx_emulated_dot_products()
    _check(1, 2, 1, 131, 203, dim, 64, block_kv, True, torch.bfloat16, 0.7)
    _check(1, 4, 2, 97, 150, dim, 32, block_kv, False, torch.bfloat16, 0.7, transposed=True)
    _check(1, 2, 2, 200, 200, dim, 128, block_kv, True, torch.bfloat16, 0.8, backward=dim == 128)
    ran = torch_ext._C.amx_emulated_dot_products() - before
    assert (ran > 0) == (amx == "emulate"), f"{ran} emulated tile products"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scale", [0.25, -0.2])
def test_scores_growing_along_the_keys(amx, dtype, scale):
    """Scores that grow from key block to key block, by a different amount per query row: the
    online softmax raises a row's running maximum only past a margin (lazy rescaling), so within
    one 32-row tile block some rows rescale their output and others add to it in place (the AMX
    kernel's two paths); a negative softmax scale reverses the growth. Forward and lse against
    float64."""
    seed = fresh_seed()
    q, k, v = _inputs(1, 2, 1, 128, 512, 128, torch.float32, seed)
    q[..., 0] = torch.linspace(-4, 4, 128)  # row i's scores grow by scale * q[i, 0] * 2 per block
    k[..., 0] += 2 * torch.arange(8).repeat_interleave(64)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    mask = BlockSparseMask.from_dense(torch.ones(1, 1, 2, 8, dtype=torch.bool), 64, 64, 128, 512)
    args = (mask.kv_counts, mask.kv_indices, 64, 64, False, scale)
    with poisoned_outputs():
        out, lse = _OP(q, k, v, *args)
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_out, ref_lse = ref.block_sparse_attention(q64, k64, v64, *args)
    what = f"{dtype} scale {scale} seed {seed}"
    assert_close_to_reference(out, ref_out, dtype, f"out {what}")
    assert_close_to_reference(lse, ref_lse, torch.float32, f"lse {what}", bound=1e-6)
    block_max = (scale * q64 @ k64.transpose(-1, -2)).view(1, 2, 128, 8, 64).amax(-1)
    growth = block_max.amax(-1) - block_max[..., 0]
    assert (growth > 10).any() and ((growth > 1) & (growth < 6)).any(), f"rows should rescale and not: {what}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_query_heads_walk_in_bundles(amx, dtype):
    """The forward walks up to 8 query heads of a KV head together, a group of key blocks per
    head in turn: 12 query heads per KV head (a bundle of 8, then one of 4), per-head masks that
    differ (the walks end at different times, one head lists nothing for some query blocks),
    causal, against float64."""
    _check(1, 12, 1, 150, 260, 64, 64, 64, True, dtype, 0.6, backward=False, empty_block=True)
    _check(2, 24, 2, 70, 130, 128, 32, 32, False, dtype, 0.5, backward=False, mask_heads=24)


def test_long_sequences():
    _check(1, 1, 1, 1000, 1000, 64, 64, 32, True, torch.float32, 0.3)
    _check(1, 1, 1, 4097, 4097, 64, 128, 64, False, torch.bfloat16, 0.1, backward=False)
    _check(1, 1, 1, 1000, 4097, 128, 64, 16, True, torch.float32, 0.05, backward=False)


def test_strided_inputs_and_broadcast_mask():
    _check(2, 4, 2, 90, 90, 64, 64, 16, True, torch.float32, 0.5, transposed=True, mask_heads=1)


def test_empty_query_blocks_give_zero_and_minus_inf():
    _check(1, 2, 1, 256, 256, 64, 64, 32, False, torch.float32, 0.5, empty_block=True)
    seed = fresh_seed()
    q, k, v = _inputs(1, 2, 1, 192, 128, 64, torch.float32, seed)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    # causal with Sq > Sk: the first 64 rows see no key; query block 2 lists nothing.
    dense = torch.ones(1, 1, 3, 4, dtype=torch.bool)
    dense[:, :, 2] = False
    mask = BlockSparseMask.from_dense(dense, 64, 32, 192, 128)
    with poisoned_outputs():
        out, lse = _OP(q, k, v, mask.kv_counts, mask.kv_indices, 64, 32, True, 0.125)
    assert torch.all(out[:, :, :64] == 0) and torch.all(out[:, :, 128:] == 0), f"seed {seed}"
    assert torch.all(lse[:, :, :64] == float("-inf")) and torch.all(lse[:, :, 128:] == float("-inf"))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref_out, ref_lse = ref.block_sparse_attention(q64, k64, v64, mask.kv_counts, mask.kv_indices, 64, 32, True, 0.125)
    assert_close_to_reference(out, ref_out, torch.float32, f"out, seed {seed}")
    assert_close_to_reference(lse[:, :, 64:128], ref_lse[:, :, 64:128], torch.float32, f"lse, seed {seed}", 1e-6)
    with poisoned_outputs():
        block_sparse_attention(q, k, v, mask, causal=True).sum().backward()
    ref_out.sum().backward()
    for name, got, want in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert_close_to_reference(got, want, torch.float32, f"{name}, seed {seed}", _GRAD_BOUNDS[torch.float32])
    assert torch.all(q.grad[:, :, :64] == 0) and torch.all(q.grad[:, :, 128:] == 0)


def test_wrapper_autograd_and_default_scale():
    seed = fresh_seed()
    q, k, v = (t.requires_grad_() for t in _inputs(1, 4, 2, 100, 120, 64, torch.float32, seed))
    mask = BlockSparseMask.causal(100, 120, 64, 16)
    out = block_sparse_attention(q, k, v, mask, causal=True)
    expected = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
        attn_mask=ref.causal_mask(100, 120))
    assert_close_to_reference(out, expected, torch.float32, f"vs SDPA seed {seed}", bound=1e-5)
    (out * expected.detach()).sum().backward()
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    dense = torch.nn.functional.scaled_dot_product_attention(
        q2, k2.repeat_interleave(2, 1), v2.repeat_interleave(2, 1), attn_mask=ref.causal_mask(100, 120))
    (dense * expected.detach()).sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert_close_to_reference(a.grad, b.grad, torch.float32, f"grad vs SDPA seed {seed}", bound=1e-5)


def test_mask_constructors():
    dense = torch.rand(2, 3, 5, 7) < 0.5
    mask = BlockSparseMask.from_dense(dense, 64, 32, 300, 200)
    assert torch.equal(mask.to_dense(), dense)
    assert (mask.num_blocks_q, mask.num_blocks_kv) == (5, 7)
    causal = BlockSparseMask.causal(300, 200, 64, 32).to_dense()[0, 0]
    token = ref.causal_mask(300, 200)
    pooled = torch.nn.functional.pad(token, (0, 24, 0, 20)).view(5, 64, 7, 32).any(dim=3).any(dim=1)
    assert torch.equal(causal, pooled)
    window = BlockSparseMask.sliding_window(300, 300, 100, 64, 32).to_dense()[0, 0]
    i, j = torch.arange(300).unsqueeze(1), torch.arange(300).unsqueeze(0)
    token = (j <= i) & (j > i - 100)
    pooled = torch.nn.functional.pad(token, (0, 20, 0, 20)).view(5, 64, 10, 32).any(dim=3).any(dim=1)
    assert torch.equal(window, pooled)


def test_flex_block_mask_round_trip():
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    seq = 256

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & ((q_idx // 64 - kv_idx // 64) < 2)  # causal within a 2-block band
    block_mask = flex.create_block_mask(mask_mod, 1, 1, seq, seq, device="cpu", BLOCK_SIZE=64)
    mask = BlockSparseMask.from_flex_block_mask(block_mask)
    assert torch.equal(mask.to_dense(), block_mask.to_dense().bool())
    # Block-aligned band + causal diagonal: the op with causal=True equals flex_attention's mask.
    seed = fresh_seed()
    q, k, v = _inputs(1, 2, 2, seq, seq, 64, torch.float32, seed)
    i, j = torch.arange(seq).unsqueeze(1), torch.arange(seq).unsqueeze(0)
    expected = ref.masked_attention(q, k, v, mask_mod(0, 0, i, j), 0.125)[0]
    assert_close_to_reference(block_sparse_attention(q, k, v, mask, causal=True), expected, torch.float32,
                              f"flex band seed {seed}")


def _small_args(dtype=torch.float32, selection=False):
    seed = fresh_seed()
    q, k, v = _inputs(1, 2, 1, 40, 48, 32, dtype, seed)
    mask = _random_mask(1, 2, 40, 48, 16, 16, 0.7, seed)
    token_blocks = torch.ops.torch_ext.moba_select(q, k, 16, 2, True) if selection else None
    return q, k, v, mask, token_blocks


@pytest.mark.parametrize("selection", [False, True])
def test_opcheck(selection):
    q, k, v, mask, token_blocks = _small_args(selection=selection)
    args = (q, k, v, mask.kv_counts, mask.kv_indices, 16, 16, True, 0.2, token_blocks)
    torch.library.opcheck(_OP, args)
    out, lse = _OP(*args)
    torch.library.opcheck(_BACKWARD, (torch.randn_like(out), q, k, v, out, lse, *args[3:]))


def test_compile_fullgraph_with_backward():
    q, k, v, mask, _ = _small_args()
    f = lambda q, k, v: block_sparse_attention(q * 2, k, v, mask, causal=True).sum()  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*inputs).backward()
    f(*eager).backward()
    for a, b in zip(inputs, eager):
        torch.testing.assert_close(a.grad, b.grad)


def test_gradcheck_float64():
    seed = fresh_seed()
    q, k, v = (t.requires_grad_() for t in _inputs(1, 2, 1, 20, 24, 16, torch.float64, seed))
    mask = BlockSparseMask.from_dense(torch.tensor([[[[True, True], [False, True]]]]), 16, 16, 20, 24)
    token_blocks = torch.ops.torch_ext.moba_select(q.detach(), k.detach(), 16, 1, True)
    for selection in (None, token_blocks):
        f = lambda q, k, v: _OP(q, k, v, mask.kv_counts, mask.kv_indices, 16, 16, True, 0.3, selection)[0]  # noqa: E731
        # lse is fp32 by design: analytic gradients carry ~1e-7 relative error.
        assert torch.autograd.gradcheck(f, (q, k, v), atol=1e-5, rtol=1e-4, fast_mode=True), f"seed {seed}"


def _bad(**changes):
    q, k, v = torch.randn(1, 4, 40, 32), torch.randn(1, 2, 48, 32), torch.randn(1, 2, 48, 32)
    counts, indices = torch.full((1, 4, 3), 2, dtype=torch.int32), torch.zeros(1, 4, 3, 3, dtype=torch.int32)
    indices[..., 1] = 2
    call = dict(q=q, k=k, v=v, kv_counts=counts, kv_indices=indices, block_size_q=16, block_size_kv=16, causal=False,
                scale=0.2, token_blocks=None)
    call.update(changes)
    return tuple(call.values())


@pytest.mark.parametrize("changes,message", [
    (dict(kv_indices=torch.full((1, 4, 3, 3), 3, dtype=torch.int32)), r"kv_indices holds key block 3 .* \[0, 3\)"),
    (dict(kv_indices=torch.full((1, 4, 3, 3), -1, dtype=torch.int32)), r"out of range \[0, 3\)"),
    (dict(kv_counts=torch.full((1, 4, 3), 4, dtype=torch.int32)), r"kv_counts holds 4 .* outside \[0, 3\]"),
    (dict(kv_counts=torch.full((1, 4, 2), 1, dtype=torch.int32)), r"kv_counts must be \[B, H, nq\] = \[1 or 1, 4 or 1, 3\]"),
    (dict(kv_counts=torch.full((1, 4, 3), 1, dtype=torch.int64)), "kv_counts must have dtype torch.int32"),
    (dict(kv_indices=torch.zeros(1, 4, 2, 3, dtype=torch.int32)), "kv_indices must be"),
    (dict(k=torch.randn(1, 3, 48, 32), v=torch.randn(1, 3, 48, 32)), "Hq = 4 must be a multiple of .* Hk = 3"),
    (dict(q=torch.randn(1, 4, 40, 40), k=torch.randn(1, 2, 48, 40), v=torch.randn(1, 2, 48, 40)),
     "head dim must be a multiple of 16 up to 256 on the CPU, got 40"),
    (dict(v=torch.randn(1, 2, 48, 32, dtype=torch.bfloat16)), r"v must have the dtype of q \(torch.float32\)"),
    (dict(q=torch.randn(1, 4, 40, 32).int()), "q must have dtype"),
    (dict(v=torch.randn(1, 2, 47, 32)), "v must have the shape of k"),
    (dict(k=torch.randn(1, 2, 48, 16)), r"k must be \[B, Hk, Sk, D\]"),
    (dict(block_size_kv=0), r"block_size_kv must be in \[1, 2147483647\]"),
    (dict(block_size_q=2**32 + 16), r"block_size_q must be in \[1, 2147483647\], got 4294967312"),
    (dict(kv_counts=torch.full((1, 4, 3), 3, dtype=torch.int32),
          kv_indices=torch.tensor([[[[0, 2, 0]]]], dtype=torch.int32).expand(1, 4, 3, 3).contiguous()),
     r"kv_indices names key block 0 twice in list 0 \(slot 2\)"),
    (dict(token_blocks=torch.zeros(1, 4, 39, 2, dtype=torch.int32)), r"token_blocks must be \[B, Hq, Sq, top_k\]"),
    (dict(token_blocks=torch.full((1, 4, 40, 2), 3, dtype=torch.int32)), r"token_blocks holds 3 .* \[-1, 3\)"),
])
def test_bad_inputs(changes, message):
    with pytest.raises(RuntimeError, match=message):
        _OP(*_bad(**changes))


def test_blocks_longer_than_the_sequence():
    """A block size beyond the sequence (up to int32) is one block holding all of it: the same
    result as the block size equal to the sequence, without scratch sized by the argument."""
    seed = fresh_seed()
    q = random_tensor((1, 2, 8, 16), torch.float32, "cpu", seed)
    k = random_tensor((1, 2, 5, 16), torch.float32, "cpu", seed + 1)
    v = random_tensor((1, 2, 5, 16), torch.float32, "cpu", seed + 2)
    one = torch.ones(1, 1, 1, dtype=torch.int32), torch.zeros(1, 1, 1, 1, dtype=torch.int32)
    expected = _OP(q, k, v, *one, 8, 5, True, 0.25, None)
    for huge in (2**20, 2**31 - 1):
        got = _OP(q, k, v, *one, huge, huge, True, 0.25, None)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]), huge
    chosen = torch.ops.torch_ext.moba_select(q, k, 2**31 - 1, 1, True)
    assert torch.equal(chosen, torch.ops.torch_ext.moba_select(q, k, 5, 1, True))


def test_bad_backward_inputs():
    args = _bad()
    out, lse = _OP(*args)
    with pytest.raises(RuntimeError, match="grad_out must have the shape of q"):
        _BACKWARD(out[:, :, :3], *args[:3], out, lse, *args[3:])
    with pytest.raises(RuntimeError, match=r"lse must be \[B, Hq, Sq\]"):
        _BACKWARD(out, *args[:3], out, lse[:, :2], *args[3:])
    with pytest.raises(ValueError, match="the mask is for"):
        block_sparse_attention(*args[:3], BlockSparseMask.causal(32, 48, 16, 16))
