// Programmatic dependent launch (PDL, sm_90+): a kernel launched with launch_dependent() may start
// while the kernel before it in the stream is still running, once every CTA of that one has
// called allow_dependent_launch() (or exited); it must call wait_for_prior_grid() before it reads
// anything the earlier kernel writes. This hides the launch gap (a few microseconds) between a
// GEMM and the small kernel that finishes its output, which matters in decode, where the GEMM
// itself takes 10-30 us. Code compiled for older GPUs (also sm_80 PTX JIT-compiled on a newer
// one) launches normally and the device calls compile to nothing. CUDA-only; no torch headers.
#pragma once

#include <cuda_runtime_api.h>

namespace torch_ext::cuda {

// In the earlier kernel: this CTA no longer holds up the dependent kernel's launch. Called at the
// start, the dependent grid's CTAs can become resident beside the last ones of this grid, and
// wait there (wait_for_prior_grid) until it completes.
__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// In the dependent kernel, before the first read of the earlier kernel's results: returns once
// that grid has completed and its writes are visible. A no-op without PDL.
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Launches kernel<<<grid, block, smem_bytes, stream>>>(args...) as a programmatic dependent of
// the stream's previous kernel when the code the device runs was compiled for compute
// capability 9.0 or later (PTX version >= 90: its griddepcontrol instructions are there); a
// plain launch otherwise. Returns the launch's error.
template <typename Kernel, typename... Args>
cudaError_t launch_dependent(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                             const Args&... args) {
  cudaFuncAttributes compiled{};
  const cudaError_t status = cudaFuncGetAttributes(&compiled, kernel);
  if (status != cudaSuccess) return status;
  cudaLaunchAttribute attribute{};
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem_bytes;
  config.stream = stream;
  config.attrs = &attribute;
  config.numAttrs = compiled.ptxVersion >= 90 ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

}  // namespace torch_ext::cuda
