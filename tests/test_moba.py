"""MoBA: moba_select against a naive float64 gating (exactly in float64, by score order in fp32/bf16),
moba_route as the union over query blocks, moba_attention and MoBAAttention against naive token-level
MoBA (forward and backward), every CPU ISA, opcheck, torch.compile and bad inputs."""

import pytest
import torch

import torch_ext
from torch_ext.ops import moba_attention, moba_route, moba_select
from torch_ext.reference import attention as ref
from torch_ext.testing import assert_close_to_reference, fresh_seed, poisoned_outputs, random_tensor


def _qk(batch, heads_q, heads_kv, seq_q, seq_kv, dim, dtype, seed):
    return (random_tensor((batch, heads_q, seq_q, dim), dtype, "cpu", seed),
            random_tensor((batch, heads_kv, seq_kv, dim), dtype, "cpu", seed + 1))


# (B, Hq, Hk, Sq, Sk, D, block_size, top_k, causal)
_CASES = [
    (1, 2, 1, 100, 100, 64, 16, 3, True),
    (2, 4, 2, 70, 130, 32, 16, 4, True),   # Sq < Sk: bottom-right
    (1, 2, 2, 130, 70, 64, 32, 2, True),   # Sq > Sk: early rows select nothing
    (1, 2, 1, 90, 200, 128, 64, 2, False),
    (1, 1, 1, 50, 60, 32, 16, 8, False),   # top_k > blocks
    (1, 1, 1, 64, 64, 32, 16, 1, True),    # only the own block
]


@pytest.mark.parametrize("case", _CASES, ids=lambda c: f"S{c[3]}x{c[4]}-b{c[6]}-k{c[7]}-{'causal' if c[8] else 'full'}")
def test_select_equals_naive_float64(cpu_isa, case):
    batch, heads_q, heads_kv, seq_q, seq_kv, dim, block_size, top_k, causal = case
    seed = fresh_seed()
    q, k = _qk(batch, heads_q, heads_kv, seq_q, seq_kv, dim, torch.float64, seed)
    with poisoned_outputs():
        got = moba_select(q, k, block_size, top_k, causal)
    assert got.dtype == torch.int32 and got.shape == (batch, heads_q, seq_q, top_k)
    assert torch.equal(got.long(), ref.moba_select(q, k, block_size, top_k, causal)), f"{case} seed {seed}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_by_score_order(dtype):
    """fp32 scores may swap near ties with the float64 reference: every chosen block must score at
    least as well as every eligible block left out, up to fp32 rounding."""
    seed = fresh_seed()
    q, k = _qk(1, 4, 2, 300, 300, 64, dtype, seed)
    got = moba_select(q, k, 16, 5, True).long()
    want = ref.moba_select(q, k, 16, 5, True)
    nk = 19
    pooled = torch.nn.functional.pad(k.double(), (0, 0, 0, nk * 16 - 300)).view(1, 2, nk, 16, 64).sum(3)
    pooled = pooled / torch.tensor([16.0] * 18 + [300 - 18 * 16]).unsqueeze(-1)
    scores = q.double() @ pooled.repeat_interleave(2, 1).transpose(-1, -2)
    own = torch.arange(300) // 16
    differs = (got != want).any(-1)
    for b, h, i in differs.nonzero().tolist():
        chosen = [j for j in got[b, h, i].tolist() if j >= 0 and j != own[i]]
        left = [j for j in range(own[i]) if j not in chosen]
        assert min(scores[b, h, i, chosen]) >= max(scores[b, h, i, left]) - 1e-4 * scores[b, h, i].abs().max(), \
            f"row {i} seed {seed}"
    assert differs.float().mean() < 0.02, f"seed {seed}"
    # causal rules hold exactly
    assert torch.all((got == own.view(1, 1, -1, 1)).any(-1)) and torch.all(got <= own.view(1, 1, -1, 1))


