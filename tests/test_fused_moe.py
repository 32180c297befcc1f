"""fused_moe: forward and backward against a float64 per-pair loop, routing corner cases, every CPU
ISA, determinism, opcheck, torch.compile, gradcheck, bad inputs."""

import pytest
import torch

import torch_ext
from torch_ext import reference
from torch_ext.ops import fused_moe, moe_route
from torch_ext.testing import (RELATIVE_ERROR_BOUNDS, assert_close_to_reference, fresh_seed, poisoned_outputs,
                               random_tensor, relative_error)

CPU_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _problem(tokens, experts, top_k, hidden, intermediate, dtype, device, seed, ids=None):
    """Inputs with weights scaled so that activations stay O(1) through both GEMMs."""
    h = random_tensor((tokens, hidden), dtype, device, seed)
    w13 = random_tensor((experts, 2 * intermediate, hidden), dtype, device, seed + 1, scale=hidden ** -0.5)
    w2 = random_tensor((experts, hidden, intermediate), dtype, device, seed + 2, scale=intermediate ** -0.5)
    logits = random_tensor((tokens, experts), torch.float32, device, seed + 3)
    weights, route_ids = moe_route(logits, top_k)
    return h, w13, w2, weights, route_ids if ids is None else ids.to(device=device, dtype=torch.int32)


def _check_forward(args, activation, dtype, what):
    with poisoned_outputs():
        out = fused_moe(*args, activation)
    h, w13, w2, weights, ids = args
    ref = reference.moe.fused_moe(h.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), activation)
    assert_close_to_reference(out, ref, dtype, what)


def _quantized_problem(tokens, experts, top_k, hidden, intermediate, dtype, device, seed, bits=4, group_size=32,
                       symmetric=False, ids=None):
    """_problem with both expert stacks quantized (torch_ext.quant.quantize_experts)."""
    from torch_ext.quant import quantize_experts

    h, w13, w2, weights, ids = _problem(tokens, experts, top_k, hidden, intermediate, dtype, device, seed, ids=ids)
    return h, quantize_experts(w13, bits, group_size, symmetric), quantize_experts(w2, bits, group_size, symmetric), \
        weights, ids


def _check_quantized(h, q13, q2, weights, ids, dtype, what):
    """fused_moe_quantized against the float64 MoE of the dequantized experts."""
    with poisoned_outputs():
        out = torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids)
    ref = reference.moe.fused_moe(h.cpu(), q13.dequantize().cpu(), q2.dequantize().cpu(), weights.cpu(), ids.cpu())
    assert_close_to_reference(out, ref, dtype, what)


# (T, E, k, H, I): odd sizes (vector tails), E = 60 with k = 4 and E = 128 with k = 8, one token,
# more experts than pairs (most idle), a decode-sized batch, ~100 rows per expert (the fp32 CPU
# kernel's panel path with its row tail).
SHAPES = [(1, 8, 2, 64, 96), (5, 4, 2, 33, 17), (13, 60, 4, 40, 24), (9, 128, 8, 48, 20), (64, 8, 2, 128, 96),
          (3, 7, 7, 17, 5), (150, 3, 2, 37, 45)]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "T{}E{}k{}H{}I{}".format(*s))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_forward_matches_reference(device, dtype, shape, activation):
    if device == "cuda" and dtype == torch.float32:
        dtype = torch.bfloat16
    seed = fresh_seed()
    _check_forward(_problem(*shape, dtype, device, seed), activation, dtype, f"{shape} {activation} (seed {seed})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_cpu_isa_path(cpu_isa, dtype):
    for shape in [(6, 5, 2, 37, 19), (7, 3, 1, 16, 32)]:
        seed = fresh_seed()
        _check_forward(_problem(*shape, dtype, "cpu", seed), "silu", dtype, f"{cpu_isa} {shape} (seed {seed})")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_panel_path_row_counts(cpu_isa, activation, dtype):
    """Experts with rows at and around the CPU kernel's panel sizes (whole vectors of 16 rows on
    AVX-512, 8 on AVX2; blocks of up to 64 / 24; fp32 FMA, on fp16 / bf16 weight rows widened a K
    chunk at a time, and bf16 pairs with AVX512_BF16), several uneven panel blocks (149 rows) and
    one row, odd H and I (bf16 pairs: a last pair with a zero; widened rows: a partial vector at
    the end of each row); training's saved pre-activations from both paths."""
    _check_panel_rows(activation, dtype, cpu_isa)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
def test_fma_panels_pad_partial_vectors_of_large_experts(cpu_isa, dtype):
    """Experts of at least 16 MiB of weights (kPadStreamedExpertBytes) on the FMA panels (fp32, and
    fp16 / bf16 widened where vdpbf16ps is missing) pad a partial last token vector of more than
    6 rows into the panels, below one full panel block: rows with no whole vector, with one, and at
    and past the block (no padding there); training's saved pre-activations of padded experts."""
    counts = [11, 23, 7, 6, 70, 1]
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])[torch.randperm(sum(counts))][:, None]
    seed = fresh_seed()
    # 3 x 1024 x I values: 16.8 MB per expert, just past the threshold.
    intermediate = 1366 * 4 // dtype.itemsize
    h, w13, w2, weights, ids = _problem(sum(counts), len(counts), 1, 1024, intermediate, dtype, "cpu", seed, ids=ids)
    _check_forward((h, w13, w2, weights, ids), "silu", dtype, f"{cpu_isa} (seed {seed})")
    out, gate_up = torch.ops.torch_ext.fused_moe_train(h, w13, w2, weights, ids, "silu")
    assert torch.equal(out, fused_moe(h, w13, w2, weights, ids, "silu"))
    expected = torch.stack([w13[e].double() @ h[t].double() for t, e in enumerate(ids[:, 0].tolist())])
    assert_close_to_reference(gate_up, expected, dtype, f"{cpu_isa} gate_up (seed {seed})")


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_bf16_panels_on_amx_tiles(amx, activation):
    """The bf16 panel products on AMX-BF16 tiles (Bf16PairMath::tile_gemm; emulated everywhere, the
    hardware's where the CPU has them): the row counts, odd H and I and long K of the test above."""
    if not torch_ext._C.build_info()["cpu_avx512_bf16_active"]:
        pytest.skip("the bf16 kernels (and their AMX paths) need AVX512_BF16")
    before = torch_ext._C.amx_emulated_dot_products()
    _check_panel_rows(activation, torch.bfloat16, f"amx {amx}")
    assert (torch_ext._C.amx_emulated_dot_products() > before) == (amx == "emulate")


