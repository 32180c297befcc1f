// The SIMD decode kernel of weight_only_linear on the CPU, shared by its two variants:
// fp32 FMA (weight_only_cpu.cpp, AVX2 and AVX-512, any x dtype, 4 and 8 bits) and bf16 dot
// products (weight_only_cpu_bf16.cpp, AVX512_BF16, bf16 x, 4 bits). Each includes this header
// inside its own ISA namespace (TORCH_EXT_CPU_ISA), so the copies never share symbols.
//
// How the packed layout (quant/weight_only_layout.h) is read without shuffles: a vector of
// kW consecutive words of a tile is shifted and masked per value slot; lane l then holds the
// value of row r(l) + 8 * (slot % 2) at column 2 * (l % 4) + d(slot), where r(l) depends only
// on the load and the lane. So the weight is never rearranged: instead x is, once per call
// (each 16-column tile of x is stored as x[0,2,4,6], x[1,3,5,7], x[8,10,..], x[9,11,..]), and
// a 4-float broadcast gives every lane its x. Each accumulator lane sums one output row over
// a quarter of the columns; the four quarters are added when the row is finished.
//
// Integer zero points cost nothing per weight: sum_k x_k (q_k - z) s = s (sum_k x_k q_k - z X)
// with X = sum of x over the group, so the inner loop multiplies raw q and the group's end
// applies the scale (one FMA per accumulator) and the zero (one FMA per 16 outputs).
#pragma once

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/cpu/parallel.h"
#include "common/cpu/prefetch.h"
#include "common/cpu/vec.h"
#include "common/float_bits.h"
#include "quant/weight_only.h"
#include "quant/weight_only_layout.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only {

using quant::kTileK;
using quant::kTileN;

// Element i of a tensor of dtype `kind`, as float (runtime type: called per 16 outputs).
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

// Scale and zero point (+ zero_bias) of W rows [n0, n0 + 16) in group g, as fp32; rows past
// n get scale 0.
inline void load_group_params(const QuantizedWeightView& w, int64_t g, int64_t n0, float zero_bias,
                              float (&scale)[kTileN], float (&zero)[kTileN]) {
  const int valid = int(std::min<int64_t>(kTileN, w.n - n0));
  const float symmetric = float(quant::symmetric_zero(w.bits));
  visit_storage_type(w.scale_dtype, [&](auto tag) {
    using S = decltype(tag);
    if constexpr (!std::is_same_v<S, double>) {  // scales are never fp64 (checked by the op)
      const S* scales = static_cast<const S*>(w.scales) + g * w.n + n0;
      const S* zeros = w.zeros ? static_cast<const S*>(w.zeros) + g * w.n + n0 : nullptr;
      for (int i = 0; i < kTileN; i += VecF::kWidth) {
        const int count = std::max(0, std::min(VecF::kWidth, valid - i));
        const auto read = [&](const S* p) { return load_partial(p + i, count); };
        store(scale + i, count > 0 ? read(scales) : broadcast(0.0f));
        store(zero + i, (zeros && count > 0 ? read(zeros) : broadcast(symmetric)) + broadcast(zero_bias));
      }
    }
  });
}

#if defined(__AVX512F__) || defined(__AVX2__)

constexpr int kW = VecF::kWidth;
// Loads of one tile that cover distinct rows: word w covers rows (w % 32) / 4 (+ 8), so kW
// consecutive words cover kW / 4 rows and 32 / kW loads cover all 8 (+ 8).
constexpr int kColumnBlocks = 32 / kW;

#if defined(__AVX512F__)
using VecI = __m512i;
inline VecI load_words(const int32_t* p) { return _mm512_loadu_si512(p); }
inline VecI shift_right(VecI v, int bits) { return _mm512_srli_epi32(v, unsigned(bits)); }
// Lane l gets p[l % 4].
inline VecF broadcast4(const float* p) { return {_mm512_broadcast_f32x4(_mm_loadu_ps(p))}; }
// Values of slot `slot`: bits [slot * bits, +bits) of every word, as floats.
template <int kBits>
inline VecF slot_values(VecI words, int slot) {
  const VecI shifted = shift_right(words, kBits * slot);
  if constexpr (kBits == 4) {
    // vpermps reads only the low 4 bits of each index: a 16-entry table turns the nibble into
    // its float without a mask or a conversion.
    const __m512 table = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return {_mm512_permutexvar_ps(shifted, table)};
  } else {
    return {_mm512_cvtepi32_ps(_mm512_and_si512(shifted, _mm512_set1_epi32(0xFF)))};
  }
}
// Lane l gets row16[4 * column_block + l / 4 + 8 * high] (the row of accumulator lane l).
inline VecF row_lanes(const float* row16, int column_block, int high) {
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i index = _mm512_add_epi32(_mm512_srli_epi32(lane, 2), _mm512_set1_epi32(4 * column_block + 8 * high));
  return {_mm512_permutexvar_ps(index, _mm512_loadu_ps(row16))};
}
#else
using VecI = __m256i;
inline VecI load_words(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline VecI shift_right(VecI v, int bits) { return _mm256_srli_epi32(v, bits); }
inline VecF broadcast4(const float* p) { return {_mm256_broadcast_ps(reinterpret_cast<const __m128*>(p))}; }
template <int kBits>
inline VecF slot_values(VecI words, int slot) {
  const VecI shifted = shift_right(words, kBits * slot);
  return {_mm256_cvtepi32_ps(_mm256_and_si256(shifted, _mm256_set1_epi32((1 << kBits) - 1)))};
}
inline VecF row_lanes(const float* row16, int column_block, int high) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i index = _mm256_add_epi32(_mm256_srli_epi32(lane, 2), _mm256_set1_epi32(2 * column_block));
  return {_mm256_permutevar8x32_ps(_mm256_loadu_ps(row16 + 8 * high), index)};
}
#endif

