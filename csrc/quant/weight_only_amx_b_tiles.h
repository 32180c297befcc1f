// TDPBF16PS B tiles from the packed 4-bit layout (quant/weight_only_layout.h), for the AMX kernel
// of weight_only_linear (quant/weight_only_cpu_amx.cpp, which includes this inside its ISA
// namespace). B row g of a 16 x 16 weight tile holds, for each of its 16 output rows n, the pair
// of k = 2g, 2g + 1 as two bf16; a B tile (16 rows) is two weight tiles, 32 k.
//
// Two kinds of B row, three or eight instructions from packed bytes to bf16 (4 bits):
//   exact   bf16 128 + q: a byte permute (vpermt2b over the tile's 128 bytes) puts in each 16-bit
//           lane the byte holding its nibble, a per-lane shift (vpsrlvw) moves the nibble down,
//           and one ternary logic op masks it and ORs in 0x4300 (bf16 128.0, whose mantissa
//           then reads q). Products with bf16 x are exact in the tiles' fp32 sums; the kernel
//           subtracts the zero and applies the scale once per group.
//   scaled  bf16 (q - z) * s, the dequantized weight rounded as dequantize_weight rounds it: the
//           exact row widened to fp32 (two unpacks with zero words below), (v - (128 + z)) * s,
//           and vcvtne2ps2bf16 back. The unpacks take the words of each 128-bit lane in halves,
//           so the permute's table places each value where that order lands it in the right lane.
// 8-bit weights take scaled rows only (128 + q would need 9 bits of mantissa): the permute over
// the half of the tile holding the row's columns, a mask, and fp32 2^23 + q from an OR.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "quant/weight_only_layout.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only_amx {

using quant::kTileK;
using quant::kTileN;

constexpr int kBRowsPerWeightTile = kTileK / 2;  // pairs of k
constexpr int kBTileElems = 2 * kBRowsPerWeightTile * 2 * kTileN;  // bf16 of one B tile: 16 rows x 16 pairs
// Bits ORed around q to make a float of it: bf16 128 + q (4 bits, 16-bit lanes), fp32 2^23 + q
// (8 bits, 32-bit lanes).
constexpr uint16_t kBf16OneTwentyEight = 0x4300;
constexpr uint32_t kFp32TwoToThe23 = 0x4B000000;
template <int kBits>
constexpr float kValueOffset = kBits == 4 ? 128.0f : 8388608.0f;

// Where value (row n, column k) of a 16 x 16 weight tile lives: the byte within the 128 bytes
// of the tile a B row reads (4 bits: the whole tile; 8 bits: its half holding columns < 8 or
// >= 8), and the value's shift in that byte. Derived from the layout's own maps by search, so
// the tables below follow quant/weight_only_layout.h by construction.
struct ValueSource {
  int byte, shift;
};
constexpr ValueSource value_source(int bits, int n, int k) {
  for (int word = 0; word < quant::words_per_tile(bits); ++word)
    for (int slot = 0; slot < quant::values_per_word(bits); ++slot)
      if (quant::tile_row(bits, word, slot) == n && quant::tile_col(bits, word, slot) == k)
        return bits == 4 ? ValueSource{4 * word + slot / 2, 4 * (slot % 2)} : ValueSource{4 * (word % 32) + slot, 0};
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
  constexpr BRowTables(int bits, bool scaled) : index{}, shift{} {
    for (int g = 0; g < kBRowsPerWeightTile; ++g)
      for (int t = 0; t < 32; ++t) {
        const ValueSource s = value_source(bits, t / 2, 2 * g + t % 2);
        const int lane = permuted_lane(scaled, t);
        index[g][2 * lane] = index[g][2 * lane + 1] = uint8_t(s.byte);
        shift[g][lane] = uint16_t(s.shift);
      }
  }
};
template <int kBits, bool kScaled>
inline constexpr BRowTables kBRowTables{kBits, kScaled};

// A tile row's group parameters in the scaled rows' fp32 order: half h (the unpack of words 0-3
// or 4-7 of each 128-bit lane), lane i holds row n = 8 h + i / 2.
struct RowScales {
  alignas(64) float scale[2][16];
  alignas(64) float biased_zero[2][16];  // kValueOffset + z

