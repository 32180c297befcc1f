"""MoE suite, configurations of ../shared/reference/shapes.md:

- ``moe_route`` against the same routing in torch ops (Mixtral, DeepSeek-V3);
- ``fused_moe`` (the experts, routing given) against transformers' eager experts module of the
  same config and weights, transformers 5's default experts implementation (``grouped_mm``) on
  that module, and a torch reference (sort by expert, ``torch._grouped_mm``,
  ``index_add_``), for Mixtral-8x7B and DeepSeek-V2-Lite (H and I / 4 on the CPU), uniform and
  skewed routing (half of the tokens' first choice on expert 0); ``bytes`` counts the weights
  of the experts that receive tokens (what a decode step must stream);
- forward+backward of the experts, and the whole layer (FusedMoE.from_hf vs the stock block).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ... import _C
from ..case import Case, on_amx_tiles, register_suite, with_backward

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


# (experts, top_k, hidden, intermediate, shared experts) at full size; the CPU divides H and I by 4.
_MOE_CONFIGS = {"mixtral": (8, 2, 4096, 14336, 0), "deepseek_v2_lite": (64, 6, 2048, 1408, 2)}
_MOE_TOKENS = {"cpu": (1, 16, 64, 512), "cuda": (1, 16, 64, 512, 4096)}
_SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@functools.lru_cache(maxsize=None)
def _hf_block(device: str, family: str, dtype: torch.dtype):
    """transformers' MoE block of the config (random init), or None without transformers 5.x."""
    try:
        import transformers
    except ImportError:
        return None
    experts, top_k, hidden, intermediate, shared = _MOE_CONFIGS[family]
    if device == "cpu":
        hidden, intermediate = hidden // 4, intermediate // 4
    torch.manual_seed(0)
    if family == "mixtral":
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as Block
        config = transformers.MixtralConfig(hidden_size=hidden, intermediate_size=intermediate,
                                            num_local_experts=experts, num_experts_per_tok=top_k)
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as Block
        config = transformers.DeepseekV2Config(hidden_size=hidden, moe_intermediate_size=intermediate,
                                               n_routed_experts=experts, num_experts_per_tok=top_k,
                                               n_shared_experts=shared)
    with torch.device(device):
        block = Block(config).to(dtype)
    if not hasattr(block.experts, "gate_up_proj"):
        return None  # transformers 4.x: per-expert modules, no experts-only entry point
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.normal_(std=hidden ** -0.5)
    return block


def _transformers_experts_function(name: str):
    """transformers 5's experts implementation of that name (ExpertsInterface), or None."""
    try:
        from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
    except ImportError:
        return None
    return ALL_EXPERTS_FUNCTIONS[name] if name in ALL_EXPERTS_FUNCTIONS else None


def _torch_grouped_reference(x, w13, w2, weights, ids):
    """Sort pairs by expert, two torch._grouped_mm calls, index_add_ back (the usual torch MoE)."""
    top_k, intermediate = ids.shape[1], w2.shape[2]
    flat = ids.reshape(-1).long()
    order = flat.argsort(stable=True)
    tokens = order // top_k
    offsets = torch.bincount(flat, minlength=w13.shape[0]).cumsum(0).to(torch.int32)
    gate_up = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=offsets)
    y = torch._grouped_mm(F.silu(gate_up[:, :intermediate]) * gate_up[:, intermediate:], w2.transpose(1, 2),
                          offs=offsets)
    y = y * weights.reshape(-1)[order, None].to(y.dtype)
    return torch.zeros_like(x).index_add_(0, tokens, y)


