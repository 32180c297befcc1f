// The copy / compute ring of the Hopper GEMMs on common/wgmma_gemm_tile.h (quant/w8a8_wgmma.cu,
// moe/fused_moe_wgmma.cu): every thread cp.asyncs its own chunks of each stage (no producer warp),
// Tile::kLoadAhead stages ahead of the wgmma batch that reads them. sm_90a code only. The order
// of one k iteration is what tests/cpp/w8a8_cuda_sim.cpp and fused_moe_cuda_sim.cpp check with
// their shared-memory models.
#pragma once

#include "common/cuda/cp_async.cuh"
#include "common/cuda/wgmma.cuh"

namespace torch_ext::cuda {

// The first kLoadAhead stages' copies (an empty commit group past the last k iteration keeps the
// wait counts uniform).
template <class Tile, class LoadStage>
__device__ __forceinline__ void wgmma_ring_prologue(int k_iters, const LoadStage& load_stage) {
#pragma unroll
  for (int s = 0; s < Tile::kLoadAhead; ++s) {
    if (s < k_iters) load_stage(s);
    cp_async_commit();
  }
}

// Before k iteration `iter`'s wgmma batch: its stage's copies landed in every thread and are
// fenced into the async proxy (the tensor cores read through it), then the copies of iteration
// Tile::refill_iter(iter) go out. Their slot was last read by the batch of iteration iter - 2,
// complete because each batch is followed by a wait that leaves at most that batch in flight.
template <class Tile, class LoadStage>
__device__ __forceinline__ void wgmma_ring_stage_ready(int iter, int k_iters, const LoadStage& load_stage) {
  cp_async_wait<Tile::kLoadAhead - 1>();
  fence_proxy_async_shared();
  __syncthreads();
  if (Tile::refill_iter(iter) < k_iters) load_stage(Tile::refill_iter(iter));
  cp_async_commit();
}

}  // namespace torch_ext::cuda
