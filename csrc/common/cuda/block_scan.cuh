// CTA-wide inclusive prefix sum of one uint32 per thread (sm_80+, no torch headers): warp
// shuffles, the warps' totals through shared memory, one warp scanning those. For kernels that
// compact in order (each thread's first output slot is the sum of the counts of the threads
// before it).
#pragma once

#include <cstdint>

namespace torch_ext::cuda {

// Words of shared memory block_inclusive_scan<kThreads> needs.
template <int kThreads>
__host__ __device__ constexpr int block_scan_words() {
  return kThreads / 32;
}

// Returns value plus the values of the threads below; `total` gets the CTA's sum. Every thread of
// the CTA (kThreads, a multiple of 32 up to 1024, one-dimensional) must call it; `scratch` holds
// block_scan_words<kThreads>() words and may be reused by the next call (it starts with a barrier).
template <int kThreads>
__device__ __forceinline__ uint32_t block_inclusive_scan(uint32_t value, uint32_t* scratch, uint32_t& total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps, at most 32");
  constexpr int kWarps = kThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const uint32_t below = __shfl_up_sync(0xffffffffu, value, offset);
    if (lane >= offset) value += below;
  }
  __syncthreads();  // the previous call's readers of scratch are done
  if (lane == 31) scratch[warp] = value;
  __syncthreads();
  if (warp == 0) {
    uint32_t warp_sum = lane < kWarps ? scratch[lane] : 0u;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const uint32_t below = __shfl_up_sync(0xffffffffu, warp_sum, offset);
      if (lane >= offset) warp_sum += below;
    }
    if (lane < kWarps) scratch[lane] = warp_sum;
  }
  __syncthreads();
  total = scratch[kWarps - 1];
  return value + (warp > 0 ? scratch[warp - 1] : 0u);
}

}  // namespace torch_ext::cuda
