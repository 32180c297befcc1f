"""The CPU kernels under valgrind's memcheck: small, odd-shaped correctness tests of every op
family (tails in every dimension, every ISA level valgrind runs) in a subprocess under valgrind,
which must report no invalid read or write inside torch_ext. valgrind emulates a CPU without
AVX-512, so the scalar and AVX2 kernels (and the shared drivers, epilogues and tail handling)
are what it checks; the AVX-512 ones share those drivers. It found a real one: the packed int8
GEMM's epilogue read up to 48 column sums past the end of the packed weight (2026-11-26).
Skipped where valgrind is not installed. Several minutes (valgrind runs code ~50x slower)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ["test_silu_and_mul.py", "test_conv.py", "test_weight_only.py", "test_w8a8.py", "test_fp8.py",
         "test_fused_moe.py", "test_block_sparse_attention.py", "test_moba.py", "test_moe_route.py"]
SELECTION = ("(every_cpu_isa_path or every_isa or extreme_values or random_shapes_cpu or odd_shapes "
             "or matches_reference_cpu or dequantize_matches_reference or sums_exactly or rounds_each_step "
             "or quantize_per_token_exact or scaled_fp8_mm_matches_reference or one_expert_and_idle "
             "or select_equals_naive or softmax_routing or deepseek_v3_routing or (panel_path_row_counts and silu) "
             "or (pointwise_path and tail)) and not cuda")
# An error report: "==PID== Invalid read of size 8" and its stack, up to the next blank report line.
_REPORT = re.compile(r"^==\d+== (Invalid (?:read|write) of size \d+.*?)(?=^==\d+== \n|\Z)", re.M | re.S)


def ours(report: str) -> bool:
    """Whether an error report's stack passes through torch_ext's extension module."""
    return "torch_ext" in report or "_C.cpython" in report


def test_ours_spots_extension_frames():
    assert ours("at 0x1: void torch_ext::cpu::avx2::w8a8::epilogue_row<...>") and not ours("at 0x1: strncmp")


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_cpu_kernels_have_no_invalid_accesses():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    command = ["valgrind", "--tool=memcheck", "--error-limit=no", "--undef-value-errors=no", "--num-callers=40",
               sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *[str(ROOT / "tests" / f) for f in FILES],
               "-k", SELECTION]
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    log = run.stdout + run.stderr
    # pytest's report is stdout (valgrind writes to stderr): which test failed, and why.
    assert run.returncode == 0 and re.search(r"\d+ passed", log), \
        f"the tests failed under valgrind:\n{run.stdout[-6000:]}\n{run.stderr[-1500:]}"
    reports = [r for r in _REPORT.findall(log) if ours(r)]
    assert not reports, f"{len(reports)} invalid accesses in torch_ext:\n" + "\n".join(reports[:3])
