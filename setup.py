"""Build torch_ext: setup.py decides about the environment, CMakeLists.txt says what to compile.

    pip install --no-build-isolation -e .     # develop
    pip wheel --no-build-isolation .          # a wheel for machines with the same torch

Environment variables:
    TORCH_EXT_CPU_ONLY=1        build the CPU kernels only, even where CUDA is available
    TORCH_CUDA_ARCH_LIST        GPU targets, e.g. "8.0;9.0a" (default: 8.0;8.6;8.9;9.0a+PTX)
    CUDA_HOME / CUDA_PATH       the CUDA toolkit (default: found through the nvcc on PATH)
    MAX_JOBS                    parallel compile jobs (default: all cores)
    TORCH_EXT_BUILD_TYPE        CMake build type (default: Release)
A compiler cache (ccache or sccache) on PATH is used when present.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0a+PTX"


def read_version() -> str:
    match = re.search(r'__version__ = "([^"]+)"', (ROOT / "torch_ext" / "_version.py").read_text())
    return match.group(1)


def log(message: str) -> None:
    print(f"torch_ext build: {message}", flush=True)


def real_cuda_home() -> Path | None:
    """The CUDA toolkit root, looking through wrapper scripts around nvcc.

    `nvcc -dryrun` prints the toolkit's own root as `TOP=...`, which is right even when the
    nvcc on PATH is a shell script in another folder (tools that take dirname(dirname(nvcc))
    would land on /usr/local there).
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return Path(home)
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    if nvcc is None:
        return None
    try:
        # A dry run of a compile (the file need not exist) prints the toolkit's variables.
        out = subprocess.run([nvcc, "-dryrun", "-c", "probe.cu", "-o", os.devnull],
                             capture_output=True, text=True, timeout=60)
        text = out.stdout + out.stderr
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", text, re.MULTILINE)
    if match:
        return Path(os.path.normpath(match.group(1).strip()))
    return Path(nvcc).resolve().parent.parent


def cuda_decision() -> tuple[bool, Path | None, str]:
    """(build CUDA?, toolkit root, reason shown to the user)."""
    if os.environ.get("TORCH_EXT_CPU_ONLY", "0") not in ("", "0"):
        return False, None, "TORCH_EXT_CPU_ONLY is set"
    import torch

    if not torch.version.cuda:
        return False, None, f"torch {torch.__version__} is not a CUDA build"
    home = real_cuda_home()
    if home is None:
        return False, None, "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return True, home, f"nvcc in {home}, torch CUDA {torch.version.cuda}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        output_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        with_cuda, cuda_home, reason = cuda_decision()
        log(("CUDA kernels ON: " if with_cuda else "CPU-ONLY build (no CUDA kernels): ") + reason)

        build_type = os.environ.get("TORCH_EXT_BUILD_TYPE", "Release")
        build_dir = ROOT / "build" / f"cmake-py{sys.version_info.major}{sys.version_info.minor}-{'cuda' if with_cuda else 'cpu'}"
        args = [
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DTORCH_EXT_OUTPUT_DIR={output_dir}",
            f"-DTORCH_EXT_WITH_CUDA={'ON' if with_cuda else 'OFF'}",
        ]
        if shutil.which("ninja"):
            args += ["-G", "Ninja"]
        launcher = shutil.which("ccache") or shutil.which("sccache")
        if launcher:
            log(f"compiler cache: {launcher}")
            args += [f"-DCMAKE_CXX_COMPILER_LAUNCHER={launcher}", f"-DCMAKE_CUDA_COMPILER_LAUNCHER={launcher}"]
        if with_cuda:
            archs = os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS).replace(" ", ";")
            log(f"GPU targets: {archs}")
            args += [
                f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                f"-DCUDAToolkit_ROOT={cuda_home}",
                f"-DTORCH_EXT_CUDA_ARCHS={archs}",
            ]
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)

        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), *args])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--parallel", jobs])


def torch_requirement() -> list[str]:
    """The extension links against one torch ABI: require the minor series it was built with."""
    try:
        import torch
    except ImportError:
        return ["torch"]
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return [f"torch=={major}.{minor}.*"]


setup(
    name="torch_ext",
    version=read_version(),
    description="Hand-written C++/CUDA operators for PyTorch: quantized GEMM, fused MoE, "
    "block-sparse attention, im2win convolution",
    packages=find_packages(include=["torch_ext", "torch_ext.*"]),
    ext_modules=[CMakeExtension("torch_ext._C")],
    cmdclass={"build_ext": CMakeBuild},
    python_requires=">=3.10",
    install_requires=torch_requirement(),
    extras_require={
        "bench": ["matplotlib", "tqdm", "nvidia-ml-py"],
        "test": ["pytest", "hypothesis", "numpy"],
    },
    zip_safe=False,
)
