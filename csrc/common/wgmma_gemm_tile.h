// The tile, copy map, descriptors and accumulator map shared by the Hopper GEMMs whose operands
// both stream through shared memory (quant/w8a8_wgmma.cu, moe/fused_moe_wgmma.cu), host+device
// so that the simulators in tests/cpp run on the CPU what the GPU runs. The element type does
// not appear: a stage row is 128 bytes of K (128 8-bit values or 64 16-bit ones), one wgmma
// step 32 bytes of it (k32 for 8-bit operands, k16 for 16-bit ones), and the descriptors and
// swizzle are the same for both.
#pragma once

#include <cstdint>

#include "common/index_math.h"
#include "common/macros.h"
#include "common/wgmma_desc.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace wgmma_gemm {

// =============================================================================================
// 1. Tiles. A CTA = 2 warpgroups (8 warps) owns a 128 x kBN output tile; warpgroup g owns rows
//    64 g .. 64 g + 63 and all kBN columns: one wgmma.m64n<kBN> per 32-byte k step. K streams
//    in 128-byte stages: a row of a stage is exactly one 128-byte swizzle row, the layout wgmma
//    reads without bank conflicts. All threads both copy and compute (no producer warp: a
//    cp.async pipeline cannot hang on a barrier phase). The stage a wgmma batch reads is
//    refilled only once that batch is known complete: every batch is followed by a wait that
//    leaves at most it in flight (wgmma.wait_group 1, or 0), so copies run kStages - 2 stages
//    ahead (common/cuda/wgmma_ring.cuh). 192 KB of stages, one CTA per SM.
// =============================================================================================

constexpr int kBM = 128, kBK = 128;  // rows, bytes of K per stage row
constexpr int kChunkBytes = 16;      // one cp.async
constexpr int kWarpgroupThreads = 128;
constexpr int kWarpgroups = kBM / 64;
constexpr int kThreads = kWarpgroups * kWarpgroupThreads;  // 256
constexpr int kWgmmaK = 32;                                 // bytes of K per wgmma
constexpr int kKSteps = kBK / kWgmmaK;                      // 4
constexpr int kChunksPerRow = kBK / kChunkBytes;            // 8
constexpr int kRowsPerPass = kThreads / kChunksPerRow;      // 32
constexpr int kAChunksPerThread = kBM / kRowsPerPass;       // 4
constexpr int kATileBytes = kBM * kBK;                      // 16 KB
// The swizzle repeats every 8 rows of 128 bytes; atoms must start 1024-byte aligned in shared
// memory (the hardware swizzles on address bits), so the kernels align their dynamic shared
// memory up and ask for one atom more.
constexpr int kSwizzleRowBytes = kWgmmaSwizzleRowBytes;
constexpr int kSwizzleAtomBytes = kWgmmaAtomBytes;
constexpr int kStageBudget = 192 * 1024;

template <int kBN_, bool kPromote_>
struct WgmmaTile {
  static constexpr int kBN = kBN_;
  static constexpr bool kPromote = kPromote_;  // per-k-block fp32 promotion (fp8)
  static constexpr int kAccRegs = kBN / 2;     // 64 x kBN / 128 threads
  static constexpr int kBChunksPerThread = kBN / kRowsPerPass;
  static constexpr int kBTileBytes = kBN * kBK;
  static constexpr int kStageBytes = kATileBytes + kBTileBytes;
  static constexpr int kStages = kStageBudget / kStageBytes;
  // wgmma batches a warpgroup leaves in flight after issuing one (its wgmma.wait_group): a slot
  // is refilled only once the batch that read it is known complete, so copies run that many
  // stages less ahead.
  static constexpr int kBatchesInFlight = 1;
  static constexpr int kLoadAhead = kStages - 1 - kBatchesInFlight;
  static constexpr int kSmemBytes = kStages * kStageBytes + kSwizzleAtomBytes;

