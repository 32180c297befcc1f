// CUDA launchers of the im2win convolution (implemented in im2win_cuda.cu, no torch headers).
// Semantics, parameters and geometry: conv/im2win.h. The GEMM formulation, the workspace
// layouts and every index map of the kernels: conv/im2win_index.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "conv/im2win.h"

namespace torch_ext::cuda {

// Bytes of device workspace im2win_conv needs for these parameters (0 when it runs the direct
// kernel: fp64, fewer than 8 output channels per group, empty shapes). Pure host function.
// The caller allocates it (16-byte aligned; any torch allocation is) and passes it unchanged.
int64_t im2win_conv_workspace_bytes(const Im2winConvParams& p);

// out = conv(input, weight) + bias as documented in conv/im2win.h: window transform + implicit
// GEMM (fp32 SIMT; fp16/bf16 tensor cores, fp32 accumulation, one rounding), or the direct
// kernel. Enqueues on `stream` and returns the launch status (cudaGetLastError); cudaSuccess
// without a launch for an empty output, cudaErrorInvalidValue for an impossible geometry
// (groups not dividing C and K, strides or dilations < 1). A null or misaligned workspace
// where one is needed falls back to the direct kernel.
cudaError_t im2win_conv(const Im2winConvParams& p, void* workspace, cudaStream_t stream);

// Writes the window buffer exactly as Im2winTransformParams documents ([N][C][Ho][width*R],
// any destination strides, the input's dtype).
cudaError_t im2win_transform(const Im2winTransformParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
