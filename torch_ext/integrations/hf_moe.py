"""Reading transformers' MoE blocks (4.x expert lists and 5.x stacked experts) and swapping them
for FusedMoE."""

from __future__ import annotations

import torch
from torch import nn

_FAMILIES = ("Mixtral", "Qwen2Moe", "DeepseekV2", "DeepseekV3")


def _family(block: nn.Module) -> str | None:
    name = type(block).__name__
    if not (name.endswith("SparseMoeBlock") or name.endswith("MoE") or name.endswith("Moe")):
        return None
    return next((family for family in _FAMILIES if name.startswith(family)), None)


def _activation(act_fn: nn.Module) -> str:
    name = type(act_fn).__name__
    if isinstance(act_fn, nn.SiLU) or name in ("SiLUActivation", "SiLU"):
        return "silu"
    if name == "GELUActivation" or (isinstance(act_fn, nn.GELU) and act_fn.approximate == "none"):
        return "gelu"
    raise ValueError(f"torch_ext: unsupported expert activation {name} (fused_moe has silu and exact gelu)")


def _stacked_experts(experts: nn.Module, hidden_size: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(w13 [E, 2I, H], w2 [E, H, I], activation) of a 5.x experts module or a 4.x expert list."""
    if hasattr(experts, "gate_up_proj"):
        w13, w2 = experts.gate_up_proj, experts.down_proj
        if w13.shape[-1] != hidden_size:  # stored transposed ([E, H, 2I] and [E, I, H])
            w13 = nn.Parameter(w13.detach().transpose(1, 2).contiguous(), requires_grad=w13.requires_grad)
            w2 = nn.Parameter(w2.detach().transpose(1, 2).contiguous(), requires_grad=w2.requires_grad)
        return w13, w2, _activation(experts.act_fn)
    first = experts[0]
    if hasattr(first, "w1"):  # Mixtral 4.x: w1 gate, w3 up, w2 down
        gate, up, down = "w1", "w3", "w2"
    else:
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    projections = [getattr(e, name) for e in experts for name in (gate, up, down)]
    if any(p.bias is not None for p in projections):
        raise ValueError("torch_ext: experts with biased projections (e.g. DeepSeek-V2 with mlp_bias) are not "
                         "supported (fused_moe has no expert biases)")
    w13 = torch.stack([torch.cat([getattr(e, gate).weight, getattr(e, up).weight]) for e in experts])
    w2 = torch.stack([getattr(e, down).weight for e in experts])
    trainable = any(p.weight.requires_grad for p in projections)  # frozen experts stay frozen
    return (nn.Parameter(w13.detach(), requires_grad=trainable), nn.Parameter(w2.detach(), requires_grad=trainable),
            _activation(first.act_fn))


def describe_moe_block(block: nn.Module) -> dict:
    """FusedMoE constructor arguments plus the tensors and submodules to reuse, for a transformers
    Mixtral / Qwen2-MoE / DeepSeek-V2 / DeepSeek-V3 MoE block."""
    family = _family(block)
    if family is None:
        raise ValueError(f"torch_ext: {type(block).__name__} is not a supported transformers MoE block "
                         f"({', '.join(_FAMILIES)})")
    gate = block.gate
    router_weight = gate.weight
    num_experts, hidden_size = router_weight.shape
    w13, w2, activation = _stacked_experts(block.experts, hidden_size)
    config = getattr(block, "config", None)

    def setting(name, default=None):
        for source in (gate, block, config):
            if source is not None and hasattr(source, name):
                return getattr(source, name)
        return default

    spec = dict(num_experts=num_experts, top_k=setting("top_k"), hidden_size=hidden_size,
                intermediate_size=w2.shape[2], activation=activation, w13=w13, w2=w2,
                router_weight=router_weight, correction_bias=None, shared_expert=None, shared_expert_gate=None,
                return_router_logits=isinstance(block.experts, nn.ModuleList) and family in ("Mixtral", "Qwen2Moe"))
    if family == "Mixtral":
        spec.update(renormalize=True, jitter_noise=float(setting("jitter_noise", 0.0) or 0.0))
    elif family == "Qwen2Moe":
        spec.update(renormalize=bool(setting("norm_topk_prob", False)), shared_expert=block.shared_expert,
                    shared_expert_gate=block.shared_expert_gate)
    else:
        groups = setting("n_group", setting("num_group", 1)) or 1
        group_limited = family == "DeepseekV3" or setting("topk_method", "greedy") == "group_limited_greedy"
        spec.update(scoring="sigmoid" if family == "DeepseekV3" else "softmax",
                    renormalize=bool(setting("norm_topk_prob", False)) if family == "DeepseekV3" else False,
                    num_expert_group=groups if group_limited else 1,
                    topk_group=(setting("topk_group", 1) or 1) if group_limited else 1,
                    routed_scaling_factor=float(setting("routed_scaling_factor", 1.0) or 1.0),
                    router_dtype=torch.float32, shared_expert=block.shared_experts)
        if family == "DeepseekV3":
            spec["correction_bias"] = gate.e_score_correction_bias
    return spec


def patch_moe(model: nn.Module) -> nn.Module:
    """Replace every supported transformers MoE block in ``model`` (in place) by a
    :class:`torch_ext.nn.FusedMoE` with the same weights; returns the model. Raises if the model
    has none (a silent no-op would hide a missed speed-up)."""
    from torch_ext.nn.fused_moe import FusedMoE

    targets = [(name, module) for name, module in model.named_modules() if _family(module) is not None]
    if not targets:
        raise ValueError(f"torch_ext.patch_moe: no supported MoE block in {type(model).__name__} "
                         f"(looked for {', '.join(_FAMILIES)} blocks)")
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        fused = FusedMoE.from_hf(module)
        fused.train(module.training)
        setattr(parent, child, fused)
    _record_router_logits(model)
    return model


def _record_router_logits(model: nn.Module) -> None:
    """transformers collects ``router_logits`` (``output_router_logits``, the load-balancing loss)
    with recorders that find the stock router (5.x) or MoE block (4.x) by class; after patching
    they must find FusedMoE's MoeRouter, whose output is the [T, E] logits. The recorder table is
    a class attribute that each model's __init__ copies into a registry keyed by class, so both
    get a MoeRouter entry (it finds nothing in unpatched models of the class). 5.x installs its
    hooks once per model: an already hooked model gets the hook on its new routers here."""
    from torch_ext.nn.fused_moe import MoeRouter

    try:  # 5.x
        from transformers.utils import output_capturing as capturing
        from transformers.utils.output_capturing import OutputRecorder, _CAN_RECORD_REGISTRY
        install_hook = (getattr(capturing, "install_output_capuring_hook", None)  # (sic, 5.x)
                        or getattr(capturing, "install_output_capturing_hook", None))
    except ImportError:
        try:  # 4.x
            from transformers.utils.generic import OutputRecorder, _CAN_RECORD_REGISTRY
        except ImportError:  # a transformers without recorders: the blocks return their logits themselves
            return
        install_hook = None
    # 4.x and 5.x to at least 5.18 key a plain dict by the class name; later 5.x (5.24) has a dict
    # subclass whose __setitem__ takes the model and keys by its class itself.
    keyed_by_class_name = type(_CAN_RECORD_REGISTRY) is dict
    for module in model.modules():
        table = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(table, dict) or "router_logits" not in table:
            continue
        specs = table["router_logits"] if isinstance(table["router_logits"], list) else [table["router_logits"]]
        if not any(isinstance(s, OutputRecorder) and s.target_class is MoeRouter for s in specs):
            table = {**table, "router_logits": [*specs, OutputRecorder(MoeRouter, index=0)]}
            type(module)._can_record_outputs = table
            if keyed_by_class_name:
                _CAN_RECORD_REGISTRY[str(type(module))] = table
            else:
                _CAN_RECORD_REGISTRY[module] = table
        if install_hook is not None and getattr(module, "_output_capturing_hooks_installed", False):
            for router in module.modules():
                if isinstance(router, MoeRouter):
                    install_hook(router, "router_logits", 0)
