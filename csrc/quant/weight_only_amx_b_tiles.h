// TDPBF16PS B tiles from the packed 4-bit layout (quant/weight_only_layout.h), for the AMX kernel
// of weight_only_linear (quant/weight_only_cpu_amx.cpp, which includes this inside its ISA
// namespace). B row g of a 16 x 16 weight tile holds, for each of its 16 output rows n, the pair
// of k = 2g, 2g + 1 as two bf16; a B tile (16 rows) is two weight tiles, 32 k.
//
// Two kinds of B row, three or eight instructions from packed bytes to bf16:
//   exact   bf16 128 + q: a byte permute (vpermt2b over the tile's 128 bytes) puts in each 16-bit
//           lane the byte holding its nibble, a per-lane shift (vpsrlvw) moves the nibble down,
//           and one ternary logic op masks it and ORs in 0x4300 (bf16 128.0, whose mantissa
//           then reads q). Products with bf16 x are exact in the tiles' fp32 sums; the kernel
//           subtracts the zero and applies the scale once per group.
//   scaled  bf16 (q - z) * s, the dequantized weight rounded as dequantize_weight rounds it: the
//           exact row widened to fp32 (two unpacks with zero words below), (v - (128 + z)) * s,
//           and vcvtne2ps2bf16 back. The unpacks take the words of each 128-bit lane in halves,
//           so the permute's table places each value where that order lands it in the right lane.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "quant/weight_only_layout.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only_amx {

using quant::kTileK;
using quant::kTileN;

constexpr int kBits = 4;
constexpr int kBRowsPerWeightTile = kTileK / 2;  // pairs of k
constexpr int kBTileElems = 2 * kBRowsPerWeightTile * 2 * kTileN;  // bf16 of one B tile: 16 rows x 16 pairs
constexpr uint16_t kBf16OneTwentyEight = 0x4300;

// Where the nibble of (row n, column k) of a 16 x 16 weight tile lives: the byte of the tile and
// the nibble's shift in it. Derived from the layout's own maps by search, so the tables below
// follow quant/weight_only_layout.h by construction.
struct NibbleSource {
  int byte, shift;
};
constexpr NibbleSource nibble_source(int n, int k) {
  for (int word = 0; word < quant::words_per_tile(kBits); ++word)
    for (int slot = 0; slot < quant::values_per_word(kBits); ++slot)
      if (quant::tile_row(kBits, word, slot) == n && quant::tile_col(kBits, word, slot) == k)
        return {4 * word + slot / 2, 4 * (slot % 2)};
  return {-1, -1};
}

// The 16-bit lane of the permuted row whose value ends in output lane t (t = 2n + e: row n,
// k = 2g + e): t itself for exact rows; for scaled rows the lane that unpack-to-fp32 and
// vcvtne2ps2bf16 move to t (lanes 0-15 of the result come from words 0-3 of each 128-bit lane,
// lanes 16-31 from words 4-7).
constexpr int permuted_lane(bool scaled, int t) {
  if (!scaled) return t;
  return t < 16 ? t % 4 + 8 * (t / 4) : 4 + t % 4 + 8 * ((t - 16) / 4);
}

// Per B row g: the vpermt2b index of each 16-bit lane's byte (in its low byte; the high byte's
// copy is masked off) and the lane's shift.
struct BRowTables {
  alignas(64) uint8_t index[kBRowsPerWeightTile][64];
  alignas(64) uint16_t shift[kBRowsPerWeightTile][32];
  constexpr explicit BRowTables(bool scaled) : index{}, shift{} {
    for (int g = 0; g < kBRowsPerWeightTile; ++g)
      for (int t = 0; t < 32; ++t) {
        const NibbleSource s = nibble_source(t / 2, 2 * g + t % 2);
        const int lane = permuted_lane(scaled, t);
        index[g][2 * lane] = index[g][2 * lane + 1] = uint8_t(s.byte);
        shift[g][lane] = uint16_t(s.shift);
      }
  }
};
inline constexpr BRowTables kExactRowTables{false};
inline constexpr BRowTables kScaledRowTables{true};

// A tile row's group parameters in the scaled rows' fp32 order: half h (the unpack of words 0-3
// or 4-7 of each 128-bit lane), lane i holds row n = 8 h + i / 2.
struct RowScales {
  alignas(64) float scale[2][16];
  alignas(64) float biased_zero[2][16];  // 128 + z

  void set(const float (&s)[kTileN], const float (&z)[kTileN]) {
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 16; ++i) {
        scale[h][i] = s[8 * h + i / 2];
        biased_zero[h][i] = 128.0f + z[8 * h + i / 2];
      }
  }
};

// The 8 B rows of weight tile `tile` (128 bytes) at out (rows of 32 bf16), exact or scaled (by
// `scales`). The only code here that needs AVX512_VBMI and AVX512_BF16: one call per 256 weights,
// not inlined into callers compiled without them.
template <bool kScaled>
__attribute__((target("avx512vbmi,avx512bf16"), noinline)) void b_rows_of_weight_tile(const uint8_t* tile,
                                                                                     uint16_t* out,
                                                                                     const RowScales* scales) {
  const BRowTables& tables = kScaled ? kScaledRowTables : kExactRowTables;
  const __m512i low = _mm512_loadu_si512(tile), high = _mm512_loadu_si512(tile + 64);
  const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(int16_t(kBf16OneTwentyEight));
#pragma GCC unroll 8
  for (int g = 0; g < kBRowsPerWeightTile; ++g) {
    const __m512i bytes = _mm512_permutex2var_epi8(low, _mm512_load_si512(tables.index[g]), high);
    const __m512i shifted = _mm512_srlv_epi16(bytes, _mm512_load_si512(tables.shift[g]));
    const __m512i exact = _mm512_ternarylogic_epi32(shifted, nibble, bias, 0xEA);  // (shifted & nibble) | bias
    if constexpr (!kScaled) {
      _mm512_store_si512(out + g * 32, exact);
      continue;
    }
    __m512 half[2] = {_mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), exact)),
                      _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), exact))};
    for (int h = 0; h < 2; ++h)
      half[h] = _mm512_mul_ps(_mm512_sub_ps(half[h], _mm512_load_ps(scales->biased_zero[h])),
                              _mm512_load_ps(scales->scale[h]));
    _mm512_store_si512(out + g * 32, (__m512i)_mm512_cvtne2ps_pbh(half[1], half[0]));
  }
}

// One B tile from the weight tile at `first` and the one after it (the next 16 k of the same
// tile row), or zeros where that one is past K (A is zero there: any finite value would do).
template <bool kScaled>
void b_tile_of_weight_tiles(const int32_t* first, bool second_exists, uint16_t* out, const RowScales* scales) {
  b_rows_of_weight_tile<kScaled>(reinterpret_cast<const uint8_t*>(first), out, scales);
  if (second_exists) {
    b_rows_of_weight_tile<kScaled>(reinterpret_cast<const uint8_t*>(first + quant::words_per_tile(kBits)),
                                   out + kBTileElems / 2, scales);
  } else {
    std::fill(out + kBTileElems / 2, out + kBTileElems, uint16_t(0));
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only_amx
