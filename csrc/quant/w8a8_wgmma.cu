// Hopper GEMM of scaled_int8_mm and scaled_fp8_mm (quant/w8a8_wgmma.h), sm_90a only: wgmma with
// both operands in shared memory. Index maps, descriptors, tile configurations and the
// pipeline's slot rule are host+device functions in quant/w8a8_wgmma_index.h, run on the CPU by
// tests/cpp/w8a8_cuda_sim.cpp (section e, with a model of the descriptor's swizzled addressing
// written from the PTX ISA).
//
// wgmma_mm_kernel<O, Op>: out = (A B^T) * a_scale * b_scale (+ bias), A [M, K] and B [N, K] 8-bit.
//   - A CTA (2 warpgroups) owns a 128 x Tile::kBN tile (int8 256, fp8 128: reasoning in the index
//     header); CTAs in scaled_int8_mm's grouped order (8 m blocks per group) for L2 reuse.
//   - K streams through a ring of 128-byte stages (int8 4 x 48 KB, fp8 6 x 32 KB). Every thread
//     copies its 16-byte chunks with cp.async (zero-filled past M, N and K: tails multiply zeros)
//     into the 128-byte-swizzled K-major layout; no producer warp, so nothing can wait on a
//     barrier phase that never comes.
//   - Per stage: wait for the slot's copies, fence them into the async proxy, CTA barrier; issue
//     the copies of the stage kStages - 2 ahead (its slot was last read by the wgmma batch 2
//     stages back, finished before the barrier); then 4 wgmma k32 steps per warpgroup
//     (descriptor start moved 32 bytes per step) and commit, and wait until only this batch is
//     in flight, so the tensor cores hold the next batch while the warps loop (fp8: k blocks
//     promoted into fp32; the k loop and the epilogue are quant/w8a8_wgmma_ops.cuh's).
//   - Epilogue: float(acc) * a_scale (* b_scale) (+ bias) with scaled_int8_mm's rounding steps,
//     two adjacent columns per store where the output allows it.
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/wgmma_ring.cuh"
#include "quant/w8a8_wgmma_ops.cuh"