def test_route_is_the_union_over_query_blocks():
    seed = fresh_seed()
    q, k = _qk(2, 2, 1, 150, 200, 32, torch.float32, seed)
    selected = moba_select(q, k, 16, 3, True)
    mask = moba_route(q, k, 16, 3, True)
    assert (mask.block_size_q, mask.block_size_kv, mask.kv_indices.shape[-1]) == (64, 16, 13)
    chosen = ref.token_block_mask(selected, 1, 13)  # [B, H, Sq, nk]
    union = torch.nn.functional.pad(chosen, (0, 0, 0, 192 - 150)).view(2, 2, 3, 64, 13).any(dim=3)
    assert torch.equal(mask.to_dense(), union), f"seed {seed}"
    listed = torch.arange(13) < mask.kv_counts.unsqueeze(-1)
    ids = torch.where(listed, mask.kv_indices, 99)
    assert torch.equal(ids, ids.sort(dim=-1).values), "lists ascending"


@pytest.mark.cuda
@pytest.mark.parametrize("block_size_q,top_k,num_kv_blocks", [(64, 3, 13), (64, 32, 2048), (128, 8, 5000)])
def test_cuda_block_lists_equal_cpu(block_size_q, top_k, num_kv_blocks):
    """The CUDA union kernel (a shared bitmask per query block) lists what the CPU lists: the same
    counts, ids in ascending order and the unlisted ids after them, over -1 slots, duplicates and
    a partial last query block."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randint(-1, num_kv_blocks, (2, 3, 301, top_k), generator=gen, dtype=torch.int32)
    chosen[:, :, ::7] = chosen[:, :, ::7, :1]  # duplicates within a row
    want_counts, want_ids = torch.ops.torch_ext.moba_block_lists(chosen, num_kv_blocks, block_size_q)
    with poisoned_outputs():
        counts, ids = torch.ops.torch_ext.moba_block_lists(chosen.cuda(), num_kv_blocks, block_size_q)
    assert torch.equal(counts.cpu(), want_counts), f"seed {seed}"
    assert torch.equal(ids.cpu(), want_ids), f"seed {seed}"  # the unlisted ids after them, ascending


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_equals_naive_moba(cpu_isa, causal, dtype):
    _check_naive_moba(causal, dtype)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_attention_on_amx_tiles(amx, causal):
    """MoBA's bf16 attention (per-token masks in the union lists) with its products on AMX-BF16
    tiles, emulated or the hardware's: still the naive MoBA."""
    if not torch_ext._C.build_info()["cpu_avx512_bf16_active"]:
        pytest.skip("the bf16 kernels (and their AMX paths) need AVX512_BF16")
    before = torch_ext._C.amx_emulated_dot_products()
    _check_naive_moba(causal, torch.bfloat16)
    assert (torch_ext._C.amx_emulated_dot_products() > before) == (amx == "emulate")


def _check_naive_moba(causal, dtype):
    seed = fresh_seed()
    q, k = _qk(1, 4, 2, 150, 170, 64, dtype, seed)
    v = random_tensor(k.shape, dtype, "cpu", seed + 2)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    with poisoned_outputs():
        out = moba_attention(q, k, v, block_size=16, top_k=3, causal=causal)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    # the reference routes in float64 from the same (rounded) inputs: ties aside, the same choice
    want = ref.moba_attention(q64, k64, v64, 16, 3, causal, 0.125)
    what = f"causal={causal} {dtype} seed {seed}"
    assert_close_to_reference(out, want, dtype, f"out {what}")
    grad = random_tensor(out.shape, dtype, "cpu", seed + 3)
    out.backward(grad)
    want.backward(grad.double())
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_reference(a.grad, b.grad, dtype, f"{name} {what}", bound=4e-6 if dtype == torch.float32 else 1e-2)


def test_module_long_sequence():
    seed = fresh_seed()
    q, k = _qk(1, 2, 1, 1000, 1000, 64, torch.float32, seed)
    v = random_tensor(k.shape, torch.float32, "cpu", seed + 2)
    module = torch_ext.nn.MoBAAttention(block_size=32, top_k=4)
    assert "top_k=4" in repr(module)
    want = ref.moba_attention(q, k, v, 32, 4, True, 0.125)
    assert_close_to_reference(module(q, k, v), want, torch.float32, f"seed {seed}")


