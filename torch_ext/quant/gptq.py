"""Import of GPTQ v1 checkpoints (AutoGPTQ's format, 4- and 8-bit) into the kernels' layout.

The facts relied on (AutoGPTQ's v1 layout, ../shared/reference/quant-formats.md), with
K = in_features, N = out_features, G = group size, P = 32 / bits values per int32 word:
- `qweight`: int32 [K / P, N], packed along K in order: value j of word (r, n) (bits
  j*bits and up) is q[P r + j, n].
- `qzeros`: int32 [ceil(K/G), N / P], packed along N in the same sequential order, and stored
  as z - 1: the zero point is the unpacked value + 1, which reaches 2**bits when the stored
  value is all ones (kept: the kernels take zero points as floats, so q - 2**bits is exact).
- `scales`: float16 [ceil(K/G), N]; the last group may be partial (K = 10944 at G = 128).
- `g_idx`: int32 [K], the group of each input channel: k // G, or with act-order (desc_act)
  the channel's position in the quantization order // G, so every group holds G channels
  (the last one at most G).
- W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n].
The group size is not stored: it comes from g_idx's group counts or, without g_idx, from K
and the number of scale rows (see infer_group_size).
"""

from __future__ import annotations

import torch

from torch_ext.quant import _checkpoint, layout
from torch_ext.quant.weight import QuantizedWeight

UNSUPPORTED_BITS = (2, 3)


def _check_bits(bits: int) -> None:
    if bits in UNSUPPORTED_BITS:
        raise ValueError(f"{bits}-bit GPTQ checkpoints are unsupported: the kernels take bits in "
                         f"{layout.SUPPORTED_BITS}")
    if bits not in layout.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {layout.SUPPORTED_BITS}, got {bits}")


def _power_of_two_group(k: int, groups: int) -> int | None:
    """The power of two G >= 16 with ceil(K / G) == groups, if any (at most one when groups >= 2)."""
    g = layout.TILE
    while g < k:
        if -(-k // g) == groups:
            return g
        g *= 2
    return None


def infer_group_size(k: int, groups: int) -> int:
    """The group size of a checkpoint without g_idx: -1 (per channel) for one scale row, else G
    with ceil(K / G) == groups, a multiple of 16.

    GPTQ group sizes are powers of two (32, 64, 128), possibly with a partial last group; an
    exact divisor G = K / groups is accepted too. When both exist and differ (K = 160 with two
    rows: 128 or 80) the checkpoint is ambiguous and g_idx is needed.
    """
    if groups == 1:
        return -1
    power = _power_of_two_group(k, groups)
    exact = k // groups if k % groups == 0 and (k // groups) % layout.TILE == 0 else None
    if power is not None and exact is not None and power != exact:
        raise ValueError(f"ambiguous group size for in_features={k} and {groups} scale rows: {power} (last group "
                         f"partial) or {exact}; pass g_idx")
    group = power if power is not None else exact
    if group is None:
        raise ValueError(f"cannot infer a group size that is a multiple of {layout.TILE} from in_features={k} and "
                         f"{groups} scale rows (ceil(K / G) must equal the rows)")
    return group


def _check_g_idx(g_idx: torch.Tensor, qweight: torch.Tensor, k: int, groups: int) -> None:
    _checkpoint.require_tensor("g_idx", g_idx)
    _checkpoint.require_same_device(qweight=qweight, g_idx=g_idx)
    if g_idx.dtype not in (torch.int32, torch.int64) or tuple(g_idx.shape) != (k,):
        raise ValueError(f"g_idx must be an int32 (or int64) tensor of shape ({k},) (in_features = "
                         f"qweight.shape[0] * 32 / bits), got {_checkpoint.describe(g_idx)}")
    low, high = int(g_idx.min()), int(g_idx.max())
    if low < 0 or high >= groups:
        raise ValueError(f"g_idx values must lie in [0, {groups}) (scale rows), got [{low}, {high}]")


def group_size_from_g_idx(g_idx: torch.Tensor, groups: int) -> int:
    """G from the group counts of g_idx: every group but the last holds G channels, the last
    1 to G; G a multiple of 16, or -1 (per channel) for one group."""
    if groups == 1:
        return -1
    counts = torch.bincount(g_idx.to(torch.int64), minlength=groups).cpu()
    group = int(counts[0])
    last = int(counts[-1])
    if not bool((counts[:-1] == group).all()) or not 0 < last <= group:
        raise ValueError(f"g_idx groups must all hold the same number of input channels (except a smaller last one), "
                         f"got counts {sorted(set(counts.tolist()))}")
    if group % layout.TILE != 0:
        raise ValueError(f"group size from g_idx must be a multiple of {layout.TILE}, got {group}")
    return group


def act_order_perm(g_idx: torch.Tensor) -> torch.Tensor | None:
    """The input-channel order that makes groups contiguous (stable sort of g_idx), or None
    when g_idx is already sorted (no act-order)."""
    if bool((g_idx[1:] >= g_idx[:-1]).all()):
        return None
    return torch.argsort(g_idx.to(torch.int64), stable=True)


def _check_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, bits: int) -> None:
    _check_bits(bits)
    _checkpoint.require_int32_matrix("qweight", qweight)
    _checkpoint.require_int32_matrix("qzeros", qzeros)
    _checkpoint.require_scales(scales)
    _checkpoint.require_same_device(qweight=qweight, qzeros=qzeros, scales=scales)
    per_word = layout.values_per_word(bits)
    n = qweight.shape[1]
    groups = scales.shape[0]
    _checkpoint.require_shape("scales", scales, (groups, n), f"[groups, N] with N = qweight.shape[1] = {n}")
    _checkpoint.require_shape("qzeros", qzeros, (groups, -(-n // per_word)),
                              f"[groups, N * {bits} / 32] with groups = scales.shape[0] = {groups}, N = {n}")


def unpack_gptq_zeros(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """int32 [groups, N * bits / 32] -> int64 zero points [groups, N] (stored value + 1)."""
    return _checkpoint.unpack_words(qzeros, bits)[:, :n] + 1


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None = None,
              bits: int = 4, sym: bool = True) -> QuantizedWeight:
    """QuantizedWeight from the tensors of one GPTQ v1 (AutoGPTQ) layer, exactly as stored.

    qweight int32 [K * bits / 32, N], qzeros int32 [groups, N * bits / 32], scales [groups, N]
    (float16 as AutoGPTQ writes it; bfloat16 / float32 kept too), optional g_idx [K]. With
    act-order the input channels are sorted by group into `perm`. Zero points are always read
    from qzeros; `sym` only says the checkpoint is symmetric, and then zeros=None when every
    zero point is 2**(bits-1). The result lives on the inputs' device.
    """
    _check_gptq(qweight, qzeros, scales, bits)
    k, n = qweight.shape[0] * layout.values_per_word(bits), qweight.shape[1]
    groups = scales.shape[0]
    if g_idx is None:
        group_size, perm = infer_group_size(k, groups), None
    else:
        _check_g_idx(g_idx, qweight, k, groups)
        group_size, perm = group_size_from_g_idx(g_idx, groups), act_order_perm(g_idx)
    q = _checkpoint.unpack_words(qweight.t(), bits)  # [N, K]
    if perm is not None:
        q = q[:, perm]
    zeros = unpack_gptq_zeros(qzeros, bits, n)
    if sym and bool((zeros == 2 ** (bits - 1)).all()):
        zeros = None
    return _checkpoint.build_quantized_weight(q, scales, zeros, bits, group_size, perm)
