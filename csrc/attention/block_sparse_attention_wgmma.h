// The Hopper (sm_90a) forward of block-sparse attention (attention/block_sparse_attention_wgmma.cu:
// wgmma for both products). Built only when the arch list holds 9.0a
// (TORCH_EXT_HAVE_SM90A_KERNELS); attention/block_sparse_attention_cuda.cu's forward launcher
// calls it on a compute capability 9.0 device when TORCH_EXT_ATTENTION_WGMMA=1 (opt-in until it
// has run on a GPU). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/block_sparse_attention.h"

namespace torch_ext::cuda {

// The semantics of block_sparse_attention_forward (attention/block_sparse_attention_cuda.h): out
// and lse within the same fp32 rounding (the products are summed in another order). The caller
// has validated the parameters (check_forward) and the device.
cudaError_t block_sparse_attention_forward_sm90(const attention::BlockSparseForwardParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
