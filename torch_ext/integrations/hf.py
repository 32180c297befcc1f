"""transformers integration: replace a model's modules by torch_ext's fused ones, weights kept.

- :func:`patch_moe`: every Mixtral, Qwen2-MoE, DeepSeek-V2 or DeepSeek-V3 MoE block becomes a
  :class:`torch_ext.nn.FusedMoE`.
- :func:`use_fused_experts` (transformers 5.x): every experts module of any MoE model computed by
  fused_moe through transformers' experts-implementation interface (name ``"torch_ext"``, see
  :func:`register_fused_experts`), the model's routing and parameters unchanged.
- :func:`patch_attention`: attention (Llama family) by MoBA or block-sparse kernels (prefill).

transformers 4.x and 5.x are both supported (the experts interface is 5.x's).
"""

from torch_ext.integrations.hf_attention import patch_attention
from torch_ext.integrations.hf_experts import register_fused_experts, use_fused_experts
from torch_ext.integrations.hf_moe import patch_moe

__all__ = ["patch_attention", "patch_moe", "register_fused_experts", "use_fused_experts"]
