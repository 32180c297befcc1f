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
template <int kBits>
void dequantize_tile(const int32_t* words, const float (&scale)[kTileN], const float (&zero)[kTileN],
                     float (&tile)[kTileN][kTileK]) {
  constexpr int kLoads = quant::words_per_tile(kBits) / kW;
  constexpr int kHalf = quant::values_per_word(kBits) / 2;
#pragma GCC unroll 8
  for (int load = 0; load < kLoads; ++load) {
    const VecI v = load_words(words + load * kW);
    const int cb = load % kColumnBlocks, h = load * kW / 32;
#pragma GCC unroll 4
    for (int slot = 0; slot < kHalf; ++slot) {
      // Slots s and s + kHalf are the same row at columns d + 2q and d + 2q + 1: interleaving
      // them per 128-bit lane gives, in lane group r, 8 consecutive columns of one row.
      const int t = slot % 2, d = quant::tile_col(kBits, 32 * h, slot);
      const VecF s = row_lanes(scale, cb, t), z = row_lanes(zero, cb, t);
      const VecF a = (slot_values<kBits>(v, slot) - z) * s;
      const VecF b = (slot_values<kBits>(v, slot + kHalf) - z) * s;
      alignas(64) float low[kW], high[kW];
#if defined(__AVX512F__)
      _mm512_store_ps(low, _mm512_unpacklo_ps(a.v, b.v));
      _mm512_store_ps(high, _mm512_unpackhi_ps(a.v, b.v));
#else
      _mm256_store_ps(low, _mm256_unpacklo_ps(a.v, b.v));
      _mm256_store_ps(high, _mm256_unpackhi_ps(a.v, b.v));
#endif
#pragma GCC unroll 4
      for (int r = 0; r < kW / 4; ++r) {
        float* row = tile[cb * (kW / 4) + r + 8 * t];
        std::memcpy(row + d, low + 4 * r, 4 * sizeof(float));
        std::memcpy(row + d + 4, high + 4 * r, 4 * sizeof(float));
      }
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
  alignas(64) float tile[kTileN][kTileK];
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    if (kt % group_tiles == 0) load_group_params(w, kt / group_tiles, nt * kTileN, 0.0f, scale, zero);
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
                const int n = std::min(VecF::kWidth, cols - c);
                if (n == VecF::kWidth) store(out + r * w.k + c, load(tile[r] + c));
                else store_partial(out + r * w.k + c, load(tile[r] + c), n);
              }
            }
          }
        });
      });
    }
  });
}

#if !(defined(__AVX512F__) || defined(__AVX2__))
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
