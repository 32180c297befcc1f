"""Model conversion: every nn.Linear of a model replaced by a quantized linear layer."""

from __future__ import annotations

from typing import Callable

from torch import nn

# The module, not the class: torch_ext.nn.quant_linear imports torch_ext.quant, so while this
# package initializes the class may not exist yet; it is looked up when quantize_model runs.
from torch_ext.nn import fp8_linear, int8_linear, quant_linear

METHODS = ("weight_only", "int8", "fp8")


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip: Callable[[str], bool] | None = None,
                   symmetric: bool = False, method: str = "weight_only",
                   outlier_threshold: float = 6.0) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (subclasses included) of `model` by a quantized
    layer, except those whose qualified name (``"model.layers.0.mlp.up_proj"``, ``"lm_head"``)
    `skip` accepts, and the layers torch modules read the weight of directly: the output
    projections of ``nn.MultiheadAttention`` (torch's dynamic quantization leaves them too) and
    ``linear1`` / ``linear2`` of ``nn.TransformerEncoderLayer`` (its inference fast path); and the
    routers of ``FusedMoE`` (small, and computed in float where ``router_dtype`` asks).
    ``method="weight_only"``: ``QuantLinear.from_linear(linear, bits, group_size, symmetric)``,
    and the experts of every ``FusedMoE`` (e.g. after ``patch_moe``: most of a MoE model's
    weights) quantized in place by ``FusedMoE.quantize_experts_(bits, group_size, symmetric)``
    unless `skip` accepts the FusedMoE's name (``"model.layers.0.mlp"``);
    ``method="int8"``: ``Int8Linear.from_linear(linear, outlier_threshold)`` (W8A8 with LLM.int8()
    outliers); ``method="fp8"``: ``FP8Linear.from_linear(linear)`` (bits/group_size/symmetric
    unused by both; FusedMoE experts stay as they are: there is no W8A8 expert kernel).

    A layer reachable under several names (shared) becomes one QuantLinear at all of them,
    unless one of its names is skipped, where it stays. Returns `model`, or the new module
    when `model` itself is an ``nn.Linear``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")

    def convert(linear: nn.Linear) -> nn.Module:
        if method == "int8":
            return int8_linear.Int8Linear.from_linear(linear, outlier_threshold=outlier_threshold)
        if method == "fp8":
            return fp8_linear.FP8Linear.from_linear(linear)
        return quant_linear.QuantLinear.from_linear(linear, bits, group_size, symmetric)

    from torch_ext.nn.fused_moe import FusedMoE, MoeRouter  # here: torch_ext.nn imports this package

    if method == "weight_only":  # experts in place: kept if any name of a shared FusedMoE is skipped
        names: dict[int, tuple[FusedMoE, list[str]]] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            if isinstance(module, FusedMoE):
                names.setdefault(id(module), (module, []))[1].append(name)
        for module, module_names in names.values():
            if module.quantization is None and not (skip is not None and any(map(skip, module_names))):
                module.quantize_experts_(bits, group_size, symmetric)

    kept = {id(child) for layer in model.modules()
            if isinstance(layer, nn.TransformerEncoderLayer)
            for child in (layer.linear1, layer.linear2)}
    quantized: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if (not isinstance(module, nn.Linear) or id(module) in kept
                or isinstance(module, (nn.modules.linear.NonDynamicallyQuantizableLinear, MoeRouter))
                or (skip is not None and skip(name))):
            continue
        if id(module) not in quantized:
            quantized[id(module)] = convert(module)
        if name == "":
            return quantized[id(module)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized[id(module)])
    return model
