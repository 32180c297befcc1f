"""Model conversion: every nn.Linear of a model replaced by a weight-only quantized QuantLinear."""

from __future__ import annotations

from typing import Callable

from torch import nn

# The module, not the class: torch_ext.nn.quant_linear imports torch_ext.quant, so while this
# package initializes the class may not exist yet; it is looked up when quantize_model runs.
from torch_ext.nn import quant_linear


def quantize_model(model: nn.Module, bits: int = 4, group_size: int = 128, skip: Callable[[str], bool] | None = None,
                   symmetric: bool = False) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` (subclasses included) of `model` by
    ``QuantLinear.from_linear(linear, bits, group_size, symmetric)``, except those whose
    qualified name (``"model.layers.0.mlp.up_proj"``, ``"lm_head"``) `skip` accepts.

    A layer reachable under several names (shared) becomes one QuantLinear at all of them,
    unless one of its names is skipped, where it stays. Returns `model`, or the new module
    when `model` itself is an ``nn.Linear``.
    """
    quantized: dict[int, nn.Module] = {}
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if not isinstance(module, nn.Linear) or (skip is not None and skip(name)):
            continue
        if id(module) not in quantized:
            quantized[id(module)] = quant_linear.QuantLinear.from_linear(module, bits, group_size, symmetric)
        if name == "":
            return quantized[id(module)]
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, quantized[id(module)])
    return model
