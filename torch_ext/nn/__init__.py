"""Drop-in nn.Module versions of the torch_ext ops."""

from torch_ext.nn.activation import SiluAndMul
from torch_ext.nn.attention import MoBAAttention
from torch_ext.nn.conv import Im2winConv2d, convert_conv2d
from torch_ext.nn.fp8_linear import FP8Linear
from torch_ext.nn.fused_moe import FusedMoE
from torch_ext.nn.int8_linear import Int8Linear
from torch_ext.nn.quant_linear import QuantLinear

__all__ = ["FP8Linear", "FusedMoE", "Im2winConv2d", "Int8Linear", "MoBAAttention", "QuantLinear", "SiluAndMul",
           "convert_conv2d"]
