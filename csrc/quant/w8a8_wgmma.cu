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
//     in flight, so the tensor cores hold the next batch while the warps loop. fp8 issues each
//     batch into a fresh accumulator, two of them in turn: once the wait says the previous batch
//     is done, that one is added into the fp32 accumulator (promotion) while the new one runs.
//     (The H100 run of 2026-11-26 promoted after wgmma.wait_group 0, the tensor cores idle
//     meanwhile: 642 TFLOP/s against int8's 1008 on the same tiles' pipeline.)
//   - Epilogue: float(acc) * a_scale (* b_scale) (+ bias) with scaled_int8_mm's rounding steps,
//     two adjacent columns per store where the output allows it.
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/vec.cuh"
#include "common/cuda/wgmma.cuh"
#include "common/cuda/wgmma_ring.cuh"
#include "quant/w8a8_mm_operands.h"
#include "quant/w8a8_wgmma.h"
#include "quant/w8a8_wgmma_index.h"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::quant::w8a8_wgmma;
namespace mm_ix = ::torch_ext::quant::w8a8_cuda;


// Op: the element and accumulator types, the tile, and one k block (kKSteps wgmma k32 steps) of
// a warpgroup from its A and B descriptors.
struct Int8Wgmma {
  using Elem = int8_t;
  using Acc = int32_t;
  using Tile = ix::Int8Tile;
  using Params = ScaledInt8MmParams;
  static __device__ __forceinline__ void k_block(Acc (&d)[Tile::kAccRegs], uint64_t a, uint64_t b) {
#pragma unroll
    for (int s = 0; s < ix::kKSteps; ++s) wgmma_m64n256k32_s8(d, ix::desc_at_k_step(a, s), ix::desc_at_k_step(b, s));
  }
  static bool a_per_row(const Params&) { return true; }
};

struct Fp8Wgmma {
  using Elem = uint8_t;  // float8_e4m3fn bits
  using Acc = float;
  using Tile = ix::Fp8Tile;
  using Params = ScaledFp8MmParams;
  // d = the k block's products alone (the first step does not accumulate): promoted by the caller.
  static __device__ __forceinline__ void k_block(Acc (&d)[Tile::kAccRegs], uint64_t a, uint64_t b) {
#pragma unroll
    for (int s = 0; s < ix::kKSteps; ++s)
      wgmma_m64n128k32_e4m3(d, ix::desc_at_k_step(a, s), ix::desc_at_k_step(b, s), s > 0);
  }
  static bool a_per_row(const Params& p) { return p.a_scale_per_row; }
};

// The operands, then the grid and the store width.
template <typename O, class Op>
struct WgmmaArgs : MmOperands<typename Op::Elem, O> {
  int m_blocks, n_blocks, k_iters;
  bool pair_stores;  // out and its row stride allow 2-element stores
};

// Two adjacent outputs as one store (the address is 2-element aligned).
template <typename O>
struct alignas(2 * sizeof(O)) OutPair {
  O v[2];
};

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
    const int stage = Tile::stage_of(iter);
    const uint64_t desc_a = ix::make_smem_desc(smem_base + Tile::a_warpgroup_offset(stage, warpgroup));
    const uint64_t desc_b = ix::make_smem_desc(smem_base + Tile::b_tile_offset(stage));
    wgmma_fence();
    wgmma_fence_operands(into);
    Op::k_block(into, desc_a, desc_b);
    wgmma_commit();
  };
  if constexpr (!Tile::kPromote) {
    // int8: one batch stays in flight while the next iteration's copies and batch are issued.
    for (int iter = 0; iter < p.k_iters; ++iter) {
      issue(iter, acc);
      wgmma_wait<1>();
    }
    wgmma_wait<0>();
  } else {
    // fp8: each batch into a fresh accumulator, two in turn; once the wait leaves only the newest
    // batch in flight, the one before it is added into acc (promotion) while the newest runs.
    // ptxas tracks wgmma batches within a loop body only (a batch still in flight at the
    // back-edge serializes every wgmma of the kernel, warning C7514), so the body is two
    // iterations ending with nothing in flight: half the promotions overlap a batch. (Four per
    // body, 3 of 4 overlapped, took 255 registers and spilled 352 bytes inside the loop; two
    // take 234 and spill nothing: CUDA 13.0, sm_90a.)
    Acc block0[Tile::kAccRegs], block1[Tile::kAccRegs];
    const auto promote = [&](Acc(&done)[Tile::kAccRegs]) {
      wgmma_fence_operands(done);
#pragma unroll
      for (int i = 0; i < Tile::kAccRegs; ++i) acc[i] += done[i];
    };
    int iter = 0;
    for (; iter + 2 <= p.k_iters; iter += 2) {
      issue(iter, block0);
      issue(iter + 1, block1);
      wgmma_wait<1>();
      promote(block0);
      wgmma_wait<0>();
      promote(block1);
    }
    if (iter < p.k_iters) {  // an odd number of k blocks: the last one alone
      issue(iter, block0);
      wgmma_wait<0>();
      promote(block0);
    }
  }
  wgmma_fence_operands(acc);

  // Epilogue: per n8 block the two columns' scales and biases once, then the thread's two rows.
  float a_scale[2];
  int rows[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    rows[h] = m0 + ix::acc_row(warpgroup, warp_in_group, lane, 2 * h);
    a_scale[h] = rows[h] < p.m ? __ldg(p.a_scale + mm_ix::scale_index(rows[h], p.a_per_row)) : 0.f;
  }
