// CPU kernels of weight_only_linear and dequantize_weight, compiled once per ISA level.
//
// weight_only_linear here serves few rows of x (decode): the AVX2 / AVX-512 fp32-FMA variant
// of the kernel in quant/weight_only_cpu_kernel.h, or, at the scalar level, dequantized tiles
// and plain dot products. Many rows (prefill) go through dequantize_weight panels and torch's
// GEMM (quant/weight_only.cpp), because there the work is the multiply, not the weight stream.
#include <algorithm>
#include <cstring>
#include <vector>

#include "quant/weight_only_cpu_kernel.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace weight_only;
using quant::tiles_for;

// One 16 x 16 tile of W dequantized into tile[row][col] (fp32), given the rows' scales and
// zero points of the tile's group.
#if defined(__AVX512F__) || defined(__AVX2__)
// Rows of one column block and row parity t as whole rows: lane group r of v[d] holds row r at
// columns 2q + d (q = 0..3) for d = 0, 1, 8, 9. Interleaving d = 0 with 1 and 8 with 9 gives,
// per 128-bit lane, four consecutive columns; a 128-bit-lane transpose makes the rows.
inline void store_rows(const VecF (&v)[4], float* const (&rows)[kW / 4]) {
#if defined(__AVX512F__)
  const __m512 a = _mm512_unpacklo_ps(v[0].v, v[1].v), b = _mm512_unpackhi_ps(v[0].v, v[1].v);
  const __m512 c = _mm512_unpacklo_ps(v[2].v, v[3].v), d = _mm512_unpackhi_ps(v[2].v, v[3].v);
  const __m512 ab01 = _mm512_shuffle_f32x4(a, b, 0x44), ab23 = _mm512_shuffle_f32x4(a, b, 0xEE);
  const __m512 cd01 = _mm512_shuffle_f32x4(c, d, 0x44), cd23 = _mm512_shuffle_f32x4(c, d, 0xEE);
  _mm512_store_ps(rows[0], _mm512_shuffle_f32x4(ab01, cd01, 0x88));
  _mm512_store_ps(rows[1], _mm512_shuffle_f32x4(ab01, cd01, 0xDD));
  _mm512_store_ps(rows[2], _mm512_shuffle_f32x4(ab23, cd23, 0x88));
  _mm512_store_ps(rows[3], _mm512_shuffle_f32x4(ab23, cd23, 0xDD));
#else
  const __m256 a = _mm256_unpacklo_ps(v[0].v, v[1].v), b = _mm256_unpackhi_ps(v[0].v, v[1].v);
  const __m256 c = _mm256_unpacklo_ps(v[2].v, v[3].v), d = _mm256_unpackhi_ps(v[2].v, v[3].v);
  _mm256_store_ps(rows[0], _mm256_permute2f128_ps(a, b, 0x20));
  _mm256_store_ps(rows[0] + 8, _mm256_permute2f128_ps(c, d, 0x20));
  _mm256_store_ps(rows[1], _mm256_permute2f128_ps(a, b, 0x31));
  _mm256_store_ps(rows[1] + 8, _mm256_permute2f128_ps(c, d, 0x31));
#endif
}

template <int kBits>
void dequantize_tile(const int32_t* words, const float (&scale)[kTileN], const float (&zero)[kTileN],
                     float (&tile)[kTileN][kTileK]) {
  constexpr int kLoads = quant::words_per_tile(kBits) / kW;
  VecI v[kLoads];
#pragma GCC unroll 8
  for (int load = 0; load < kLoads; ++load) v[load] = load_words(words + load * kW);
#pragma GCC unroll 4
  for (int cb = 0; cb < kColumnBlocks; ++cb) {
#pragma GCC unroll 2
    for (int t = 0; t < 2; ++t) {
      const VecF s = row_lanes(scale, cb, t), z = row_lanes(zero, cb, t);
      // The slots holding columns 2q + {0, 1, 8, 9} of rows with parity t (weight_only_layout.h):
      // 4-bit: one load, bytes 0, 2, 1, 3; 8-bit: bytes 0, 2 of the load for columns < 8 and of
      // the one 32 words later for columns >= 8.
      VecF columns[4];
      if constexpr (kBits == 4) {
        columns[0] = slot_values<4>(v[cb], t), columns[1] = slot_values<4>(v[cb], t + 4);
        columns[2] = slot_values<4>(v[cb], t + 2), columns[3] = slot_values<4>(v[cb], t + 6);
      } else {
        columns[0] = slot_values<8>(v[cb], t), columns[1] = slot_values<8>(v[cb], t + 2);
        columns[2] = slot_values<8>(v[cb + kColumnBlocks], t);
        columns[3] = slot_values<8>(v[cb + kColumnBlocks], t + 2);
      }
      for (VecF& c : columns) c = (c - z) * s;
      float* rows[kW / 4];
      for (int r = 0; r < kW / 4; ++r) rows[r] = tile[cb * (kW / 4) + r + 8 * t];
      store_rows(columns, rows);
    }
  }
}
#else
template <int kBits>
void dequantize_tile(const int32_t* words, const float (&scale)[kTileN], const float (&zero)[kTileN],
                     float (&tile)[kTileN][kTileK]) {
  for (int word = 0; word < quant::words_per_tile(kBits); ++word) {
    const uint32_t bits = uint32_t(words[word]);
    for (int slot = 0; slot < quant::values_per_word(kBits); ++slot) {
      const int row = quant::tile_row(kBits, word, slot), col = quant::tile_col(kBits, word, slot);
      const float q = float((bits >> (kBits * slot)) & ((1u << kBits) - 1));
      tile[row][col] = (q - zero[row]) * scale[row];
    }
  }
}
#endif

