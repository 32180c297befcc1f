// Device helpers shared by the Hopper (sm_90a, wgmma) kernels of block-sparse attention
// (attention/block_sparse_attention_wgmma.cu, attention/block_sparse_attention_wgmma_bwd.cu): the
// three product shapes of a warpgroup's 64 rows, on top of the mma.sync kernels' shared code
// (attention/block_sparse_attention_cuda_row.cuh). Descriptors: block_sparse_attention_cuda_index.h
// sections 10 and 11. Call only from code compiled for sm_90a. No torch headers.
#pragma once

#include "attention/block_sparse_attention_cuda_row.cuh"
#include "common/cuda/wgmma.cuh"

namespace torch_ext::cuda {
namespace {

static_assert(ix::kBwdQTile == ix::kTileKv, "wgmma_v_desc reads 64-row tiles: the Q / dO sub-tiles are too");

// acc (64 x D per warpgroup) += A B for the four k16 steps of a 64-deep product: A from registers
// (a[kk]), B a 64-row tile read transposed (keys or query rows along k, D along n).
template <bool kBf16, int kD>
__device__ __forceinline__ void wgmma_acc_x_tile(float (&acc)[kD / 8][4], const uint32_t (&a)[4][4], uint32_t tile) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if constexpr (kD == 128) {
      wgmma_m64n128k16_rs<kBf16, true>(acc, a[kk], ix::wgmma_v_desc(tile, kk));
    } else {
      wgmma_m64n64k16_rs<kBf16, true>(acc, a[kk], ix::wgmma_v_desc(tile, kk));
    }
  }
}

// s (64 x 64 per warpgroup) = A B^T over D: A the warpgroup's 64 rows of a kRowsA-row tile (Q,
// dO, or K / V in the dK / dV kernel), B a 64-row tile (K, V, or Q / dO), both K-major in shared
// memory. Issued, not committed.
template <bool kBf16, int kD, int kRowsA>
__device__ __forceinline__ void wgmma_rows_x_rows(float (&s)[8][4], uint32_t a_rows, uint32_t b_tile) {
#pragma unroll
  for (int k16 = 0; k16 < kD / 16; ++k16)
    wgmma_m64n64k16_ss<kBf16>(s, ix::wgmma_kmajor_desc<kRowsA>(a_rows, k16), ix::wgmma_kmajor_desc<ix::kTileKv>(b_tile, k16),
                              k16 > 0);
}

// The A fragments of all four k16 steps of a 64-deep product from accumulators, fenced: written
// before the batch's first wgmma (a register written between wgmmas of one batch makes ptxas
// insert a fence before each: warning C7519).
template <typename T>
__device__ __forceinline__ void acc_to_a_all(uint32_t (&a)[4][4], const float (&acc)[8][4]) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) acc_to_a<T>(a[kk], acc, kk);
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_fence_operands(a[kk]);
}

}  // namespace
}  // namespace torch_ext::cuda
