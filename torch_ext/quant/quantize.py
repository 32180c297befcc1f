"""Round-to-nearest weight quantization into the kernels' packed layout."""

from __future__ import annotations

import torch

from torch_ext.quant import layout
from torch_ext.quant.weight import QuantizedWeight


def check_quant_config(bits: int, group_size: int) -> None:
    if bits not in layout.SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {layout.SUPPORTED_BITS}, got {bits}")
    if group_size != -1 and (group_size <= 0 or group_size % layout.TILE != 0):
        raise ValueError(f"group_size must be -1 (per output channel) or a positive multiple of {layout.TILE}, "
                         f"got {group_size}")


def _group_extrema(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of w [N, K] along K: two [groups, N] tensors (last group partial)."""
    n, k = w.shape
    groups = -(-k // group)
    pad = groups * group - k
    padded_lo = torch.nn.functional.pad(w, (0, pad), value=float("inf")).reshape(n, groups, group)
    padded_hi = torch.nn.functional.pad(w, (0, pad), value=float("-inf")).reshape(n, groups, group)
    return padded_lo.amin(dim=-1).t(), padded_hi.amax(dim=-1).t()


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 128, symmetric: bool = False,
                    scale_dtype: torch.dtype | None = None) -> QuantizedWeight:
    """Quantize w [N, K] (nn.Linear.weight) with round-to-nearest per group of input channels.

    Asymmetric: scale = (max - min) / (2**bits - 1) over the group (its range widened to
    contain 0, so zero stays exact), integer zero point = round(-min / scale). Symmetric:
    scale = absmax / (2**(bits-1) - 1), zero point 2**(bits-1). group_size=-1 quantizes per
    output channel. Scales (and zeros) are stored in `scale_dtype`: default w's dtype when it
    is float16/bfloat16, else float32. The values are rounded with the stored scale.
    """
    check_quant_config(bits, group_size)
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point [N, K] weight, got {w.dtype} {tuple(w.shape)}")
    if scale_dtype is None:
        scale_dtype = w.dtype if w.dtype in (torch.float16, torch.bfloat16) else torch.float32
    n, k = w.shape
    if k == 0:
        raise ValueError(f"w must have at least one input feature, got shape {tuple(w.shape)}")
    group = k if group_size == -1 else group_size
    w64 = w.detach().to(torch.float64)
    max_q = 2**bits - 1
    lo, hi = _group_extrema(w64, group)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi.abs()) / (2 ** (bits - 1) - 1)
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        scale = (hi - lo) / max_q
    # A group of zeros, or one whose scale underflows in scale_dtype (fp16 below ~6e-8), takes
    # scale 1, so that its values (all tinier than one fp16 step) dequantize to 0 rather than a
    # division by the zero scale making NaN zero points.
    scale = scale.to(scale_dtype)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    scale64 = scale.to(torch.float64)
    if not symmetric:
        zero = torch.round(-lo / scale64).clamp(0, max_q)
    group_of_k = torch.arange(k, device=w.device) // group
    q = torch.round(w64 / scale64[group_of_k].t()) + zero[group_of_k].t()
    q = q.clamp(0, max_q).to(torch.int64)
    qweight = layout.pack_qweight(q, bits, pad_value=zero[-1].to(torch.int64))
    zeros = None if symmetric else zero.to(scale_dtype).contiguous()  # the kernels read [groups, N] rows
    return QuantizedWeight(qweight, scale.contiguous(), zeros, bits, group_size, (n, k))
