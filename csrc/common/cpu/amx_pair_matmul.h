// C = A B with bf16 pairs on AMX-BF16 tiles (the shared driver: common/cpu/amx_gemm.h), for the
// kernels whose AVX512_BF16 products take B packed as 32-bit pairs (attention's dot_matmul,
// fused_moe's panels): the same operands, so their AMX paths are one call. For AVX-512 kernel
// files compiled with the AMX flags (or using only the emulated tiles).
//
//   A   rows through a pointer array: pair k of row r at a[r] + 2 k ld_a (ld_a == 1: a bf16 row of
//       a_values values; a pair past them reads as zero, e.g. an odd K's last one).
//   B   pairs rows of ld_b uint32, pair k of column n at b[k ld_b + n]: TDPBF16PS's B operand as
//       it is, 16 columns per tile row; or in segments of b_segment_pairs rows (a multiple of
//       16), segment t at b + b_segment_shifts[t] bytes (TilePairOperands::segment_shift).
//   C   cols (a multiple of 16) fp32 per row through c's pointers: c[r][n] = row_scale[r] c[r][n]
//       + sum (row_scale non-null) or out_scale * sum.
// A's rows are read in place, 32-row blocks of equally spaced rows as tiles with that stride,
// where they are bf16 rows (ld_a == 1) of whole 64-byte steps (K a multiple of 32: no tile reads
// past a row): split_rows. The other rows are gathered once per call into `staging` as 32-bit
// pairs in whole 64-byte steps, zero-padded in k and to 32-row blocks (that copy cost as much as
// the products in fused_moe's panels, and a tenth of the attention forward). Loops: column pairs of
// 16-column blocks, then 32-row blocks, then all of k in the tiles. A 32-row block of C whose rows
// are equally spaced takes its results straight from the tiles (the sums as they are, or added to
// C with row scales of 1: C loaded into the tiles first); the rest go through a local array and an
// epilogue, whose vector loads of the tile stores' bytes wait for the stores to drain (measured on
// a Sapphire Rapids VM: a 64 x 64 x 128 product took 1.0 us that way, 0.6 us in place).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx.h"
#include "common/cpu/amx_gemm.h"
#include "common/dtype.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx {

// Whether the bf16 pair products of an AMX-capable kernel file run on tiles (hardware or
// emulated) rather than its vdpbf16ps code, as cpu::amx_bf16_kernel_mode() says.
inline bool bf16_products_on_tiles() {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
  return amx_bf16_kernel_mode() != AmxMode::kOff;
#else
  return amx_bf16_kernel_mode() == AmxMode::kEmulate;
#endif
}

// Which of A's rows tile_pair_matmul reads in place: the first rows of 32-row blocks whose rows are
// equally spaced in memory (a positive stride, e.g. a head's query rows, a P buffer, a run of an
// expert's weight rows); none unless A's rows are bf16 rows (ld_a == 1) of whole 64-byte steps.
// The rest, in order, into `staged`.
inline void split_rows(const BFloat16* const* a, int rows, int64_t a_values, int64_t ld_a, int pairs,
                       int64_t step_pairs, std::vector<int>& in_place, std::vector<int>& staged) {
  in_place.clear();
  staged.clear();
  const bool whole_steps = ld_a == 1 && a_values == 2 * int64_t(pairs) && pairs % step_pairs == 0;
  int r = 0;
  while (r < rows) {
    int run = 1;  // rows from r equally spaced, at least a row apart
    if (whole_steps && r + 1 < rows) {
      const std::ptrdiff_t spacing = a[r + 1] - a[r];
      if (spacing >= a_values)
        while (r + run < rows && a[r + run] - a[r + run - 1] == spacing) ++run;
    }
    const int blocks = run / kBlockRows;
    for (int i = 0; i < blocks; ++i) in_place.push_back(r + i * kBlockRows);
    for (int i = blocks * kBlockRows; i < run; ++i) staged.push_back(r + i);
    r += run;
  }
}

// The spacing (in floats) of n output rows if they are equally spaced and ascending, else 0.
inline int64_t spacing_of(float* const* c, int n) {
  const std::ptrdiff_t spacing = c[1] - c[0];
  for (int i = 2; i < n; ++i)
    if (c[i] - c[i - 1] != spacing) return 0;
  return spacing > 0 ? spacing : 0;
}