def _check_panel_rows(activation, dtype, what):
    counts = [64, 63, 16, 15, 8, 7, 24, 23, 149, 0, 1]
    ids = torch.cat([torch.full((n,), e) for e, n in enumerate(counts)])[torch.randperm(sum(counts))][:, None]
    seed = fresh_seed()
    h, w13, w2, weights, ids = _problem(sum(counts), len(counts), 1, 41, 37, dtype, "cpu", seed, ids=ids)
    _check_forward((h, w13, w2, weights, ids), activation, dtype, f"{what} (seed {seed})")
    out, gate_up = torch.ops.torch_ext.fused_moe_train(h, w13, w2, weights, ids, activation)
    assert torch.equal(out, fused_moe(h, w13, w2, weights, ids, activation))
    expected = torch.stack([w13[e].double() @ h[t].double() for t, e in enumerate(ids[:, 0].tolist())])
    assert_close_to_reference(gate_up, expected, dtype, f"{what} gate_up (seed {seed})")
    # H and I past the panel kernel's 512-deep K chunks (accumulated across chunks); k = 2 with
    # both slots of some tokens on the same expert.
    slot0 = torch.arange(70) % 2
    ids = torch.stack([slot0, torch.where(torch.arange(70) % 5 == 0, slot0, 1 - slot0)], 1)
    args = _problem(70, 2, 2, 1031, 531, dtype, "cpu", seed + 10, ids=ids)
    _check_forward(args, activation, dtype, f"{what} K chunks (seed {seed})")
    # The same K with a single token vector per expert (fp32 on AVX-512: a block of k pairs,
    # odd K and I ending in a pair with a zero) and a 4-row tail beside it.
    ids = (torch.arange(40) % 2)[:, None]
    args = _problem(40, 2, 1, 1031, 531, dtype, "cpu", seed + 20, ids=ids)
    _check_forward(args, activation, dtype, f"{what} K chunks, one vector (seed {seed})")


def test_all_tokens_on_one_expert_and_idle_experts(device):
    seed = fresh_seed()
    tokens, experts = 20, 6
    ids = torch.stack([torch.full((tokens,), 4), torch.arange(tokens) % 2], 1)  # expert 4 gets every token
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    _check_forward(_problem(tokens, experts, 2, 40, 24, dtype, device, seed, ids=ids), "silu", dtype,
                   f"skewed (seed {seed})")