// Position of x[k] (k < 16) in the prepared tile of x: even columns of each half first.
constexpr int prepared_position(int k) { return 4 * (k % 2) + 8 * (k / 8) + (k % 8) / 2; }
// Where the x of lane 0 of slot `slot` (word half h) starts in the prepared tile.
constexpr int prepared_offset(int bits, int h, int slot) { return prepared_position(quant::tile_col(bits, 32 * h, slot)); }

// Accumulators of a block of kRows rows of x times one 16-row tile row of W: [row][column
// block][slot parity], lane l of [cb][t] at W row 4 cb + l / 4 + 8 t (kW = 16) or 2 cb + l / 4
// + 8 t (kW = 8).
template <int kRows>
using Accumulators = VecF[kRows][kColumnBlocks][2];

// The fp32 variant: x prepared as float, every value multiplied with one FMA.
template <int kBits>
struct Fp32Dot {
  using XType = float;
  static constexpr float kZeroBias = 0.0f;
  // x prepared: tile kt of row m at x + m * stride + 16 kt, in prepared_position order.
  static void prepare_tile(const float* x16, int valid, XType* out) {
    for (int k = 0; k < kTileK; ++k) out[prepared_position(k)] = k < valid ? x16[k] : 0.0f;
  }
  static float prepared_value(const XType* tile, int k) { return tile[prepared_position(k)]; }

  template <int kRows>
  static void tile(const int32_t* words, const XType* const (&x)[kRows], Accumulators<kRows>& acc) {
    constexpr int kLoads = quant::words_per_tile(kBits) / kW;
    constexpr int kSlots = quant::values_per_word(kBits);
#pragma GCC unroll 8
    for (int load = 0; load < kLoads; ++load) {
      const VecI v = load_words(words + load * kW);
      const int cb = load % kColumnBlocks, h = load * kW / 32;
#pragma GCC unroll 8
      for (int slot = 0; slot < kSlots; ++slot) {
        const VecF value = slot_values<kBits>(v, slot);
        const int offset = prepared_offset(kBits, h, slot);
#pragma GCC unroll 4
        for (int m = 0; m < kRows; ++m) acc[m][cb][slot % 2] = fmadd(value, broadcast4(x[m] + offset), acc[m][cb][slot % 2]);
      }
    }
  }
};

template <typename XType>
struct PreparedX {
  const XType* x;         // [rows][k_tiles * 16], rows padded to the row block with zeros
  int64_t stride;         // elements per row
  const float* group_sum; // [rows][groups]: sum of x over each group (as the kernel sees x)
  int64_t groups;
};

// Scales and scale * (zero + zero_bias) of `count` tile rows from nt0 on, as fp32, into
// params[i] = {scale[groups][16], scaled_zero[groups][16]} for tile row nt0 + i.
//
// Why up front and for several tile rows: one tile row's scales are 16 elements of each
// [groups, N] row, i.e. one 32-byte piece per 8 KiB (N = 4096 bf16), a stride the hardware
// prefetchers miss and that touches a new page per group. Read inside the weight stream, those
// misses stalled it (measured at 4096 x 4096 g128, M = 1: 630 us with scales, 380 us for the
// same weight per channel; zeros cost as much again). Reading `count` tile rows' pieces of each
// group row together makes them contiguous runs.
inline void load_tile_row_params(const QuantizedWeightView& w, int64_t nt0, int64_t count, int64_t groups,
                                 float zero_bias, float* params) {
  alignas(64) float scale[kTileN], zero[kTileN];
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t i = 0; i < count; ++i) {
      load_group_params(w, g, (nt0 + i) * kTileN, zero_bias, scale, zero);
      float* scales_out = params + (i * 2 * groups + g) * kTileN;
      float* zeros_out = scales_out + groups * kTileN;
      for (int c = 0; c < kTileN; c += VecF::kWidth) {
        store(scales_out + c, load(scale + c));
        store(zeros_out + c, load(zero + c) * load(scale + c));
      }
    }
  }
}

