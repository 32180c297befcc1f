// CUDA launchers of MoBA's key-block-major forward (attention/moba_gather_cuda.cu) and backward
// (attention/moba_gather_backward_cuda.cu); plan and layout in attention/moba_gather_index.h. No
// torch headers.
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

// The key-block-major backward (attention/moba_gather_backward_cuda.cu) takes what the forward
// takes with key blocks of at most 64 keys (its dQ CTA keeps two Q / dO tiles and one K / V step
// within sm_86's 99 KB).
bool moba_gather_backward_supported(const attention::BlockSparseForwardParams& p);

// Workspace bytes of the backward for a chunk of `lanes` (batch, head) lanes: the forward's layout
// plus the sort of its lists; -1 when the chunk is too large for the sort (lanes * Sq * top_k
// below 2^31 and keys of at most 32 bits). The sort's share depends on the architecture of the
// current device: call it on the device that runs moba_gather_backward.
int64_t moba_gather_backward_workspace_bytes(int64_t lanes, int64_t seq_q, int top_k, int64_t num_kv_blocks,
                                             int head_dim);

// Writes bp.grad_q for the chunk's query heads and bp.grad_k / bp.grad_v for their kv heads: p and
// bp share the forward parameters (q, k, v, lse, token choices; p.forward == bp.forward), the chunk
// holds whole GQA groups (head_begin and heads multiples of Hq / Hk), p.workspace holds
// moba_gather_backward_workspace_bytes(batches * heads, ...) bytes, bp.delta holds
// rowsum(dO * O) (block_sparse_attention_delta). The plan again, then the dQ runs, their merge and
// the dK / dV kernel. Enqueues on `stream`; no host synchronization.
cudaError_t moba_gather_backward(const attention::MobaGatherParams& p, const attention::BlockSparseBackwardParams& bp,
                                 cudaStream_t stream);

}  // namespace torch_ext::cuda
