#!/usr/bin/env python3
"""Whether a refactor of a CUDA file left its kernels' instructions unchanged, without a GPU.

    python scripts/compare_ptx.py csrc/attention/block_sparse_attention_cuda.cu [--base HEAD]

Compiles the file as it is in the working tree and as it is at --base (git) to PTX for sm_90a,
then compares, kernel by kernel, the multiset of PTX instructions with register numbers and
branch labels normalized away. Equal multisets mean the code moved or was renamed but computes
the same instructions (the order can differ: ptxas schedules anyway); a difference names the
kernels and the instructions that appeared or vanished. Exit status 0: the same; 1: different.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_REGISTER = re.compile(r"%(r|rd|f|fd|p|rs|h|hh)\d+")
_LABEL = re.compile(r"\$L__BB\d+_\d+")
_ENTRY = re.compile(r"\.entry\s+(\S+?)\(")
# Anonymous namespaces are mangled with a hash of the file's path, which differs between trees.
_ANONYMOUS = re.compile(r"_GLOBAL__N__[0-9a-f]+_")


def kernel_instructions(ptx: str) -> dict[str, collections.Counter]:
    """Normalized instruction multiset of every .entry in a PTX file."""
    kernels: dict[str, collections.Counter] = {}
    current = None
    for line in ptx.splitlines():
        text = line.strip()
        entry = _ENTRY.search(text)
        if entry:
            current = kernels.setdefault(_ANONYMOUS.sub("_GLOBAL__N__", entry.group(1)), collections.Counter())
            continue
        if current is None or not text or text.startswith(("//", ".loc", ".file")):
            continue
        current[_ANONYMOUS.sub("_GLOBAL__N__", _LABEL.sub("L", _REGISTER.sub(r"%\1", text)))] += 1
    return kernels


def compile_ptx(source_root: Path, cu_file: str, out: Path) -> str:
    nvcc = shutil.which("nvcc") or "nvcc"
    subprocess.run([nvcc, "-std=c++20", "--expt-relaxed-constexpr", f"-I{source_root / 'csrc'}",
                    "-gencode", "arch=compute_90a,code=compute_90a", "-ptx", str(source_root / cu_file),
                    "-o", str(out)], check=True)
    return out.read_text()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cu_file", help="path of the .cu file, relative to the repository root")
    parser.add_argument("--base", default="HEAD", help="git revision to compare against (default HEAD)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_tree = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), args.base],
                       check=True, capture_output=True)
        try:
            before = kernel_instructions(compile_ptx(base_tree, args.cu_file, Path(tmp) / "before.ptx"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=True)
        after = kernel_instructions(compile_ptx(ROOT, args.cu_file, Path(tmp) / "after.ptx"))
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    for name in changed[:10]:
        old, new = before.get(name, collections.Counter()), after.get(name, collections.Counter())
        print(f"{name}: -{sum((old - new).values())} +{sum((new - old).values())} instructions")
        for text, count in (old - new).most_common(3):
            print(f"    - {count} x {text}")
        for text, count in (new - old).most_common(3):
            print(f"    + {count} x {text}")
    print(f"{len(after)} kernels, {len(changed)} with different instructions than at {args.base}")
    return 1 if changed else 0


if __name__ == "__main__":
    sys.exit(main())