def test_no_tokens(device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    h, w13, w2, weights, ids = _problem(0, 4, 2, 16, 8, dtype, device, fresh_seed())
    assert fused_moe(h, w13, w2, weights, ids).shape == (0, 16)


@pytest.mark.parametrize("tokens", [40, 300])  # the dot-product kernel only; with panels
def test_deterministic_and_independent_of_thread_count(tokens):
    args = _problem(tokens, 8, 2, 96, 64, torch.float32, "cpu", fresh_seed())
    threads = torch.get_num_threads()
    first = fused_moe(*args)
    assert torch.equal(first, fused_moe(*args))
    try:
        torch.set_num_threads(1)
        single = fused_moe(*args)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(first, single)


def _reference_grads(args, grad_out, activation):
    leaves = [t.detach().cpu().double().requires_grad_() for t in args[:4]]
    out = reference.moe.fused_moe(*leaves, args[4].cpu(), activation)
    out.backward(grad_out.cpu().double())
    return [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_backward_matches_reference(device, dtype, activation):
    if device == "cuda" and dtype == torch.float64:
        pytest.skip("float64 covered on the CPU")
    seed = fresh_seed()
    args = [t.requires_grad_() if t.is_floating_point() else t
            for t in _problem(11, 6, 3, 24, 20, dtype, device, seed)]
    grad_out = random_tensor((11, 24), dtype, device, seed + 7)
    with poisoned_outputs():
        out = fused_moe(*args, activation)
        grads = torch.autograd.grad(out, args[:4], grad_out)
    expected = _reference_grads(args, grad_out, activation)
    # bf16: the backward's GEMM inputs (recomputed activations, weighted gradients) are rounded to
    # bf16, several roundings deep (CPU: worst of 20 seeds 7.9e-3; CUDA not yet measured).
    bound = (1.2e-2 if device == "cpu" else 2e-2) if dtype == torch.bfloat16 else None
    for name, got, ref in zip(["hidden", "w13", "w2", "topk_weights"], grads, expected):
        got_dtype = torch.float32 if name == "topk_weights" and dtype == torch.float64 else dtype  # fp32 weights
        assert_close_to_reference(got, ref, got_dtype, f"grad {name} (seed {seed})", bound=bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_backward_in_fp32_blocks(dtype):
    """16-bit experts whose CPU backward widens the weights to fp32 a block of rows at a time (fp16
    on every CPU, bf16 without bf16 dot products): experts large enough for several blocks and a
    partial last one, with the forward's gate_up and with the first GEMM recomputed."""
    seed = fresh_seed()
    args = _problem(24, 4, 2, 640, 320, dtype, "cpu", seed)
    grad_out = random_tensor((24, 640), dtype, "cpu", seed + 3)
    expected = _reference_grads(args, grad_out, "silu")
    gate_up = torch.ops.torch_ext.fused_moe_train(*args, "silu")[1]
    for saved in (gate_up, None):
        with poisoned_outputs():
            grads = torch.ops.torch_ext.fused_moe_backward(grad_out, *args, "silu", saved)
        if saved is not None:
            with_saved = grads
        for name, got, ref in zip(["hidden", "w13", "w2", "topk_weights"], grads, expected):
            assert_close_to_reference(got, ref, dtype, f"grad {name} saved={saved is not None} (seed {seed})",
                                      bound=1.2e-2 if dtype == torch.bfloat16 else None)
    frozen = torch.ops.torch_ext.fused_moe_backward(grad_out, *args, "silu", gate_up, False)
    assert torch.equal(frozen[0], with_saved[0]) and torch.equal(frozen[3], with_saved[3])
    assert frozen[1].numel() == 0 and frozen[2].numel() == 0


def test_gradcheck():
    seed = fresh_seed()
    h, w13, w2, weights, ids = _problem(4, 5, 2, 6, 5, torch.float64, "cpu", seed)
    # topk_weights are fp32 by contract, too coarse for finite differences: gradcheck covers hidden,
    # w13 and w2 in float64; the weights' gradient is checked in test_backward_matches_reference.
    inputs = tuple(t.requires_grad_() for t in (h, w13, w2))
    for activation in ("silu", "gelu"):
        assert torch.autograd.gradcheck(lambda *t: fused_moe(*t, weights, ids, activation), inputs)


def test_opcheck():
    args = _problem(7, 5, 2, 20, 12, torch.float32, "cpu", fresh_seed())
    torch.library.opcheck(torch.ops.torch_ext.fused_moe, (*args, "silu"))
    torch.library.opcheck(torch.ops.torch_ext.fused_moe_train, (*args, "silu"))
    grad_out = torch.randn(7, 20)
    torch.library.opcheck(torch.ops.torch_ext.fused_moe_backward, (grad_out, *args, "gelu"))
    gate_up = torch.ops.torch_ext.fused_moe_train(*args, "gelu")[1]
    torch.library.opcheck(torch.ops.torch_ext.fused_moe_backward, (grad_out, *args, "gelu", gate_up))
    torch.library.opcheck(torch.ops.torch_ext.fused_moe_backward, (grad_out, *args, "gelu", None, False))


def test_frozen_experts_skip_the_weight_gradients():
    """weight_grads=False: the same hidden and routing-weight gradients, no weight gradients; the
    autograd of fused_moe asks for them only when w13 or w2 requires grad."""
    seed = fresh_seed()
    h, w13, w2, weights, ids = _problem(11, 6, 2, 24, 16, torch.float32, "cpu", seed)
    grad_out = random_tensor((11, 24), torch.float32, "cpu", seed + 5)
    full = torch.ops.torch_ext.fused_moe_backward(grad_out, h, w13, w2, weights, ids, "silu")
    frozen = torch.ops.torch_ext.fused_moe_backward(grad_out, h, w13, w2, weights, ids, "silu", None, False)
    assert torch.equal(frozen[0], full[0]) and torch.equal(frozen[3], full[3])
    assert frozen[1].numel() == 0 and frozen[2].numel() == 0
    h_leaf, weights_leaf = h.clone().requires_grad_(), weights.clone().requires_grad_()
    fused_moe(h_leaf, w13, w2, weights_leaf, ids).backward(grad_out)
    # (through fused_moe_train: the kernel's saved gate_up, equal to the recomputed one to rounding)
    assert relative_error(h_leaf.grad, full[0]) < 1e-6 and relative_error(weights_leaf.grad, full[3]) < 1e-6
    assert w13.grad is None and w2.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_train_saves_the_pre_activations(dtype):
    """fused_moe_train's gate_up is W13[e] h[t] per pair, and the backward with it equals the
    recomputing backward."""
    seed = fresh_seed()
    h, w13, w2, weights, ids = _problem(9, 5, 2, 24, 16, dtype, "cpu", seed)
    out, gate_up = torch.ops.torch_ext.fused_moe_train(h, w13, w2, weights, ids, "silu")
    assert torch.equal(out, fused_moe(h, w13, w2, weights, ids))
    expected = torch.stack([w13[e].double() @ h[t].double() for t in range(9) for e in ids[t].tolist()])
    assert_close_to_reference(gate_up, expected, dtype, f"gate_up (seed {seed})")
    grad_out = random_tensor((9, 24), dtype, "cpu", seed + 5)
    saved = torch.ops.torch_ext.fused_moe_backward(grad_out, h, w13, w2, weights, ids, "silu", gate_up)
    recomputed = torch.ops.torch_ext.fused_moe_backward(grad_out, h, w13, w2, weights, ids, "silu")
    for a, b in zip(saved, recomputed):
        assert relative_error(a, b) < (1e-2 if dtype == torch.bfloat16 else 1e-6)
    with pytest.raises(RuntimeError, match="gate_up must be"):
        torch.ops.torch_ext.fused_moe_backward(grad_out, h, w13, w2, weights, ids, "silu", gate_up[:-1])


def _check_routing_weight_grad(got, ref, args, grad_out, bound, what):
    """The routing weights' gradient: each entry is grad_out . (its expert's output), a dot product
    whose terms the kernel takes in the io dtype. Where they cancel, the entry's relative error is
    unbounded (idle-experts bf16 measured 2.7e-2 and 7.2e-2 on 2 of 300 seeds: 4 entries), so the
    error is measured against the size of the terms, sum |grad_out * output|, per entry."""
    h, w13, w2, weights, ids = (t.detach().cpu() for t in args)
    magnitude = torch.empty(ids.shape, dtype=torch.float64)
    for slot in range(ids.shape[1]):
        one_hot = torch.zeros_like(weights, dtype=torch.float64)
        one_hot[:, slot] = 1.0
        output = reference.moe.fused_moe(h.double(), w13.double(), w2.double(), one_hot, ids, "silu")
        magnitude[:, slot] = (grad_out.cpu().double() * output).abs().sum(-1)
    error = (got.cpu().double() - ref).norm() / magnitude.norm()
    assert error <= bound, f"grad topk_weights {what}: error {error:.3e} of the terms' size exceeds {bound:.1e}"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(11, 6, 3, 32, 24), (2, 8, 2, 16, 8)], ids=["T11E6k3", "idle-experts"])
def test_grouped_backward_matches_reference(device, dtype, shape, monkeypatch):
    """The backward on torch._grouped_mm (forced here; by default CUDA bf16 on sm_90 only), with the
    forward's gate_up and recomputing it, with and without weight gradients; experts without rows
    get zero weight gradients (outputs poisoned)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_BACKWARD", "1")
    seed = fresh_seed()
    tokens, hidden = shape[0], shape[3]
    args = _problem(*shape, dtype, device, seed)
    grad_out = random_tensor((tokens, hidden), dtype, device, seed + 7)
    expected = _reference_grads(args, grad_out, "silu")
    gate_up = torch.ops.torch_ext.fused_moe_train(*args, "silu")[1]
    # fp16: the worst of 400 seeded runs was 2.5e-3 (routing weights' gradient, a short sum in
    # fp16); one seed reached 6e-3.
    bound = 2e-2 if dtype == torch.bfloat16 else (1e-2 if dtype == torch.float16 else None)
    for saved in (gate_up, None):
        with poisoned_outputs():
            grads = torch.ops.torch_ext.fused_moe_backward(grad_out, *args, "silu", saved)
            frozen = torch.ops.torch_ext.fused_moe_backward(grad_out, *args, "silu", saved, False)
        for name, got, ref in zip(["hidden", "w13", "w2"], grads, expected):
            assert_close_to_reference(got, ref, dtype, f"grad {name} saved={saved is not None} (seed {seed})",
                                      bound=bound)
        _check_routing_weight_grad(grads[3], expected[3], args, grad_out, bound or 2e-6,
                                   f"saved={saved is not None} (seed {seed})")
        assert torch.equal(frozen[0], grads[0]) and torch.equal(frozen[3], grads[3])
        assert frozen[1].numel() == 0 and frozen[2].numel() == 0


def test_grouped_backward_switch(monkeypatch):
    """TORCH_EXT_MOE_GROUPED_BACKWARD=0 and unaligned sizes keep the per-expert form, which agrees."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    seed = fresh_seed()
    for choice in ("0", "1"):
        monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_BACKWARD", choice)
        # H = 20: not a multiple of 8, so the grouped form does not apply even when forced.
        for shape in ((9, 5, 2, 24, 16), (4, 3, 2, 20, 12)):
            args = _problem(*shape, torch.float32, "cpu", seed)
            grad_out = random_tensor((shape[0], shape[3]), torch.float32, "cpu", seed + 5)
            with poisoned_outputs():
                grads = torch.ops.torch_ext.fused_moe_backward(grad_out, *args, "gelu")
            for got, want in zip(grads, _reference_grads(args, grad_out, "gelu")):
                assert_close_to_reference(got, want, torch.float32, f"choice {choice} {shape} seed {seed}")


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(11, 6, 3, 32, 24), (2, 8, 2, 16, 8), (1, 4, 2, 64, 48), (40, 60, 4, 40, 24)],
                         ids=["T11E6k3", "idle-experts", "one-token", "E60k4"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_grouped_forward_matches_reference(device, dtype, shape, activation, monkeypatch):
    """The forward on torch._grouped_mm (forced here; by default CUDA bf16 on sm_90 from 8 rows
    per expert on), idle experts included. Its first GEMM rounds gate / up to the io dtype before
    the activation (the fused kernels keep them in fp32): the worst of 300 seeded runs per shape
    on the CPU was 1.02x the dtype's usual bound at these small sizes, hence 1.5x."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", "1")
    seed = fresh_seed()
    args = _problem(*shape, dtype, device, seed)
    with poisoned_outputs():
        out = fused_moe(*args, activation)
    h, w13, w2, weights, ids = args
    ref = reference.moe.fused_moe(h.cpu(), w13.cpu(), w2.cpu(), weights.cpu(), ids.cpu(), activation)
    bound = None if dtype == torch.float32 else 1.5 * RELATIVE_ERROR_BOUNDS[dtype]
    assert_close_to_reference(out, ref, dtype, f"grouped {shape} {activation} (seed {seed})", bound=bound)
    assert torch.equal(fused_moe(*args, activation), fused_moe(*args, activation))  # deterministic


def test_grouped_forward_switch(monkeypatch):
    """On the CPU the automatic choice keeps the fused kernel (bit for bit what =0 and =off give);
    TORCH_EXT_MOE_GROUPED_FORWARD=1 takes the grouped GEMMs, which agree, except where H or I is
    not a multiple of 8 (the fused kernel even when forced)."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    seed = fresh_seed()
    for shape in ((64, 4, 2, 24, 16), (4, 3, 2, 20, 12)):
        args = _problem(*shape, torch.float32, "cpu", seed)
        results = {}
        for choice in ("", "0", "1", "off"):
            monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", choice)
            _check_forward(args, "silu", torch.float32, f"choice {choice!r} {shape} seed {seed}")
            results[choice] = fused_moe(*args, "silu")
        assert torch.equal(results[""], results["0"]) and torch.equal(results["off"], results["0"])
        if shape[3] % 8 != 0:
            assert torch.equal(results["1"], results["0"])
        else:  # the other path ran: another summation order
            assert not torch.equal(results["1"], results["0"])


def test_compile_fullgraph():
    args = _problem(9, 6, 2, 24, 16, torch.float32, "cpu", fresh_seed())
    compiled = torch.compile(lambda *a: fused_moe(*a, "silu") * 2.0, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args), fused_moe(*args, "silu") * 2.0)
    # With gradients: the training op and its backward inside one compiled graph.
    leaves = [t.clone().requires_grad_() for t in args[:4]]
    compiled(*leaves, args[4]).sum().backward()
    eager = [t.clone().requires_grad_() for t in args[:4]]
    (fused_moe(*eager, args[4], "silu") * 2.0).sum().backward()
    for a, b in zip(leaves, eager):
        assert relative_error(a.grad, b.grad) < 1e-6


