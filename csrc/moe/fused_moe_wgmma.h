// fused_moe's grouped GEMMs on Hopper tensor cores (moe/fused_moe_wgmma.cu: wgmma with both
// operands in shared memory), built only when the arch list holds 9.0a
// (TORCH_EXT_HAVE_SM90A_KERNELS). moe/fused_moe_cuda.cu's launcher runs them in place of its
// mma.sync GEMMs with TORCH_EXT_MOE_WGMMA=1 on a compute capability 9.0 device. No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "moe/fused_moe_cuda_gemm.cuh"

namespace torch_ext::cuda {

// One grouped GEMM of fused_moe (kGateUp: GEMM 1, else one rank of GEMM 2) on 128 x 256 tiles:
// the plan's segments padded to 128 rows (fused_moe_wgmma::kBM), m_blocks / n_blocks / k_iters
// from moe/fused_moe_wgmma_index.h, 16-byte rows (p.vector). The results are the mma.sync
// GEMMs' up to the order of the fp32 sums. T: Half or BFloat16.
template <typename T, bool kGateUp>
cudaError_t grouped_gemm_sm90(const GemmArgs<T>& p, cudaStream_t stream);

// The same GEMM with B brought by the copy engine and shared by 2-CTA clusters within an expert
// (moe/fused_moe_wgmma_tma.cu; TORCH_EXT_MOE_WGMMA_TMA=1, opt-in until it has run on a GPU): the
// same bits. cudaErrorNotSupported (nothing launched) where it cannot run (no tensor maps in the
// driver, strides they cannot describe, registers or cluster size refused).
template <typename T, bool kGateUp>
cudaError_t grouped_gemm_sm90_tma(const GemmArgs<T>& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
