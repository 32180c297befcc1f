"""Mixture-of-Experts routing: wrapper and fake kernel of moe_route."""

from __future__ import annotations

import torch

_ROUTE = torch.ops.torch_ext.moe_route


def moe_route(router_logits: torch.Tensor, top_k: int, renormalize: bool = True, scoring: str = "softmax",
              num_expert_group: int = 1, topk_group: int = 1, correction_bias: torch.Tensor | None = None,
              routed_scaling_factor: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: ``(topk_weights fp32 [T, k], topk_ids int32 [T, k])``.

    ``scoring='softmax'`` (Mixtral, Qwen-MoE) or ``'sigmoid'`` (DeepSeek-V3, with
    ``correction_bias`` used for selection only). With ``num_expert_group > 1`` the experts form
    equal groups scored by their max (softmax) or the sum of their two best biased scores
    (sigmoid); only the best ``topk_group`` groups are eligible. The k chosen experts come in
    descending order of (biased) score; their weights are the unbiased scores, renormalized to
    sum 1 when ``renormalize``, times ``routed_scaling_factor``. Not differentiable (the
    weights' gradient belongs to the fused MoE op that consumes them).
    """
    return _ROUTE(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                  routed_scaling_factor)


@torch.library.register_fake("torch_ext::moe_route")
def _moe_route_fake(router_logits, top_k, renormalize, scoring, num_expert_group, topk_group, correction_bias,
                    routed_scaling_factor):
    tokens = router_logits.shape[0]
    return (router_logits.new_empty((tokens, top_k), dtype=torch.float32),
            router_logits.new_empty((tokens, top_k), dtype=torch.int32))


_FUSED = torch.ops.torch_ext.fused_moe
_FUSED_BACKWARD = torch.ops.torch_ext.fused_moe_backward


def fused_moe(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """The experts of a MoE layer: ``out[t] = sum_j topk_weights[t, j] * W2[e] @ act(W13[e] @ hidden[t])``
    with ``e = topk_ids[t, j]``.

    ``hidden`` [T, H]; ``w13`` [E, 2I, H] (gate rows first, then up, as vLLM and transformers 5
    store them); ``w2`` [E, H, I]; ``topk_weights`` fp32 [T, k] and ``topk_ids`` int32 [T, k] as
    :func:`moe_route` returns them. ``activation`` ``'silu'`` (SwiGLU) or ``'gelu'`` (GeGLU,
    exact erf GELU). Each expert's weights are read once per call; the gated activation runs in
    the first GEMM's epilogue and the weighted combine in the second's, summing each token's
    experts in increasing expert id (deterministic). Differentiable in ``hidden``, ``w13``,
    ``w2`` and ``topk_weights``.
    """
    return _FUSED(hidden, w13, w2, topk_weights, topk_ids, activation)


@torch.library.register_fake("torch_ext::fused_moe")
def _fused_moe_fake(hidden, w13, w2, topk_weights, topk_ids, activation):
    torch._check(hidden.dim() == 2, lambda: f"hidden must be [T, H], got {tuple(hidden.shape)}")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@torch.library.register_fake("torch_ext::fused_moe_backward")
def _fused_moe_backward_fake(grad_out, hidden, w13, w2, topk_weights, topk_ids, activation):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            torch.empty_like(w13, memory_format=torch.contiguous_format),
            torch.empty_like(w2, memory_format=torch.contiguous_format),
            torch.empty_like(topk_weights, memory_format=torch.contiguous_format))


def _fused_moe_setup_context(ctx, inputs, output) -> None:
    hidden, w13, w2, topk_weights, topk_ids, activation = inputs
    ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids)
    ctx.activation = activation


def _fused_moe_backward(ctx, grad_out: torch.Tensor):
    hidden, w13, w2, topk_weights, topk_ids = ctx.saved_tensors
    grad_hidden, grad_w13, grad_w2, grad_weights = _FUSED_BACKWARD(grad_out, hidden, w13, w2, topk_weights, topk_ids,
                                                                   ctx.activation)
    return grad_hidden, grad_w13, grad_w2, grad_weights, None, None


torch.library.register_autograd("torch_ext::fused_moe", _fused_moe_backward, setup_context=_fused_moe_setup_context)