template <typename Tiles>
void tile_pair_matmul(const BFloat16* const* a, int rows, int64_t a_values, int64_t ld_a, const uint32_t* b,
                      int64_t ld_b, int pairs, float* const* c, int cols, const float* row_scale, float out_scale,
                      LineAlignedVector<uint32_t>& staging, const int64_t* b_segment_shifts = nullptr,
                      int64_t b_segment_pairs = 0) {
  constexpr int kLanes = 16;  // fp32 per zmm, columns per B tile
  const int64_t step_pairs = kStepBytes / 4, steps = (pairs + step_pairs - 1) / step_pairs;
  const int64_t stride = steps * step_pairs;  // uint32 pairs per staged row
  thread_local std::vector<int> in_place, staged;
  split_rows(a, rows, a_values, ld_a, pairs, step_pairs, in_place, staged);
  const int64_t padded_rows = (int64_t(staged.size()) + kBlockRows - 1) / kBlockRows * kBlockRows;
  if (staging.size() < size_t(padded_rows * stride)) staging.resize(size_t(padded_rows * stride));
  for (int64_t s = 0; s < padded_rows; ++s) {  // one pass: each staged word written once
    uint32_t* const dst = staging.data() + s * stride;
    const bool real_row = s < int64_t(staged.size());
    const int r = real_row ? staged[size_t(s)] : 0;
    int64_t real = 0;  // whole pairs copied
    if (real_row && ld_a == 1) {
      real = std::min<int64_t>(pairs, a_values / 2);
      std::memcpy(dst, a[r], size_t(real) * 4);
      if (real < pairs && a_values % 2 == 1) dst[real++] = a[r][a_values - 1].bits;  // (value, 0)
    } else if (real_row) {
      for (real = 0; real < pairs; ++real) std::memcpy(dst + real, a[r] + 2 * real * ld_a, 4);
    }
    std::memset(dst + real, 0, size_t(stride - real) * 4);
  }
  const auto bytes = [](const void* p) { return reinterpret_cast<const uint8_t*>(p); };
  // Per in-place block of A, once: the spacing of its C rows (in floats) where its results go
  // from the tiles to them directly, 0 where they go through tile_pair_gemm's local array and
  // the epilogue. Directly: C rows equally spaced, and the sums as they are (no scales) or added
  // to C (row scales all 1: C loaded into the tiles first).
  thread_local std::vector<int64_t> direct_spacing;
  direct_spacing.resize(in_place.size());
  const bool plain_sums = row_scale == nullptr && out_scale == 1.0f;
  for (size_t i = 0; i < in_place.size(); ++i) {
    const int first = in_place[i];
    const bool adds_to_c = row_scale && std::all_of(row_scale + first, row_scale + first + kBlockRows,
                                                    [](float s) { return s == 1.0f; });
    const int64_t spacing = spacing_of(c + first, kBlockRows);
    direct_spacing[i] = spacing >= cols && (plain_sums || adds_to_c) ? spacing : 0;
  }
  for (int n0 = 0; n0 < cols; n0 += kBlockColumns) {
    const int width = std::min(kBlockColumns, cols - n0);  // 16 or 32
    const uint8_t* const b_blocks[2] = {bytes(b + n0), bytes(b + (width > kLanes ? n0 + kLanes : n0))};
    // The operands of A rows a_stride bytes apart from `rows_at` with this column pair.
    const auto operands = [&](const uint8_t* rows_at, int64_t a_stride) {
      return TilePairOperands{rows_at, a_stride, {b_blocks[0], b_blocks[1]}, ld_b * 4, pairs, b_segment_shifts,
                              b_segment_pairs};
    };
    // `count` rows of the product from A rows a_stride bytes apart at `rows_at`, through the
    // epilogue; row_of(i) is the i-th one's row of A and C.
    const auto run = [&](const uint8_t* rows_at, int64_t a_stride, int64_t count, const auto& row_of) {
      const int64_t blocks_end = (count + kBlockRows - 1) / kBlockRows * kBlockRows;
      tile_pair_gemm<TileDot::kBf16, Tiles, float>(
          operands(rows_at, a_stride), 0, blocks_end, [&](int64_t m0, const float (&acc)[kBlockRows][kBlockColumns]) {
            for (int i = 0; i < kBlockRows && m0 + i < count; ++i) {
              const int r = row_of(m0 + i);
              float* const out = c[r] + n0;
              for (int n = 0; n < width; n += kLanes) {
                const __m512 sum = _mm512_loadu_ps(acc[i] + n);
                _mm512_storeu_ps(out + n, row_scale ? _mm512_add_ps(_mm512_mul_ps(_mm512_loadu_ps(out + n),
                                                                                  _mm512_set1_ps(row_scale[r])), sum)
                                                    : _mm512_mul_ps(sum, _mm512_set1_ps(out_scale)));
              }
            }
          });
    };
    for (size_t i = 0; i < in_place.size(); ++i) {
      const int first = in_place[i];
      const int64_t a_stride = (a[first + 1] - a[first]) * int64_t(sizeof(BFloat16));
      if (const int64_t spacing = direct_spacing[i]) {
        float* const at = c[first] + n0;
        tile_pair_products<TileDot::kBf16, Tiles>(
            operands(bytes(a[first]), a_stride), 0, kBlockRows,
            [&](int64_t) { row_scale ? load_block<Tiles>(at, spacing * 4, width) : zero_block<Tiles>(); },
            [&](int64_t) { store_block<Tiles>(at, spacing * 4, width); });
      } else {
        run(bytes(a[first]), a_stride, kBlockRows, [first](int64_t r) { return first + int(r); });
      }
    }
    if (!staged.empty())
      run(bytes(staging.data()), stride * 4, int64_t(staged.size()), [&](int64_t i) { return staged[size_t(i)]; });
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx
