// The Hopper (sm_90a) GEMMs behind scaled_int8_mm and scaled_fp8_mm (quant/w8a8_wgmma.cu: wgmma
// from shared memory). Built only when the arch list holds 9.0a (TORCH_EXT_HAVE_SM90A_KERNELS);
// quant/w8a8_cuda.cu's launchers call them for problems that fill the GPU
// (use_tile in quant/w8a8_wgmma_index.h) on a compute capability 9.0 device unless
// TORCH_EXT_WGMMA=0. No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "quant/w8a8.h"

namespace torch_ext::cuda {

// The semantics of scaled_int8_mm / scaled_fp8_mm (quant/w8a8_cuda.h); bitwise the same results
// for int8. fp8: the tensor cores sum each 128-deep k block with about 14 significant bits
// (Hopper's fp8 accumulation, DeepSeek-V3 report 3.3.2) before it is added in fp32, so errors
// reach ~2^-14 of a block's magnitude instead of fp32's 2^-24 per addition. The caller has validated the parameters and
// checked use_tile (16-byte aligned operands and row strides) and the device (9.0).
cudaError_t scaled_int8_mm_sm90(const ScaledInt8MmParams& p, cudaStream_t stream);
cudaError_t scaled_fp8_mm_sm90(const ScaledFp8MmParams& p, cudaStream_t stream);

// The same GEMMs with the operands brought in by the copy engine, B multicast to 2-CTA clusters
// (quant/w8a8_wgmma_tma.cu; TORCH_EXT_WGMMA_TMA=1, opt-in until it has run on a GPU): the same
// bits as the two above; cudaErrorNotSupported (nothing launched) where they cannot run (no
// tensor maps in the driver, strides they cannot describe, registers or cluster size refused).
cudaError_t scaled_int8_mm_sm90_tma(const ScaledInt8MmParams& p, cudaStream_t stream);
cudaError_t scaled_fp8_mm_sm90_tma(const ScaledFp8MmParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