def test_opcheck_and_compile():
    seed = fresh_seed()
    q, k = _qk(1, 2, 1, 40, 56, 32, torch.float32, seed)
    v = random_tensor(k.shape, torch.float32, "cpu", seed + 2)
    torch.library.opcheck(torch.ops.torch_ext.moba_select, (q, k, 16, 2, True))
    torch.library.opcheck(torch.ops.torch_ext.moba_route, (q, k, 16, 2, False))
    selected = moba_select(q, k, 16, 2, True)
    torch.library.opcheck(torch.ops.torch_ext.moba_block_lists, (selected, 4, 64))
    torch.library.opcheck(torch.ops.torch_ext.moba_attention, (q, k, v, selected, 16, True, 0.2))
    out, lse = torch.ops.torch_ext.moba_attention(q, k, v, selected, 16, True, 0.2)
    grad = random_tensor(out.shape, torch.float32, "cpu", seed + 3)
    torch.library.opcheck(torch.ops.torch_ext.moba_attention_backward, (grad, q, k, v, out, lse, selected, 16, True, 0.2))
    f = lambda q, k, v: moba_attention(q * 1.5, k, v, 16, 2, True)  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v))
    # the backward (moba_attention_backward) traced too
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    compiled(*leaves).backward(grad)
    eager = [t.clone().requires_grad_() for t in (q, k, v)]
    f(*eager).backward(grad)
    for a, b in zip(leaves, eager):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.parametrize("args,message", [
    (dict(block_size=0), r"block_size must be in \[1, 2147483647\]"),
    (dict(block_size=2**32), r"block_size must be in \[1, 2147483647\], got 4294967296"),
    (dict(top_k=0), r"top_k must be in \[1, 2147483647\]"),
    (dict(k=torch.randn(1, 3, 40, 32)), "Hq = 2 must be a multiple of .* Hk = 3"),
    (dict(k=torch.randn(1, 1, 40, 32, dtype=torch.bfloat16)), "k must have the dtype of q"),
])
def test_bad_inputs(args, message):
    call = dict(q=torch.randn(1, 2, 40, 32), k=torch.randn(1, 1, 40, 32), block_size=16, top_k=2, causal=True)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.moba_select(*call.values())
    with pytest.raises(RuntimeError, match="token_blocks must be"):
        torch.ops.torch_ext.moba_block_lists(torch.zeros(2, 3, dtype=torch.int32), 4, 64)
    with pytest.raises(RuntimeError, match="token_blocks holds 4 at flat position 1, not below num_kv_blocks = 4"):
        torch.ops.torch_ext.moba_block_lists(torch.tensor([[[[0, 4]]]], dtype=torch.int32), 4, 64)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("dim", [96, 256])
def test_cuda_select_large_head_dim(dtype, dim):
    """CUDA moba_select (tensor-core scores from hi / lo operand splits; 4, 2 or 1 warps per CTA as
    the device's shared memory allows) picks what the CPU picks up to near ties, fp32 included."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    q, k = _qk(1, 2, 1, 400, 400, dim, dtype, seed)
    with poisoned_outputs():
        selected = moba_select(q.cuda(), k.cuda(), 16, 6, True).cpu()
    cpu_selected = moba_select(q, k, 16, 6, True)
    assert (selected != cpu_selected).any(-1).float().mean() < 0.02, f"seed {seed}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("block_size,top_k", [(16, 4), (64, 2)])
@pytest.mark.parametrize("forward", ["gather", "union", "wgmma"])
def test_cuda_select_and_attention(request, monkeypatch, dtype, block_size, top_k, forward):
    """CUDA moba_select picks what the CPU picks (up to near ties) under the causal rules, and the
    token-level attention with the CUDA selection equals float64 attention under that mask: through
    the key-block-major forward (the default), the union lists (TORCH_EXT_MOBA_GATHER=0), and the
    union lists on the Hopper forward (TORCH_EXT_ATTENTION_WGMMA=1) where it can run."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER", "1" if forward == "gather" else "0")
    if forward == "wgmma":
        request.getfixturevalue("hopper_build")
        monkeypatch.setenv("TORCH_EXT_ATTENTION_WGMMA", "1")
    seed = fresh_seed()
    q, k = _qk(1, 4, 2, 300, 300, 64, dtype, seed)
    v = random_tensor(k.shape, dtype, "cpu", seed + 2)
    selected = moba_select(q.cuda(), k.cuda(), block_size, top_k, True).cpu()
    cpu_selected = moba_select(q, k, block_size, top_k, True)
    assert (selected != cpu_selected).any(-1).float().mean() < 0.02, f"seed {seed}"
    own = torch.arange(300) // block_size
    assert torch.all((selected == own.view(1, 1, -1, 1)).any(-1)) and torch.all(selected <= own.view(1, 1, -1, 1))
    with poisoned_outputs():
        out = moba_attention(q.cuda(), k.cuda(), v.cuda(), block_size=block_size, top_k=top_k, causal=True)
    mask = ref.token_block_mask(selected, block_size, 300) & ref.causal_mask(300, 300)
    want = ref.masked_attention(q.double(), k.double(), v.double(), mask, 0.125)[0]
    # The CUDA output uses its own selection, so rows whose choice differs from the CPU's still match `want`.
    assert_close_to_reference(out, want, dtype, f"seed {seed}", bound=2e-3 if dtype == torch.float16 else 1.2e-2)


