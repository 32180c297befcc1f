"""Import of AutoAWQ "GEMM" checkpoints (4-bit) into the kernels' packed layout.

The facts relied on (AutoAWQ's GEMM layout, ../shared/reference/quant-formats.md), with
K = in_features, N = out_features, G = group size:
- `qweight`: int32 [K, N/8], packed along N: nibble i of word (k, c) (bits 4i to 4i + 3)
  holds the weight of column 8c + [0, 2, 4, 6, 1, 3, 5, 7][i].
- `qzeros`: int32 [K/G, N/8], the same packing and interleave, raw zero points (no offset).
- `scales`: float16 [K/G, N].
- W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]; AutoAWQ only quantizes with G dividing K,
  and group size -1 means one group over all of K.
"""

from __future__ import annotations

import torch

from torch_ext.quant import _checkpoint
from torch_ext.quant.quantize import check_quant_config
from torch_ext.quant.weight import QuantizedWeight

BITS = 4
PER_WORD = 8
# Position in a word of column j of an 8-column block: the inverse of AutoAWQ's interleave.
_COLUMN_TO_NIBBLE = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """int32 [R, N/8] in AutoAWQ's interleaved order -> int64 [R, N] in column order."""
    rows, blocks = words.shape
    nibbles = _checkpoint.unpack_words(words, BITS).reshape(rows, blocks, PER_WORD)
    return nibbles[:, :, _COLUMN_TO_NIBBLE.to(words.device)].reshape(rows, blocks * PER_WORD)


def _groups(k: int, group_size: int) -> int:
    """Number of scale rows for K input channels; AutoAWQ requires G to divide K."""
    check_quant_config(BITS, group_size)
    if group_size == -1:
        return 1
    if k % group_size != 0:
        raise ValueError(f"AutoAWQ checkpoints have group_size dividing in_features, got group_size={group_size} "
                         f"and in_features=qweight.shape[0]={k}")
    return k // group_size


def _check_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> None:
    _checkpoint.require_int32_matrix("qweight", qweight)
    _checkpoint.require_int32_matrix("qzeros", qzeros)
    _checkpoint.require_scales(scales)
    _checkpoint.require_same_device(qweight=qweight, qzeros=qzeros, scales=scales)
    k, n = qweight.shape[0], qweight.shape[1] * PER_WORD
    groups = _groups(k, group_size)
    _checkpoint.require_shape("scales", scales, (groups, n),
                              f"[K/G, N] for K={k}, G={group_size}, N=8*qweight.shape[1]={n}")
    _checkpoint.require_shape("qzeros", qzeros, (groups, n // PER_WORD),
                              f"[K/G, N/8] for K={k}, G={group_size}, N={n}")


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantizedWeight:
    """QuantizedWeight from the tensors of one AutoAWQ GEMM layer, exactly as stored.

    qweight int32 [K, N/8], qzeros int32 [K/G, N/8], scales [K/G, N] (float16 as AutoAWQ
    writes it; bfloat16 / float32 are kept too); group_size G, or -1 for one group over K.
    The result lives on the inputs' device; scales keep their dtype and the zero points are
    always kept, as integers in the scales' dtype.
    """
    _check_awq(qweight, qzeros, scales, group_size)
    q = unpack_awq(qweight).t()  # [N, K]
    zeros = unpack_awq(qzeros)  # [groups, N]
    return _checkpoint.build_quantized_weight(q, scales, zeros, BITS, group_size)
