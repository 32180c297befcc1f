// The SIMD decode kernel of weight_only_linear on the CPU, shared by its two variants: fp32
// FMA (weight_only_cpu.cpp, AVX2 and AVX-512, any x dtype, 4 and 8 bits) and int8 dot products
// (weight_only_cpu_vnni.cpp, AVX512_VNNI, 16-bit x). Each includes this header inside its own ISA
// namespace (TORCH_EXT_CPU_ISA), so the copies never share symbols.
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

// Scale and zero point of W rows [n0, n0 + 16) in group g, as fp32; rows past n get scale 0.
inline void load_group_params(const QuantizedWeightView& w, int64_t g, int64_t n0,
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
        store(zero + i, zeros && count > 0 ? read(zeros) : broadcast(symmetric));
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
// The same lanes as fp32 sums over whole spans (below), scaled: what the row's end adds up.
template <int kRows>
using Totals = float[kRows][kColumnBlocks][2][kW];

// Tiles ahead of the one in use whose bytes the kernel prefetches into the L2 (6 KiB of a 4-bit
// tile row). On the Sapphire Rapids VM each core's stream from DRAM ran at half the copy
// bandwidth with the hardware prefetchers alone (4096 x 4096 g128, M = 1: 659 us against 380 us
// from cache); prefetching 16 / 48 / 128 tiles ahead into the L1 gave 564 / 522 / 597 us
// (docs/perf/quant.md). With the VNNI kernel's lighter arithmetic, L1 prefetches stalled on the
// L1's miss buffers (most of the kernel's samples sat on them); into the L2: 536-606 -> 460-530
// us, no clear difference between 48, 128 and 512 tiles.
constexpr int64_t kPrefetchTiles = 48;
template <int kBits>
inline void prefetch_tile_ahead(const int32_t* tile) {
  constexpr int64_t kTileWords = quant::words_per_tile(kBits);
  prefetch_lines_to_l2(tile + kPrefetchTiles * kTileWords, kTileWords * int64_t(sizeof(int32_t)));
}

// What the decode loop below asks of a Dot (Fp32Dot here, VnniDot in weight_only_cpu_vnni.cpp):
//   XType, kPreparedPerTile: x as the Dot reads it, and its elements per 16-column tile;
//   span_tiles(group_tiles): the tiles whose products are summed before they are scaled, a
//     divisor of the group's, so that a span never straddles two groups;
//   prepare_span(x, tiles, out, scale, sum): one span of a row of x (fp32, zero padded to whole
//     tiles) as the Dot reads it, the scale its values carry, and their sum times that scale;
//   span<kRows>(words, tiles, x, scales, x_scales, totals): the products of one span's tiles
//     (consecutive in memory) with kRows rows of x, added to the totals times the rows' scales
//     of the span's group (16 floats) and the scale of each row's x.

// The fp32 variant: x prepared as float, every value multiplied with one FMA; a span is a group.
template <int kBits>
struct Fp32Dot {
  using XType = float;
  static constexpr int kPreparedPerTile = kTileK;  // tile kt of a row at 16 kt, in prepared_position order
  static int64_t span_tiles(int64_t group_tiles) { return group_tiles; }
  static void prepare_span(const float* x, int64_t tiles, XType* out, float& scale, float& sum) {
    scale = 1.0f;
    sum = 0.0f;
    for (int64_t i = 0; i < tiles * kTileK; i += kTileK)
      for (int k = 0; k < kTileK; ++k) {
        out[i + prepared_position(k)] = x[i + k];
        sum += x[i + k];
      }
  }

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

  template <int kRows>
  static void span(const int32_t* words, int64_t tiles, const XType* const (&x)[kRows], const float* scale16,
                   const float (&)[kRows], Totals<kRows>& total) {
    // kSets accumulator sets take consecutive tiles in turn: with few rows of x, one set alone
    // is a chain of dependent FMAs per register, bound by latency instead of throughput.
    constexpr int kSets = kRows >= 4 ? 1 : 4 / kRows;
    Accumulators<kRows> acc[kSets];
    for (auto& set : acc)
      for (auto& row : set)
        for (auto& block : row) block[0] = block[1] = broadcast(0.0f);
    const auto tile_at = [&](int64_t i, Accumulators<kRows>& into) {
      const XType* xt[kRows];
      for (int m = 0; m < kRows; ++m) xt[m] = x[m] + i * kPreparedPerTile;
      const int32_t* at = words + i * quant::words_per_tile(kBits);
      prefetch_tile_ahead<kBits>(at);
      tile<kRows>(at, xt, into);
    };
    int64_t i = 0;
    for (; i + kSets <= tiles; i += kSets) {
#pragma GCC unroll 4
      for (int set = 0; set < kSets; ++set) tile_at(i + set, acc[set]);
    }
    for (; i < tiles; ++i) tile_at(i, acc[0]);
    // totals += scale * sum of the sets (per lane); x carries no scale.
    for (int cb = 0; cb < kColumnBlocks; ++cb)
      for (int t = 0; t < 2; ++t) {
        const VecF s = row_lanes(scale16, cb, t);
        for (int m = 0; m < kRows; ++m) {
          VecF sum = acc[0][m][cb][t];
          for (int set = 1; set < kSets; ++set) sum = sum + acc[set][m][cb][t];
          store(total[m][cb][t], fmadd(s, sum, load(total[m][cb][t])));
        }
      }
  }
};

template <typename XType>
struct PreparedX {
  const XType* x;          // [rows][k_tiles * kPreparedPerTile], rows padded to the row block with zeros
  int64_t stride;          // elements per row
  const float* span_scale; // [rows][spans]: the scale each span's prepared values carry
  int64_t spans, span_tiles;
  const float* group_sum;  // [rows][groups]: sum of x over each group (as the kernel sees x)
  int64_t groups;
};

// Scales and scale * zero of `count` tile rows from nt0 on, as fp32, into params[i] =
// {scale[groups][16], scaled_zero[groups][16]} for tile row nt0 + i (rows past n: 0).
//
// Why up front and for several tile rows: one tile row's scales are 16 elements of each
// [groups, N] row, i.e. one 32-byte piece per 8 KiB (N = 4096 bf16), a stride the hardware
// prefetchers miss and that touches a new page per group. Read inside the weight stream, those
// misses stalled it (measured at 4096 x 4096 g128, M = 1: 630 us with scales, 380 us for the
// same weight per channel; zeros cost as much again). Reading `count` tile rows' pieces of each
// group row together makes them contiguous runs.
inline void load_tile_row_params(const QuantizedWeightView& w, int64_t nt0, int64_t count, int64_t groups,
                                 float* params) {
  const VecF symmetric = broadcast(float(quant::symmetric_zero(w.bits)));
  visit_storage_type(w.scale_dtype, [&](auto tag) {
    using S = decltype(tag);
    if constexpr (!std::is_same_v<S, double>) {  // scales are never fp64 (checked by the op)
      for (int64_t g = 0; g < groups; ++g) {
        const S* scales = static_cast<const S*>(w.scales) + g * w.n;
        const S* zeros = w.zeros ? static_cast<const S*>(w.zeros) + g * w.n : nullptr;
        for (int64_t i = 0; i < count; ++i) {
          float* scales_out = params + (i * 2 * groups + g) * kTileN;
          float* zeros_out = scales_out + groups * kTileN;
          for (int64_t n = (nt0 + i) * kTileN, c = 0; c < kTileN; c += VecF::kWidth) {
            const int valid = int(std::clamp<int64_t>(w.n - n - c, 0, VecF::kWidth));
            const VecF scale = load_partial(scales + n + c, valid);
            store(scales_out + c, scale);
            store(zeros_out + c, (zeros ? load_partial(zeros + n + c, valid) : symmetric) * scale);
          }
        }
      }
    }
  });
}

// Asks for the pieces load_tile_row_params(w, nt0, count, ...) will read of groups [g_begin,
// g_end), into the L2: a batch's pieces, requested a few groups per tile row of the batch before,
// arrive while the weights stream instead of stalling it when the batch starts (4096 x 4096 g128,
// M = 1 on the Sapphire Rapids VM: 502-530 us against 465 us per channel before).
inline void prefetch_tile_row_params(const QuantizedWeightView& w, int64_t nt0, int64_t count, int64_t g_begin,
                                     int64_t g_end) {
  visit_storage_type(w.scale_dtype, [&](auto tag) {
    using S = decltype(tag);
    const int64_t n0 = nt0 * kTileN, bytes = std::min(count * kTileN, w.n - n0) * int64_t(sizeof(S));
    for (int64_t g = g_begin; g < g_end; ++g) {
      prefetch_lines_to_l2(static_cast<const S*>(w.scales) + g * w.n + n0, bytes);
      if (w.zeros) prefetch_lines_to_l2(static_cast<const S*>(w.zeros) + g * w.n + n0, bytes);
    }
  });
}

// y rows [m0, m0 + rows) x W rows [16 nt, +16): streams the tile row once for the block.
// params: this tile row's scales and scaled zeros from load_tile_row_params.
template <class Dot, int kRows, typename T>
void tile_row_block(const WeightOnlyLinearParams& p, const PreparedX<typename Dot::XType>& px, int64_t nt,
                    int64_t m0, const float* params) {
  const QuantizedWeightView& w = p.w;
  const int64_t k_tiles = quant::tiles_for(w.k);
  const int64_t group_tiles = w.group_size / kTileK;
  const int64_t n0 = nt * kTileN;

  alignas(64) Totals<kRows> total;
  alignas(64) float zero_total[kRows][kTileN];
  for (int m = 0; m < kRows; ++m) {
    for (auto& block : total[m])
      for (auto& lanes : block) store(lanes, broadcast(0.0f));
    for (int i = 0; i < kTileN; i += kW) store(zero_total[m] + i, broadcast(0.0f));
  }
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

  const int32_t* words = w.qweight + quant::tile_offset_words(w.bits, k_tiles, nt, 0);
  for (int64_t s = 0; s < px.spans; ++s) {
    const int64_t kt = s * px.span_tiles, tiles = std::min(px.span_tiles, k_tiles - kt);
    const typename Dot::XType* xs[kRows];
    float x_scale[kRows];
    for (int m = 0; m < kRows; ++m) {
      xs[m] = x[m] + kt * Dot::kPreparedPerTile;
      x_scale[m] = px.span_scale[(m0 + m) * px.spans + s];
    }
    Dot::template span<kRows>(words + kt * quant::words_per_tile(w.bits), tiles, xs,
                              group_scales + kt / group_tiles * kTileN, x_scale, total);
  }

  // The row's end: add the four column quarters of each lane group, subtract the zero term.
  const int columns = int(std::min<int64_t>(kTileN, w.n - n0));
  const int64_t rows = std::min<int64_t>(kRows, p.m - m0);
  for (int64_t m = 0; m < rows; ++m) {
    alignas(64) float y16[kTileN];
    for (int c = 0; c < kTileN; ++c) {
      const int t = c / 8, r = c % 8, cb = r / (kW / 4), lane = (r % (kW / 4)) * 4;
      const float* quarters = total[m][cb][t] + lane;
      y16[c] = (quarters[0] + quarters[1]) + (quarters[2] + quarters[3]) - zero_total[m][c];
    }
    T* y = static_cast<T*>(p.y) + (m0 + m) * p.y_row_stride + n0;
    for (int c = 0; c < columns; c += VecF::kWidth) {
      const int count = std::min(VecF::kWidth, columns - c);
      VecF value = load(y16 + c);
      if (p.bias) value = value + load_partial(static_cast<const T*>(p.bias) + n0 + c, count);
      store_partial(y + c, value, count);
    }
  }
}

// Prepares x (and its group sums) for Dot, then runs every (tile row, row block) in parallel.
template <class Dot, int kRows, typename T>
void decode(const WeightOnlyLinearParams& p) {
  using XType = typename Dot::XType;
  const int64_t k_tiles = quant::tiles_for(p.w.k);
  const int64_t group_tiles = p.w.group_size / kTileK;
  const int64_t groups = (k_tiles + group_tiles - 1) / group_tiles;
  const int64_t span_tiles = Dot::span_tiles(group_tiles);
  const int64_t spans = (k_tiles + span_tiles - 1) / span_tiles;
  const int64_t rows = (p.m + kRows - 1) / kRows * kRows;
  const int64_t stride = k_tiles * Dot::kPreparedPerTile;
  std::vector<XType> x(size_t(rows * stride));
  std::vector<float> span_scale(size_t(rows * spans)), group_sum(size_t(rows * groups), 0.0f);
  std::vector<float> row(size_t(k_tiles * kTileK), 0.0f);  // x row m as fp32, zero padded
  for (int64_t m = 0; m < rows; ++m) {
    if (m < p.m) {
      const T* in = static_cast<const T*>(p.x) + m * p.x_row_stride;
      for (int64_t k = 0; k < p.w.k; k += VecF::kWidth)
        store(row.data() + k, load_partial(in + k, int(std::min<int64_t>(VecF::kWidth, p.w.k - k))));
    } else {
      std::fill(row.begin(), row.end(), 0.0f);
    }
    for (int64_t s = 0; s < spans; ++s) {
      const int64_t kt = s * span_tiles, tiles = std::min(span_tiles, k_tiles - kt);
      float sum = 0.0f;
      Dot::prepare_span(row.data() + kt * kTileK, tiles, x.data() + m * stride + kt * Dot::kPreparedPerTile,
                        span_scale[m * spans + s], sum);
      group_sum[m * groups + kt / group_tiles] += sum;
    }
  }
  const PreparedX<XType> px{x.data(), stride, span_scale.data(), spans, span_tiles, group_sum.data(), groups};
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
      load_tile_row_params(p.w, nt0, count, groups, params.data());
      const int64_t next = nt0 + count, next_count = std::min(rows_together, end - next);
      for (int64_t i = 0; i < count; ++i) {
        if (next_count > 0) prefetch_tile_row_params(p.w, next, next_count, groups * i / count, groups * (i + 1) / count);
        for (int64_t b = 0; b < row_blocks; ++b)
          tile_row_block<Dot, kRows, T>(p, px, nt0 + i, b * kRows, params.data() + i * params_per_row);
      }
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
