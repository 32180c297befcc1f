// The Hopper (sm_90a) kernels of block-sparse attention, every product on wgmma: the forward
// (attention/block_sparse_attention_wgmma.cu) and the backward's dQ and dK / dV kernels
// (attention/block_sparse_attention_wgmma_bwd.cu). Built only when the arch list holds 9.0a
// (TORCH_EXT_HAVE_SM90A_KERNELS); attention/block_sparse_attention_cuda.cu's launchers call them
// on a compute capability 9.0 device when TORCH_EXT_ATTENTION_WGMMA=1 (forward) /
// TORCH_EXT_ATTENTION_WGMMA_BWD=1 (backward): opt-in until they have run on a GPU (written and
// simulated without one). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/block_sparse_attention.h"

namespace torch_ext::cuda {

// The semantics of block_sparse_attention_forward (attention/block_sparse_attention_cuda.h): out
// and lse within the same fp32 rounding (the products are summed in another order). The caller
// has validated the parameters (check_forward) and the device.
cudaError_t block_sparse_attention_forward_sm90(const attention::BlockSparseForwardParams& p, cudaStream_t stream);

// The backward's dQ (p.grad_q) and dK / dV (p.grad_k, p.grad_v), each as the mma.sync kernels
// compute it within fp32 rounding; p.delta already holds rowsum(dO * O). dK / dV covers block_kv
// 64 and 128 (whole warpgroups of keys): the caller takes the mma.sync kernel for 16 / 32.
cudaError_t block_sparse_attention_dq_sm90(const attention::BlockSparseBackwardParams& p, cudaStream_t stream);
bool block_sparse_attention_dkdv_sm90_supports(int block_kv);
cudaError_t block_sparse_attention_dkdv_sm90(const attention::BlockSparseBackwardParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
