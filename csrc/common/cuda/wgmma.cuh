// Hopper warpgroup tensor-core helpers (sm_90a only: wgmma needs the arch-specific target):
// the fences and group waits of wgmma.mma_async, and m64n256k32 with 8-bit operands from shared
// memory (int8 -> s32, e4m3 -> f32). Descriptor encoding and the accumulator map are host-testable
// in quant/w8a8_wgmma_index.h. Include only from sources compiled for sm_90a. No torch headers.
//
// Order of a k step (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   shared operands written by cp.async / st.shared: wait for them, fence_proxy_async_shared() in
//   every writing thread, then a CTA barrier (the tensor cores read through the async proxy);
//   wgmma_fence() before the first wgmma that touches accumulators other code wrote;
//   wgmma_* ...; wgmma_commit(); wgmma_wait<N>() before reading accumulators or reusing the
//   shared memory of all but the N most recent groups.
#pragma once

#include <cstdint>

namespace torch_ext::cuda {

__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// The 128 accumulator operands of an m64n256 wgmma (%0..%127), then the A and B descriptors
// (%128, %129).
#define TORCH_EXT_WGMMA_N256_D                                            \
  "{%0, %1, %2, %3, %4, %5, %6, %7, "                                     \
  "%8, %9, %10, %11, %12, %13, %14, %15, "                                \
  "%16, %17, %18, %19, %20, %21, %22, %23, "                              \
  "%24, %25, %26, %27, %28, %29, %30, %31, "                              \
  "%32, %33, %34, %35, %36, %37, %38, %39, "                              \
  "%40, %41, %42, %43, %44, %45, %46, %47, "                              \
  "%48, %49, %50, %51, %52, %53, %54, %55, "                              \
  "%56, %57, %58, %59, %60, %61, %62, %63, "                              \
  "%64, %65, %66, %67, %68, %69, %70, %71, "                              \
  "%72, %73, %74, %75, %76, %77, %78, %79, "                              \
  "%80, %81, %82, %83, %84, %85, %86, %87, "                              \
  "%88, %89, %90, %91, %92, %93, %94, %95, "                              \
  "%96, %97, %98, %99, %100, %101, %102, %103, "                          \
  "%104, %105, %106, %107, %108, %109, %110, %111, "                      \
  "%112, %113, %114, %115, %116, %117, %118, %119, "                      \
  "%120, %121, %122, %123, %124, %125, %126, %127}"
// Constraint c: "+r" for s32 accumulators, "+f" for fp32 ones (a .b32 operand on an .f32 wgmma
// makes the compiler copy the registers around every instruction, which serializes them).
#define TORCH_EXT_WGMMA_ACC8(c, d, i) \
  c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define TORCH_EXT_WGMMA_ACC128(c, d)                                                                          \
  TORCH_EXT_WGMMA_ACC8(c, d, 0), TORCH_EXT_WGMMA_ACC8(c, d, 8), TORCH_EXT_WGMMA_ACC8(c, d, 16),               \
      TORCH_EXT_WGMMA_ACC8(c, d, 24), TORCH_EXT_WGMMA_ACC8(c, d, 32), TORCH_EXT_WGMMA_ACC8(c, d, 40),         \
      TORCH_EXT_WGMMA_ACC8(c, d, 48), TORCH_EXT_WGMMA_ACC8(c, d, 56), TORCH_EXT_WGMMA_ACC8(c, d, 64),         \
      TORCH_EXT_WGMMA_ACC8(c, d, 72), TORCH_EXT_WGMMA_ACC8(c, d, 80), TORCH_EXT_WGMMA_ACC8(c, d, 88),         \
      TORCH_EXT_WGMMA_ACC8(c, d, 96), TORCH_EXT_WGMMA_ACC8(c, d, 104), TORCH_EXT_WGMMA_ACC8(c, d, 112),       \
      TORCH_EXT_WGMMA_ACC8(c, d, 120)

// d += A B^T for a 64 x 32 int8 A and a 256 x 32 int8 B, both K-major in shared memory
// (descriptors), s32 accumulators (wrapping, as int32 arithmetic).
__device__ __forceinline__ void wgmma_m64n256k32_s8(int32_t (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 " TORCH_EXT_WGMMA_N256_D ", %128, %129, 1;\n"
               : TORCH_EXT_WGMMA_ACC128("+r", d)
               : "l"(desc_a), "l"(desc_b)
               : "memory");
}

// d += A B^T for float8_e4m3fn operands (same shapes and layouts), fp32 accumulators;
// the two trailing 1s keep A and B unnegated.
__device__ __forceinline__ void wgmma_m64n256k32_e4m3(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.f32.e4m3.e4m3 " TORCH_EXT_WGMMA_N256_D
               ", %128, %129, 1, 1, 1;\n"
               : TORCH_EXT_WGMMA_ACC128("+f", d)
               : "l"(desc_a), "l"(desc_b)
               : "memory");
}

#undef TORCH_EXT_WGMMA_ACC128
#undef TORCH_EXT_WGMMA_ACC8
#undef TORCH_EXT_WGMMA_N256_D

}  // namespace torch_ext::cuda