  void set(const float (&s)[kTileN], const float (&z)[kTileN], float offset) {
    for (int h = 0; h < 2; ++h)
      for (int i = 0; i < 16; ++i) {
        scale[h][i] = s[8 * h + i / 2];
        biased_zero[h][i] = offset + z[8 * h + i / 2];
      }
  }
};

// The 8 B rows of a kBits weight tile at out (rows of 32 bf16), exact (4 bits only) or scaled by
// `scales`. The only code here that needs AVX512_VBMI and AVX512_BF16: one call per 256 weights,
// not inlined into callers compiled without them.
template <int kBits, bool kScaled>
__attribute__((target("avx512vbmi,avx512bf16"), noinline)) void b_rows_of_weight_tile(const uint8_t* tile,
                                                                                     uint16_t* out,
                                                                                     const RowScales* scales) {
  static_assert(kBits == 4 || kScaled, "8-bit values do not fit bf16's mantissa with an offset");
  constexpr const BRowTables& tables = kBRowTables<kBits, kScaled>;
  // 4 bits: one 128-byte source for every row; 8 bits: columns < 8 (rows 0-3), then >= 8.
  __m512i source[kBits / 2];
  for (int i = 0; i < kBits / 2; ++i) source[i] = _mm512_loadu_si512(tile + 64 * i);
#pragma GCC unroll 8
  for (int g = 0; g < kBRowsPerWeightTile; ++g) {
    const int half = kBits == 4 ? 0 : g / 4;
    const __m512i bytes =
        _mm512_permutex2var_epi8(source[2 * half], _mm512_load_si512(tables.index[g]), source[2 * half + 1]);
    __m512 wide[2];
    if constexpr (kBits == 4) {
      const __m512i shifted = _mm512_srlv_epi16(bytes, _mm512_load_si512(tables.shift[g]));
      // (shifted & 0xF) | 0x4300: bf16 128 + q
      const __m512i exact = _mm512_ternarylogic_epi32(shifted, _mm512_set1_epi16(0x000F),
                                                      _mm512_set1_epi16(int16_t(kBf16OneTwentyEight)), 0xEA);
      if constexpr (!kScaled) {
        _mm512_store_si512(out + g * 32, exact);
        continue;
      }
      wide[0] = _mm512_castsi512_ps(_mm512_unpacklo_epi16(_mm512_setzero_si512(), exact));
      wide[1] = _mm512_castsi512_ps(_mm512_unpackhi_epi16(_mm512_setzero_si512(), exact));
    } else {
      const __m512i q = _mm512_and_si512(bytes, _mm512_set1_epi16(0x00FF));
      const __m512i offset = _mm512_set1_epi32(int32_t(kFp32TwoToThe23));
      wide[0] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_unpacklo_epi16(q, _mm512_setzero_si512()), offset));
      wide[1] = _mm512_castsi512_ps(_mm512_or_si512(_mm512_unpackhi_epi16(q, _mm512_setzero_si512()), offset));
    }
    for (int h = 0; h < 2; ++h)  // (offset + q - (offset + z)) * s, the subtraction exact
      wide[h] = _mm512_mul_ps(_mm512_sub_ps(wide[h], _mm512_load_ps(scales->biased_zero[h])),
                              _mm512_load_ps(scales->scale[h]));
    _mm512_store_si512(out + g * 32, (__m512i)_mm512_cvtne2ps_pbh(wide[1], wide[0]));
  }
}

// One B tile from the weight tile at `first` and the one after it (the next 16 k of the same
// tile row), or zeros where that one is past K (A is zero there: any finite value would do).
template <int kBits, bool kScaled>
void b_tile_of_weight_tiles(const int32_t* first, bool second_exists, uint16_t* out, const RowScales* scales) {
  b_rows_of_weight_tile<kBits, kScaled>(reinterpret_cast<const uint8_t*>(first), out, scales);
  if (second_exists) {
    b_rows_of_weight_tile<kBits, kScaled>(reinterpret_cast<const uint8_t*>(first + quant::words_per_tile(kBits)),
                                          out + kBTileElems / 2, scales);
  } else {
    std::fill(out + kBTileElems / 2, out + kBTileElems, uint16_t(0));
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::weight_only_amx
