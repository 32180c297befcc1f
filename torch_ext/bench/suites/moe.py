"""MoE suite (so far the routing): ``moe_route`` against the same routing in torch ops, for the
Mixtral and DeepSeek-V3 configurations of ../shared/reference/shapes.md."""

from __future__ import annotations

import torch

from ..case import Case, register_suite

_TOKENS = (1, 64, 512, 4096)
_QUICK_TOKENS = (512,)


def _torch_softmax_route(logits: torch.Tensor, k: int):
    weights, ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def _torch_deepseek_route(logits: torch.Tensor, bias: torch.Tensor):
    scores = logits.float().sigmoid()
    choice = scores + bias
    groups = choice.view(-1, 8, 32).topk(2, dim=-1).values.sum(-1)
    kept = torch.zeros_like(groups).scatter_(1, groups.topk(4, dim=-1).indices, 1.0).bool()
    choice = choice.masked_fill(~kept.repeat_interleave(32, dim=1), float("-inf"))
    ids = choice.topk(8, dim=-1).indices
    weights = scores.gather(1, ids)
    return weights / weights.sum(-1, keepdim=True) * 2.5, ids


def _route_case(device: str, tokens: int, family: str) -> Case:
    experts = 8 if family == "mixtral" else 256

    def make_inputs(seed: int):
        gen = torch.Generator().manual_seed(seed)
        tensors = (torch.randn(tokens, experts, generator=gen), torch.randn(experts, generator=gen) * 0.05)
        return tuple(t.to(device) for t in tensors)

    if family == "mixtral":
        ours = lambda logits, bias: torch.ops.torch_ext.moe_route(logits, 2, True, "softmax", 1, 1, None, 1.0)  # noqa: E731
        baseline = lambda logits, bias: _torch_softmax_route(logits, 2)  # noqa: E731
    else:
        ours = lambda logits, bias: torch.ops.torch_ext.moe_route(logits, 8, True, "sigmoid", 8, 4, bias, 2.5)  # noqa: E731
        baseline = _torch_deepseek_route
    return Case(family="moe", op="moe_route", label=f"T={tokens} {family} E={experts}", make_inputs=make_inputs,
                ours=ours, baselines={"torch ops": baseline}, bytes=float(tokens * experts * 4), device=device)


@register_suite("moe")
def moe_suite(device: str, quick: bool) -> list[Case]:
    tokens = _QUICK_TOKENS if quick else _TOKENS
    return [_route_case(device, t, family) for family in ("mixtral", "deepseek_v3") for t in tokens]