@pytest.mark.parametrize("change,message", [
    (lambda a: a.update(ids=a["ids"] + 100), "topk_ids entry must be in"),
    (lambda a: a.update(ids=a["ids"].long()), "topk_ids"),
    (lambda a: a.update(w13=a["w13"][:, :-1]), "w13 must be"),
    (lambda a: a.update(w2=a["w2"][:, :, :-1]), "w2 must be"),
    (lambda a: a.update(w2=a["w2"].double()), "w2"),
    (lambda a: a.update(weights=a["weights"][:, :1]), "topk_weights must have"),
    (lambda a: a.update(hidden=a["hidden"][0]), "hidden must be"),
    (lambda a: a.update(activation="relu"), "activation must be"),
    (lambda a: a.update(ids=torch.zeros(6, 6, dtype=torch.int32), weights=torch.ones(6, 6)), "top_k"),
])
def test_bad_inputs(change, message):
    h, w13, w2, weights, ids = _problem(6, 5, 2, 16, 8, torch.float32, "cpu", fresh_seed())
    args = dict(hidden=h, w13=w13, w2=w2, weights=weights, ids=ids, activation="silu")
    change(args)
    with pytest.raises(RuntimeError, match=message):
        fused_moe(args["hidden"], args["w13"], args["w2"], args["weights"], args["ids"], args["activation"])