# (B, Hq, Hk, Sq, Sk, D, block_size, top_k, causal)
_GATHER_CASES = [
    (1, 4, 2, 300, 300, 64, 16, 5, True),
    (2, 2, 1, 257, 300, 128, 32, 3, True),    # Sq < Sk: bottom-right
    (1, 2, 2, 300, 190, 64, 64, 2, True),     # Sq > Sk: early rows see nothing
    (1, 2, 1, 200, 333, 128, 128, 2, True),   # two 64-key steps per block
    (1, 4, 1, 150, 270, 64, 16, 24, False),   # top_k above the 17 blocks: unused slots
    (1, 1, 1, 1, 100, 128, 64, 1, False),     # one query
    (1, 2, 1, 64, 20000, 64, 16, 8, True),    # 1250 key blocks: the plan scans them in 2 chunks
    (1, 2, 1, 2048, 2048, 128, 64, 16, False),  # ~1024 pairs a block: runs of 512 rows, 8 tiles each
    (1, 2, 1, 2048, 2048, 128, 128, 8, True),   # causal: the first blocks chosen by most tokens, 2 steps
]


def _gather_inputs(case, dtype):
    """CUDA q, k, v of a (B, Hq, Hk, Sq, Sk, D, block_size, top_k, causal) case, its scale and the
    CUDA moba_select's choices."""
    batch, heads_q, heads_kv, seq_q, seq_kv, dim, block_size, top_k, causal = case
    seed = fresh_seed()
    q, k = (t.cuda() for t in _qk(batch, heads_q, heads_kv, seq_q, seq_kv, dim, dtype, seed))
    v = random_tensor(k.shape, dtype, "cuda", seed + 2)
    return seed, q, k, v, dim ** -0.5, moba_select(q, k, block_size, top_k, causal)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _GATHER_CASES, ids=lambda c: f"S{c[3]}x{c[4]}-D{c[5]}-b{c[6]}-k{c[7]}-{c[8]}")
