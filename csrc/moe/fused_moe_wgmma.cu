// fused_moe's grouped GEMMs on Hopper wgmma (moe/fused_moe_wgmma.h), sm_90a only. Tile, copy
// map, descriptors and accumulator map are the shared Hopper GEMM tile's
// (common/wgmma_gemm_tile.h), the pipeline its ring (common/cuda/wgmma_ring.cuh); the MoE parts
// (B rows of a tile, gate / up pairing) are in moe/fused_moe_wgmma_index.h. All of it runs on
// the CPU in tests/cpp/fused_moe_cuda_sim.cpp, section (e).
//
// grouped_wgmma_kernel<T, kGateUp>: one CTA (2 warpgroups) per 128 grouped rows x 256 B rows.
//   - The 128 rows lie in one expert's segment of the plan (padded to 128 rows); A rows are
//     gathered per chunk (GEMM 1: the pair's token's hidden row; GEMM 2: its act row), B rows are
//     the expert's weight rows (GEMM 1: 128 gate + the same 128 up rows; GEMM 2: 256 W2 rows).
//   - K streams through 4 stages of 64 values (128 bytes a row: A 16 KB + B 32 KB); every thread
//     copies its 16-byte chunks with cp.async, zero-filled past K and for padding rows.
//   - Per stage, per warpgroup: 4 x wgmma.m64n256k16 (fp32 accumulators, 128 per thread), one
//     batch left in flight while the next stage's copies and batch are issued.
//   - Epilogues (moe/fused_moe_wgmma_ops.cuh, shared with the copy-engine variant) as on mma.sync: GEMM 1 stores act = act(gate, up) rounded to the io dtype (gate
//     register i and up register i + 64 hold the same column); GEMM 2 adds w * y into the
//     rank-ordered fp32 sum (acc32) and rounds into out at the last rank. No atomics.
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/wgmma_ring.cuh"
#include "moe/fused_moe_wgmma.h"
#include "moe/fused_moe_wgmma_ops.cuh"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::moe::fused_moe_cuda;
using namespace fused_moe_sm90;

template <typename T, bool kGateUp>
__device__ __forceinline__ void wgmma_gemm_cta(const GemmArgs<T>& p) {
  extern __shared__ unsigned char smem_raw[];
  // Swizzle atoms must be 1024-byte aligned (kSmemBytes has the slack).
  const uint32_t smem_base = aligned_shared_address(smem_raw, wx::kSwizzleAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, wx::kSwizzleAtomBytes);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warpgroup = warp / 4, warp_in_group = warp % 4;
  const ix::TileCoord tile = ix::tile_of(blockIdx.x, p.m_blocks, p.n_blocks);
  const auto [row0, expert] = grouped_tile(p, tile.mb, wx::kBM);
  if (expert < 0) return;  // past the plan's rows (uniform over the CTA, before any barrier)
  const int64_t n0 = tile.nb * (kGateUp ? wx::kGateCols : Tile::kBN);

  // Source rows of this thread's chunks (nullptr: zero-filled row).
  const int col = wx::chunk_col(tid);
  const T* a_src[wx::kAChunksPerThread];
#pragma unroll
  for (int i = 0; i < wx::kAChunksPerThread; ++i) a_src[i] = a_row_source<T, kGateUp>(p, row0 + wx::chunk_row(tid, i));
  const T* const w_expert = p.w + int64_t(expert) * p.w_expert_stride;
  const T* b_src[Tile::kBChunksPerThread];
#pragma unroll
  for (int i = 0; i < Tile::kBChunksPerThread; ++i) {
    const int64_t w_row = wx::weight_row(kGateUp, wx::chunk_row(tid, i), n0, p.n_total);
    b_src[i] = w_row >= 0 ? w_expert + w_row * p.k_total : nullptr;
  }

  const auto load_operand = [&]<int kChunks>(const T* const (&rows)[kChunks], unsigned char* tile_smem, int iter) {
    const int64_t k = int64_t(iter) * wx::kBKElems + col * ix::kChunkElems;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int elems = ix::chunk_elems(k, p.k_total, rows[i] != nullptr);
      cp_async_16_partial(tile_smem + wx::swizzled_offset(wx::chunk_row(tid, i), col),
                          elems > 0 ? rows[i] + k : p.w, elems * wx::kElemBytes);
    }
  };
  const auto load_stage = [&](int iter) {
    const int stage = Tile::stage_of(iter);
    load_operand(a_src, smem + Tile::a_tile_offset(stage), iter);
    load_operand(b_src, smem + Tile::b_tile_offset(stage), iter);
  };

  float acc[Tile::kAccRegs];
  zero_accumulators(acc);
  const int k_iters = int(p.k_iters);
  wgmma_ring_prologue<Tile>(k_iters, load_stage);
  for (int iter = 0; iter < k_iters; ++iter) {
    wgmma_ring_stage_ready<Tile>(iter, k_iters, load_stage);
    const int stage = Tile::stage_of(iter);
    issue_stage<T>(acc, wx::make_smem_desc(smem_base + Tile::a_warpgroup_offset(stage, warpgroup)),
                   wx::make_smem_desc(smem_base + Tile::b_tile_offset(stage)));
    wgmma_wait<Tile::kBatchesInFlight>();  // this batch stays in flight while the next stage is prepared
  }
  wgmma_wait<0>();
  wgmma_fence_operands(acc);

  store_tile<T, kGateUp>(p, acc, row0, n0, warpgroup, warp_in_group, lane);
}

// One CTA per SM (193 KB of shared memory): the bound lets ptxas use up to 255 registers for the
// 128 accumulators, the 12 chunk source pointers and the epilogue.
template <typename T, bool kGateUp>
__global__ void __launch_bounds__(wx::kThreads, 1) grouped_wgmma_kernel(const GemmArgs<T> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_gemm_cta<T, kGateUp>(p);
#else
  __trap();  // only compiled for sm_90a; the launcher runs it on compute capability 9.0 only
#endif
}

}  // namespace

template <typename T, bool kGateUp>
cudaError_t grouped_gemm_sm90(const GemmArgs<T>& p, cudaStream_t stream) {
  const int64_t blocks = p.m_blocks * p.n_blocks;
  if (blocks > kMaxGridX || !p.vector) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  const auto kernel = grouped_wgmma_kernel<T, kGateUp>;
  const cudaError_t status =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tile::kSmemBytes);
  if (status != cudaSuccess) return status;
  kernel<<<unsigned(blocks), wx::kThreads, Tile::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t grouped_gemm_sm90<Half, true>(const GemmArgs<Half>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90<Half, false>(const GemmArgs<Half>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90<BFloat16, true>(const GemmArgs<BFloat16>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90<BFloat16, false>(const GemmArgs<BFloat16>&, cudaStream_t);

}  // namespace torch_ext::cuda