  // Stage slot of k iteration `iter`, and the iteration whose copies are issued while `iter`
  // computes (beyond the last: none, an empty commit group keeps the wait count uniform).
  static TORCH_EXT_HOST_DEVICE int stage_of(int iter) { return iter % kStages; }
  static TORCH_EXT_HOST_DEVICE int refill_iter(int iter) { return iter + kLoadAhead; }
  static TORCH_EXT_HOST_DEVICE int a_tile_offset(int stage) { return stage * kStageBytes; }
  static TORCH_EXT_HOST_DEVICE int b_tile_offset(int stage) { return stage * kStageBytes + kATileBytes; }
  // Warpgroup g's A operand: rows 64 g.. of the stage's A tile (8 KB further per warpgroup).
  static TORCH_EXT_HOST_DEVICE int a_warpgroup_offset(int stage, int warpgroup) {
    return a_tile_offset(stage) + warpgroup * 64 * kSwizzleRowBytes;
  }

  static_assert(kStages >= 3 && kSmemBytes <= 227 * 1024, "at least one stage between copies and reads");
  static_assert(kStageBytes % kSwizzleAtomBytes == 0 && kATileBytes % kSwizzleAtomBytes == 0,
                "every operand tile starts on a swizzle atom");
};

static_assert(kBK == kSwizzleRowBytes, "a stage row is one swizzle row");

// =============================================================================================
// 2. Global -> shared. Thread t copies 16-byte chunk t % 8 of rows t / 8 + 32 i of each operand
//    tile (A: i < 4, B: i < kBN / 32): a warp reads 4 whole 128-byte row segments per copy.
//    Chunk c of tile row r lands at r * 128 + 16 (c ^ (r % 8)): the 128-byte swizzle
//    ("SWIZZLE_128B": address bits 4-6 XOR bits 7-9) that the descriptors below declare.
// =============================================================================================

TORCH_EXT_HOST_DEVICE int chunk_row(int tid, int i) { return tid / kChunksPerRow + kRowsPerPass * i; }
TORCH_EXT_HOST_DEVICE int chunk_col(int tid) { return tid % kChunksPerRow; }
TORCH_EXT_HOST_DEVICE int swizzled_offset(int row, int chunk) {
  return row * kSwizzleRowBytes + ((chunk ^ (row % 8)) * kChunkBytes);
}

// =============================================================================================
// 3. Shared-memory matrix descriptors (common/wgmma_desc.h): K-major with the 128-byte swizzle,
//    8-row core-matrix groups 1024 bytes apart; one wgmma's 32 bytes of K lie inside a swizzle
//    row. k step s starts 32 s bytes into the row: the start address moves by 2 units of 16
//    bytes, the swizzle stays on the absolute address bits.
// =============================================================================================

TORCH_EXT_HOST_DEVICE uint64_t make_smem_desc(uint32_t shared_address) {
  return wgmma_kmajor_sw128_desc(shared_address);
}
TORCH_EXT_HOST_DEVICE uint64_t desc_at_k_step(uint64_t desc, int k_step) {
  return desc + uint64_t((k_step * kWgmmaK) >> 4);
}

// =============================================================================================
// 4. Accumulators (PTX ISA, wgmma "Matrix fragments for accumulator D", m64nN): warp w of the
//    warpgroup holds rows 16 w .. 16 w + 15; register i of a lane lies in n8 block i / 4, row
//    lane / 4 (+ 8 for i % 4 >= 2), column 2 (lane % 4) + i % 2 of the block: the mma.m16n8
//    C layout repeated along N. Rows / columns inside the CTA tile.
// =============================================================================================

TORCH_EXT_HOST_DEVICE int acc_row(int warpgroup, int warp_in_group, int lane, int i) {
  return 64 * warpgroup + 16 * warp_in_group + lane / 4 + 8 * ((i / 2) % 2);
}
TORCH_EXT_HOST_DEVICE int acc_col(int lane, int i) { return 8 * (i / 4) + 2 * (lane % 4) + i % 2; }

}  // namespace wgmma_gemm
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