def test_cuda_gather_forward(monkeypatch, dtype, case):
    """The key-block-major forward (per key block, the tokens that chose it; partials merged per
    token) equals float64 attention under the token mask and the union forward's lse, in one chunk of
    heads and in chunks of one head (a tiny workspace budget); deterministic across calls."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, _, _, seq_q, seq_kv, _, block_size, _, causal = case
    seed, q, k, v, scale, selected = _gather_inputs(case, dtype)
    op = torch.ops.torch_ext.moba_attention
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER", "0")
    union_out, union_lse = op(q, k, v, selected, block_size, causal, scale)
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER", "1")
    with poisoned_outputs():
        out, lse = op(q, k, v, selected, block_size, causal, scale)
    mask = ref.token_block_mask(selected.cpu(), block_size, seq_kv)
    if causal:
        mask = mask & ref.causal_mask(seq_q, seq_kv)
    want, want_lse = ref.masked_attention(q.cpu().double(), k.cpu().double(), v.cpu().double(), mask, scale)
    what = f"{case} {dtype} seed {seed}"
    assert_close_to_reference(out, want, dtype, what, bound=2e-3 if dtype == torch.float16 else 1.2e-2)
    seen = torch.isfinite(want_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), seen) and torch.all(out.cpu()[~seen] == 0), what
    torch.testing.assert_close(lse[seen.cuda()], union_lse[seen.cuda()], rtol=0, atol=2e-4, msg=what)
    torch.testing.assert_close(out.float(), union_out.float(), rtol=1.6e-2, atol=1e-2, msg=what)
    again, again_lse = op(q, k, v, selected, block_size, causal, scale)
    assert torch.equal(again, out) and torch.equal(again_lse, lse), f"not deterministic: {what}"
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER_BUDGET_BYTES", "1")
    chunked, chunked_lse = op(q, k, v, selected, block_size, causal, scale)
    assert torch.equal(chunked, out) and torch.equal(chunked_lse, lse), f"head chunks differ: {what}"


def test_backward_op_is_the_union_backward():
    """moba_attention_backward on the CPU is block_sparse_attention_backward over the union lists
    (bit for bit), and its input checks name the argument."""
    seed = fresh_seed()
    q, k = _qk(2, 4, 2, 90, 130, 32, torch.float32, seed)
    v = random_tensor(k.shape, torch.float32, "cpu", seed + 2)
    selected = moba_select(q, k, 16, 3, True)
    out, lse = torch.ops.torch_ext.moba_attention(q, k, v, selected, 16, True, 0.2)
    grad = random_tensor(out.shape, torch.float32, "cpu", seed + 3)
    counts, indices = torch.ops.torch_ext.moba_block_lists(selected, 9, 64)
    want = torch.ops.torch_ext.block_sparse_attention_backward(grad, q, k, v, out, lse, counts, indices, 64, 16, True,
                                                               0.2, selected)
    got = torch.ops.torch_ext.moba_attention_backward(grad, q, k, v, out, lse, selected, 16, True, 0.2)
    for a, b in zip(got, want):
        assert torch.equal(a, b), f"seed {seed}"
    with pytest.raises(RuntimeError, match=r"moba_attention_backward: lse must be \[B, Hq, Sq\]"):
        torch.ops.torch_ext.moba_attention_backward(grad, q, k, v, out, lse[:, :, :5], selected, 16, True, 0.2)
    with pytest.raises(RuntimeError, match="moba_attention_backward: block_size must be in"):
        torch.ops.torch_ext.moba_attention_backward(grad, q, k, v, out, lse, selected, 0, True, 0.2)


# (B, Hq, Hk, Sq, Sk, D, block_size, top_k, causal): the key-block-major backward (blocks <= 64).
_GATHER_BACKWARD_CASES = [
    (1, 4, 2, 300, 300, 64, 16, 5, True),
    (2, 2, 1, 257, 300, 128, 32, 3, True),    # Sq < Sk: bottom-right
    (1, 2, 2, 300, 190, 64, 64, 2, True),     # Sq > Sk: early rows see nothing
    (1, 4, 1, 150, 270, 128, 16, 24, False),  # top_k above the 17 blocks: unused slots; GQA group 4
    (1, 1, 1, 1, 100, 128, 64, 1, False),     # one query
    (1, 2, 1, 2048, 2048, 128, 64, 16, False),  # ~1024 pairs a block: several dQ runs, 16 dK / dV tiles a head
    (2, 4, 2, 300, 300, 64, 32, 4, True),     # blocks of 32 at D = 64; B > 1 beside GQA groups of 2
    (1, 2, 1, 2048, 2048, 128, 64, 8, True),  # causal with several dQ runs a block
]


@pytest.mark.cuda
def test_cuda_gather_backward_runs_its_kernels(monkeypatch):
    """TORCH_EXT_MOBA_GATHER_BACKWARD=1 runs the key-block-major kernels (from the profiler's kernel
    names), not the union backward it falls back to (which computes the same gradients)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    case = _GATHER_BACKWARD_CASES[0]
    _, _, _, _, _, _, block_size, _, causal = case
    _, q, k, v, scale, selected = _gather_inputs(case, torch.bfloat16)
    out, lse = torch.ops.torch_ext.moba_attention(q, k, v, selected, block_size, causal, scale)
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER_BACKWARD", "1")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.ops.torch_ext.moba_attention_backward(torch.ones_like(out), q, k, v, out, lse, selected, block_size,
                                                    causal, scale)
        torch.cuda.synchronize()
    names = " ".join(event.name for event in prof.events())
    for kernel in ("gather_dq_kernel", "merge_dq_kernel", "gather_dkdv_kernel"):
        assert kernel in names, f"{kernel} did not run"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", _GATHER_BACKWARD_CASES,
                         ids=lambda c: f"S{c[3]}x{c[4]}-H{c[1]}/{c[2]}-D{c[5]}-b{c[6]}-k{c[7]}-{c[8]}")
