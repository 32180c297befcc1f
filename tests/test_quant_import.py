"""Checkpoint import: AutoAWQ GEMM and GPTQ v1 tensors, made here by packers written from the
format description (../shared/reference/quant-formats.md), imported with from_awq / from_gptq,
must dequantize exactly (float64, element for element) to (q - z) * s; bad inputs raise."""

import re

import pytest
import torch

from torch_ext import reference
from torch_ext.quant import QuantizedWeight, from_awq, from_gptq, unpack_qweight
from torch_ext.quant.gptq import infer_group_size
from torch_ext.testing import fresh_seed

AWQ_NIBBLE_COLUMNS = [0, 2, 4, 6, 1, 3, 5, 7]  # nibble i of an AWQ word holds column 8c + this[i]


# ---- independent packers, from the format description ----

def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Unsigned 32-bit values in int64 -> the same bits as int32."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _pack_sequential(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 [R, C] -> int32 [R, ceil(C * bits / 32)]: value c at word c // P, bits (c % P) * bits."""
    per_word = 32 // bits
    rows, cols = values.shape
    padded = torch.zeros((rows, -(-cols // per_word) * per_word), dtype=torch.int64)
    padded[:, :cols] = values
    words = torch.zeros((rows, padded.shape[1] // per_word), dtype=torch.int64)
    for slot in range(per_word):
        words |= padded[:, slot::per_word] << (slot * bits)
    return _to_int32(words)


def awq_pack(values: torch.Tensor) -> torch.Tensor:
    """int64 [R, N] -> AutoAWQ's int32 [R, N/8], columns interleaved [0, 2, 4, 6, 1, 3, 5, 7]."""
    words = torch.zeros((values.shape[0], values.shape[1] // 8), dtype=torch.int64)
    for nibble, column in enumerate(AWQ_NIBBLE_COLUMNS):
        words |= values[:, column::8] << (4 * nibble)
    return _to_int32(words)


def gptq_pack_qweight(q: torch.Tensor, bits: int) -> torch.Tensor:
    """q [K, N] -> int32 [K * bits / 32, N], packed along K."""
    return _pack_sequential(q.t(), bits).t().contiguous()


def gptq_pack_qzeros(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points [groups, N] in [1, 2**bits] -> int32 [groups, N * bits / 32] storing z - 1."""
    return _pack_sequential(zeros - 1, bits)


# ---- random checkpoints and the expected weight ----

def _draw(seed: int, bits: int, k: int, n: int, groups: int, zero_low: int, zero_high: int):
    """Random q [K, N], zero points [groups, N] in [zero_low, zero_high] (both ends present)
    and positive fp16 scales [groups, N]."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (k, n), generator=generator)
    zeros = torch.randint(zero_low, zero_high + 1, (groups, n), generator=generator)
    zeros[0, 0], zeros[-1, -1] = zero_high, zero_low
    scales = (torch.rand((groups, n), generator=generator, dtype=torch.float64) * 0.05 + 1e-3).to(torch.float16)
    return q, zeros, scales


def expected_weight(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_of_k: torch.Tensor):
    """W [N, K] = (q[k, n] - z[g(k), n]) * s[g(k), n] in float64."""
    return ((q - zeros[group_of_k]).to(torch.float64) * scales[group_of_k].to(torch.float64)).t()


dequantized = reference.quant.original_weight


def assert_exact(qw: QuantizedWeight, want: torch.Tensor, what: str) -> None:
    got = dequantized(qw)
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    mismatches = int((got != want).sum())
    assert mismatches == 0, f"{what}: {mismatches} elements differ, max |diff| {(got - want).abs().max().item():.3e}"


def act_order_g_idx(seed: int, k: int, group_size: int) -> torch.Tensor:
    """What desc_act produces: each channel's position in a random order, // G."""
    order = torch.randperm(k, generator=torch.Generator().manual_seed(seed))
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[order] = (torch.arange(k) // group_size).to(torch.int32)
    return g_idx


# ---- AutoAWQ ----

@pytest.mark.parametrize("n", [40, 24])
@pytest.mark.parametrize("group_size,k", [(32, 160), (64, 192), (128, 384), (-1, 200)])
def test_awq_dequantizes_exactly(device, group_size, k, n):
    seed = fresh_seed()
    groups = 1 if group_size == -1 else k // group_size
    q, zeros, scales = _draw(seed, 4, k, n, groups, 0, 15)
    qw = from_awq(awq_pack(q).to(device), awq_pack(zeros).to(device), scales.to(device), group_size)
    what = f"AWQ K={k} N={n} G={group_size} seed {seed}"
    assert qw.device.type == device and qw.scales.device.type == device, what
    assert (qw.bits, qw.group_size, qw.shape, qw.perm) == (4, group_size, (n, k), None), what
    assert qw.scales.dtype == torch.float16 and qw.zeros.dtype == torch.float16, what
    group_of_k = torch.arange(k) // (k if group_size == -1 else group_size)
    assert_exact(qw, expected_weight(q, zeros, scales, group_of_k), what)


def test_awq_interleave_known_word():
    """Nibbles 0..7 in order (0x76543210) are columns [0, 4, 1, 5, 2, 6, 3, 7] after the interleave;
    zero word 0x01234567 gives zero points [7, 3, 6, 2, 5, 1, 4, 0]."""
    k = 16
    qweight = torch.full((k, 1), 0x76543210, dtype=torch.int32)
    qzeros = torch.tensor([[0x01234567]], dtype=torch.int32)
    qw = from_awq(qweight, qzeros, torch.ones((1, 8), dtype=torch.float16), -1)
    row = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7], dtype=torch.float64) - torch.tensor([7, 3, 6, 2, 5, 1, 4, 0])
    assert torch.equal(dequantized(qw), row.reshape(8, 1).expand(8, k))


def _awq_inputs(seed, k=128, n=40, group_size=32):
    groups = k // group_size
    q, zeros, scales = _draw(seed, 4, k, n, groups, 0, 15)
    return dict(qweight=awq_pack(q), qzeros=awq_pack(zeros), scales=scales, group_size=group_size)


@pytest.mark.parametrize("change,message", [
    (dict(qweight=lambda t: t.to(torch.int64)), "qweight must be a non-empty 2-D torch.int32 tensor"),
    (dict(qzeros=lambda t: t.to(torch.int16)), "qzeros must be a non-empty 2-D torch.int32 tensor"),
    (dict(scales=lambda t: t.to(torch.float64)), "scales must be a 2-D tensor of dtype"),
    (dict(scales=lambda t: t[:2]), re.escape("scales must have shape (4, 40) ([K/G, N] for K=128, G=32")),
    (dict(scales=lambda t: t[:, :32]), re.escape("scales must have shape (4, 40)")),
    (dict(qzeros=lambda t: t[:, :4]), re.escape("qzeros must have shape (4, 5)")),
    (dict(group_size=lambda g: 48), "group_size dividing in_features, got group_size=48 and in_features"),
    (dict(group_size=lambda g: 100), "group_size must be -1 .* or a positive multiple of 16, got 100"),
    (dict(scales=lambda t: t.to("meta")), "all tensors must be on one device"),
])
def test_awq_rejects_bad_inputs(change, message):
    seed = fresh_seed()
    inputs = _awq_inputs(seed)
    for name, modify in change.items():
        inputs[name] = modify(inputs[name])
    with pytest.raises(ValueError, match=message):
        from_awq(**inputs)


# ---- GPTQ v1 ----

def _gptq_zero_range(bits: int, sym: bool) -> tuple[int, int]:
    """Symmetric files store 2**(bits-1) - 1 (zero 2**(bits-1)); asymmetric ones any stored value,
    so zero points span [1, 2**bits] (stored all ones -> 2**bits)."""
    return (2 ** (bits - 1),) * 2 if sym else (1, 2**bits)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group_size,n", [(10944, 128, 24), (256, 32, 40), (384, 64, 24), (200, -1, 40)])
def test_gptq_dequantizes_exactly(device, bits, sym, k, group_size, n):
    seed = fresh_seed()
    group = k if group_size == -1 else group_size
    groups = -(-k // group)
    q, zeros, scales = _draw(seed, bits, k, n, groups, *_gptq_zero_range(bits, sym))
    qw = from_gptq(gptq_pack_qweight(q, bits).to(device), gptq_pack_qzeros(zeros, bits).to(device), scales.to(device),
                   bits=bits, sym=sym)
    what = f"GPTQ {bits}-bit sym={sym} K={k} N={n} G={group_size} seed {seed}"
    assert qw.device.type == device, what
    assert (qw.bits, qw.group_size, qw.shape, qw.perm, qw.groups) == (bits, group_size, (n, k), None, groups), what
    if sym:
        assert qw.zeros is None, what
    else:
        assert qw.zeros.dtype == torch.float16 and qw.zeros.max().item() == 2**bits, what
    assert_exact(qw, expected_weight(q, zeros, scales, torch.arange(k) // group), what)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,group_size", [(10944, 128), (384, 32)])
def test_gptq_act_order(device, bits, k, group_size):
    seed = fresh_seed()
    n = 24
    g_idx = act_order_g_idx(seed, k, group_size)
    q, zeros, scales = _draw(seed + 1, bits, k, n, -(-k // group_size), 1, 2**bits)
    qw = from_gptq(gptq_pack_qweight(q, bits).to(device), gptq_pack_qzeros(zeros, bits).to(device), scales.to(device),
                   g_idx.to(device), bits=bits, sym=False)
    what = f"GPTQ act-order {bits}-bit K={k} G={group_size} seed {seed}"
    assert qw.group_size == group_size and qw.perm is not None and qw.perm.device.type == device, what
    perm = qw.perm.cpu()
    assert torch.equal(perm.sort().values, torch.arange(k)), what
    assert torch.equal(g_idx[perm].long(), torch.arange(k) // group_size), f"{what}: groups not contiguous"
    assert_exact(qw, expected_weight(q, zeros, scales, g_idx.long()), what)


@pytest.mark.parametrize("k,group_size", [(10944, 128), (200, -1)])
def test_gptq_trivial_g_idx_has_no_perm(k, group_size):
    seed = fresh_seed()
    group = k if group_size == -1 else group_size
    g_idx = (torch.arange(k) // group).to(torch.int32)
    q, zeros, scales = _draw(seed, 4, k, 40, -(-k // group), 1, 16)
    qw = from_gptq(gptq_pack_qweight(q, 4), gptq_pack_qzeros(zeros, 4), scales, g_idx, sym=False)
    what = f"GPTQ trivial g_idx K={k} G={group_size} seed {seed}"
    assert qw.perm is None and qw.group_size == group_size, what
    assert_exact(qw, expected_weight(q, zeros, scales, g_idx.long()), what)


def test_gptq_stored_all_ones_is_zero_point_2_pow_bits():
    """A stored nibble 15 means zero point 16: (q - 16) * s, kept exactly."""
    seed = fresh_seed()
    k, n = 64, 24
    q, _, scales = _draw(seed, 4, k, n, 2, 1, 16)
    qzeros = torch.full((2, n // 8), -1, dtype=torch.int32)  # every nibble 15
    qw = from_gptq(gptq_pack_qweight(q, 4), qzeros, scales, sym=False)
    assert bool((qw.zeros == 16).all()), f"seed {seed}"
    assert_exact(qw, expected_weight(q, torch.full((2, n), 16), scales, torch.arange(k) // 32), f"seed {seed}")


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_sym_flag_only_drops_uniform_midpoint_zeros(bits):
    seed = fresh_seed()
    k, n = 128, 24
    q, zeros, scales = _draw(seed, bits, k, n, 4, 1, 2**bits)
    qweight = gptq_pack_qweight(q, bits)
    midpoint = torch.full_like(zeros, 2 ** (bits - 1))
    mixed = from_gptq(qweight, gptq_pack_qzeros(zeros, bits), scales, bits=bits, sym=True)
    assert mixed.zeros is not None, f"sym=True with non-midpoint zeros must keep them (seed {seed})"
    assert_exact(mixed, expected_weight(q, zeros, scales, torch.arange(k) // 32), f"sym mixed seed {seed}")
    uniform = from_gptq(qweight, gptq_pack_qzeros(midpoint, bits), scales, bits=bits, sym=False)
    assert uniform.zeros is not None, f"sym=False keeps zeros (seed {seed})"
    assert_exact(uniform, expected_weight(q, midpoint, scales, torch.arange(k) // 32), f"asym midpoint seed {seed}")


@pytest.mark.parametrize("k,groups,group_size", [(10944, 86, 128), (4096, 32, 128), (4096, 64, 64), (4096, 1, -1),
                                                 (4096, 2, 2048), (960, 10, 96), (1000, 8, 128)])
def test_gptq_infer_group_size(k, groups, group_size):
    assert infer_group_size(k, groups) == group_size


@pytest.mark.parametrize("k,groups,message", [(160, 2, "ambiguous group size for in_features=160 .* 128 .* or 80"),
                                              (1000, 10, "cannot infer a group size that is a multiple of 16"),
                                              (128, 9, "cannot infer a group size")])
def test_gptq_infer_group_size_errors(k, groups, message):
    with pytest.raises(ValueError, match=message):
        infer_group_size(k, groups)


def _gptq_inputs(seed, k=128, n=40, group_size=32, bits=4):
    q, zeros, scales = _draw(seed, bits, k, n, -(-k // group_size), 1, 2**bits)
    return dict(qweight=gptq_pack_qweight(q, bits), qzeros=gptq_pack_qzeros(zeros, bits), scales=scales,
                g_idx=(torch.arange(k) // group_size).to(torch.int32), bits=bits, sym=False)


def _unequal_groups(g_idx):
    """An act-order g_idx with one channel moved from group 1 to group 0 (counts 33, 31, 32, 32)."""
    moved = act_order_g_idx(fresh_seed(), g_idx.numel(), 32)
    moved[torch.nonzero(moved == 1)[0]] = 0
    return moved


@pytest.mark.parametrize("change,message", [
    (dict(bits=lambda b: 3), "3-bit GPTQ checkpoints are unsupported"),
    (dict(bits=lambda b: 2), "2-bit GPTQ checkpoints are unsupported"),
    (dict(bits=lambda b: 5), re.escape("bits must be one of (4, 8), got 5")),
    (dict(qweight=lambda t: t.to(torch.int64)), "qweight must be a non-empty 2-D torch.int32 tensor"),
    (dict(qzeros=lambda t: t.float()), "qzeros must be a non-empty 2-D torch.int32 tensor"),
    (dict(scales=lambda t: t.to(torch.int32)), "scales must be a 2-D tensor of dtype"),
    (dict(scales=lambda t: t[:, :32]), re.escape("scales must have shape (4, 40)")),
    (dict(qzeros=lambda t: t[:, :4]), re.escape("qzeros must have shape (4, 5)")),
    (dict(qzeros=lambda t: t[:3]), re.escape("qzeros must have shape (4, 5)")),
    (dict(g_idx=lambda t: t[:100]), re.escape("g_idx must be an int32 (or int64) tensor of shape (128,)")),
    (dict(g_idx=lambda t: t.float()), "g_idx must be an int32"),
    (dict(g_idx=lambda t: t + 1), re.escape("g_idx values must lie in [0, 4)")),
    (dict(g_idx=_unequal_groups), "g_idx groups must all hold the same number of input channels"),
    (dict(g_idx=lambda t: (torch.arange(128) // 40).to(torch.int32)), "group size from g_idx must be a multiple of 16"),
    (dict(g_idx=lambda t: None, scales=lambda t: t[:3], qzeros=lambda t: t[:3]), "cannot infer a group size"),
    (dict(scales=lambda t: t.to("meta")), "all tensors must be on one device"),
])
def test_gptq_rejects_bad_inputs(change, message):
    seed = fresh_seed()
    inputs = _gptq_inputs(seed)
    for name, modify in change.items():
        inputs[name] = modify(inputs[name])
    with pytest.raises(ValueError, match=message):
        from_gptq(**inputs)


# ---- padding ----

def padded_columns(qw: QuantizedWeight) -> torch.Tensor:
    """The integers the last tiles hold in columns k >= K of rows n < N: [N, padding]."""
    n, k = qw.shape
    full = unpack_qweight(qw.qweight.cpu(), qw.bits, 16 * qw.qweight.shape[0], 16 * qw.qweight.shape[1])
    return full[:n, k:]


@pytest.mark.parametrize("fmt", ["awq", "gptq_asym", "gptq_sym"])
def test_padding_holds_the_last_group_zero(fmt):
    """Columns past K (K = 200: 8 of them) hold the row's last-group zero point, so they
    dequantize to 0; a GPTQ zero point of 16 does not fit in a nibble and is padded with 15."""
    seed = fresh_seed()
    k, n = 200, 40
    if fmt == "awq":  # AutoAWQ needs G | K: per channel, one group
        q, zeros, scales = _draw(seed, 4, k, n, 1, 0, 15)
        zeros[-1, 1] = 15
        qw = from_awq(awq_pack(q), awq_pack(zeros), scales, -1)
    else:  # G = 32: 7 groups, the last of 8 channels
        q, zeros, scales = _draw(seed, 4, k, n, 7, *_gptq_zero_range(4, fmt == "gptq_sym"))
        zeros[-1, 1] = zeros.max()  # 16 (stored 15) when asymmetric
        qw = from_gptq(gptq_pack_qweight(q, 4), gptq_pack_qzeros(zeros, 4), scales, sym=fmt == "gptq_sym")
    pad = padded_columns(qw)
    want = zeros[-1].clamp(max=15).reshape(n, 1).expand(n, 8)
    assert torch.equal(pad, want), f"{fmt} seed {seed}: padding {pad[:, 0].tolist()} != {want[:, 0].tolist()}"


# ---- dtype conversion ----

@pytest.mark.parametrize("fmt", ["awq", "gptq4", "gptq8"])
def test_to_bfloat16_keeps_the_weight(fmt):
    """Zero points (up to 256) are exact in bf16: only the scales round."""
    seed = fresh_seed()
    k, n, group_size = 256, 40, 64
    group_of_k = torch.arange(k) // group_size
    if fmt == "awq":
        q, zeros, scales = _draw(seed, 4, k, n, k // group_size, 0, 15)
        qw = from_awq(awq_pack(q), awq_pack(zeros), scales, group_size)
    else:
        bits = int(fmt[-1])
        q, zeros, scales = _draw(seed, bits, k, n, k // group_size, 1, 2**bits)
        g_idx = act_order_g_idx(seed, k, group_size)
        group_of_k = g_idx.long()
        qw = from_gptq(gptq_pack_qweight(q, bits), gptq_pack_qzeros(zeros, bits), scales, g_idx, bits=bits, sym=False)
    bf16 = qw.to(dtype=torch.bfloat16)
    what = f"{fmt} seed {seed}"
    assert bf16.scales.dtype == torch.bfloat16 and bf16.zeros.dtype == torch.bfloat16, what
    assert torch.equal(bf16.qweight, qw.qweight) and (qw.perm is None or torch.equal(bf16.perm, qw.perm)), what
    assert_exact(bf16, expected_weight(q, zeros, scales.to(torch.bfloat16), group_of_k), what)
    original = dequantized(qw)
    assert bool(((dequantized(bf16) - original).abs() <= 2.0**-8 * original.abs()).all()), what
