"""Attention modules."""

from __future__ import annotations

import torch
from torch import nn

from torch_ext.ops.attention import moba_attention


class MoBAAttention(nn.Module):
    """Token-level MoBA as an attention core: ``forward(q, k, v)`` on ``[B, H, S, D]`` tensors,
    in place of ``F.scaled_dot_product_attention(q, k, v, is_causal=causal)``.

    Each query token attends only the ``top_k`` key blocks of ``block_size`` tokens whose
    mean-pooled key scores highest against it (under ``causal`` its own block always, causally,
    and no later block). No parameters.
    """

    def __init__(self, block_size: int = 64, top_k: int = 8, causal: bool = True, scale: float | None = None):
        super().__init__()
        self.block_size, self.top_k, self.causal, self.scale = block_size, top_k, causal, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return moba_attention(q, k, v, self.block_size, self.top_k, self.causal, self.scale)

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, top_k={self.top_k}, causal={self.causal}"
