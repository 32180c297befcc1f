"""transformers attention through torch_ext's block-sparse kernels: an attention function
registered in transformers' AttentionInterface (and the sdpa mask builder under the same name),
selected on the model with its attention-implementation switch."""

from __future__ import annotations

import itertools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

_MODES = ("moba", "block_sparse")
_REGISTRATIONS = itertools.count()  # one registry name per patch: each model keeps its settings


def _dense_fallback(query, key, value, attention_mask, scaling, is_causal):
    """SDPA for what the block-sparse path does not cover: decode steps (one query row) and
    padded batches (a materialized mask)."""
    causal = is_causal and attention_mask is None and query.shape[2] > 1
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, is_causal=causal,
                                          scale=scaling, enable_gqa=query.shape[1] != key.shape[1])


def _attention_function(mode: str, block_size: int, top_k: int, mask_fn: Callable | None) -> Callable:
    from torch_ext.attention import BlockSparseMask
    from torch_ext.ops import block_sparse_attention, moba_attention

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  is_causal: bool | None = None, **kwargs):
        if dropout > 0.0:
            raise ValueError(f"torch_ext attention ({mode}) has no attention dropout, got dropout={dropout} "
                             "(set the config's attention_dropout to 0 to train with it)")
        for name in ("softcap", "s_aux"):  # logit soft-capping, attention sinks
            if kwargs.get(name) is not None:
                raise ValueError(f"torch_ext attention ({mode}) does not support {name}")
        causal = getattr(module, "is_causal", True) if is_causal is None else is_causal
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        if attention_mask is not None or query.shape[2] == 1:
            out = _dense_fallback(query, key, value, attention_mask, scaling, causal)
        elif mode == "moba":
            out = moba_attention(query, key, value, block_size=block_size, top_k=top_k, causal=causal,
                                 scale=scaling)
        else:
            seq_q, seq_kv = query.shape[2], key.shape[2]
            mask = (mask_fn(seq_q, seq_kv, query.device) if mask_fn is not None else
                    BlockSparseMask.from_dense(torch.ones(1, 1, -(-seq_q // 64), -(-seq_kv // block_size),
                                                          dtype=torch.bool, device=query.device),
                                               64, block_size, seq_q, seq_kv))
            out = block_sparse_attention(query, key, value, mask, causal=causal, scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    return attention


def patch_attention(model: nn.Module, mode: str = "moba", *, block_size: int = 64, top_k: int = 8,
                    mask: Callable | None = None) -> nn.Module:
    """Compute the attention of a transformers model (Llama family: any model using the
    AttentionInterface) with torch_ext's kernels; returns the model.

    - ``mode="moba"``: token-level MoBA (:func:`torch_ext.ops.moba_attention`) with ``block_size``
      and ``top_k``; causal models keep each token's own block.
    - ``mode="block_sparse"``: :func:`torch_ext.ops.block_sparse_attention` with the mask
      ``mask(seq_len_q, seq_len_kv, device) -> BlockSparseMask``; default every block (density
      100%: the stock result), causal as the model is.

    Prefill only: decode steps (one query token) and batches with padding (a materialized
    attention mask) fall back to dense ``F.scaled_dot_product_attention``.
    """
    if mode not in _MODES:
        raise ValueError(f"torch_ext.patch_attention: mode must be one of {_MODES}, got {mode!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = f"torch_ext_{mode}_{next(_REGISTRATIONS)}"
    AttentionInterface.register(name, _attention_function(mode, block_size, top_k, mask))
    # The sdpa mask builder returns None for a purely causal batch (the kernels apply causality
    # themselves) and a mask only when there is padding (then the SDPA fallback uses it).
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name
    return model
