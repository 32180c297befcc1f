"""Where fused_moe's forward should switch from the fused CUDA kernel to torch._grouped_mm: times
fused_moe on Mixtral-8x7B and DeepSeek-V2-Lite experts (bf16, uniform routing) for several token
counts with TORCH_EXT_MOE_GROUPED_FORWARD=0 (fused kernel), =1 (grouped GEMMs), unset (the
automatic choice), and the fused kernel with its GEMMs on Hopper wgmma (TORCH_EXT_MOE_WGMMA=1, on
sm_90a builds; elsewhere it equals "fused"), cp.async and copy-engine variants (fused_wgmma_tma:
TORCH_EXT_MOE_WGMMA_TMA=1 too), all in one process with the bench harness's timer
(L2 flushed before each repetition). The variables are read at every call.

    python scripts/moe_grouped_sweep.py [--tokens 1 8 16 32 64 256] [--out DIR]

Prints a table of microseconds and writes it as JSON to DIR.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

import torch_ext  # noqa: F401  (registers the ops)
from torch_ext.bench.timer import TimerConfig, measure, prepare_inputs

# (experts, top_k, hidden, intermediate), as in the bench's MoE suite.
CONFIGS = {"mixtral": (8, 2, 4096, 14336), "deepseek_v2_lite": (64, 6, 2048, 1408)}
# The forward's switches per column: unset variables take their defaults.
CHOICES = {"fused": {"TORCH_EXT_MOE_GROUPED_FORWARD": "0"}, "grouped": {"TORCH_EXT_MOE_GROUPED_FORWARD": "1"},
           "auto": {}, "fused_wgmma": {"TORCH_EXT_MOE_GROUPED_FORWARD": "0", "TORCH_EXT_MOE_WGMMA": "1"},
           "fused_wgmma_tma": {"TORCH_EXT_MOE_GROUPED_FORWARD": "0", "TORCH_EXT_MOE_WGMMA": "1",
                               "TORCH_EXT_MOE_WGMMA_TMA": "1"}}
SWITCHES = sorted({name for env in CHOICES.values() for name in env})


def set_switches(env: dict[str, str]) -> None:
    for name in SWITCHES:
        os.environ.pop(name, None)
    os.environ.update(env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256])
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to smoke-test the script)")
    parser.add_argument("--scale", type=int, default=1, help="divide H and I by this (smoke tests)")
    parser.add_argument("--out", type=Path, default=Path("bench_results"))
    args = parser.parse_args()
    config = TimerConfig.for_mode(quick=False)
    rows = []
    for family, (experts, top_k, hidden, intermediate) in CONFIGS.items():
        hidden, intermediate = hidden // args.scale, intermediate // args.scale
        gen = torch.Generator().manual_seed(0)
        w13 = (torch.randn(experts, 2 * intermediate, hidden, generator=gen) * hidden ** -0.5).to(args.device,
                                                                                                  torch.bfloat16)
        w2 = (torch.randn(experts, hidden, intermediate, generator=gen) * intermediate ** -0.5).to(args.device,
                                                                                                  torch.bfloat16)
        for tokens in args.tokens:
            def make_inputs(seed: int):
                g = torch.Generator().manual_seed(seed)
                weights, ids = torch.ops.torch_ext.moe_route(torch.randn(tokens, experts, generator=g), top_k, True,
                                                             "softmax", 1, 1, None, 1.0)
                x = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
                return x.to(args.device), weights.to(args.device), ids.to(args.device)

            inputs = prepare_inputs(make_inputs, args.device)
            row = {"family": family, "tokens": tokens}
            for name, env in CHOICES.items():
                set_switches(env)
                with torch.no_grad():
                    row[f"{name}_us"] = measure(
                        lambda x, w, i: torch.ops.torch_ext.fused_moe(x, w13, w2, w, i, "silu"), inputs,
                        config).median_s * 1e6
            set_switches({})
            rows.append(row)
            print(f"{family:17s} T={tokens:<5d} fused {row['fused_us']:9.1f} us  grouped {row['grouped_us']:9.1f} us"
                  f"  auto {row['auto_us']:9.1f} us  fused_wgmma {row['fused_wgmma_us']:9.1f} us"
                  f"  fused_wgmma_tma {row['fused_wgmma_tma_us']:9.1f} us"
                  f"  (grouped / fused_wgmma {row['grouped_us'] / row['fused_wgmma_us']:.2f},"
                  f" / fused_wgmma_tma {row['grouped_us'] / row['fused_wgmma_tma_us']:.2f})", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    record = {"device": name, "torch": torch.__version__, "dtype": "bfloat16", "rows": rows}
    (args.out / "moe_grouped_sweep.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
