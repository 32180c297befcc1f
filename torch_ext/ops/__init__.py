"""Functional wrappers of the torch_ext ops, with their fake kernels and autograd.

Each module here keeps an op's typed wrapper, its fake (meta) implementation for
torch.compile and its autograd registration side by side.
"""

from torch_ext.ops.activation import silu_and_mul
from torch_ext.ops.attention import block_sparse_attention, moba_attention, moba_route, moba_select
from torch_ext.ops.conv import conv2d
from torch_ext.ops.moe import fused_moe, fused_moe_quantized, moe_route
from torch_ext.ops.quant import dequantize_weight, weight_only_linear
from torch_ext.ops.w8a8 import int8_linear, quantize_fp8_per_row, quantize_per_token, scaled_fp8_mm, scaled_int8_mm

__all__ = ["block_sparse_attention", "conv2d", "dequantize_weight", "fused_moe", "fused_moe_quantized", "int8_linear",
           "moba_attention", "moba_route", "moba_select", "moe_route", "quantize_fp8_per_row", "quantize_per_token",
           "scaled_fp8_mm",
           "scaled_int8_mm", "silu_and_mul", "weight_only_linear"]
