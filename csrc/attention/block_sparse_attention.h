// block_sparse_attention: softmax(q k^T * scale) v where each query block of block_q rows attends
// only the key blocks of block_kv columns listed for it, computed FlashAttention-2 style (tiles
// on chip, online softmax, nothing S x S in memory); forward and backward. Optionally MoBA's
// token-level selection: inside its block's list, a query token attends only the key blocks IT
// selected. Torch-free: the parameter structs carry raw pointers and element strides; the
// torch-facing code in block_sparse_attention.cpp fills them.
//
// Conventions (docs/attention.md):
// - q [B, Hq, Sq, D], k/v [B, Hk, Sk, D] with Hq a multiple of Hk (GQA: query head h reads kv
//   head h / (Hq / Hk)); last dimension contiguous, other strides free.
// - causal: bottom-right aligned as FlashAttention-2: query i sees keys j <= i + Sk - Sq.
// - A query row that sees no key (no listed block, or all masked) gets out = 0 and lse = -inf.
// - lse [B, Hq, Sq] fp32 = log(sum_j exp(score_ij)) with score = q.k * scale (natural log).
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"

namespace torch_ext::attention {

// Which key blocks each query block visits. Head strides may be 0 (one list for every head).
struct BlockList {
  const int32_t* counts;        // [B, Hm, nq]: blocks listed for query block i (<= max_blocks)
  const int32_t* indices;       // [B, Hm, nq, max_blocks]: the first counts[..] entries are used
  int64_t counts_batch_stride;  // element strides of counts (query-block stride 1)
  int64_t counts_head_stride;
  int64_t indices_batch_stride; // element strides of indices (query-block stride max_blocks)
  int64_t indices_head_stride;
  int32_t max_blocks;
};

// MoBA token-level selection, or blocks == nullptr: the key blocks each query token chose,
// [B, Hq, Sq, top_k] int32, -1 for an unused slot (causal: early tokens have fewer blocks).
// A listed key block is attended by query token i only if it is among i's choices.
struct TokenSelection {
  const int32_t* blocks;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t seq_stride;           // = top_k when contiguous
  int32_t top_k;
};

// A [B, H, S, D] tensor: base pointer and element strides (the D stride is 1).
struct Bhsd {
  const void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t seq_stride;
};
struct MutableBhsd {
  void* data;
  int64_t batch_stride;
  int64_t head_stride;
  int64_t seq_stride;
};

struct BlockSparseForwardParams {
  ScalarKind dtype;             // q, k, v, out: fp16/bf16 (CUDA), fp32/bf16 (CPU), fp64 (CPU checks)
  int64_t batch, heads_q, heads_kv, seq_q, seq_kv;
  int32_t head_dim;
  int32_t block_q, block_kv;
  bool causal;
  float scale;
  Bhsd q, k, v;
  MutableBhsd out;
  float* lse;                   // [B, Hq, Sq] contiguous
  BlockList blocks;             // per query block (nq = ceil(Sq / block_q))
  TokenSelection selection;     // optional (blocks == nullptr: every listed block fully)
};

// Gradients given grad_out. Deterministic without float atomics: dq is computed per query block
// walking `blocks`; dk and dv per key block walking `transposed`, the same pairs listed per key
// block (for kv head hk and key block j: every query head of hk's group, and each query block
// of that head listing j).
struct BlockSparseBackwardParams {
  BlockSparseForwardParams forward;  // out and lse as the forward wrote them (read-only here)
  Bhsd grad_out;
  MutableBhsd grad_q, grad_k, grad_v;
  float* delta;                 // [B, Hq, Sq] scratch: rowsum(grad_out * out)
  // Per (batch, query head, key block): the query blocks listing it, [B, Hq, nk, max_blocks]
  // with counts [B, Hq, nk] (head strides never 0 here).
  BlockList transposed;
};

// MoBA's key-block-major forward and backward on CUDA (attention/moba_gather_index.h): `forward` as
// for block_sparse_attention with selection = the token choices and block_kv = MoBA's block size
// (its block lists unused), run for query heads [head_begin, head_begin + heads) of batches
// [batch_begin, batch_begin + batches) with a workspace of
// moba_gather::workspace_layout(batches * heads, ...).bytes bytes (the forward) or
// moba_gather_backward_workspace_bytes(batches * heads, ...) (the backward, attention/moba_gather_cuda.h).
struct MobaGatherParams {
  BlockSparseForwardParams forward;
  int64_t batch_begin, batches;
  int64_t head_begin, heads;
  void* workspace;
};

// moba_select: MoBA gating. Key blocks of block_size tokens are mean-pooled; query token i scores
// block b by q_i . mean(k_b) and keeps its top_k blocks (ties: lower block id first). Causal:
// the block holding position i + Sk - Sq is always kept (and attended causally), later blocks
// never; blocks are returned in increasing id, -1 filling unused slots.
struct MobaSelectParams {
  ScalarKind dtype;
  int64_t batch, heads_q, heads_kv, seq_q, seq_kv;
  int32_t head_dim;
  int32_t block_size, top_k;
  bool causal;
  Bhsd q, k;
  int32_t* selected;            // [B, Hq, Sq, top_k] contiguous
};

// moba_block_lists on the CPU: per query block of block_q rows, the union of its rows' choices.
struct MobaBlockListsParams {
  const int32_t* token_blocks;  // [B, H, Sq, top_k] contiguous: ids < num_kv_blocks, negative = unused
  int64_t batch, heads, seq_q;
  int32_t top_k, num_kv_blocks, block_q, max_blocks;
  int32_t* counts;              // [B, H, nq] contiguous
  int32_t* indices;             // [B, H, nq, max_blocks] contiguous
};

}  // namespace torch_ext::attention

namespace torch_ext::cpu {
// CPU kernels (block_sparse_attention_cpu.cpp): fp32, bf16 and fp64 (checks); any head dim that is
// a multiple of 16, any block sizes. The backward writes p.delta first.
TORCH_EXT_DECLARE_CPU_KERNEL(void block_sparse_attention_forward(const attention::BlockSparseForwardParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void block_sparse_attention_backward(const attention::BlockSparseBackwardParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void moba_select(const attention::MobaSelectParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void moba_block_lists(const attention::MobaBlockListsParams& p))
}  // namespace torch_ext::cpu
