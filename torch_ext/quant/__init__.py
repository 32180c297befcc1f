"""Weight quantization: packing into the kernels' layout, round-to-nearest quantization,
checkpoint import (AutoAWQ, GPTQ) and model conversion."""

from torch_ext.quant.awq import from_awq
from torch_ext.quant.experts import QuantizedExperts, quantize_experts
from torch_ext.quant.gptq import from_gptq
from torch_ext.quant.layout import pack_qweight, unpack_qweight
from torch_ext.quant.model import quantize_model
from torch_ext.quant.quantize import quantize_weight
from torch_ext.quant.weight import QuantizedWeight

__all__ = ["QuantizedExperts", "QuantizedWeight", "from_awq", "from_gptq", "pack_qweight", "quantize_experts", "quantize_model", "quantize_weight",
           "unpack_qweight"]
