"""Split-K sweep of the CUDA weight-only GEMM: times weight_only_linear on one 4-bit g128 layer
for several token counts with the planner's split count and with TORCH_EXT_WO_SPLITS forced to
each of a few values (the variable is read at every call), F.linear on the same layer as the
reference, all in one process with the bench harness's timer (L2 flushed before each repetition).

    python scripts/wo_split_sweep.py [--n 8192] [--k 8192] [--m 1 16 64] [--out DIR]

Prints a table of microseconds (and ratios to F.linear) and writes it as JSON to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext.bench.timer import TimerConfig, measure, prepare_inputs
from torch_ext.quant import quantize_weight

SPLITS = ("auto", 1, 2, 4, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--k", type=int, default=8192)
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    w = torch.randn(args.n, args.k, dtype=dtype, device=args.device)
    qw = quantize_weight(w, bits=4, group_size=128)
    config = TimerConfig.for_mode(quick=False)
    rows = []
    for m in args.m:
        inputs = prepare_inputs(lambda seed: (torch.randn(m, args.k, generator=torch.Generator().manual_seed(seed))
                                              .to(args.device, dtype),), args.device)
        linear_us = measure(lambda x: F.linear(x, w), inputs, config).median_s * 1e6
        row = {"m": m, "F.linear_us": linear_us}
        for splits in SPLITS:
            os.environ.pop("TORCH_EXT_WO_SPLITS", None)
            if splits != "auto":
                os.environ["TORCH_EXT_WO_SPLITS"] = str(splits)
            ours = lambda x: torch.ops.torch_ext.weight_only_linear(  # noqa: E731
                x, qw.qweight, qw.scales, qw.zeros, None, 4, 128)
            row[f"splits={splits}_us"] = measure(ours, inputs, config).median_s * 1e6
        os.environ.pop("TORCH_EXT_WO_SPLITS", None)
        rows.append(row)
        cells = "  ".join(f"{key[:-3]} {value:7.1f} ({linear_us / value:4.2f}x)" for key, value in row.items()
                          if key.startswith("splits"))
        print(f"M={m:<4} F.linear {linear_us:7.1f} us  {cells}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record = {"device": name, "torch": torch.__version__, "n": args.n, "k": args.k,
              "dtype": args.dtype, "rows": rows}
    (args.out / "wo_split_sweep.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