// Every tile of tile row nt, dequantized in K order: fn(kt, tile).
template <int kBits, typename Fn>
void for_each_dequantized_tile(const QuantizedWeightView& w, int64_t nt, Fn&& fn) {
  const int64_t k_tiles = tiles_for(w.k), group_tiles = w.group_size / kTileK;
  alignas(64) float scale[kTileN], zero[kTileN];
  alignas(64) float tile[kTileN][kTileK];  // rows stored with aligned 32/64-byte stores
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt % group_tiles == 0) load_group_params(w, kt / group_tiles, nt * kTileN, scale, zero);
    dequantize_tile<kBits>(w.qweight + quant::tile_offset_words(kBits, k_tiles, nt, kt), scale, zero, tile);
    fn(kt, tile);
  }
}

template <int kBits>
void dequantize_rows(const DequantizeWeightParams& p) {
  const QuantizedWeightView& w = p.w;
  const int64_t nt_begin = p.row_begin / kTileN, nt_end = tiles_for(p.row_end);
  parallel_for(nt_begin, nt_end, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nt = begin; nt < end; ++nt) {
      const int rows = int(std::min<int64_t>(kTileN, p.row_end - nt * kTileN));
      for_each_dequantized_tile<kBits>(w, nt, [&](int64_t kt, const float (&tile)[kTileN][kTileK]) {
        const int cols = int(std::min<int64_t>(kTileK, w.k - kt * kTileK));
        visit_storage_type(p.out_dtype, [&](auto tag) {
          using T = decltype(tag);
          T* out = static_cast<T*>(p.out) + (nt * kTileN - p.row_begin) * w.k + kt * kTileK;
          for (int r = 0; r < rows; ++r) {
            if constexpr (std::is_same_v<T, double>) {
              for (int c = 0; c < cols; ++c) out[r * w.k + c] = tile[r][c];
            } else {
              for (int c = 0; c < cols; c += VecF::kWidth) {
                store_partial(out + r * w.k + c, load(tile[r] + c), std::min(VecF::kWidth, cols - c));
              }
            }
          }
        });
      });
    }
  });
}

#if !(defined(__AVX512F__) || defined(__AVX2__))
// Element i of a tensor of dtype `kind`, as float (runtime type).
inline float element_as_float(ScalarKind kind, const void* data, int64_t i) {
  float value = 0.0f;
  visit_storage_type(kind, [&](auto tag) { value = float(to_float(static_cast<const decltype(tag)*>(data)[i])); });
  return value;
}
inline void store_element(ScalarKind kind, void* data, int64_t i, float value) {
  visit_storage_type(kind, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      static_cast<double*>(data)[i] = value;
    } else {
      static_cast<T*>(data)[i] = from_float<T>(value);
    }
  });
}

// Scalar level: dequantized tiles times x, one output row at a time.
template <int kBits>
void linear_by_tiles(const WeightOnlyLinearParams& p) {
  const QuantizedWeightView& w = p.w;
  parallel_for(0, tiles_for(w.n), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> acc(size_t(p.m * kTileN));
    for (int64_t nt = begin; nt < end; ++nt) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for_each_dequantized_tile<kBits>(w, nt, [&](int64_t kt, const float (&tile)[kTileN][kTileK]) {
        const int cols = int(std::min<int64_t>(kTileK, w.k - kt * kTileK));
        for (int64_t m = 0; m < p.m; ++m)
          for (int r = 0; r < kTileN; ++r)
            for (int c = 0; c < cols; ++c)
              acc[m * kTileN + r] += tile[r][c] * element_as_float(p.x_dtype, p.x, m * p.x_row_stride + kt * kTileK + c);
      });
      const int rows = int(std::min<int64_t>(kTileN, w.n - nt * kTileN));
      for (int64_t m = 0; m < p.m; ++m)
        for (int r = 0; r < rows; ++r) {
          float value = acc[m * kTileN + r];
          if (p.bias) value += element_as_float(p.x_dtype, p.bias, nt * kTileN + r);
          store_element(p.x_dtype, p.y, m * p.y_row_stride + nt * kTileN + r, value);
        }
    }
  });
}
#endif

}  // namespace

void weight_only_linear(const WeightOnlyLinearParams& p) {
#if defined(__AVX512F__) || defined(__AVX2__)
  // Accumulators per row of x: kColumnBlocks x 2 vectors (4 at AVX-512, 8 at AVX2); the row
  // block keeps 16 of the 32 / 16 vector registers for them.
  constexpr int kMaxRows = 16 / (2 * kColumnBlocks);
  if (p.w.bits == 4) decode_any_rows<Fp32Dot<4>, kMaxRows>(p);
  else decode_any_rows<Fp32Dot<8>, kMaxRows>(p);
#else
  if (p.w.bits == 4) linear_by_tiles<4>(p);
  else linear_by_tiles<8>(p);
#endif
}

void dequantize_weight(const DequantizeWeightParams& p) {
  if (p.w.bits == 4) dequantize_rows<4>(p);
  else dequantize_rows<8>(p);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
