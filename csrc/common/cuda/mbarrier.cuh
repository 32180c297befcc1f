// Shared-memory barriers (mbarrier) and thread-block clusters (sm_90+): what a producer /
// consumer pipeline on the copy engine (common/cuda/tma.cuh) waits on. Call only from code
// compiled for sm_90 or later. No torch headers.
//
// An mbarrier phase completes when its expected arrivals have arrived and its transaction count
// (bytes announced with expect_tx, counted down by the copies that signal it) is back to zero;
// waiters name the phase by its parity. PTX ISA "Parallel Synchronization and Communication
// Instructions: mbarrier", "Cluster" (mapa, barrier.cluster).
#pragma once

#include <cstdint>

#include "common/cuda/cp_async.cuh"  // shared_address

namespace torch_ext::cuda {

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}

// After the barriers of a cluster kernel are initialized, before any other CTA may signal them
// (then a cluster barrier: cluster_sync()).
__device__ __forceinline__ void fence_mbarrier_init_cluster() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// One arrival that also announces `bytes` more bytes of copies to wait for.
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(shared_address(bar)), "r"(bytes)
               : "memory");
}

// One arrival (release at CTA scope: this thread's earlier writes are visible to the threads
// that see the phase complete).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(bar)) : "memory");
}

// One arrival on the barrier at the same shared-memory offset in cluster CTA `cta_rank` (this CTA
// included). The default semantics (release at CTA scope), as CUTLASS's cluster pipelines use:
// the stage was read by wgmma, whose completion the caller waited for; an explicit
// .release.cluster compiles to a GPU-wide memory barrier before every arrival.
__device__ __forceinline__ void mbarrier_arrive_cluster(uint64_t* bar, uint32_t cta_rank) {
  asm volatile(
      "{\n"
      ".reg .b32 remote;\n"
      "mapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(cta_rank)
      : "memory");
}

// Waits until the phase with this parity has completed. A protocol error would otherwise hang
// the GPU forever: once a wait has lasted 10 s of the GPU's global timer (far beyond any
// legitimate wait, sanitizers and time-slicing included) the kernel traps instead, so the launch
// fails with an error the caller reports. (Bounded by time, not by tries: a try may suspend the
// thread for an implementation-defined time.) The loop is one asm block: a counter or a clock in
// C++ around the try made ptxas spill the fp8 GEMM's accumulators.
__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n"
      ".reg .pred ready;\n"
      ".reg .u64 start, now;\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@ready bra.uni TORCH_EXT_MBARRIER_DONE;\n"
      "mov.u64 start, %%globaltimer;\n"
      "TORCH_EXT_MBARRIER_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 ready, [%0], %1;\n"
      "@ready bra.uni TORCH_EXT_MBARRIER_DONE;\n"
      "mov.u64 now, %%globaltimer;\n"
      "sub.u64 now, now, start;\n"
      "setp.lt.u64 ready, now, 10000000000;\n"
      "@ready bra.uni TORCH_EXT_MBARRIER_WAIT;\n"
      "trap;\n"
      "TORCH_EXT_MBARRIER_DONE:\n"
      "}\n" ::"r"(shared_address(bar)),
      "r"(parity)
      : "memory");
}

// This CTA's rank in its cluster.
__device__ __forceinline__ uint32_t cluster_cta_rank() {
  uint32_t rank;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
  return rank;
}

// Every thread of every CTA of the cluster (all threads must call it): writes before are visible
// to reads after, cluster-wide. The .aligned barrier wants each warp converged: a caller may come
// from a branch that one lane took (the producer thread's loop).
__device__ __forceinline__ void cluster_sync() {
  __syncwarp();
  asm volatile(
      "barrier.cluster.arrive.release.aligned;\n"
      "barrier.cluster.wait.acquire.aligned;\n" ::
          : "memory");
}

}  // namespace torch_ext::cuda