// Tiles ahead of the one in use whose bytes the kernel prefetches (6 KiB of a 4-bit tile row): on
// the Sapphire Rapids VM each core's stream from DRAM ran at half the copy bandwidth with the
// hardware prefetchers alone (4096 x 4096 g128, M = 1: 659 us against 380 us from cache). Measured
// there, same command: 16 tiles 564 us, 48 tiles 522 us, 128 tiles 597 us (docs/perf/quant.md).
constexpr int64_t kPrefetchTiles = 48;

// y rows [m0, m0 + rows) x W rows [16 nt, +16): streams the tile row once for the block.
// params: this tile row's scales and scaled zeros from load_tile_row_params.
template <class Dot, int kRows>
void tile_row_block(const WeightOnlyLinearParams& p, const PreparedX<typename Dot::XType>& px, int64_t nt,
                    int64_t m0, const float* params) {
  const QuantizedWeightView& w = p.w;
  const int64_t k_tiles = quant::tiles_for(w.k);
  const int64_t group_tiles = w.group_size / kTileK;
  const int64_t n0 = nt * kTileN;
  constexpr int kPhases = kRows >= 4 ? 1 : 4 / kRows;

  const int64_t tile_words = quant::words_per_tile(w.bits);
  alignas(64) float total[kRows][kColumnBlocks][2][kW] = {};
  alignas(64) float zero_total[kRows][kTileN] = {};
  const typename Dot::XType* x[kRows];
  for (int m = 0; m < kRows; ++m) x[m] = px.x + (m0 + m) * px.stride;

  // The zero term zero_total = sum_g scale * zero * X[g], once per block of rows.
  const float* group_scales = params;
  const float* scaled_zeros = params + px.groups * kTileN;
  for (int64_t g = 0; g < px.groups; ++g)
    for (int m = 0; m < kRows; ++m) {
      const VecF group_sum = broadcast(px.group_sum[(m0 + m) * px.groups + g]);
      for (int i = 0; i < kTileN; i += kW)
        store(zero_total[m] + i, fmadd(load(scaled_zeros + g * kTileN + i), group_sum, load(zero_total[m] + i)));
    }

  for (int64_t g = 0; g * group_tiles < k_tiles; ++g) {
    // kPhases accumulator sets take consecutive tiles in turn: with few rows of x, one set
    // alone is a chain of dependent FMAs per register, bound by latency instead of throughput.
    Accumulators<kRows> acc[kPhases];
    for (auto& phase : acc)
      for (auto& row : phase)
        for (auto& block : row) block[0] = block[1] = broadcast(0.0f);
    const auto tile = [&](int64_t kt, Accumulators<kRows>& into) {
      const typename Dot::XType* xt[kRows];
      for (int m = 0; m < kRows; ++m) xt[m] = x[m] + kt * kTileK;
      const int32_t* words = w.qweight + quant::tile_offset_words(w.bits, k_tiles, nt, kt);
      prefetch_lines(words + kPrefetchTiles * tile_words, tile_words * int64_t(sizeof(int32_t)));
      Dot::template tile<kRows>(words, xt, into);
    };
    const int64_t kt_end = std::min(k_tiles, (g + 1) * group_tiles);
    int64_t kt = g * group_tiles;
    for (; kt + kPhases <= kt_end; kt += kPhases) {
#pragma GCC unroll 4
      for (int phase = 0; phase < kPhases; ++phase) tile(kt + phase, acc[phase]);
    }
    for (; kt < kt_end; ++kt) tile(kt, acc[0]);
    for (int phase = 1; phase < kPhases; ++phase)
      for (int m = 0; m < kRows; ++m)
        for (int cb = 0; cb < kColumnBlocks; ++cb)
          for (int t = 0; t < 2; ++t) acc[0][m][cb][t] = acc[0][m][cb][t] + acc[phase][m][cb][t];
    // The group's end: total += scale * acc (per lane).
    for (int cb = 0; cb < kColumnBlocks; ++cb)
      for (int t = 0; t < 2; ++t) {
        const VecF s = row_lanes(group_scales + g * kTileN, cb, t);
        for (int m = 0; m < kRows; ++m) store(total[m][cb][t], fmadd(s, acc[0][m][cb][t], load(total[m][cb][t])));
      }
  }

  // The row's end: add the four column quarters of each lane group, subtract the zero term.
  const int columns = int(std::min<int64_t>(kTileN, w.n - n0));
  const int64_t rows = std::min<int64_t>(kRows, p.m - m0);
  for (int64_t m = 0; m < rows; ++m) {
    const int64_t y_row = (m0 + m) * p.y_row_stride + n0;
    for (int c = 0; c < columns; ++c) {
      const int t = c / 8, r = c % 8, cb = r / (kW / 4), lane = (r % (kW / 4)) * 4;
      const float* quarters = total[m][cb][t] + lane;
      float value = (quarters[0] + quarters[1]) + (quarters[2] + quarters[3]) - zero_total[m][c];
      if (p.bias) value += element_as_float(p.x_dtype, p.bias, n0 + c);
      store_element(p.x_dtype, p.y, y_row + c, value);
    }
  }
}