def test_bench_baseline_computes_the_same():
    """The benchmark's torch reference (sort + torch._grouped_mm + index_add_) is the same function."""
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch has no _grouped_mm")
    from torch_ext.bench.suites.moe import _torch_grouped_reference

    args = _problem(10, 5, 2, 16, 8, torch.float32, "cpu", fresh_seed())
    assert relative_error(_torch_grouped_reference(*args), fused_moe(*args)) < 1e-5


# CUDA: one token on the row-expert GEMMs (a CTA per pair); then the pairs grouped by expert on the
# device, in blocks of 16 rows (8, 40 tokens: <= 16 rows per expert on average) or 64 (100, and
# 300 tokens all on experts 0 and 1: several blocks per expert, most of the grid idle); 900 tokens
# (300 rows per expert) run per expert (dequantize + cuBLAS).
QUANTIZED_ROUTINGS = {"T1": (1, None), "T8": (8, None), "T40": (40, None), "T100": (100, None),
                      "T300-two-experts": (300, torch.tensor([[0, 1]]).repeat(300, 1)), "T900": (900, None)}


@pytest.mark.parametrize("bits,group_size,symmetric", [(4, 128, False), (4, 32, True), (8, -1, False)])
@pytest.mark.parametrize("routing", QUANTIZED_ROUTINGS)
def test_quantized_experts_match_dequantized(device, bits, group_size, symmetric, routing):
    """fused_moe_quantized equals fused_moe on the dequantized experts (K = 40: a partial group)."""
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    seed = fresh_seed()
    tokens, route = QUANTIZED_ROUTINGS[routing]
    problem = _quantized_problem(tokens, 6, 2, 40, 24, dtype, device, seed, bits, group_size, symmetric, route)
    _check_quantized(*problem, dtype, f"{bits}-bit g{group_size} (seed {seed})")


