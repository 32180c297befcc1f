// What the Hopper GEMMs' copy-engine variants (quant/w8a8_wgmma_tma.cu, moe/fused_moe_wgmma_tma.cu)
// share on the device and the host around the protocol of common/wgmma_cluster_pipeline.h: the
// stage barriers' set-up and the launch on thread-block clusters. sm_90 code. No torch headers.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

#include "common/cuda/mbarrier.cuh"

namespace torch_ext::cuda {

// Every thread of the CTA: thread 0 initializes the stages' full and empty barriers; then a
// cluster barrier, so that no peer's copy or release signals them before they exist.
template <int kStages>
__device__ __forceinline__ void init_stage_barriers(uint64_t (&full)[kStages], uint64_t (&empty)[kStages],
                                                    uint32_t full_arrivals, uint32_t empty_arrivals) {
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], full_arrivals);
      mbarrier_init(&empty[s], empty_arrivals);
    }
    fence_mbarrier_init_cluster();
  }
  cluster_sync();
}

// kKernel<<<ctas, threads, smem_bytes, stream>>>(args...) in clusters of cluster_ctas along x.
// cudaErrorNotSupported, nothing launched, where the kernel's register count at entry is not the
// one its setmaxnreg budgets add up to (a claim beyond what the others gave back would wait
// forever; a property of the compiled kernel, queried once) or the device refuses the cluster
// size: the caller runs its cp.async kernel.
template <auto kKernel, typename... Args>
cudaError_t launch_on_clusters(int64_t ctas, int cluster_ctas, int threads, int smem_bytes, int entry_registers,
                               cudaStream_t stream, Args&&... args) {
  static const auto compiled = [] {
    cudaFuncAttributes attributes{};
    const cudaError_t query = cudaFuncGetAttributes(&attributes, kKernel);
    return std::pair<cudaError_t, int>{query, attributes.numRegs};
  }();
  if (compiled.first != cudaSuccess) return compiled.first;
  if (compiled.second != entry_registers) return cudaErrorNotSupported;
  const auto kernel = kKernel;
  cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
  if (status != cudaSuccess) return status;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = unsigned(cluster_ctas);
  cluster.val.clusterDim.y = cluster.val.clusterDim.z = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = dim3(unsigned(ctas));
  config.blockDim = dim3(unsigned(threads));
  config.dynamicSmemBytes = size_t(smem_bytes);
  config.stream = stream;
  config.attrs = &cluster;
  config.numAttrs = 1;
  status = cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
  if (status == cudaErrorInvalidClusterSize) {
    (void)cudaGetLastError();  // a configuration the device refused, not a fault: clear it
    return cudaErrorNotSupported;
  }
  return status;
}

}  // namespace torch_ext::cuda
