"""torch_ext's fused_moe as a transformers 5.x experts implementation.

transformers 5 computes a MoE layer's experts in a module whose class carries
``@use_experts_implementation``: its forward takes ``(hidden_states [T, H], top_k_index [T, k],
top_k_weights [T, k])`` after the model's own router and dispatches by the config's
``experts_implementation`` name ("eager", "grouped_mm", ...) through ``ExpertsInterface``. Registered
there as ``"torch_ext"``, fused_moe computes the experts of every such model (Qwen3-MoE, GLM-4.5,
MiniMax-M2, OLMoE, Qwen3-Next, Mixtral, DeepSeek-V3, ...) with the model's routing unchanged and its
parameters used in place (no copy: state_dict, optimizers and adapters see the same tensors), so
it trains as well (fused_moe's backward). Experts that fused_moe does not compute (biases, a
custom gate such as GPT-OSS's clamped SwiGLU, a non-gated MLP, transposed or interleaved
weights, a post-expert norm, expert parallelism, an activation other than SiLU or exact GELU)
run transformers' own eager forward, with a warning naming the reason once per class.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

EXPERTS_IMPLEMENTATION = "torch_ext"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_WARNED: set[tuple[type, str]] = set()


def _interface():
    try:
        from transformers.integrations.moe import ExpertsInterface
    except ImportError as error:
        import transformers

        raise RuntimeError(f"torch_ext: transformers {transformers.__version__} has no experts implementation "
                           "interface (transformers 5.x has it); use torch_ext.integrations.hf.patch_moe "
                           "instead") from error
    return ExpertsInterface


def _fused_moe_activation(experts: nn.Module, hidden_states: torch.Tensor) -> tuple[str | None, str | None]:
    """(fused_moe's activation for this experts module, None) where fused_moe can compute its
    forward, else (None, why not)."""
    from transformers.integrations.moe import _default_apply_gate

    from torch_ext.integrations.hf_moe import _activation

    flags = {"has no gate projection": not getattr(experts, "has_gate", True),
             "has biases": getattr(experts, "has_bias", False),
             "stores its weights transposed": getattr(experts, "is_transposed", False),
             "interleaves gate and up rows": not getattr(experts, "is_concatenated", True),
             "has a post-expert norm": getattr(experts, "has_post_expert_norm", False),
             "is expert-parallel": getattr(experts, "_is_expert_parallel", False),
             "has its own gate function": getattr(type(experts), "_apply_gate", _default_apply_gate)
             is not _default_apply_gate}
    reason = next((name for name, flag in flags.items() if flag), None)
    if reason is not None:
        return None, reason
    w13, w2 = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if not isinstance(w13, torch.Tensor) or not isinstance(w2, torch.Tensor) or w13.dim() != 3 or w2.dim() != 3:
        return None, "has no [E, 2I, H] gate_up_proj and [E, H, I] down_proj tensors"
    if w13.shape[2] != hidden_states.shape[-1] or w2.shape[1] != hidden_states.shape[-1]:
        return None, "has weights whose shapes do not match the hidden size"
    if not (hidden_states.dtype == w13.dtype == w2.dtype and w13.dtype in _DTYPES):
        return None, f"mixes dtypes or has an unsupported one ({hidden_states.dtype}, {w13.dtype}, {w2.dtype})"
    if hidden_states.device.type not in ("cpu", "cuda"):
        return None, f"runs on {hidden_states.device.type}"
    try:
        return _activation(experts.act_fn), None
    except (ValueError, AttributeError):
        return None, f"uses the activation {type(getattr(experts, 'act_fn', None)).__name__}"


def fused_experts_forward(experts: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                          top_k_weights: torch.Tensor) -> torch.Tensor:
    """The ``"torch_ext"`` experts implementation: ``hidden_states`` [T, H], ``top_k_index`` [T, k]
    (any integer dtype), ``top_k_weights`` [T, k] -> [T, H] in ``hidden_states``' dtype."""
    from torch_ext.ops.moe import fused_moe

    activation, reason = _fused_moe_activation(experts, hidden_states)
    if activation is None:
        if (type(experts), reason) not in _WARNED:
            _WARNED.add((type(experts), reason))
            warnings.warn(f"torch_ext experts: {type(experts).__name__} {reason}; it runs transformers' eager "
                          "experts forward", stacklevel=2)
        return type(experts).forward.__wrapped__(experts, hidden_states, top_k_index, top_k_weights)
    return fused_moe(hidden_states, experts.gate_up_proj, experts.down_proj, top_k_weights.float(),
                     top_k_index.to(torch.int32), activation)


def register_fused_experts() -> str:
    """Register fused_moe in transformers' ``ExpertsInterface`` under ``"torch_ext"`` (idempotent)
    and return that name, for ``from_pretrained(..., experts_implementation="torch_ext")`` or
    ``model.set_experts_implementation("torch_ext")``. transformers 4.x has no such interface:
    a RuntimeError says so (use :func:`patch_moe` there)."""
    _interface().register(EXPERTS_IMPLEMENTATION, fused_experts_forward)
    return EXPERTS_IMPLEMENTATION


def use_fused_experts(model: nn.Module) -> nn.Module:
    """Compute every experts module of a transformers 5.x ``model`` by fused_moe (in place, weights
    and routing untouched); returns the model. Raises if the model has no experts module that takes
    an experts implementation (a silent no-op would hide a missed speed-up)."""
    register_fused_experts()
    targets = [m for m in model.modules() if hasattr(type(m).forward, "__wrapped__") and hasattr(m, "has_gate")]
    if not targets or not hasattr(model, "set_experts_implementation"):
        raise ValueError(f"torch_ext.use_fused_experts: {type(model).__name__} has no experts module that takes an "
                         "experts implementation (transformers 5.x MoE models have them)")
    model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    if not any(getattr(getattr(m, "config", None), "_experts_implementation", None) == EXPERTS_IMPLEMENTATION
               for m in targets):
        raise ValueError(f"torch_ext.use_fused_experts: {type(model).__name__} did not take the experts "
                         "implementation (set_experts_implementation left its experts modules as they were)")
    return model
