"""Drop-in nn.Module versions of the torch_ext ops."""

from torch_ext.nn.activation import SiluAndMul

__all__ = ["SiluAndMul"]
