// CUDA launcher of MoBA's key-block-major forward (attention/moba_gather_cuda.cu; plan and layout
// in attention/moba_gather_index.h). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include "attention/block_sparse_attention.h"

namespace torch_ext::cuda {

// Whether the key-block-major forward takes these parameters (else cudaErrorInvalidValue from
// moba_gather_forward; the caller runs the union forward instead): fp16 / bf16, head dim 64 or
// 128, block_kv 16 / 32 / 64 / 128, token choices present, seq_q * top_k below 2^31 (pair ids are
// int32), the attention kernels' layout rules (16-byte aligned rows).
bool moba_gather_supported(const attention::BlockSparseForwardParams& p);

// Writes p.forward.out and p.forward.lse for query heads [head_begin, head_begin + heads): the
// plan (three small kernels and a memset), the attention of every tile, the merge. Enqueues on
// `stream`; no host synchronization.
cudaError_t moba_gather_forward(const attention::MobaGatherParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
