"""Times block_sparse_attention's forward on the CPU for one shape, outside the harness: B = 1,
8 query heads, 2 KV heads, D = 128, bf16, 64 x 64 blocks, non-causal, a random block mask of the
given density (the diagonal always kept; the harness's attention suite draws the same masks).
For A/B runs of two builds, alternated; the harness's numbers are in docs/perf/.

    python scripts/bsa_cpu_timing.py --seq 8192 --density 1.0 --reps 2
"""

import argparse
import time

import torch

import torch_ext  # noqa: F401 (registers the ops)
from torch_ext.attention import BlockSparseMask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=8192)
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    seq, blocks = args.seq, args.seq // 64
    gen = torch.Generator().manual_seed(blocks)
    q, k, v = (torch.randn(1, heads, seq, 128, generator=gen).bfloat16() for heads in (8, 2, 2))
    keep = (torch.rand(1, 8, blocks, blocks, generator=torch.Generator().manual_seed(blocks)) < args.density)
    mask = BlockSparseMask.from_dense(keep | torch.eye(blocks, dtype=torch.bool), 64, 64, seq, seq)

    def forward():
        return torch.ops.torch_ext.block_sparse_attention(q, k, v, mask.kv_counts, mask.kv_indices, 64, 64, False,
                                                          128 ** -0.5)[0]

    forward()
    start = time.perf_counter()
    for _ in range(args.reps):
        forward()
    print(f"S={seq} density={args.density}: {(time.perf_counter() - start) / args.reps * 1e3:.1f} ms "
          f"(AMX mode {torch_ext._C.cpu_amx()}, {torch.get_num_threads()} threads)")


if __name__ == "__main__":
    main()
