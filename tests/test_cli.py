"""The command line: info and check (bench is covered in test_bench.py)."""

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch_ext", *args], capture_output=True, text=True, timeout=600)


def test_info_lists_ops_and_kernels():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "silu_and_mul" in out.stdout
    assert "CPU ISA paths compiled" in out.stdout
    assert "AMX kernels:" in out.stdout
    line = next(l for l in out.stdout.splitlines() if l.strip().startswith("silu_and_mul "))
    assert "cpu" in line


def test_check_passes():
    out = _run("check")
    assert out.returncode == 0, out.stdout + out.stderr
    assert " 0 failed" in out.stdout


def test_unknown_command_fails():
    assert _run("frobnicate").returncode != 0


def test_unknown_options_fail():
    """A mistyped option is an error, not silently ignored (only bench takes further options)."""
    out = _run("check", "--device", "cuda")
    assert out.returncode != 0 and "unrecognized arguments for check: --device cuda" in out.stderr
