#!/usr/bin/env python3
"""Run the torch_ext benchmarks; same as ``python -m torch_ext bench [ARGS]``.

Usage: python benchmarks/run.py [--op NAME ...] [--quick] [--out DIR] [--device cpu|cuda]
"""

import sys
from pathlib import Path

try:
    import torch_ext  # noqa: F401  (an installed or already importable package wins)
except ModuleNotFoundError:
    # Running from a source checkout without installing: use the repository's package.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from torch_ext.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