def test_quantized_experts_gradient_and_module():
    from torch_ext.quant import quantize_experts

    seed = fresh_seed()
    h, w13, w2, weights, ids = _problem(7, 5, 2, 32, 16, torch.float32, "cpu", seed)
    q13, q2 = quantize_experts(w13), quantize_experts(w2)
    h.requires_grad_()
    weights.requires_grad_()
    grad_h, grad_w = torch.autograd.grad(torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids).sum(),
                                         (h, weights))
    deq13, deq2 = q13.dequantize(), q2.dequantize()
    ref_h, ref_w = torch.autograd.grad(fused_moe(h, deq13, deq2, weights, ids).sum(), (h, weights))
    assert relative_error(grad_h, ref_h) < 1e-5 and relative_error(grad_w, ref_w) < 1e-5
    layer = torch_ext.nn.FusedMoE(5, 2, 32, 16)
    x = torch.randn(3, 32)
    with torch.no_grad():
        dense = layer(x)
        layer.quantize_experts_(bits=8, group_size=-1)
        quantized = layer(x)
    assert "w13" not in dict(layer.named_parameters()) and layer.w13_qweight.dtype == torch.int32
    assert relative_error(quantized, dense) < 2e-2  # 8-bit per-channel rounding of the experts


def test_quantized_experts_compile_fullgraph():
    from torch_ext.quant import quantize_experts

    h, w13, w2, weights, ids = _problem(6, 4, 2, 32, 16, torch.float32, "cpu", fresh_seed())
    q13, q2 = quantize_experts(w13, group_size=16), quantize_experts(w2, group_size=16)
    compiled = torch.compile(lambda x: torch_ext.ops.fused_moe_quantized(x, q13, q2, weights, ids) + 1.0,
                             fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(h), torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids) + 1.0)


def test_quantized_experts_opcheck_and_bad_inputs():
    from torch_ext.quant import quantize_experts

    h, w13, w2, weights, ids = _problem(5, 4, 2, 32, 16, torch.float32, "cpu", fresh_seed())
    q13, q2 = quantize_experts(w13, group_size=32), quantize_experts(w2, group_size=16)
    args = (h, q13.qweight, q13.scales, q13.zeros, q2.qweight, q2.scales, q2.zeros, weights, ids, "silu", 4, 16)
    with pytest.raises(ValueError, match="share bits and group_size"):
        torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids)
    q13 = quantize_experts(w13, group_size=16)
    args = (h, q13.qweight, q13.scales, q13.zeros, q2.qweight, q2.scales, q2.zeros, weights, ids, "silu", 4, 16)
    torch.library.opcheck(torch.ops.torch_ext.fused_moe_quantized, args)
    with pytest.raises(RuntimeError, match="topk_ids entry must be in"):
        torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids + 10)
    with pytest.raises(RuntimeError, match="w2_scales must be"):
        torch_ext.ops.fused_moe_quantized(h, q13, quantize_experts(w2[:, :-1], group_size=16), weights, ids)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [3, 200])  # the decode kernels and the grouped GEMMs