def _routing(tokens: int, experts: int, top_k: int, skewed: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=gen)
    if skewed:
        logits[: tokens // 2 + tokens % 2, 0] += 100.0  # half of the tokens pick expert 0 first
    return torch.ops.torch_ext.moe_route(logits, top_k, True, "softmax", 1, 1, None, 1.0)


def _experts_case(device: str, family: str, tokens: int, dtype: torch.dtype, skewed: bool, backward: bool) -> Case:
    block = _hf_block(device, family, dtype)
    experts, top_k = _MOE_CONFIGS[family][:2]
    hidden, intermediate = block.experts.gate_up_proj.shape[2], block.experts.down_proj.shape[2]
    w13, w2 = block.experts.gate_up_proj, block.experts.down_proj

    def make_inputs(seed: int):
        weights, ids = _routing(tokens, experts, top_k, skewed, seed)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        return x.to(device), weights.to(device), ids.to(device)

    def ours(x, weights, ids):
        from torch_ext.ops import fused_moe  # the wrapper: fused_moe_train when gradients are needed

        return fused_moe(x, w13, w2, weights, ids, "silu")

    baselines = {"transformers eager experts": lambda x, weights, ids: block.experts(x, ids.long(), weights)}
    grouped_experts = _transformers_experts_function("grouped_mm")
    if grouped_experts is not None:  # what a transformers 5 model runs by default
        baselines["transformers grouped_mm experts"] = lambda x, weights, ids: grouped_experts(block.experts, x,
                                                                                               ids.long(), weights)
    if hasattr(torch, "_grouped_mm"):
        baselines["torch sort + _grouped_mm"] = lambda x, weights, ids: _torch_grouped_reference(x, w13, w2,
                                                                                                 weights, ids)
    if backward:
        ours, baselines = with_backward(ours, (w13, w2)), {
            name: with_backward(fn, (w13, w2)) for name, fn in baselines.items()}
    else:  # inference: no autograd bookkeeping on either side (ours would run its training kernel)
        ours, baselines = torch.no_grad()(ours), {name: torch.no_grad()(fn) for name, fn in baselines.items()}
    used = 1 if tokens == 0 else len(torch.unique(_routing(tokens, experts, top_k, skewed, 0)[1]))
    element = torch.empty((), dtype=dtype).element_size()
    expert_bytes = 3 * hidden * intermediate * element
    return Case(
        family="moe", op="fused_moe fwd+bwd" if backward else "fused_moe",
        label=f"{family} T={tokens} E={experts} k={top_k} H={hidden} I={intermediate} "
              f"{'skewed' if skewed else 'uniform'} {_SHORT[dtype]}",
        make_inputs=make_inputs, ours=ours, baselines=baselines,
        flops=(3.0 if backward else 1.0) * 2 * 3 * tokens * top_k * hidden * intermediate,
        bytes=float(used * expert_bytes * (3 if backward else 1)), device=device,
        notes={"experts_receiving_tokens": used, "bytes_are": "expert weights touched (x3 with the backward: "
                                                                "read twice, gradient written)"},
        working_set_bytes=experts * expert_bytes)


@functools.lru_cache(maxsize=None)
def _quantized_experts(device: str, family: str, dtype: torch.dtype):
    from torch_ext.quant import quantize_experts

    block = _hf_block(device, family, dtype)
    return (quantize_experts(block.experts.gate_up_proj.detach(), 4, 128),
            quantize_experts(block.experts.down_proj.detach(), 4, 128))


def _quantized_case(device: str, family: str, tokens: int, dtype: torch.dtype) -> Case:
    """fused_moe_quantized (4-bit, group 128) against the unquantized layer: fused_moe on the same
    (dense) weights and transformers' eager experts. bytes: the packed weights of the experts
    that receive tokens."""
    from torch_ext.ops import fused_moe_quantized

    block = _hf_block(device, family, dtype)
    experts, top_k = _MOE_CONFIGS[family][:2]
    hidden, intermediate = block.experts.gate_up_proj.shape[2], block.experts.down_proj.shape[2]

    def make_inputs(seed: int):
        weights, ids = _routing(tokens, experts, top_k, False, seed)
        x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed + 1)).to(dtype)
        return x.to(device), weights.to(device), ids.to(device)

    used = len(torch.unique(_routing(tokens, experts, top_k, False, 0)[1]))
    # 4-bit values plus bf16 scales and zeros per group of 128, for W13 [2I, H] and W2 [H, I]
    packed_bytes = experts * sum(n * k // 2 + 2 * 2 * n * -(-k // 128)
                                 for n, k in ((2 * intermediate, hidden), (hidden, intermediate)))
    return Case(
        family="moe", op="fused_moe_quantized",
        label=f"{family} T={tokens} E={experts} k={top_k} H={hidden} I={intermediate} int4 g128 {_SHORT[dtype]}",
        make_inputs=make_inputs,
        # quantized on first use (a few seconds), not when the suite is listed
        ours=torch.no_grad()(lambda x, weights, ids: fused_moe_quantized(
            x, *_quantized_experts(device, family, dtype), weights, ids)),
        baselines={
            "fused_moe (dense weights)": torch.no_grad()(lambda x, weights, ids: torch.ops.torch_ext.fused_moe(
                x, block.experts.gate_up_proj, block.experts.down_proj, weights, ids, "silu")),
            "transformers eager experts": torch.no_grad()(lambda x, weights, ids: block.experts(
                x, ids.long(), weights))},
        flops=2.0 * 3 * tokens * top_k * hidden * intermediate, bytes=float(packed_bytes * used / experts),
        device=device, working_set_bytes=packed_bytes)


