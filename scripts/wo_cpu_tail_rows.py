"""Small batches of the CPU weight-only decode kernel: M rows against M rounded up to a multiple of
the kernel's 4-row block (what M cost before rows past whole blocks got a pass of their own), in
one process, the two calls alternating, medians of --reps calls each.

    python scripts/wo_cpu_tail_rows.py [--m 5 6 9 10] [--reps 11]

Prints, per dtype and layer (4-bit g128), the ratio time(M rounded up) / time(M).
"""

from __future__ import annotations

import argparse
import time

import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext.quant import quantize_weight

LAYERS = ((7168, 1024), (4096, 4096), (14336, 4096))


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, nargs="+", default=[5, 6, 9, 10])
    parser.add_argument("--reps", type=int, default=11)
    args = parser.parse_args()
    torch.manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        for n, k in LAYERS:
            q = quantize_weight((torch.randn(n, k) * k ** -0.5).to(dtype), 4, 128)

            def linear(x):
                return torch.ops.torch_ext.weight_only_linear(x, q.qweight, q.scales, q.zeros, None, 4, 128)

            cells = []
            for m in args.m:
                x, padded = torch.randn(m, k, dtype=dtype), torch.randn(-(-m // 4) * 4, k, dtype=dtype)
                linear(x), linear(padded)
                ours, before = [], []
                for _ in range(args.reps):
                    ours.append(seconds(lambda: linear(x)))
                    before.append(seconds(lambda: linear(padded)))
                ours_us, before_us = (sorted(t)[args.reps // 2] * 1e6 for t in (ours, before))
                cells.append(f"M={m}: {ours_us:.0f} us vs {before_us:.0f} us padded ({before_us / ours_us:.2f}x)")
            print(f"{str(dtype)[6:]} {n}x{k}  " + " | ".join(cells))


if __name__ == "__main__":
    main()
