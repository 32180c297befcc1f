"""What ptxas reports for the Hopper wgmma kernels, checked without a GPU (needs nvcc).

wgmma runs asynchronously only where ptxas can prove that no other instruction touches the
accumulators of a batch in flight; where it cannot, it serializes every wgmma of the kernel and
says so with warning C7514 (performance, not correctness: the tests on the GPU still pass).
Spills inside the pipelined main loop cost as much. Both are easy to cause by reordering the
loop, so the build's report is checked here. A serialized kernel also shows in the SASS, a wait
(WARPGROUP.DEPBAR) after every GMMA instruction: the second check reads that with cuobjdump where
it is found (CUDA toolkit or triton's copy), in case a toolkit words or numbers the warning
differently."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
_NVCC = shutil.which("nvcc")


def _cuobjdump() -> str | None:
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def _serialized_kernels(sass: str) -> list[str]:
    """Kernels in which every GMMA instruction is followed by a wait before the next GMMA."""
    serialized = []
    for function in re.split(r"\n\s*Function : ", sass)[1:]:
        events = re.findall(r"[HIQ]GMMA\.|WARPGROUP\.DEPBAR", function)
        gmmas = [i for i, e in enumerate(events) if e != "WARPGROUP.DEPBAR"]
        waited = [i for i in gmmas if i + 1 < len(events) and events[i + 1] == "WARPGROUP.DEPBAR"]
        if len(gmmas) > 1 and len(waited) == len(gmmas):
            serialized.append(function.split("\n", 1)[0])
    return serialized


# (source, whether spills are allowed): the weight-only file's 4-bit Hopper batch kernel sits at
# its 128-register bound (2 CTAs per SM) and keeps 8 bytes outside its hot loop. MoBA's
# key-block-major forward (mma.sync, no wgmma) is here for its spills alone: its tile loop spilled
# ~300 B at D = 128 when the compiler hoisted the fragment addresses out of it. The Hopper
# backward's dK / dV kernel at D = 128 with 64-key blocks sits at 255 registers (dK and dV take
# 128) and keeps 8 bytes on the stack, stored before its walk and read once per step; so does
# MoBA's key-block-major dK / dV kernel (mma.sync) at D = 128 with 64-key blocks (12 bytes).
_SOURCES = [("csrc/quant/w8a8_wgmma.cu", False), ("csrc/quant/w8a8_wgmma_tma.cu", False), ("csrc/attention/block_sparse_attention_wgmma.cu", False),
            ("csrc/quant/weight_only_cuda.cu", True), ("csrc/attention/moba_gather_cuda.cu", False),
            ("csrc/attention/block_sparse_attention_wgmma_bwd.cu", True),
            ("csrc/attention/moba_gather_backward_cuda.cu", True), ("csrc/moe/fused_moe_wgmma.cu", False),
            ("csrc/moe/fused_moe_wgmma_tma.cu", False)]


@pytest.mark.skipif(_NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("source,spills_allowed", _SOURCES, ids=[s for s, _ in _SOURCES])
def test_wgmma_kernels_stay_asynchronous_without_spills(source, spills_allowed, tmp_path):
    result = subprocess.run(
        [_NVCC, "-std=c++20", "--expt-relaxed-constexpr", "-O3", f"-I{_ROOT / 'csrc'}",
         "-DTORCH_EXT_HAVE_SM90A_KERNELS=1", "-gencode", "arch=compute_90a,code=sm_90a",
         "-Xptxas", "-v", "-c", str(_ROOT / source), "-o", str(tmp_path / "kernel.o")],
        capture_output=True, text=True, timeout=600)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    assert "C7514" not in report, "ptxas serialized wgmma:\n" + report
    assert "C7519" not in report, "ptxas fenced wgmma operands written inside a batch:\n" + report
    assert "C7512" not in report, "ptxas serialized wgmma for lack of registers:\n" + report
    assert "C7508" not in report, "ptxas ignored setmaxnreg:\n" + report
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    assert spills, report
    assert spills_allowed or all(stores == "0" and loads == "0" for stores, loads in spills), report
    cuobjdump = _cuobjdump()
    if cuobjdump is not None:
        sass = subprocess.run([cuobjdump, "-sass", str(tmp_path / "kernel.o")], capture_output=True, text=True,
                              timeout=300)
        assert sass.returncode == 0, sass.stderr
        assert re.search(r"[HIQ]GMMA\.", sass.stdout) or "moba_gather" in source or "weight_only" in source, \
            "no warpgroup MMA in the SASS"
        assert not _serialized_kernels(sass.stdout), "ptxas serialized wgmma (a wait after every GMMA)"