def test_cuda_gather_backward(monkeypatch, dtype, case):
    """The key-block-major backward (TORCH_EXT_MOBA_GATHER_BACKWARD=1: dQ per run of a key block's
    pairs, merged per token; dK / dV per key block over its group's pairs) and the union backward
    against float64 gradients of token-level MoBA; deterministic across calls and chunkings (a tiny
    workspace budget: chunks of one GQA group)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _, _, _, seq_q, seq_kv, _, block_size, _, causal = case
    seed, q, k, v, scale, selected = _gather_inputs(case, dtype)
    out, lse = torch.ops.torch_ext.moba_attention(q, k, v, selected, block_size, causal, scale)
    grad = random_tensor(out.shape, dtype, "cuda", seed + 3)
    op = torch.ops.torch_ext.moba_attention_backward
    union = op(grad, q, k, v, out, lse, selected, block_size, causal, scale)
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER_BACKWARD", "1")
    with poisoned_outputs():
        grads = op(grad, q, k, v, out, lse, selected, block_size, causal, scale)
    mask = ref.token_block_mask(selected.cpu(), block_size, seq_kv)
    if causal:
        mask = mask & ref.causal_mask(seq_q, seq_kv)
    q64, k64, v64 = (t.cpu().double().requires_grad_() for t in (q, k, v))
    ref.masked_attention(q64, k64, v64, mask, scale)[0].backward(grad.cpu().double())
    what = f"{case} {dtype} seed {seed}"
    bound = 5e-3 if dtype == torch.float16 else 2.5e-2
    for name, got, want, other in zip(("dq", "dk", "dv"), grads, (q64.grad, k64.grad, v64.grad), union):
        assert_close_to_reference(got, want, dtype, f"{name} {what}", bound=bound)
        assert_close_to_reference(other, want, dtype, f"{name} (union) {what}", bound=bound)
    again = op(grad, q, k, v, out, lse, selected, block_size, causal, scale)
    assert all(torch.equal(a, b) for a, b in zip(again, grads)), f"not deterministic: {what}"
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER_BUDGET_BYTES", "1")
    chunked = op(grad, q, k, v, out, lse, selected, block_size, causal, scale)
    assert all(torch.equal(a, b) for a, b in zip(chunked, grads)), f"group chunks differ: {what}"


@pytest.mark.cuda
@pytest.mark.parametrize("backward", ["mma_sync", "wgmma"])
def test_cuda_gather_forward_graph_capture_and_backward(request, monkeypatch, backward):
    """moba_attention's CUDA forward has no host sync (it captures in a CUDA graph and replays to the
    eager result on new inputs); its gradients are the union backward's, on mma.sync or on the
    Hopper kernels (TORCH_EXT_ATTENTION_WGMMA_BWD=1: the dK / dV kernel skips the 64-row steps no
    row of which chose the block; key blocks of 64 there)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if backward == "wgmma":
        request.getfixturevalue("hopper_build")
        monkeypatch.setenv("TORCH_EXT_ATTENTION_WGMMA_BWD", "1")
    block = 64 if backward == "wgmma" else 32  # the Hopper dK / dV kernel takes blocks of 64 and 128
    seed = fresh_seed()
    q, k = (t.cuda() for t in _qk(1, 4, 2, 500, 500, 128, torch.bfloat16, seed))
    v = random_tensor(k.shape, torch.bfloat16, "cuda", seed + 2)
    static = [t.clone() for t in (q, k, v)]
    moba_attention(*static, block_size=block, top_k=4)  # warm-up: kernels loaded, allocator primed
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moba_attention(*static, block_size=block, top_k=4)
    fresh = [random_tensor(t.shape, torch.bfloat16, "cuda", seed + 10 + i) for i, t in enumerate(static)]
    for dst, src in zip(static, fresh):
        dst.copy_(src)
    graph.replay()
    assert torch.equal(captured, moba_attention(*fresh, block_size=block, top_k=4)), f"seed {seed}"

    q, k, v = (t.detach().requires_grad_() for t in fresh)
    out = moba_attention(q, k, v, block_size=block, top_k=4)
    grad = random_tensor(out.shape, torch.bfloat16, "cuda", seed + 20)
    out.backward(grad)
    q64, k64, v64 = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    selected = moba_select(q.detach(), k.detach(), block, 4, True).cpu()
    mask = ref.token_block_mask(selected, block, 500) & ref.causal_mask(500, 500)
    want = ref.masked_attention(q64, k64, v64, mask, 128 ** -0.5)[0]
    want.backward(grad.cpu().double())
    for name, a, b in (("dq", q, q64), ("dk", k, k64), ("dv", v, v64)):
        assert_close_to_reference(a.grad, b.grad, torch.bfloat16, f"{name} seed {seed}", bound=2.5e-2)


