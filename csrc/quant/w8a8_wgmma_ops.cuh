// The parts of the Hopper W8A8 GEMMs that do not depend on how the operands reach shared memory
// (quant/w8a8_wgmma.cu: cp.async ring; quant/w8a8_wgmma_tma.cu: copy engine, 2-CTA clusters): the
// int8 / e4m3 k block on wgmma, the kernel arguments and the epilogue. sm_90a code only. No torch
// headers.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda/mma.cuh"  // zero_accumulators
#include "common/cuda/vec.cuh"
#include "common/cuda/wgmma.cuh"
#include "quant/w8a8_mm_operands.h"
#include "quant/w8a8_wgmma.h"
#include "quant/w8a8_wgmma_index.h"

namespace torch_ext::cuda::w8a8_sm90 {

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

// The wgmma batch of one stage for warpgroup `warpgroup` (its 64 A rows, all kBN B rows) into
// the accumulators `into`, committed as one group: both kernels' issue once the stage is ready.
template <class Op, class Acc>
__device__ __forceinline__ void issue_stage(Acc& into, uint32_t smem_base, int stage, int warpgroup) {
  using Tile = typename Op::Tile;
  const uint64_t desc_a = ix::make_smem_desc(smem_base + Tile::a_warpgroup_offset(stage, warpgroup));
  const uint64_t desc_b = ix::make_smem_desc(smem_base + Tile::b_tile_offset(stage));
  wgmma_fence_operands(into);  // (before wgmma.fence: no accumulator access may move past it)
  wgmma_fence();
  Op::k_block(into, desc_a, desc_b);
  wgmma_commit();
}

// The k loop of a warpgroup in both kernels: issue(iter, into) waits for iteration iter's stage,
// issues its wgmma batch into the accumulators `into` and commits it; done(iter) runs once that
// batch is known complete (the copy-engine variant releases the stage there; the cp.async ring
// needs nothing: its slot rule is in the next issue's barrier).
//   - int8: one batch stays in flight while the next iteration's copies and batch are issued.
//   - fp8: each batch into a fresh accumulator, two in turn; once the wait leaves only the newest
//     batch in flight, the one before it is added into acc (promotion) while the newest runs.
//     ptxas tracks wgmma batches within a loop body only (a batch still in flight at the
//     back-edge serializes every wgmma of the kernel, warning C7514), so the body is two
//     iterations ending with nothing in flight: half the promotions overlap a batch. (Four per
//     body, 3 of 4 overlapped, took 255 registers and spilled 352 bytes inside the loop; two
//     take 234 and spill nothing: CUDA 13.0, sm_90a.) (The H100 run of 2026-11-26 promoted after
//     wgmma.wait_group 0, the tensor cores idle meanwhile: 642 TFLOP/s against int8's 1008.)
template <class Op, class Issue, class Done>
__device__ __forceinline__ void k_loop(int k_iters, typename Op::Acc (&acc)[Op::Tile::kAccRegs], const Issue& issue,
                                       const Done& done) {
  using Acc = typename Op::Acc;
  using Tile = typename Op::Tile;
  if (k_iters == 0) return;
  if constexpr (!Tile::kPromote) {
    static_assert(Tile::kBatchesInFlight == 1, "done(iter - 1) below");
    for (int iter = 0; iter < k_iters; ++iter) {
      issue(iter, acc);
      wgmma_wait<Tile::kBatchesInFlight>();
      if (iter > 0) done(iter - 1);
    }
    wgmma_wait<0>();
    done(k_iters - 1);
  } else {
    Acc block0[Tile::kAccRegs], block1[Tile::kAccRegs];
    const auto promote = [&](Acc(&finished)[Tile::kAccRegs]) {
      wgmma_fence_operands(finished);
#pragma unroll
      for (int i = 0; i < Tile::kAccRegs; ++i) acc[i] += finished[i];
    };
    int iter = 0;
    for (; iter + 2 <= k_iters; iter += 2) {
      issue(iter, block0);
      issue(iter + 1, block1);
      wgmma_wait<1>();
      done(iter);
      promote(block0);
      wgmma_wait<0>();
      done(iter + 1);
      promote(block1);
    }
    if (iter < k_iters) {  // an odd number of k blocks: the last one alone
      issue(iter, block0);
      wgmma_wait<0>();
      done(iter);
      promote(block0);
    }
  }
}

// The launch arguments of both kernels for out type O.
template <typename O, class Op>
WgmmaArgs<O, Op> make_wgmma_args(const typename Op::Params& p) {
  WgmmaArgs<O, Op> a{};
  fill_mm_operands(a, p, Op::a_per_row(p));
  a.m_blocks = int(ix::ceil_div(p.m, ix::kBM));
  a.n_blocks = int(ix::ceil_div(p.n, Op::Tile::kBN));
  a.k_iters = int(ix::ceil_div(p.k, ix::kBK));
  a.pair_stores = reinterpret_cast<uintptr_t>(p.out) % (2 * sizeof(O)) == 0 && p.out_row_stride % 2 == 0;
  return a;
}

// Epilogue of a consumer warpgroup (0 or 1: rows 64 warpgroup.. of the 128 x kBN tile at m0, n0):
// float(acc) * a_scale (* b_scale) (+ bias) with scaled_int8_mm's rounding steps; per n8 block the
// two columns' scales and biases once, then the thread's two rows.
template <typename O, class Op>
__device__ __forceinline__ void store_tile(const WgmmaArgs<O, Op>& p, const typename Op::Acc (&acc)[Op::Tile::kAccRegs],
                                           int m0, int n0, int warpgroup, int warp_in_group, int lane) {
  using Tile = typename Op::Tile;
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

// A kernel file's entry point: Launcher<O, Op>::run(p, stream) with O the type of p.out_dtype.
template <class Op, template <typename, class> class Launcher>
cudaError_t launch_for_out_type(const typename Op::Params& p, cudaStream_t stream) {
  cudaError_t status = cudaErrorInvalidValue;
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using O = decltype(tag);
    if constexpr (!std::is_same_v<O, double>) status = Launcher<O, Op>::run(p, stream);
  });
  return status;
}

}  // namespace torch_ext::cuda::w8a8_sm90
