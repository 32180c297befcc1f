// The copy engine's tensor copies (TMA, sm_90+): a box of a tensor described by a tensor map
// (common/cuda/tensor_map.h) into shared memory, completing on an mbarrier
// (common/cuda/mbarrier.cuh) that counts the box's bytes. Coordinates are in elements, innermost
// first; boxes reaching past the tensor are filled with zeros and still count their whole size.
// The tensor map lives in kernel parameter space (a __grid_constant__ CUtensorMap parameter).
// Call only from code compiled for sm_90 or later. No torch headers. PTX ISA "cp.async.bulk.tensor".
#pragma once

#include <cuda.h>

#include <cstdint>

#include "common/cuda/cp_async.cuh"  // shared_address

namespace torch_ext::cuda {

// Fetches the tensor map into the cache ahead of the first copy that reads it.
__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// The box at coordinates c (innermost first; common/cuda/tensor_map.h makes 4-D maps, unused
// dimensions of size 1) into this CTA's shared memory at smem; signals bar.
__device__ __forceinline__ void tma_load_4d(void* smem, const CUtensorMap* map, int c0, int c1, int c2, int c3,
                                            uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(shared_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(shared_address(bar))
      : "memory");
}

// The same box into the shared memory of every cluster CTA in cta_mask (bit r: rank r), at the
// same offset as smem in each, signalling the barrier at bar's offset in each.
__device__ __forceinline__ void tma_load_4d_multicast(void* smem, const CUtensorMap* map, int c0, int c1, int c2,
                                                      int c3, uint64_t* bar, uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1, {%2, "
      "%3, %4, %5}], [%6], %7;\n" ::"r"(shared_address(smem)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(shared_address(bar)),
      "h"(cta_mask)
      : "memory");
}

}  // namespace torch_ext::cuda
