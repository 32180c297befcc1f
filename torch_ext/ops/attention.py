"""Block-sparse attention and MoBA: wrappers, fake kernels and autograd (docs/attention.md)."""

from __future__ import annotations

import torch

from torch_ext.ops._dispatch import call_differentiable

from torch_ext.attention.mask import BlockSparseMask

_FORWARD = torch.ops.torch_ext.block_sparse_attention
_BACKWARD = torch.ops.torch_ext.block_sparse_attention_backward
_SELECT = torch.ops.torch_ext.moba_select
_ROUTE = torch.ops.torch_ext.moba_route
_MOBA = torch.ops.torch_ext.moba_attention
_MOBA_BACKWARD = torch.ops.torch_ext.moba_attention_backward

# moba_route / moba_attention list key blocks per query block of this many rows.
MOBA_QUERY_BLOCK = 64


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: BlockSparseMask,
                           causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """``softmax(q k^T * scale) v`` where each query block attends only the key blocks ``mask`` lists.

    ``q [B, Hq, Sq, D]``, ``k, v [B, Hk, Sk, D]`` (the layout of ``F.scaled_dot_product_attention``;
    ``Hq`` a multiple of ``Hk``: GQA/MQA without copying K/V). ``causal`` is bottom-right aligned
    (query i sees keys ``j <= i + Sk - Sq``); ``scale`` defaults to ``1/sqrt(D)``. A query row
    that sees no key gets 0. Differentiable in q, k and v.
    """
    if (mask.seq_len_q, mask.seq_len_kv) != (q.shape[2], k.shape[2]):
        raise ValueError(f"torch_ext.block_sparse_attention: the mask is for (Sq, Sk) = "
                         f"({mask.seq_len_q}, {mask.seq_len_kv}), q and k have ({q.shape[2]}, {k.shape[2]})")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return call_differentiable(_FORWARD, q, k, v, mask.kv_counts, mask.kv_indices, mask.block_size_q,
                               mask.block_size_kv, causal, scale, None)[0]


def moba_select(q: torch.Tensor, k: torch.Tensor, block_size: int = 64, top_k: int = 8,
                causal: bool = True) -> torch.Tensor:
    """MoBA gating: the key blocks each query token chose, int32 ``[B, Hq, Sq, top_k]``.

    Keys are mean-pooled per block of ``block_size``; token i scores block b by
    ``q_i . mean(k_b)`` and keeps its ``top_k`` best (ties: the lower id). Causal: the block
    holding position ``i + Sk - Sq`` is always kept, later blocks never. Ids ascending, -1 for
    unused slots. Not differentiable.
    """
    return _SELECT(q, k, block_size, top_k, causal)


def moba_route(q: torch.Tensor, k: torch.Tensor, block_size: int = 64, top_k: int = 8,
               causal: bool = True) -> BlockSparseMask:
    """The block lists of MoBA: per query block of 64 rows, the union of its tokens' choices."""
    counts, indices = _ROUTE(q, k, block_size, top_k, causal)
    return BlockSparseMask(counts, indices, MOBA_QUERY_BLOCK, block_size, q.shape[2], k.shape[2])


def moba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_size: int = 64, top_k: int = 8,
                   causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Token-level MoBA: every query token attends only the key blocks it chose (``moba_select``),
    its own block causally under ``causal``. Equal to dense attention under that mask. On CUDA
    computed key block by key block over the tokens that chose it (no union lists); on the CPU by
    block-sparse attention over the union lists with the token selection applied inside.
    Differentiable in q, k and v (the routing is not): ``moba_attention_backward``, the union
    lists' backward (on CUDA key block by key block with ``TORCH_EXT_MOBA_GATHER_BACKWARD=1``)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    selected = _SELECT(q, k, block_size, top_k, causal)
    return call_differentiable(_MOBA, q, k, v, selected, block_size, causal, scale)[0]


@torch.library.register_fake("torch_ext::block_sparse_attention")
def _forward_fake(q, k, v, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale, token_blocks=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("torch_ext::block_sparse_attention_backward")
def _backward_fake(grad_out, q, k, v, out, lse, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale,
                   token_blocks=None):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("torch_ext::moba_attention")
def _moba_fake(q, k, v, token_blocks, block_size, causal, scale):
    return _forward_fake(q, k, v, None, None, None, block_size, causal, scale)


@torch.library.register_fake("torch_ext::moba_attention_backward")
def _moba_backward_fake(grad_out, q, k, v, out, lse, token_blocks, block_size, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


@torch.library.register_fake("torch_ext::moba_select")
def _select_fake(q, k, block_size, top_k, causal):
    return q.new_empty((*q.shape[:3], top_k), dtype=torch.int32)


def _lists_fake(like: torch.Tensor, batch, heads, nq, max_kv):
    return like.new_empty((batch, heads, nq), dtype=torch.int32), like.new_empty((batch, heads, nq, max_kv),
                                                                                dtype=torch.int32)


@torch.library.register_fake("torch_ext::moba_block_lists")
def _block_lists_fake(token_blocks, num_kv_blocks, block_size_q):
    batch, heads, seq_q, top_k = token_blocks.shape
    return _lists_fake(token_blocks, batch, heads, _ceil_div(seq_q, block_size_q),
                       min(num_kv_blocks, block_size_q * top_k))


@torch.library.register_fake("torch_ext::moba_route")
def _route_fake(q, k, block_size, top_k, causal):
    batch, heads, seq_q, _ = q.shape
    return _lists_fake(q, batch, heads, _ceil_div(seq_q, MOBA_QUERY_BLOCK),
                       min(_ceil_div(k.shape[2], block_size), MOBA_QUERY_BLOCK * top_k))


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale, token_blocks = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_counts, kv_indices, token_blocks)
    ctx.args = (block_size_q, block_size_kv, causal, scale)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
    """lse is not differentiable (its gradient is ignored)."""
    q, k, v, out, lse, kv_counts, kv_indices, token_blocks = ctx.saved_tensors
    grads = _BACKWARD(grad_out, q, k, v, out, lse, kv_counts, kv_indices, *ctx.args, token_blocks)
    return (*grads, None, None, None, None, None, None, None)


torch.library.register_autograd("torch_ext::block_sparse_attention", _backward, setup_context=_setup_context)


def _moba_setup_context(ctx, inputs, output) -> None:
    q, k, v, token_blocks, block_size, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, token_blocks)
    ctx.args = (block_size, causal, scale)
    ctx.mark_non_differentiable(lse)


def _moba_backward(ctx, grad_out: torch.Tensor, grad_lse: torch.Tensor):
    """moba_attention_backward (lse's gradient is ignored)."""
    q, k, v, out, lse, token_blocks = ctx.saved_tensors
    grads = _MOBA_BACKWARD(grad_out, q, k, v, out, lse, token_blocks, *ctx.args)
    return (*grads, None, None, None, None)


torch.library.register_autograd("torch_ext::moba_attention", _moba_backward, setup_context=_moba_setup_context)
