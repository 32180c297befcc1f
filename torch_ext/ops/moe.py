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
