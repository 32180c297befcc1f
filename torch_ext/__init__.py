"""torch_ext: hand-written C++/CUDA operators for PyTorch.

Importing the package loads the compiled extension, which registers every op under
torch.ops.torch_ext, and the Python side of each op (fake kernels for torch.compile,
autograd). Functional wrappers live in torch_ext.ops, drop-in modules in torch_ext.nn.
"""

import torch  # noqa: F401  (loads libtorch before the extension that links against it)

from torch_ext._version import __version__
from torch_ext import _C
from torch_ext import attention, ops, nn

build_info = _C.build_info

__all__ = ["__version__", "attention", "build_info", "ops", "nn"]
