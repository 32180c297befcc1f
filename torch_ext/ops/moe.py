"""Mixture-of-Experts routing: wrapper and fake kernel of moe_route."""

from __future__ import annotations

import torch

from torch_ext.ops._dispatch import call_differentiable

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
_FUSED_TRAIN = torch.ops.torch_ext.fused_moe_train
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
    ``w2`` and ``topk_weights``. On the CPU, when gradients are needed, this runs
    ``fused_moe_train``, whose kernel also keeps the pre-activation ``[T * k, 2I]`` for the
    backward as it goes; on CUDA the forward is the same as without gradients (no host sync)
    and the backward recomputes the first GEMM. bf16 on Hopper (sm_90) runs batches of 8 or
    more (token, slot) pairs per expert on ``torch._grouped_mm`` instead of the fused kernel
    (faster there; docs/moe.md "Which path runs"), summing each token's slots in slot order.
    """
    if (hidden.device.type == "cpu" and torch.is_grad_enabled()
            and any(t.requires_grad for t in (hidden, w13, w2, topk_weights))):
        return _FUSED_TRAIN(hidden, w13, w2, topk_weights, topk_ids, activation)[0]
    return call_differentiable(_FUSED, hidden, w13, w2, topk_weights, topk_ids, activation)


@torch.library.register_fake("torch_ext::fused_moe")
def _fused_moe_fake(hidden, w13, w2, topk_weights, topk_ids, activation):
    torch._check(hidden.dim() == 2, lambda: f"hidden must be [T, H], got {tuple(hidden.shape)}")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


@torch.library.register_fake("torch_ext::fused_moe_train")
def _fused_moe_train_fake(hidden, w13, w2, topk_weights, topk_ids, activation):
    return (torch.empty_like(hidden, memory_format=torch.contiguous_format),
            hidden.new_empty((topk_ids.numel(), w13.shape[1])))


@torch.library.register_fake("torch_ext::fused_moe_backward")
def _fused_moe_backward_fake(grad_out, hidden, w13, w2, topk_weights, topk_ids, activation, gate_up=None,
                             weight_grads=True):
    def weight_grad(w):
        return torch.empty_like(w, memory_format=torch.contiguous_format) if weight_grads else w.new_empty((0,))

    return (torch.empty_like(hidden, memory_format=torch.contiguous_format), weight_grad(w13), weight_grad(w2),
            torch.empty_like(topk_weights, memory_format=torch.contiguous_format))


def _fused_moe_setup_context(ctx, inputs, output) -> None:
    hidden, w13, w2, topk_weights, topk_ids, activation = inputs
    ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids)
    ctx.activation = activation


def _experts_backward(ctx, grad_out: torch.Tensor):
    """Gradients of (hidden, w13, w2, topk_weights, topk_ids, activation); the weights' only when
    autograd asks for them (frozen experts skip those GEMMs). ``ctx.saved_tensors`` is read once:
    non-reentrant activation checkpointing allows a saved tensor to be unpacked only once."""
    saved = ctx.saved_tensors
    hidden, w13, w2, topk_weights, topk_ids = saved[:5]
    gate_up = saved[5] if len(saved) > 5 else None
    weight_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    grad_hidden, grad_w13, grad_w2, grad_weights = _FUSED_BACKWARD(grad_out, hidden, w13, w2, topk_weights, topk_ids,
                                                                   ctx.activation, gate_up, weight_grads)
    if not weight_grads:
        grad_w13 = grad_w2 = None
    return grad_hidden, grad_w13, grad_w2, grad_weights, None, None


torch.library.register_autograd("torch_ext::fused_moe", _experts_backward, setup_context=_fused_moe_setup_context)


def _fused_moe_train_setup_context(ctx, inputs, output) -> None:
    hidden, w13, w2, topk_weights, topk_ids, activation = inputs
    ctx.save_for_backward(hidden, w13, w2, topk_weights, topk_ids, output[1])
    ctx.mark_non_differentiable(output[1])
    ctx.activation = activation


def _fused_moe_train_backward(ctx, grad_out: torch.Tensor, _grad_gate_up):
    return _experts_backward(ctx, grad_out)


torch.library.register_autograd("torch_ext::fused_moe_train", _fused_moe_train_backward,
                                setup_context=_fused_moe_train_setup_context)


_FUSED_QUANTIZED = torch.ops.torch_ext.fused_moe_quantized


def fused_moe_quantized(hidden: torch.Tensor, w13, w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        activation: str = "silu") -> torch.Tensor:
    """:func:`fused_moe` with weight-only quantized experts: ``w13`` and ``w2`` are
    :class:`torch_ext.quant.QuantizedExperts` (from :func:`torch_ext.quant.quantize_experts`) with
    the same bits and group size. Each expert's tokens run through the dequantizing
    weight_only_linear kernels. Differentiable in ``hidden`` and ``topk_weights`` (frozen experts:
    the backward dequantizes them once per call)."""
    if (w13.bits, w13.group_size) != (w2.bits, w2.group_size):
        raise ValueError(f"w13 and w2 must share bits and group_size, got {(w13.bits, w13.group_size)} and "
                         f"{(w2.bits, w2.group_size)}")
    return call_differentiable(_FUSED_QUANTIZED, hidden, w13.qweight, w13.scales, w13.zeros, w2.qweight, w2.scales,
                               w2.zeros, topk_weights, topk_ids, activation, w13.bits, w13.group_size)


@torch.library.register_fake("torch_ext::fused_moe_quantized")
def _fused_moe_quantized_fake(hidden, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros,
                              topk_weights, topk_ids, activation, bits, group_size):
    torch._check(hidden.dim() == 2, lambda: f"hidden must be [T, H], got {tuple(hidden.shape)}")
    return torch.empty_like(hidden, memory_format=torch.contiguous_format)


def _fused_moe_quantized_setup_context(ctx, inputs, output) -> None:
    (hidden, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros, topk_weights, topk_ids,
     activation, bits, group_size) = inputs
    ctx.save_for_backward(hidden, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros,
                          topk_weights, topk_ids)
    ctx.config = (activation, bits, group_size)


def _fused_moe_quantized_backward(ctx, grad_out: torch.Tensor):
    hidden, w13_q, w13_s, w13_z, w2_q, w2_s, w2_z, topk_weights, topk_ids = ctx.saved_tensors
    activation, bits, group_size = ctx.config
    from torch_ext.quant.experts import QuantizedExperts

    experts, hidden_size, intermediate = w13_s.shape[0], hidden.shape[1], w13_s.shape[2] // 2
    w13 = QuantizedExperts(w13_q, w13_s, w13_z, bits, group_size, (experts, 2 * intermediate, hidden_size)).dequantize(
        hidden.dtype)
    w2 = QuantizedExperts(w2_q, w2_s, w2_z, bits, group_size, (experts, hidden_size, intermediate)).dequantize(
        hidden.dtype)
    grad_hidden, _, _, grad_weights = _FUSED_BACKWARD(grad_out, hidden, w13, w2, topk_weights, topk_ids, activation,
                                                      None, False)
    return grad_hidden, None, None, None, None, None, None, grad_weights, None, None, None, None


torch.library.register_autograd("torch_ext::fused_moe_quantized", _fused_moe_quantized_backward,
                                setup_context=_fused_moe_quantized_setup_context)