def _layer_case(device: str, family: str, tokens: int, dtype: torch.dtype) -> Case:
    """The whole layer: FusedMoE.from_hf(block) (router, experts, shared experts) vs the block."""
    from torch_ext.nn import FusedMoE

    block = _hf_block(device, family, dtype)
    fused = FusedMoE.from_hf(block)
    hidden = block.experts.gate_up_proj.shape[2]

    def make_inputs(seed: int):
        x = torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
        return (x.to(device),)

    return Case(family="moe", op="FusedMoE layer", label=f"{family} T={tokens} {_SHORT[dtype]}",
                make_inputs=make_inputs, ours=torch.no_grad()(fused), baselines={
                    "transformers eager block": torch.no_grad()(block)}, device=device)


def _fused_cases(device: str, quick: bool) -> list[Case]:
    kind = torch.device(device).type
    if kind not in _MOE_TOKENS or _hf_block(device, "mixtral", torch.float32 if kind == "cpu" else torch.bfloat16) \
            is None:
        return []
    if quick:
        return [_experts_case(device, "mixtral", 64, torch.float32 if kind == "cpu" else torch.bfloat16, False,
                              False)]
    cases = []
    for family in _MOE_CONFIGS:
        for dtype in ((torch.float32, torch.bfloat16) if kind == "cpu" else (torch.bfloat16,)):
            cases += [_experts_case(device, family, t, dtype, skewed, False)
                      for t in _MOE_TOKENS[kind] for skewed in (False, True)]
            cases.append(_experts_case(device, family, 64, dtype, False, True))
            cases.append(_layer_case(device, family, 64, dtype))
        cases += [_quantized_case(device, family, t, torch.bfloat16) for t in (1, 16, 64)]
    if kind == "cpu" and _C.build_info()["cpu_amx_bf16_detected"]:
        # bf16 panels on AMX-BF16 (the default where detected) against the AVX512_BF16 kernel.
        cases += [on_amx_tiles(_experts_case(device, family, t, torch.bfloat16, False, False),
                               "fused_moe on AVX512_BF16") for family in _MOE_CONFIGS for t in (64, 512)]
    return cases


@register_suite("moe")
def moe_suite(device: str, quick: bool) -> list[Case]:
    tokens = _QUICK_TOKENS if quick else _TOKENS
    routes = [_route_case(device, t, family) for family in ("mixtral", "deepseek_v3") for t in tokens]
    return routes + _fused_cases(device, quick)
