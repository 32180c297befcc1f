// The parts of fused_moe's Hopper grouped GEMMs that do not depend on how the operands reach
// shared memory (moe/fused_moe_wgmma.cu: cp.async ring; moe/fused_moe_wgmma_tma.cu: B by the copy
// engine in 2-CTA clusters): one stage's wgmma batch and the epilogues. sm_90a code only. No
// torch headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda/wgmma.cuh"
#include "moe/fused_moe_cuda_gemm.cuh"
#include "moe/fused_moe_wgmma_index.h"

namespace torch_ext::cuda::fused_moe_sm90 {

namespace wx = ::torch_ext::moe::fused_moe_wgmma;
using Tile = wx::Tile;

// One stage of a warpgroup: 4 x wgmma.m64n256k16 from the stage's A rows (desc_a: the
// warpgroup's 64) and its 256 B rows, into the 128 fp32 accumulators, committed as one batch.
template <typename T>
__device__ __forceinline__ void issue_stage(float (&acc)[Tile::kAccRegs], uint64_t desc_a, uint64_t desc_b) {
  wgmma_fence_operands(acc);  // (before wgmma.fence: no accumulator access may move past it)
  wgmma_fence();
#pragma unroll
  for (int s = 0; s < wx::kKSteps; ++s)
    wgmma_m64n256k16_ss<std::is_same_v<T, BFloat16>>(acc, wx::desc_at_k_step(desc_a, s), wx::desc_at_k_step(desc_b, s));
  wgmma_commit();
}

// The epilogue of consumer warpgroup `warpgroup` (rows 64 warpgroup.. of the tile at grouped row
// row0, B rows from n0): the thread's two rows (registers 4 j + 2 h, + 1 of every n8 block j).
// GEMM 1 stores act = act(gate, up) rounded to the io dtype (gate register i and up register
// i + kUpRegOffset hold the same column); GEMM 2 adds w * y into the rank-ordered fp32 sum.
template <typename T, bool kGateUp>
__device__ __forceinline__ void store_tile(const GemmArgs<T>& p, const float (&acc)[Tile::kAccRegs], int64_t row0,
                                           int64_t n0, int warpgroup, int warp_in_group, int lane) {
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int64_t r = row0 + wx::acc_row(warpgroup, warp_in_group, lane, 2 * h);
    const int32_t pair = p.sorted[r];
    if (pair < 0) continue;  // padding row
    if constexpr (kGateUp) {
#pragma unroll
      for (int j = 0; j < wx::kGateCols / 8; ++j) {
        const int i = 4 * j + 2 * h, up = i + wx::kUpRegOffset;
        store_act_pair(p, r, wx::gate_col(n0, lane, i), acc[i], acc[up], acc[i + 1], acc[up + 1]);
      }
    } else {
      const CombineRow<T> row(p, pair);
#pragma unroll
      for (int j = 0; j < Tile::kBN / 8; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) row.add(p, n0 + wx::acc_col(lane, 4 * j + 2 * h + e), acc[4 * j + 2 * h + e]);
    }
  }
}

}  // namespace torch_ext::cuda::fused_moe_sm90
