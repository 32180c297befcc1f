// CUDA launchers of block-sparse attention and MoBA gating (implemented in
// block_sparse_attention_cuda.cu, no torch headers). Semantics and parameters:
// attention/block_sparse_attention.h.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "attention/block_sparse_attention.h"

namespace torch_ext::cuda {

// Forward: out and lse. fp16/bf16, head_dim 64 or 128 (others: cudaErrorInvalidValue),
// block_q 64 or 128, block_kv 16, 32, 64 or 128. Enqueues on `stream`.
cudaError_t block_sparse_attention_forward(const attention::BlockSparseForwardParams& p, cudaStream_t stream);

// Backward: writes delta, then grad_q (per query block) and grad_k / grad_v (per key block,
// walking p.transposed); deterministic, no float atomics.
cudaError_t block_sparse_attention_backward(const attention::BlockSparseBackwardParams& p, cudaStream_t stream);

// The backward's first pass alone: p.delta = rowsum(dO * O) in fp32 per query row (MoBA's
// key-block-major backward runs it before its own kernels). fp16 / bf16, head_dim 64 or 128.
cudaError_t block_sparse_attention_delta(const attention::BlockSparseBackwardParams& p, cudaStream_t stream);

// MoBA gating: mean-pooled key blocks and per-token top-k selection into p.selected.
// `workspace` holds moba_select_workspace_bytes(p) bytes (the pooled keys), 16-byte aligned.
int64_t moba_select_workspace_bytes(const attention::MobaSelectParams& p);

// moba_block_lists on the GPU (p.counts, p.indices: device pointers): per query block the union
// of its rows' choices in ascending order; ids outside [0, num_kv_blocks) are ignored. Refuses
// (cudaErrorInvalidValue) key-block counts whose bitmask exceeds bsa_cuda::kMaxListSmemBytes of
// shared memory; the caller then builds the lists with tensor ops.
cudaError_t moba_block_lists(const attention::MobaBlockListsParams& p, cudaStream_t stream);
cudaError_t moba_select(const attention::MobaSelectParams& p, void* workspace, cudaStream_t stream);

}  // namespace torch_ext::cuda
