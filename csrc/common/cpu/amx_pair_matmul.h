// C = A B with bf16 pairs on AMX-BF16 tiles (the shared driver: common/cpu/amx_gemm.h), for the
// kernels whose AVX512_BF16 products take B packed as 32-bit pairs (attention's dot_matmul,
// fused_moe's panels): the same operands, so their AMX paths are one call. For AVX-512 kernel
// files compiled with the AMX flags (or using only the emulated tiles).
//
//   A   rows through a pointer array: pair k of row r at a[r] + 2 k ld_a (ld_a == 1: a bf16 row of
//       a_values values; a pair past them reads as zero, e.g. an odd K's last one).
//   B   pairs rows of ld_b uint32, pair k of column n at b[k ld_b + n]: TDPBF16PS's B operand as
//       it is, 16 columns per tile row.
//   C   cols (a multiple of 16) fp32 per row through c's pointers: c[r][n] = row_scale[r] c[r][n]
//       + sum (row_scale non-null) or out_scale * sum.
// The A rows are gathered once per call into `staging` as 32-bit pairs in whole 64-byte steps,
// zero-padded in k and to 32-row blocks; loops: column pairs of 16-column blocks, then 32-row
// blocks, then all of k in the tiles.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu/amx_gemm.h"
#include "common/dtype.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx {

template <typename Tiles>
void tile_pair_matmul(const BFloat16* const* a, int rows, int64_t a_values, int64_t ld_a, const uint32_t* b,
                      int64_t ld_b, int pairs, float* const* c, int cols, const float* row_scale, float out_scale,
                      std::vector<uint32_t>& staging) {
  constexpr int kLanes = 16;  // fp32 per zmm, columns per B tile
  const int64_t step_pairs = kStepBytes / 4, steps = (pairs + step_pairs - 1) / step_pairs;
  const int64_t stride = steps * step_pairs;  // uint32 pairs per staged row
  const int64_t padded_rows = (rows + kBlockRows - 1) / kBlockRows * kBlockRows;
  if (staging.size() < size_t(padded_rows * stride)) staging.resize(size_t(padded_rows * stride));
  for (int64_t r = 0; r < padded_rows; ++r) {  // one pass: each staged word written once
    uint32_t* const dst = staging.data() + r * stride;
    int64_t real = 0;  // whole pairs copied
    if (r < rows && ld_a == 1) {
      real = std::min<int64_t>(pairs, a_values / 2);
      std::memcpy(dst, a[r], size_t(real) * 4);
      if (real < pairs && a_values % 2 == 1) dst[real++] = a[r][a_values - 1].bits;  // (value, 0)
    } else if (r < rows) {
      for (real = 0; real < pairs; ++real) std::memcpy(dst + real, a[r] + 2 * real * ld_a, 4);
    }
    std::memset(dst + real, 0, size_t(stride - real) * 4);
  }
  const auto bytes = [](const uint32_t* p) { return reinterpret_cast<const uint8_t*>(p); };
  for (int n0 = 0; n0 < cols; n0 += kBlockColumns) {
    const int width = std::min(kBlockColumns, cols - n0);  // 16 or 32
    const TilePairOperands operands{bytes(staging.data()), stride * 4,
                                    {bytes(b + n0), bytes(b + (width > kLanes ? n0 + kLanes : n0))}, ld_b * 4,
                                    pairs};
    tile_pair_gemm<TileDot::kBf16, Tiles, float>(
        operands, 0, padded_rows, [&](int64_t m0, const float (&acc)[kBlockRows][kBlockColumns]) {
          for (int i = 0; i < kBlockRows && m0 + i < rows; ++i) {
            const int64_t r = m0 + i;
            float* const out = c[r] + n0;
            for (int n = 0; n < width; n += kLanes) {
              const __m512 sum = _mm512_loadu_ps(acc[i] + n);
              _mm512_storeu_ps(out + n, row_scale ? _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(out + n),
                                                                                _mm512_set1_ps(row_scale[r])), sum)
                                                  : _mm512_mul_ps(sum, _mm512_set1_ps(out_scale)));
            }
          }
        });
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx
