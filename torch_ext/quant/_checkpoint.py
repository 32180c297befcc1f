"""What the checkpoint importers (awq.py, gptq.py) share: argument checks, unpacking of int32
words into small unsigned integers, and assembling the QuantizedWeight."""

from __future__ import annotations

import torch

from torch_ext.quant import layout
from torch_ext.quant.weight import QuantizedWeight

SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def describe(t: torch.Tensor) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}"


def require_tensor(name: str, t: object) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def require_int32_matrix(name: str, t: torch.Tensor) -> None:
    """`t` is a 2-D int32 tensor (how AutoAWQ and AutoGPTQ store packed words)."""
    require_tensor(name, t)
    if t.dtype != torch.int32 or t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 2-D torch.int32 tensor of packed words, got {describe(t)}")


def require_scales(scales: torch.Tensor) -> None:
    require_tensor("scales", scales)
    if scales.dtype not in SCALE_DTYPES or scales.dim() != 2:
        raise ValueError(f"scales must be a 2-D tensor of dtype {' / '.join(map(str, SCALE_DTYPES))}, "
                         f"got {describe(scales)}")


def require_shape(name: str, t: torch.Tensor, expected: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {expected} ({meaning}), got {tuple(t.shape)}")


def require_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        placed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {placed}")


def unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., W] -> int64 [..., W * 32 / bits]: value j of word w (bits j*bits and up,
    lowest first) lands at position w * (32 / bits) + j of the last dimension."""
    per_word = layout.values_per_word(bits)
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * bits
    values = (words.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.flatten(-2)


def build_quantized_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                           group_size: int, perm: torch.Tensor | None = None) -> QuantizedWeight:
    """QuantizedWeight from unsigned integer weights q [N, K] (already in packed column order),
    scales [groups, N], integer zero points [groups, N] (None = symmetric, 2**(bits-1)).

    The padding of the last tiles holds each row's last-group zero point so that it
    dequantizes to 0; a GPTQ zero point of 2**bits does not fit in `bits` bits and is padded
    with 2**bits - 1 (the kernels multiply padding by zero-filled x only).
    """
    n, k = q.shape
    pad = 2 ** (bits - 1) if zeros is None else zeros[-1].clamp(max=2**bits - 1)
    qweight = layout.pack_qweight(q, bits, pad_value=pad)
    stored_zeros = None if zeros is None else zeros.to(scales.dtype).contiguous()
    return QuantizedWeight(qweight, scales.contiguous(), stored_zeros, bits, group_size, (n, k), perm)
