"""FusedMoE: a Mixture-of-Experts layer (router, routed experts, optional shared expert) on
torch_ext's moe_route and fused_moe ops, with conversion from transformers' MoE blocks."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from torch_ext.ops.moe import fused_moe, fused_moe_quantized, moe_route
from torch_ext.quant.experts import QuantizedExperts, quantize_experts


class MoeRouter(nn.Linear):
    """The router of a FusedMoE: ``logits = x W^T`` ([T, E]), computed in ``router_dtype`` when
    set (DeepSeek routes in float32). A class of its own so that transformers' output recorders
    (``output_router_logits``, the load-balancing loss) find the logits by class
    (integrations.hf.patch_moe registers it), and so that ``quantize_model`` leaves it as it is."""

    def __init__(self, hidden_size: int, num_experts: int, router_dtype: torch.dtype | None = None, device=None,
                 dtype=None) -> None:
        super().__init__(hidden_size, num_experts, bias=False, device=device, dtype=dtype)
        self.router_dtype = router_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router_dtype is None:
            return super().forward(x)
        return F.linear(x.to(self.router_dtype), self.weight.to(self.router_dtype))


class FusedMoE(nn.Module):
    """``y = sum_j w_j * Expert_{e_j}(x) [+ shared(x)]`` over the top-k experts of each token.

    Parameters (as vLLM and transformers 5 store them): ``gate.weight`` [E, H] (the router),
    ``w13`` [E, 2I, H] (gate rows first, then up), ``w2`` [E, H, I], and with
    ``score_correction_bias`` the buffer ``e_score_correction_bias`` [E] (DeepSeek-V3). Routing
    arguments are those of :func:`torch_ext.ops.moe_route`. ``shared_expert`` is any module
    [..., H] -> [..., H] added to the output, scaled by ``sigmoid(shared_expert_gate(x))`` when
    ``shared_expert_gate`` (Qwen2-MoE). ``router_dtype`` computes the router logits in that dtype
    (DeepSeek routes in float32). ``return_router_logits`` makes forward return
    ``(y, router_logits)`` as transformers 4.x Mixtral and Qwen2-MoE blocks do. ``jitter_noise``
    (Mixtral's ``router_jitter_noise``) multiplies the input by uniform noise in [1 - j, 1 + j]
    in training, before the router and the experts, as Mixtral does.

    :meth:`quantize_experts_` replaces ``w13`` and ``w2`` by weight-only quantized buffers
    (4 or 8 bits, fused_moe_quantized).

    Training: experts train through fused_moe's backward; the router trains through the routing
    weights, recomputed with differentiable torch ops from the chosen ids when gradients are on
    (the choice itself is discrete).
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, *,
                 activation: str = "silu", renormalize: bool = True, scoring: str = "softmax",
                 num_expert_group: int = 1, topk_group: int = 1, routed_scaling_factor: float = 1.0,
                 score_correction_bias: bool = False, shared_expert: nn.Module | None = None,
                 shared_expert_gate: bool = False, router_dtype: torch.dtype | None = None,
                 return_router_logits: bool = False, jitter_noise: float = 0.0, device=None, dtype=None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_experts, self.top_k = num_experts, top_k
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.activation, self.renormalize, self.scoring = activation, renormalize, scoring
        self.num_expert_group, self.topk_group = num_expert_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.return_router_logits, self.jitter_noise = return_router_logits, jitter_noise
        self.gate = MoeRouter(hidden_size, num_experts, router_dtype, **factory)
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, **factory))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, **factory))
        if score_correction_bias:
            self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, device=device))
        else:
            self.e_score_correction_bias = None
        self.quantization: tuple[int, int] | None = None  # (bits, group_size) once quantized
        self.shared_expert = shared_expert
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False, **factory) if shared_expert_gate else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for weight in (self.w13, self.w2):
            bound = 1.0 / weight.shape[-1] ** 0.5
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"intermediate_size={self.intermediate_size}, activation={self.activation!r}, "
                f"scoring={self.scoring!r}, renormalize={self.renormalize}")

    def routing_weights(self, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The weights of the chosen experts as a differentiable function of the logits (the same
        values moe_route returns)."""
        scores = logits.float().softmax(-1) if self.scoring == "softmax" else logits.float().sigmoid()
        weights = scores.gather(1, ids.long())
        if self.renormalize:
            weights = weights / (weights.sum(-1, keepdim=True) + (1e-20 if self.scoring == "sigmoid" else 0.0))
        return weights * self.routed_scaling_factor

    def forward(self, hidden_states: torch.Tensor):
        shape = hidden_states.shape
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - self.jitter_noise,
                                                                                     1.0 + self.jitter_noise)
        x = hidden_states.reshape(-1, self.hidden_size)
        logits = self.gate(x)
        # (moe_route takes 16- and 32-bit logits; a float64 module, for checks, routes on fp32.)
        weights, ids = moe_route(logits.float() if logits.dtype == torch.float64 else logits, self.top_k,
                                 self.renormalize, self.scoring, self.num_expert_group, self.topk_group,
                                 self.e_score_correction_bias, self.routed_scaling_factor)
        if torch.is_grad_enabled() and logits.requires_grad:
            weights = self.routing_weights(logits, ids)
        if self.quantized_experts is not None:
            y = fused_moe_quantized(x, *self.quantized_experts, weights, ids, self.activation)
        else:
            y = fused_moe(x, self.w13, self.w2, weights, ids, self.activation)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        y = y.view(shape)
        return (y, logits) if self.return_router_logits else y

    @property
    def quantized_experts(self) -> tuple[QuantizedExperts, QuantizedExperts] | None:
        if self.quantization is None:
            return None
        bits, group_size = self.quantization
        e, h, i = self.num_experts, self.hidden_size, self.intermediate_size
        return (QuantizedExperts(self.w13_qweight, self.w13_scales, self.w13_zeros, bits, group_size, (e, 2 * i, h)),
                QuantizedExperts(self.w2_qweight, self.w2_scales, self.w2_zeros, bits, group_size, (e, h, i)))

    @torch.no_grad()
    def quantize_experts_(self, bits: int = 4, group_size: int = 128, symmetric: bool = False) -> "FusedMoE":
        """Quantize the expert weights in place (round-to-nearest, per group of input channels);
        ``w13`` and ``w2`` become buffers ``w13_qweight``, ``w13_scales``, ``w13_zeros`` (and w2's).
        The router and the shared expert stay as they are."""
        for name in ("w13", "w2"):
            packed = quantize_experts(getattr(self, name).detach(), bits, group_size, symmetric)
            delattr(self, name)
            self.register_buffer(f"{name}_qweight", packed.qweight)
            self.register_buffer(f"{name}_scales", packed.scales)
            self.register_buffer(f"{name}_zeros", packed.zeros)
        self.quantization = (bits, group_size)
        return self

    @classmethod
    def from_hf(cls, block: nn.Module) -> "FusedMoE":
        """A FusedMoE computing what a transformers MoE block computes, sharing its weights where
        the layouts agree (transformers 5 stores experts as [E, 2I, H] and [E, H, I]; 4.x expert
        lists are stacked into new tensors). Mixtral, Qwen2-MoE, DeepSeek-V2 and DeepSeek-V3
        blocks, transformers 4.x and 5.x."""
        from torch_ext.integrations.hf_moe import describe_moe_block

        spec = describe_moe_block(block)
        w13, w2 = spec.pop("w13"), spec.pop("w2")
        router_weight = spec.pop("router_weight")
        bias = spec.pop("correction_bias")
        shared_expert, shared_gate = spec.pop("shared_expert"), spec.pop("shared_expert_gate")
        module = cls(**spec, score_correction_bias=bias is not None, shared_expert=shared_expert,
                     shared_expert_gate=shared_gate is not None, device="meta")
        module.gate.weight = router_weight
        module.w13, module.w2 = w13, w2
        if bias is not None:
            module.e_score_correction_bias = bias
        if shared_gate is not None:
            module.shared_expert_gate = shared_gate
        return module
