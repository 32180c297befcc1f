// cp.async wrappers (sm_80+): asynchronous global -> shared copies that bypass registers, with
// zero-fill for predicated-off copies so tails never read out of bounds, and the
// commit / wait-group pair that builds multi-stage pipelines. CUDA-only; no torch headers.
//
// Pipeline pattern: issue a stage's copies, cp_async_commit(); before reading stage s, wait
// until at most (stages in flight after s) groups are pending with cp_async_wait<N>(), then
// __syncthreads() so every thread's copies are visible.
#pragma once

#include <cstdint>

namespace torch_ext::cuda {

// 32-bit shared-memory address of a generic pointer into __shared__ memory (PTX operand).
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// p's shared address rounded up to a multiple of `alignment` (a power of two), and p moved there:
// kernels whose operands must start on swizzle atoms (wgmma's 1024 bytes) align their dynamic
// shared memory with these and ask for `alignment` bytes more.
__device__ __forceinline__ uint32_t aligned_shared_address(const void* p, uint32_t alignment) {
  return (shared_address(p) + alignment - 1) & ~(alignment - 1);
}
__device__ __forceinline__ unsigned char* align_shared_up(unsigned char* p, uint32_t alignment) {
  return p + (aligned_shared_address(p, alignment) - shared_address(p));
}

// 16 bytes global -> shared, cached in L2 only (.cg); both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(shared_address(smem)), "l"(gmem) : "memory");
}

// 16 bytes global -> shared (.cg) when `pred`; otherwise writes 16 zero bytes and reads nothing
// (src-size 0). Pass a valid gmem pointer anyway (e.g. the tensor base) when !pred.
__device__ __forceinline__ void cp_async_16_zfill(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 16 bytes global -> shared (.cg) of which only the first src_bytes (0..16) are read; the rest of
// the 16 shared bytes are zero-filled (a row tail that ends inside a chunk). gmem 16-byte aligned
// and valid even when src_bytes is 0.
__device__ __forceinline__ void cp_async_16_partial(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 8 bytes global -> shared, cached in L1 and L2 (.ca); zero-filled when !pred. 8-byte aligned.
__device__ __forceinline__ void cp_async_8_zfill(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 8 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// 4 bytes global -> shared (.ca); zero-filled when !pred. 4-byte aligned.
__device__ __forceinline__ void cp_async_4_zfill(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(smem)), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}

// Closes the group of cp.async issued by this thread since the previous commit.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Waits for all of this thread's cp.async.
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// The kStages-deep ring over iterations iter_begin .. iter_begin + iters - 1 (iteration i in slot
// (i - iter_begin) % kStages): slots 0..kStages-2 in flight before the loop; one commit group per
// iteration (empty past the end) keeps cp_async_wait's count uniform. Local iteration it waits for
// its slot (this thread's copies, then everyone's through the barrier), refills the slot consumed
// in it - 1 (the barrier orders the two), then computes. load_stage(slot, iter) issues the copies
// of iteration iter into the slot, compute_stage(slot, iter) consumes them. Every thread of the
// CTA calls it (barriers inside). kAsyncProxyReader: the stages are read by wgmma (the async
// proxy), so each thread fences its landed copies into it before the barrier; compute_stage must
// then finish its wgmma before returning (the slot is refilled after the next barrier).
template <int kStages, bool kAsyncProxyReader = false, class Load, class Compute>
__device__ __forceinline__ void cp_async_pipeline(int iter_begin, int iters, Load&& load_stage,
                                                  Compute&& compute_stage) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < iters) load_stage(s, iter_begin + s);
    cp_async_commit();
  }
  for (int it = 0; it < iters; ++it) {
    cp_async_wait<kStages - 2>();
    if constexpr (kAsyncProxyReader) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
    }
    __syncthreads();
    const int next = it + kStages - 1;
    if (next < iters) load_stage(next % kStages, iter_begin + next);
    cp_async_commit();
    compute_stage(it % kStages, iter_begin + it);
  }
  cp_async_wait_all();  // only empty groups remain
}

}  // namespace torch_ext::cuda
