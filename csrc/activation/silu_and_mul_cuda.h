// CUDA launchers of silu_and_mul (implemented in silu_and_mul_cuda.cu, no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include "activation/silu_and_mul.h"

namespace torch_ext::cuda {

// Enqueue on `stream`; return the launch status (cudaGetLastError after the launch).
cudaError_t silu_and_mul(const SiluAndMulParams& p, cudaStream_t stream);
cudaError_t silu_and_mul_backward(const SiluAndMulBackwardParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