#pragma unroll
  for (int j = 0; j < Tile::kBN / 8; ++j) {
    const int n = n0 + ix::acc_col(lane, 4 * j);
    if (n >= p.n) continue;
    const bool second = n + 1 < p.n;
    const float b_scale0 = __ldg(p.b_scale + mm_ix::scale_index(n, p.per_channel));
    const float b_scale1 = second ? __ldg(p.b_scale + mm_ix::scale_index(n + 1, p.per_channel)) : 0.f;
    const float bias0 = p.bias != nullptr ? __ldg(p.bias + n) : 0.f;
    const float bias1 = p.bias != nullptr && second ? __ldg(p.bias + n + 1) : 0.f;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (rows[h] >= p.m) continue;
      O* const dst = p.out + int64_t(rows[h]) * p.out_row_stride + n;
      const O v0 = from_compute<O>(mm_ix::epilogue_value(acc[4 * j + 2 * h], a_scale[h], b_scale0, p.bias != nullptr, bias0));
      if (!second) {
        dst[0] = v0;
        continue;
      }
      const O v1 =
          from_compute<O>(mm_ix::epilogue_value(acc[4 * j + 2 * h + 1], a_scale[h], b_scale1, p.bias != nullptr, bias1));
      if (p.pair_stores) {
        *reinterpret_cast<OutPair<O>*>(dst) = OutPair<O>{{v0, v1}};
      } else {
        dst[0] = v0;
        dst[1] = v1;
      }
    }
  }
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
cudaError_t launch(const typename Op::Params& p, cudaStream_t stream) {
  WgmmaArgs<O, Op> a{};
  fill_mm_operands(a, p, Op::a_per_row(p));
  a.m_blocks = int(ix::ceil_div(p.m, ix::kBM));
  a.n_blocks = int(ix::ceil_div(p.n, Op::Tile::kBN));
  a.k_iters = int(ix::ceil_div(p.k, ix::kBK));
  a.pair_stores = reinterpret_cast<uintptr_t>(p.out) % (2 * sizeof(O)) == 0 && p.out_row_stride % 2 == 0;
  const int64_t blocks = int64_t(a.m_blocks) * a.n_blocks;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  constexpr int kSmemBytes = Op::Tile::kSmemBytes;
  const auto kernel = wgmma_mm_kernel<O, Op>;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (status != cudaSuccess) return status;
  kernel<<<unsigned(blocks), ix::kThreads, kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

template <class Op>
cudaError_t scaled_mm_sm90(const typename Op::Params& p, cudaStream_t stream) {
  cudaError_t status = cudaErrorInvalidValue;
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using O = decltype(tag);
    if constexpr (!std::is_same_v<O, double>) status = launch<O, Op>(p, stream);
  });
  return status;
}

}  // namespace

cudaError_t scaled_int8_mm_sm90(const ScaledInt8MmParams& p, cudaStream_t stream) {
  return scaled_mm_sm90<Int8Wgmma>(p, stream);
}

cudaError_t scaled_fp8_mm_sm90(const ScaledFp8MmParams& p, cudaStream_t stream) {
  return scaled_mm_sm90<Fp8Wgmma>(p, stream);
}

}  // namespace torch_ext::cuda
