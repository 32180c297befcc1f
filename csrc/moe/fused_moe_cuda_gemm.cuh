// What fused_moe's grouped GEMM kernels share (moe/fused_moe_cuda.cu: mma.sync;
// moe/fused_moe_wgmma.cu: Hopper wgmma): their arguments, filled once by the launcher, the place
// of a CTA's tile in the plan, the A row a grouped row reads, and the epilogues' stores. No torch
// headers.
#pragma once

#include <cstdint>

#include "common/cuda/vec.cuh"
#include "moe/fused_moe.h"
#include "moe/fused_moe_cuda_index.h"

namespace torch_ext::cuda {

// One grouped GEMM launch. GEMM 1: rows of plan 1 (key = expert), A = hidden rows of the pairs'
// tokens, B = W13[e], act = act(gate, up) stored. GEMM 2: the rows of one rank of plan 2, A = act
// rows through row_of_pair, B = W2[e], the weighted sum over ranks in acc32 and out.
template <typename T>
struct GemmArgs {
  const T* a;                // GEMM 1: hidden [T, H]; GEMM 2: act [rows1, act_stride]
  int64_t a_stride;          // elements between A rows
  const T* w;                // w13 or w2
  int64_t w_expert_stride;   // 2 I H or H I
  int64_t k_total;           // H or I (also the weight row length)
  int64_t n_total;           // GEMM 1: I (gate columns); GEMM 2: H
  const int32_t* sorted;     // plan 1 or plan 2 rows
  const int32_t* offsets;
  int32_t first_key, keys, experts;
  const int32_t* row_of_pair;  // GEMM 2: act row of a pair
  int top_k;
  int64_t m_blocks, n_blocks, k_iters;
  bool vector;               // cp.async path
  // GEMM 1 epilogue
  T* act;
  int64_t act_stride;
  moe::Activation activation;
  // GEMM 2 epilogue
  const float* topk_weights;
  float* acc32;              // [T, H] or nullptr when k = 1
  T* out;
  bool first, last;
};

// Two adjacent io-dtype values (column j even; 4-byte aligned when the row stride is even).
template <typename T>
__device__ __forceinline__ void store_two(T* row, int64_t j, int64_t n_total, float v0, float v1, bool paired) {
  if (paired && j + 1 < n_total) {
    const T pair[2] = {from_compute<T>(v0), from_compute<T>(v1)};
    uint32_t word;
    __builtin_memcpy(&word, pair, 4);
    *reinterpret_cast<uint32_t*>(row + j) = word;
    return;
  }
  if (j < n_total) row[j] = from_compute<T>(v0);
  if (j + 1 < n_total) row[j + 1] = from_compute<T>(v1);
}

// A CTA's bm grouped rows from plan row row0 on, inside the segment of one expert (segments are
// padded to bm rows); expert < 0 past the plan's rows.
struct GroupedTile {
  int64_t row0;
  int32_t expert;
};
template <typename T>
__device__ __forceinline__ GroupedTile grouped_tile(const GemmArgs<T>& p, int64_t m_block, int bm) {
  namespace ix = ::torch_ext::moe::fused_moe_cuda;
  const int64_t row0 = int64_t(p.offsets[p.first_key]) + m_block * bm;
  const int32_t key = ix::segment_of_row(p.offsets, p.first_key, p.keys, row0);
  return {row0, key < 0 ? -1 : key % p.experts};
}

// The A row of a grouped row (GEMM 1: the pair's token's hidden row; GEMM 2: the pair's act
// row), nullptr for a padding row (copied as zeros).
template <typename T, bool kGateUp>
__device__ __forceinline__ const T* a_row_source(const GemmArgs<T>& p, int64_t grouped_row) {
  const int32_t pair = p.sorted[grouped_row];
  int64_t a_row = -1;
  if (pair >= 0) a_row = kGateUp ? pair / p.top_k : p.row_of_pair[pair];
  return a_row >= 0 ? p.a + a_row * p.a_stride : nullptr;
}

// GEMM 1's epilogue: act of intermediate columns j and j + 1 (j even) of grouped row r from their
// gate and up sums, rounded to the io dtype.
template <typename T>
__device__ __forceinline__ void store_act_pair(const GemmArgs<T>& p, int64_t r, int64_t j, float g0, float u0,
                                               float g1, float u1) {
  namespace ix = ::torch_ext::moe::fused_moe_cuda;
  store_two(p.act + r * p.act_stride, j, p.n_total, ix::act_value(p.activation, g0, u0),
            ix::act_value(p.activation, g1, u1), true);
}

// GEMM 2's epilogue for the token of one pair: out[t, n] of this rank is w y added to the sum of
// the ranks before (fp32 acc32), rounded into out at the last rank.
template <typename T>
struct CombineRow {
  T* out_row;
  float* acc_row;  // nullptr when k = 1
  float w;
  __device__ __forceinline__ CombineRow(const GemmArgs<T>& p, int32_t pair)
      : out_row(p.out + pair / p.top_k * p.n_total),
        acc_row(p.acc32 != nullptr ? p.acc32 + pair / p.top_k * p.n_total : nullptr),
        w(__ldg(p.topk_weights + pair)) {}
  __device__ __forceinline__ void add(const GemmArgs<T>& p, int64_t n, float y) const {
    if (n >= p.n_total) return;
    const float prev = p.first ? 0.f : acc_row[n];
    const float s = ::torch_ext::moe::fused_moe_cuda::combine_value(p.first, prev, w, y);
    if (p.last) {
      out_row[n] = from_compute<T>(s);
    } else {
      acc_row[n] = s;
    }
  }
};

}  // namespace torch_ext::cuda