@pytest.mark.cuda
def test_cuda_gather_forward_choice_sets_and_strides(monkeypatch):
    """token_blocks with repeated ids (a token's choices are a set) and ids past the key blocks
    (ignored on CUDA) give the union forward's result; [B, S, H, D]-strided q, k, v and a
    non-contiguous token_blocks take the key-block-major forward as they are."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    q, k = (t.cuda() for t in _qk(2, 4, 2, 200, 200, 64, torch.float16, seed))
    v = random_tensor(k.shape, torch.float16, "cuda", seed + 2)
    selected = moba_select(q, k, 16, 5, True)
    selected[..., 3] = selected[..., 0]            # a repeat
    selected[:, :, ::7, 4] = 20                    # past the 13 key blocks: ignored
    op = torch.ops.torch_ext.moba_attention
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER", "0")
    union_out, union_lse = op(q, k, v, selected, 16, True, 0.125)
    monkeypatch.setenv("TORCH_EXT_MOBA_GATHER", "1")
    out, lse = op(q, k, v, selected, 16, True, 0.125)
    torch.testing.assert_close(lse, union_lse, rtol=0, atol=2e-4, msg=f"seed {seed}")
    torch.testing.assert_close(out.float(), union_out.float(), rtol=4e-3, atol=2e-3, msg=f"seed {seed}")
    bshd = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v)]
    choices = selected.transpose(2, 3).contiguous().transpose(2, 3)
    strided, strided_lse = op(*bshd, choices, 16, True, 0.125)
    assert torch.equal(strided, out) and torch.equal(strided_lse, lse), f"seed {seed}"


@pytest.mark.parametrize("args,message", [
    (dict(block_size=0), r"moba_attention: block_size must be in \[1, 2147483647\], got 0"),
    (dict(token_blocks=torch.zeros(1, 2, 40, dtype=torch.int32)), "token_blocks must be \\[B, H, Sq, top_k\\]"),
    (dict(token_blocks=torch.zeros(1, 2, 39, 2, dtype=torch.int32)), r"token_blocks must be \[B, Hq, Sq, top_k\]"),
    (dict(token_blocks=torch.zeros(1, 2, 40, 2)), "token_blocks must have dtype"),
    (dict(token_blocks=torch.full((1, 2, 40, 2), 3, dtype=torch.int32)), "token_blocks holds 3"),
    (dict(v=torch.randn(1, 1, 41, 32)), "v must have the shape of k"),
])
def test_attention_op_bad_inputs(args, message):
    call = dict(q=torch.randn(1, 2, 40, 32), k=torch.randn(1, 1, 40, 32), v=torch.randn(1, 1, 40, 32),
                token_blocks=torch.zeros(1, 2, 40, 2, dtype=torch.int32), block_size=16, causal=True, scale=0.2)
    call.update(args)
    with pytest.raises(RuntimeError, match=message):
        torch.ops.torch_ext.moba_attention(*call.values())