def test_cuda_graph_capture(tokens):
    """No host sync in the routing or the grouping: the layer captures in a CUDA graph and
    replays to the eager result on new inputs."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    h, w13, w2, _, _ = _problem(tokens, 8, 2, 64, 48, torch.bfloat16, "cuda", fresh_seed())
    _check_graph_replay(h, lambda weights, ids: fused_moe(h, w13, w2, weights, ids))


# (T, E, k, H, I) for the Hopper grouped GEMMs (T k > 64): K tails inside a 64-value stage, gate
# tiles past I and W2 tiles past H, several n blocks, E = 60 with most experts idle, k = 1.
HOPPER_SHAPES = [(100, 8, 2, 264, 200), (70, 60, 4, 128, 64), (300, 4, 1, 520, 136), (65, 3, 3, 1024, 392)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=lambda s: "T{}E{}k{}H{}I{}".format(*s))
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_hopper_grouped_gemms(monkeypatch, hopper_build, dtype, shape, activation):
    """fused_moe's GEMMs on Hopper wgmma (TORCH_EXT_MOE_WGMMA=1, the torch._grouped_mm forward
    off) against float64 and against the mma.sync kernels (the same act rounding, another fp32
    summation order), deterministic; also with every token on the same k experts (many 128-row
    tiles per expert)."""
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", "0")
    seed = fresh_seed()
    hot = torch.zeros(shape[0], shape[2], dtype=torch.int32)
    hot[:, 1:] = torch.arange(1, shape[2], dtype=torch.int32)  # distinct experts per token
    for ids in (None, hot):
        args = _problem(*shape, dtype, "cuda", seed, ids=ids)
        monkeypatch.setenv("TORCH_EXT_MOE_WGMMA", "1")
        _check_forward(args, activation, dtype, f"hopper {shape} {activation} (seed {seed})")
        out = fused_moe(*args, activation)
        assert torch.equal(out, fused_moe(*args, activation))
        monkeypatch.setenv("TORCH_EXT_MOE_WGMMA", "0")
        assert relative_error(out, fused_moe(*args, activation)) < RELATIVE_ERROR_BOUNDS[dtype]


def _tma_equals_ring(monkeypatch, shape, dtype, check_names=True):
    """fused_moe through the copy-engine variant of the Hopper GEMMs (TORCH_EXT_MOE_WGMMA_TMA=1:
    B by TMA, shared by 2-CTA clusters within an expert) and through the cp.async ones: the same
    bits (the same stage batches in the same order on the same shared data). Two routings: spread
    (adjacent 128-row blocks mostly in different experts: each CTA fetches its own B) and every
    token on the same k experts (many blocks per expert: clusters share B)."""
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", "0")
    monkeypatch.setenv("TORCH_EXT_MOE_WGMMA", "1")
    seed = fresh_seed()
    hot = torch.zeros(shape[0], shape[2], dtype=torch.int32)
    hot[:, 1:] = torch.arange(1, shape[2], dtype=torch.int32)
    for ids in (None, hot):
        args = _problem(*shape, dtype, "cuda", seed, ids=ids)
        results = []
        for flag, kernel in (("1", "grouped_tma_kernel"), ("0", "grouped_wgmma_kernel")):
            monkeypatch.setenv("TORCH_EXT_MOE_WGMMA_TMA", flag)
            if check_names:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    fused_moe(*args, "silu")
                    torch.cuda.synchronize()
                assert kernel in " ".join(event.name for event in prof.events()), (shape, flag)
            with poisoned_outputs():
                results.append(fused_moe(*args, "silu"))
        assert torch.equal(*results), f"{shape} {dtype} seed {seed}"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", HOPPER_SHAPES, ids=lambda s: "T{}E{}k{}H{}I{}".format(*s))
def test_hopper_tma_gemms_equal_ring(monkeypatch, hopper_build, dtype, shape):
    _tma_equals_ring(monkeypatch, shape, dtype)


@pytest.mark.cuda
def test_hopper_tma_gemms_for_sanitizers(monkeypatch, hopper_build):
    """One small case of the copy-engine variant without the profiler (scripts/gpu_check.sh runs
    it under compute-sanitizer memcheck and racecheck)."""
    _tma_equals_ring(monkeypatch, HOPPER_SHAPES[0], torch.bfloat16, check_names=False)


@pytest.mark.cuda
def test_hopper_grouped_gemms_run_wgmma_kernels(monkeypatch, hopper_build):
    """Which kernels TORCH_EXT_MOE_WGMMA runs (from the profiler, apart from the numeric test,
    which the sanitizers run): wgmma for 16-byte rows outside the decode path, mma.sync for H not
    a multiple of 8 and for decode."""
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", "0")
    seed = fresh_seed()
    for tokens, hidden, choice, want in ((200, 256, "1", True), (200, 256, "0", False), (200, 260, "1", False),
                                         (3, 256, "1", False)):
        monkeypatch.setenv("TORCH_EXT_MOE_WGMMA", choice)
        args = _problem(tokens, 8, 2, hidden, 128, torch.bfloat16, "cuda", seed)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            fused_moe(*args, "silu")
            torch.cuda.synchronize()
        names = " ".join(event.name for event in prof.events())
        assert ("grouped_wgmma_kernel" in names) == want, (tokens, hidden, choice)


@pytest.mark.cuda
def test_hopper_grouped_gemms_graph_capture(monkeypatch, hopper_build):
    """The Hopper GEMMs need no host sync either: the layer captures and replays."""
    monkeypatch.setenv("TORCH_EXT_MOE_GROUPED_FORWARD", "0")
    monkeypatch.setenv("TORCH_EXT_MOE_WGMMA", "1")
    h, w13, w2, _, _ = _problem(200, 8, 2, 256, 192, torch.bfloat16, "cuda", fresh_seed())
    _check_graph_replay(h, lambda weights, ids: fused_moe(h, w13, w2, weights, ids))


def _check_graph_replay(h, experts):
    """Routing from logits and experts(weights, ids) captured in a CUDA graph replay to the eager
    result after the logits and `h` (the hidden rows the experts read) change in place."""
    logits = torch.randn(h.shape[0], 8, device="cuda")

    def layer():
        return experts(*moe_route(logits, 2))

    layer()  # warm-up (allocations) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = layer()
    logits.copy_(torch.randn_like(logits))
    h.copy_(torch.randn_like(h))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, layer())


@pytest.mark.cuda
def test_quantized_decode_device_mismatch():
    """Routing or experts on another device than hidden: a clear error, not a kernel fault."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from torch_ext.quant import quantize_experts

    h, w13, w2, weights, ids = _problem(2, 4, 2, 32, 16, torch.bfloat16, "cuda", fresh_seed())
    q13, q2 = quantize_experts(w13, 4, 32), quantize_experts(w2, 4, 32)
    with pytest.raises(RuntimeError, match="topk_ids must be on the device"):
        torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids.cpu())
    q13_cpu = quantize_experts(w13.cpu(), 4, 32)
    with pytest.raises(RuntimeError, match="must be on the device"):
        torch_ext.ops.fused_moe_quantized(h, q13_cpu, q2, weights, ids)


