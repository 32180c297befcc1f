"""Print the facts CMake needs about the installed torch, one `KEY=VALUE` per line.

Run by CMakeLists.txt with the same Python that builds the package, so the extension is
always compiled against the torch it will be imported with.
"""
import glob
import os
import sysconfig

import torch

torch_dir = os.path.dirname(torch.__file__)
site_packages = os.path.dirname(torch_dir)
# CUDA builds of torch pull cuBLAS/cuSPARSE headers (ATen/cuda/CUDAContext.h) that a bare
# toolkit may lack; the torch wheel's nvidia-* dependencies ship them here.
nvidia_includes = sorted(glob.glob(os.path.join(site_packages, "nvidia", "*", "include")))

facts = {
    "TORCH_VERSION": torch.__version__.split("+")[0],
    "TORCH_CUDA_VERSION": torch.version.cuda or "",
    "TORCH_INCLUDE_DIRS": ";".join(
        [os.path.join(torch_dir, "include"), os.path.join(torch_dir, "include", "torch", "csrc", "api", "include")]
    ),
    "TORCH_LIBRARY_DIR": os.path.join(torch_dir, "lib"),
    "TORCH_CXX11_ABI": int(torch._C._GLIBCXX_USE_CXX11_ABI),
    "TORCH_NVIDIA_INCLUDE_DIRS": ";".join(nvidia_includes),
    "PYTHON_EXT_SUFFIX": sysconfig.get_config_var("EXT_SUFFIX"),
}
for key, value in facts.items():
    print(f"{key}={value}")
