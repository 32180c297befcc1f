// Index math of fused_moe's Hopper grouped GEMMs (moe/fused_moe_wgmma.cu, sm_90a: wgmma),
// host+device so that tests/cpp/fused_moe_cuda_sim.cpp runs them on the CPU: the tile (the shared
// Hopper GEMM tile of common/wgmma_gemm_tile.h with 16-bit operands), the B rows of a tile (GEMM
// 1's gate / up halves), the pairing of gate and up accumulators in the epilogue, and when these
// kernels replace the mma.sync ones. The plan, the A rows, tails, activation and combine are the
// mma.sync GEMMs' (moe/fused_moe_cuda_index.h), so both give the same act and out up to the
// order of the fp32 sums.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/wgmma_gemm_tile.h"
#include "moe/fused_moe_cuda_index.h"

namespace torch_ext::moe {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace fused_moe_wgmma {

using namespace ::torch_ext::wgmma_gemm;
using fused_moe_cuda::ceil_div;
using fused_moe_cuda::kChunkElems;

// =============================================================================================
// 1. Tiles. 128 grouped rows x 256 B rows per CTA (2 warpgroups, m64n256k16 each), 64 values of
//    K per 128-byte stage, 4 stages of 48 KB. Why:
//    - n256, wgmma's widest: the 64 x 16 A slice from shared memory feeds the most MACs, and
//      128 x 256 moves (1/256 + 1/128) x 2 bytes from L2 per MAC. Tiles of 128 rows make the
//      plan pad each expert's segment to 128 rows (up to 127 idle rows per active expert): a
//      cost for fine-grained MoE with few rows per expert, hence the switch below.
//    - GEMM 1: B rows 0..127 are the gate rows j0..j0+127 of W13[e] and rows 128..255 the up
//      rows I+j0..: accumulator register i (gate column acc_col(i)) and i + 64 (n8 block + 16,
//      the same column of up) sit in the same thread, so act = act(g, u) is formed in registers
//      and only act [rows, I] is stored, as on mma.sync.
//    - GEMM 2: B rows are W2 rows n0..n0+255 (256 output columns), K = I.
// =============================================================================================

using Tile = WgmmaTile<256, false>;
constexpr int kElemBytes = 2;
constexpr int kBKElems = kBK / kElemBytes;  // 64 values of K per stage
constexpr int kGateCols = Tile::kBN / 2;    // 128 intermediate columns per GEMM 1 tile
constexpr int kUpRegOffset = Tile::kAccRegs / 2;
static_assert(kChunkBytes == kChunkElems * kElemBytes, "one cp.async = one chunk of 8 values");

TORCH_EXT_HOST_DEVICE int64_t gemm1_n_blocks(int64_t inter) { return ceil_div(inter, kGateCols); }
TORCH_EXT_HOST_DEVICE int64_t gemm2_n_blocks(int64_t hidden) { return ceil_div(hidden, Tile::kBN); }
TORCH_EXT_HOST_DEVICE int64_t k_iters(int64_t k_total) { return ceil_div(k_total, kBKElems); }

// The weight row (of W13[e] or W2[e]) behind B tile row b, or -1 past I (GEMM 1) / H (GEMM 2).
TORCH_EXT_HOST_DEVICE int64_t weight_row(bool gate_up, int b, int64_t n0, int64_t n_total) {
  if (!gate_up) return n0 + b < n_total ? n0 + b : -1;
  const int64_t j = n0 + (b < kGateCols ? b : b - kGateCols);
  if (j >= n_total) return -1;
  return b < kGateCols ? j : n_total + j;
}

// GEMM 1: the intermediate column of gate register i (< kUpRegOffset); its up partner is
// register i + kUpRegOffset.
TORCH_EXT_HOST_DEVICE int64_t gate_col(int64_t n0, int lane, int i) { return n0 + acc_col(lane, i); }

// =============================================================================================
// 2. The copy-engine variant (moe/fused_moe_wgmma_tma.cu; the pipeline of
//    common/wgmma_cluster_pipeline.h with gathered A). B's 256 rows are two boxes of 128 rows,
//    half h at B tile row 128 h, from a 4-D tensor map over the weights {K, n_total, halves, E}
//    (K = the row length H or I; GEMM 1: halves = 2, gate and up; GEMM 2: 1), so that boxes past
//    an expert's rows or past K read zeros, as the ring's zero-filled chunks do. Box h of a tile
//    at n0 starts at (row, half) = (n0, h) in GEMM 1 and (n0 + 128 h, 0) in GEMM 2.
// =============================================================================================

struct BoxRow {
  int64_t row, half;
};
TORCH_EXT_HOST_DEVICE BoxRow b_box_row(bool gate_up, int h, int64_t n0) {
  return gate_up ? BoxRow{n0, h} : BoxRow{n0 + int64_t(h) * kGateCols, 0};
}
// The tensor map's dimensions {K, n_total, halves, E} and byte strides of the outer three.
TORCH_EXT_HOST_DEVICE int64_t b_map_halves(bool gate_up) { return gate_up ? 2 : 1; }

// =============================================================================================
// 3. The switch. These kernels need 16-byte rows for both GEMMs (cp.async only; the mma.sync
//    kernels also take unaligned rows) and run outside the decode path. They are opt-in
//    (TORCH_EXT_MOE_WGMMA=1, read by the launcher) until they have run on a GPU.
// =============================================================================================

TORCH_EXT_HOST_DEVICE bool usable(int64_t pairs, bool rows_vectorizable) {
  return rows_vectorizable && !fused_moe_cuda::use_decode(pairs);
}

}  // namespace fused_moe_wgmma
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