namespace torch_ext::cuda {
namespace {

using namespace w8a8_sm90;

template <typename O, class Op>
__device__ __forceinline__ void wgmma_mm_cta(const WgmmaArgs<O, Op>& p) {
  using Elem = typename Op::Elem;
  using Tile = typename Op::Tile;
  extern __shared__ unsigned char smem_raw[];
  // Swizzle atoms must be 1024-byte aligned (kSmemBytes has the slack).
  const uint32_t smem_base = aligned_shared_address(smem_raw, ix::kSwizzleAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, ix::kSwizzleAtomBytes);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warpgroup = warp / 4, warp_in_group = warp % 4;
  const mm_ix::TileCoord tile = mm_ix::tile_of(blockIdx.x, p.m_blocks, p.n_blocks);
  const int m0 = int(tile.mb) * ix::kBM, n0 = int(tile.nb) * Tile::kBN;

  // This thread's copies: chunk `col` of rows chunk_row(tid, i); one source pointer per operand
  // (rows kRowsPerPass apart), rows past M / N as bits of a mask.
  const int col = ix::chunk_col(tid), row0 = ix::chunk_row(tid, 0);
  const Elem* const a_src = p.a + int64_t(m0 + row0) * p.a_row_stride + col * mm_ix::kChunkBytes;
  const Elem* const b_src = p.b + int64_t(n0 + row0) * p.b_row_stride + col * mm_ix::kChunkBytes;
  const int64_t a_pass = int64_t(ix::kRowsPerPass) * p.a_row_stride;
  const int64_t b_pass = int64_t(ix::kRowsPerPass) * p.b_row_stride;
  uint32_t a_rows = 0, b_rows = 0;
#pragma unroll
  for (int i = 0; i < ix::kAChunksPerThread; ++i) a_rows |= uint32_t(m0 + ix::chunk_row(tid, i) < p.m) << i;
#pragma unroll
  for (int i = 0; i < Tile::kBChunksPerThread; ++i) b_rows |= uint32_t(n0 + ix::chunk_row(tid, i) < p.n) << i;

  // One operand's chunks of iteration `iter` into its tile: rows `pass` apart from `src`, the
  // rows in `rows` real, zero-filled past them and past K (`base`: any valid address).
  const auto load_operand = [&](auto chunks, unsigned char* tile, const Elem* src, const Elem* base, int64_t pass,
                                uint32_t rows, int iter) {
    const int k = iter * ix::kBK + col * mm_ix::kChunkBytes;
#pragma unroll
    for (int i = 0; i < decltype(chunks)::value; ++i) {
      const int bytes = mm_ix::chunk_bytes(k, p.k, (rows >> i) & 1);
      cp_async_16_partial(tile + ix::swizzled_offset(ix::chunk_row(tid, i), col),
                          bytes > 0 ? src + i * pass + iter * ix::kBK : base, bytes);
    }
  };
  const auto load_stage = [&](int iter) {
    const int stage = Tile::stage_of(iter);
    load_operand(std::integral_constant<int, ix::kAChunksPerThread>{}, smem + Tile::a_tile_offset(stage), a_src, p.a,
                 a_pass, a_rows, iter);
    load_operand(std::integral_constant<int, Tile::kBChunksPerThread>{}, smem + Tile::b_tile_offset(stage), b_src, p.b,
                 b_pass, b_rows, iter);
  };

  using Acc = typename Op::Acc;
  Acc acc[Tile::kAccRegs];
  zero_accumulators(acc);

  wgmma_ring_prologue<Tile>(p.k_iters, load_stage);
  // Issue k iteration `iter` into the accumulators `into` once its stage is ready
  // (common/cuda/wgmma_ring.cuh): the warpgroup's wgmma batch, committed.
  const auto issue = [&](int iter, auto& into) {
    wgmma_ring_stage_ready<Tile>(iter, p.k_iters, load_stage);
    issue_stage<Op>(into, smem_base, Tile::stage_of(iter), warpgroup);
  };
  k_loop<Op>(p.k_iters, acc, issue, [](int) {});
  wgmma_fence_operands(acc);

  store_tile(p, acc, m0, n0, warpgroup, warp_in_group, lane);
}

// One CTA per SM (192 KB of shared memory): the bound lets ptxas use up to 255 registers for
// the accumulators (int8 128, fp8 64 + 2 x 64 k-block ones), copy addresses and epilogue.
template <typename O, class Op>
__global__ void __launch_bounds__(ix::kThreads, 1) wgmma_mm_kernel(const WgmmaArgs<O, Op> p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  wgmma_mm_cta<O, Op>(p);
#else
  __trap();  // only compiled for sm_90a; the launchers run it on compute capability 9.0 only
#endif
}

template <typename O, class Op>
struct RingLaunch {
  static cudaError_t run(const typename Op::Params& p, cudaStream_t stream) {
    const WgmmaArgs<O, Op> a = make_wgmma_args<O, Op>(p);
    const int64_t blocks = int64_t(a.m_blocks) * a.n_blocks;
    if (blocks > kMaxGridX) return cudaErrorInvalidValue;
    const auto kernel = wgmma_mm_kernel<O, Op>;
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Op::Tile::kSmemBytes);
    if (status != cudaSuccess) return status;
    kernel<<<unsigned(blocks), ix::kThreads, Op::Tile::kSmemBytes, stream>>>(a);
    return cudaGetLastError();
  }
};

}  // namespace

cudaError_t scaled_int8_mm_sm90(const ScaledInt8MmParams& p, cudaStream_t stream) {
  return launch_for_out_type<Int8Wgmma, RingLaunch>(p, stream);
}
cudaError_t scaled_fp8_mm_sm90(const ScaledFp8MmParams& p, cudaStream_t stream) {
  return launch_for_out_type<Fp8Wgmma, RingLaunch>(p, stream);
}

}  // namespace torch_ext::cuda