// Prepares x (and its group sums) for Dot, then runs every (tile row, row block) in parallel.
template <class Dot, int kRows, typename T>
void decode(const WeightOnlyLinearParams& p) {
  using XType = typename Dot::XType;
  const int64_t k_tiles = quant::tiles_for(p.w.k);
  const int64_t groups = (k_tiles * kTileK + p.w.group_size - 1) / p.w.group_size;
  const int64_t rows = (p.m + kRows - 1) / kRows * kRows;
  const int64_t stride = k_tiles * kTileK;
  std::vector<XType> x(size_t(rows * stride));
  std::vector<float> group_sum(size_t(rows * groups), 0.0f);
  for (int64_t m = 0; m < rows; ++m) {
    XType* out = x.data() + m * stride;
    float x16[kTileK];
    for (int64_t kt = 0; kt < k_tiles; ++kt) {
      const int valid = m < p.m ? int(std::min<int64_t>(kTileK, p.w.k - kt * kTileK)) : 0;
      const T* in = static_cast<const T*>(p.x) + m * p.x_row_stride + kt * kTileK;
      for (int k = 0; k < valid; ++k) x16[k] = to_float(in[k]);
      Dot::prepare_tile(x16, valid, out + kt * kTileK);
      float sum = 0.0f;
      for (int k = 0; k < kTileK; ++k) sum += Dot::prepared_value(out + kt * kTileK, k);
      group_sum[m * groups + kt * kTileK / p.w.group_size] += sum;
    }
  }
  const PreparedX<XType> px{x.data(), stride, group_sum.data(), groups};
  const int64_t n_tiles = quant::tiles_for(p.w.n);
  const int64_t row_blocks = rows / kRows;
  // Tile rows whose scales are read together: up to 16 (512 contiguous bytes of bf16 per group
  // row), fewer when K has so many groups that their fp32 copies would outgrow the L2.
  const int64_t params_per_row = 2 * groups * kTileN;
  const int64_t rows_together = std::clamp<int64_t>((256 * 1024 / 4) / params_per_row, 1, 16);
  parallel_for(0, n_tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> params(size_t(rows_together * params_per_row));
    for (int64_t nt0 = begin; nt0 < end; nt0 += rows_together) {
      const int64_t count = std::min(rows_together, end - nt0);
      load_tile_row_params(p.w, nt0, count, groups, Dot::kZeroBias, params.data());
      for (int64_t i = 0; i < count; ++i)
        for (int64_t b = 0; b < row_blocks; ++b)
          tile_row_block<Dot, kRows>(p, px, nt0 + i, b * kRows, params.data() + i * params_per_row);
    }
  });
}

// Runs decode with the row blocks that waste the least for p.m (kMaxRows fills the registers). A
// remainder of 1 or 2 rows past whole blocks gets a pass of its own with a block of that size
// rather than a padded block of kMaxRows: that pass streams the weights once more, but costs
// less than the padded rows' products (measured with bf16 x, 4-bit g128 7168 x 1024 on the
// project VM: M = 5 as 4 + 1 rows vs one 8-row padding, see docs/perf/quant.md).
template <class Dot, int kMaxRows>
void decode_any_rows(const WeightOnlyLinearParams& p) {
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      if (p.m == 1) return decode<Dot, 1, T>(p);
      if (p.m == 2 || kMaxRows == 2) return decode<Dot, 2, T>(p);
      const int64_t rest = p.m % kMaxRows;
      if (p.m < kMaxRows || rest == 0 || rest > 2) return decode<Dot, kMaxRows, T>(p);
      WeightOnlyLinearParams whole = p, tail = p;
      whole.m = p.m - rest;
      tail.m = rest;
      tail.x = static_cast<const T*>(p.x) + whole.m * p.x_row_stride;
      tail.y = static_cast<T*>(p.y) + whole.m * p.y_row_stride;
      decode<Dot, kMaxRows, T>(whole);
      if (rest == 1) return decode<Dot, 1, T>(tail);
      return decode<Dot, 2, T>(tail);
    }
  });
}

#endif  // SIMD

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only
