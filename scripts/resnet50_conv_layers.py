"""Every distinct convolution of torchvision's ResNet-50 (batch 8, 224x224, fp32, NCHW), ours
(torch_ext.ops.conv2d) against F.conv2d, in one process with the bench harness's timer, weights
made outside inference mode so that ours keeps its packed-weight cache as a loaded model does.
Prints per layer and weighted by how often the layer occurs in the net, and writes JSON to DIR.

    python scripts/resnet50_conv_layers.py [--batch 8] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

import torch_ext
from torch_ext.bench.timer import TimerConfig, measure, prepare_inputs

# (in channels, out channels, kernel, stride, input size, occurrences in ResNet-50)
LAYERS = [(3, 64, 7, 2, 224, 1), (64, 64, 1, 1, 56, 3), (64, 64, 3, 1, 56, 3), (64, 256, 1, 1, 56, 4),
          (256, 64, 1, 1, 56, 2), (256, 128, 1, 1, 56, 1), (128, 128, 3, 2, 56, 1), (128, 512, 1, 1, 28, 4),
          (256, 512, 1, 2, 56, 1), (512, 128, 1, 1, 28, 3), (128, 128, 3, 1, 28, 3), (512, 256, 1, 1, 28, 1),
          (256, 256, 3, 2, 28, 1), (256, 1024, 1, 1, 14, 6), (512, 1024, 1, 2, 28, 1), (1024, 256, 1, 1, 14, 5),
          (256, 256, 3, 1, 14, 5), (1024, 512, 1, 1, 14, 1), (512, 512, 3, 2, 14, 1), (512, 2048, 1, 1, 7, 3),
          (1024, 2048, 1, 2, 14, 1), (2048, 512, 1, 1, 7, 2), (512, 512, 3, 1, 7, 2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    config = TimerConfig.for_mode(quick=False)
    rows, ours_total, base_total = [], 0.0, 0.0
    for c, k, r, stride, size, count in LAYERS:
        weight = torch.randn(k, c, r, r, generator=torch.Generator().manual_seed(k * c + r)) * (c * r * r) ** -0.5
        inputs = prepare_inputs(
            lambda seed, c=c, size=size: (torch.randn(args.batch, c, size, size,
                                                      generator=torch.Generator().manual_seed(seed)),), "cpu")
        with torch.no_grad():
            ours = measure(lambda x: torch_ext.ops.conv2d(x, weight, None, stride, r // 2), inputs, config).median_s
            base = measure(lambda x: F.conv2d(x, weight, None, stride, r // 2), inputs, config).median_s
        ours_total += ours * count
        base_total += base * count
        rows.append({"c": c, "k": k, "kernel": r, "stride": stride, "size": size, "count": count,
                     "ours_us": ours * 1e6, "f_conv2d_us": base * 1e6})
        print(f"{c:5d} -> {k:5d} {r}x{r}/{stride} @{size:3d} x{count}: ours {ours * 1e3:8.2f} ms"
              f"  F.conv2d {base * 1e3:8.2f} ms  ({base / ours:.2f}x)", flush=True)
    print(f"all layers, weighted by occurrence: ours {ours_total * 1e3:.1f} ms  F.conv2d {base_total * 1e3:.1f} ms"
          f"  ({base_total / ours_total:.2f}x)")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": args.batch, "rows": rows}
    (args.out / "resnet50_conv_layers.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