@pytest.mark.cuda
@pytest.mark.parametrize("tokens", [1, 3, 200])  # row-expert GEMMs, grouped in 16- and 64-row blocks
def test_quantized_cuda_graph_capture(tokens):
    """fused_moe_quantized on CUDA up to 256 rows per expert has no host sync: it captures in a CUDA
    graph and replays to the eager result on new inputs (a new routing: new expert groups)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    h, q13, q2, _, _ = _quantized_problem(tokens, 8, 2, 64, 48, torch.bfloat16, "cuda", fresh_seed())
    _check_graph_replay(h, lambda weights, ids: torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids))


@pytest.mark.cuda
@pytest.mark.parametrize("tokens,switches", [
    (20, {}),                                 # 16-row blocks, expert 0 in 17 of them: two blocks
    (20, {"TORCH_EXT_WO_SPLITS": "4"}),       # every split of an idle block writes zero partials
    (300, {}),                                # 64-row blocks, expert 0 in five
    (300, {"TORCH_EXT_WO_WGMMA": "1"}),       # the same on the Hopper batch kernel (sm_90a)
], ids=["T20", "T20-splits4", "T300", "T300-wgmma"])
def test_quantized_grouped_experts_deep_k(monkeypatch, tokens, switches):
    """The grouped path at H = I = 512 (several pipeline stages, split-K with idle blocks in the
    grid) with expert 0 in most tokens (several blocks of one expert), against the dequantized
    experts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for name, value in switches.items():
        monkeypatch.setenv(name, value)
    seed = fresh_seed()
    ids = torch.tensor([[0, 1 + t % 5] if t < 17 or tokens > 20 else [1, 2] for t in range(tokens)])
    problem = _quantized_problem(tokens, 6, 2, 512, 512, torch.bfloat16, "cuda", seed, group_size=128, ids=ids)
    _check_quantized(*problem, torch.bfloat16, f"T{tokens} {switches} (seed {seed})")


@pytest.mark.cuda
def test_quantized_grouped_experts_never_sync():
    """The grouped path reads nothing back to the host (torch's sync debug mode raises on a sync)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    h, q13, q2, weights, ids = _quantized_problem(40, 8, 2, 64, 48, torch.bfloat16, "cuda", fresh_seed())
    torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids)  # warm-up: first-call set-up may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch_ext.ops.fused_moe_quantized(h, q13, q2, weights, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.cuda
def test_quantized_grouped_experts_for_sanitizers():
    """A small grouped case (E = 60, k = 4: many experts with one or two rows, idle blocks) for
    memcheck and racecheck, against the dequantized experts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    seed = fresh_seed()
    problem = _quantized_problem(13, 60, 4, 40, 24, torch.float16, "cuda", seed, group_size=16)
    _check_quantized(*problem, torch.float16, f"grouped E60 k4 (seed {seed})")


@pytest.mark.cuda
def test_cuda_graph_capture_training():
    """bf16 on sm_90: the fused forward and the grouped-GEMM backward have no host sync, so a whole
    training step (forward, backward to hidden and the expert weights) captures in a CUDA graph."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    if torch.cuda.get_device_capability()[0] != 9 or not hasattr(torch, "_grouped_mm"):
        pytest.skip("the sync-free backward needs sm_90 and torch._grouped_mm")
    h, w13, w2, weights, ids = _problem(200, 8, 2, 64, 48, torch.bfloat16, "cuda", fresh_seed())
    leaves = [t.requires_grad_() for t in (h, w13, w2)]
    grad_out = torch.randn_like(h)

    def step():
        return torch.autograd.grad(fused_moe(*leaves, weights, ids), leaves, grad_out)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up (allocations, lazy inits) outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in (h, grad_out):
            t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(captured, step()):
        assert torch.equal(got, want)


def test_backward_with_idle_experts():
    """Experts without tokens get zero weight gradients (their slices are never touched by a GEMM)."""
    seed = fresh_seed()
    args = [t.requires_grad_() if t.is_floating_point() else t
            for t in _problem(2, 8, 2, 16, 12, torch.float32, "cpu", seed)]
    with poisoned_outputs():
        grads = torch.autograd.grad(fused_moe(*args).sum(), args[:4])
    expected = _reference_grads(args, torch.ones(2, 16), "silu")
    for got, want in zip(grads, expected):
        assert_close_to_reference(got, want, torch.float32, f"seed {seed}")
    idle = torch.ones(8, dtype=torch.bool)
    idle[args[4].long().flatten()] = False
    assert torch.all(grads[1][idle] == 0) and torch.all(grads[2][idle] == 0)
