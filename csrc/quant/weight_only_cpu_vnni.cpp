// weight_only_linear with AVX512_VNNI int8 dot products (vpdpbusd), for 16-bit x (bf16, fp16) and
// 4- or 8-bit weights.
//
// Compiled only at the AVX-512 level with -mavx512vnni, in its own ISA namespace (avx512_vnni),
// and called only when the CPU has the extension (avx512_vnni_active()).
//
// Why integer products for a weight-only kernel: turning packed weights into fp32 or bf16 lanes
// costs a shift and a mask per 16 or 32 values before every FMA or vdpbf16ps, and decode was
// bound by those instructions, not by the weight stream (measured on the Sapphire Rapids VM, a
// loop over L2-resident tiles, one row of x: 6.2 ns per 256 4-bit weights with vdpbf16ps, 1.7 ns
// with this Dot). vpdpbusd multiplies unsigned bytes where they are packed: one AND keeps the
// low nibbles of a word (row r, quant/weight_only_layout.h), one the high nibbles (row r + 8, as
// 16 q: the factor 16 goes into the scale), or for 8 bits the even and odd bytes (rows r and
// r + 8); 64 products per instruction.
//
// x, the signed operand, must then be bytes. Each span of up to kMaxSpanTiles tiles of a row is
// scaled by a power of two that maps its largest |x| to at most kLargestCode and rounded to an
// integer x_q = 256 hi + lo (hi, lo signed bytes), and the two bytes are multiplied separately:
// two vpdpbusd per weight vector, summed as 256 hi + lo at the span's end. Rounding error: at most
// 1/32512 of the span's largest |x| per element; bf16 elements within 2^5 of it are exact.
#include <cmath>
#include <limits>

#include "quant/weight_only_cpu_kernel.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace weight_only;

template <int kBits>
struct VnniDot {
  using XType = int8_t;
  // Byte vectors of a prepared tile per part (hi, lo): 16 bytes for the columns a 16-word load
  // meets, one (4-bit: every load meets all 16 columns) or two (8-bit: columns 0-7, 8-15).
  static constexpr int kHalves = kBits / 4;
  static constexpr int kPreparedPerTile = 2 * 16 * kHalves;  // [part][half][lane q][byte j]
  // Spans of at most 128 columns keep the int32 sums exact: a lane adds 32 products of at most
  // 255 (16 q for 4 bits) times kLargestCode, 2.7e8 < 2^31.
  static constexpr int64_t kMaxSpanTiles = 8;
  // hi = (x_q + 128) >> 8 must stay a signed byte: |x_q| <= 127 * 256.
  static constexpr float kLargestCode = 127.0f * 256.0f;
  // The value of the high-nibble lanes is 16 q (4 bits); bytes carry q as it is (8 bits).
  static constexpr float kHighLaneScale = kBits == 4 ? 1.0f / 16.0f : 1.0f;

  static int64_t span_tiles(int64_t group_tiles) {
    int64_t tiles = std::min(kMaxSpanTiles, group_tiles);
    while (group_tiles % tiles != 0) --tiles;
    return tiles;
  }

  // Byte i = 4 q + j of half h of a prepared part: the column whose value byte j of word
  // 32 h + q holds (for 4 bits, its low nibble's slot 2 j; the high nibble has the same column).
  struct ByteOrder {
    alignas(16) int8_t columns[kHalves][16];
  };
  static constexpr ByteOrder kByteOrder = [] {
    ByteOrder order{};
    for (int h = 0; h < kHalves; ++h)
      for (int i = 0; i < 16; ++i)
        order.columns[h][i] = int8_t(quant::tile_col(kBits, 32 * h + i / 4, kBits == 4 ? 2 * (i % 4) : i % 4));
    return order;
  }();
  // 16 int32 values within a signed byte, stored in the order of every half of one part.
  static void store_part(__m512i values, int8_t* out) {
    const __m128i bytes = _mm512_cvtepi32_epi8(values);
    for (int h = 0; h < kHalves; ++h) {
      const __m128i order = _mm_load_si128(reinterpret_cast<const __m128i*>(kByteOrder.columns[h]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + 16 * h), _mm_shuffle_epi8(bytes, order));
    }
  }

  static void prepare_span(const float* x, int64_t tiles, XType* out, float& scale, float& sum) {
    __m512 largest = _mm512_setzero_ps();
    __mmask16 not_finite = 0;
    for (int64_t i = 0; i < tiles * kTileK; i += kTileK) {
      const __m512 v = _mm512_loadu_ps(x + i);
      largest = _mm512_max_ps(largest, _mm512_abs_ps(v));
      not_finite |= _mm512_fpclass_ps_mask(v, 0x99);  // NaN, +inf, -inf
    }
    // 2^exponent > largest / kLargestCode, kept normal so that its inverse is finite.
    int exponent = 0;
    std::frexp(_mm512_reduce_max_ps(largest) / kLargestCode, &exponent);
    exponent = std::max(exponent, -126);
    scale = std::ldexp(1.0f, exponent);
    const __m512 inverse = _mm512_set1_ps(std::ldexp(1.0f, -exponent));
    __m512i sum_q = _mm512_setzero_si512();
    for (int64_t t = 0; t < tiles; ++t) {
      const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + t * kTileK), inverse));
      const __m512i hi = _mm512_srai_epi32(_mm512_add_epi32(q, _mm512_set1_epi32(128)), 8);
      const __m512i lo = _mm512_sub_epi32(q, _mm512_slli_epi32(hi, 8));
      sum_q = _mm512_add_epi32(sum_q, q);
      store_part(hi, out + t * kPreparedPerTile);
      store_part(lo, out + t * kPreparedPerTile + 16 * kHalves);
    }
    sum = float(_mm512_reduce_add_epi32(sum_q)) * scale;  // exact: |sum_q| < 2^24
    // A NaN or infinity has no integer code: the span's products become NaN instead.
    if (not_finite) scale = sum = std::numeric_limits<float>::quiet_NaN();
  }

  template <int kRows>
  static void span(const int32_t* words, int64_t tiles, const XType* const (&x)[kRows], const float* scale16,
                   const float (&x_scale)[kRows], Totals<kRows>& total) {
    // [row][column block][lane row t][part]: one set (unlike Fp32Dot's), as even one row's 8
    // chains of vpdpbusd (latency about 5 cycles, 2 ns a tile) outrun the weight stream (about
    // 10 ns a tile per core from DRAM).
    __m512i acc[kRows][kColumnBlocks][2][2];
    for (auto& row : acc)
      for (auto& block : row)
        for (auto& lanes : block) lanes[0] = lanes[1] = _mm512_setzero_si512();
    const __m512i row_masks[2] = {_mm512_set1_epi32(kBits == 4 ? 0x0F0F0F0F : 0x00FF00FF),
                                  _mm512_set1_epi32(kBits == 4 ? int(0xF0F0F0F0u) : int(0xFF00FF00u))};
    for (int64_t i = 0; i < tiles; ++i) {
      const int32_t* tile = words + i * quant::words_per_tile(kBits);
      prefetch_tile_ahead<kBits>(tile);
      __m512i xq[kRows][2][kHalves];  // [row][part][half]: every lane's four bytes of x
#pragma GCC unroll 2
      for (int m = 0; m < kRows; ++m)
#pragma GCC unroll 4
        for (int j = 0; j < 2 * kHalves; ++j)
          xq[m][j / kHalves][j % kHalves] = _mm512_broadcast_i32x4(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(x[m] + i * kPreparedPerTile + 16 * j)));
#pragma GCC unroll 4
      for (int load = 0; load < quant::words_per_tile(kBits) / 16; ++load) {
        const __m512i v = load_words(tile + 16 * load);
        const int cb = load % kColumnBlocks, h = load / kColumnBlocks;
#pragma GCC unroll 2
        for (int t = 0; t < 2; ++t) {
          const __m512i values = _mm512_and_si512(v, row_masks[t]);
#pragma GCC unroll 2
          for (int m = 0; m < kRows; ++m)
#pragma GCC unroll 2
            for (int part = 0; part < 2; ++part)
              acc[m][cb][t][part] = _mm512_dpbusd_epi32(acc[m][cb][t][part], values, xq[m][part][h]);
        }
      }
    }
    // totals += scale * x_scale * (256 hi + lo) (per lane; exact in int32, see kMaxSpanTiles).
    for (int cb = 0; cb < kColumnBlocks; ++cb)
      for (int t = 0; t < 2; ++t) {
        const VecF s = row_lanes(scale16, cb, t);
        for (int m = 0; m < kRows; ++m) {
          const __m512i sum = _mm512_add_epi32(_mm512_slli_epi32(acc[m][cb][t][0], 8), acc[m][cb][t][1]);
          const VecF factor = s * broadcast(x_scale[m] * (t == 1 ? kHighLaneScale : 1.0f));
          store(total[m][cb][t], fmadd(factor, VecF{_mm512_cvtepi32_ps(sum)}, load(total[m][cb][t])));
        }
      }
  }
};

}  // namespace

void weight_only_linear_vnni_dot(const WeightOnlyLinearParams& p) {
  // 16 accumulators per row block of two rows (or one row, two sets).
  if (p.w.bits == 4) decode_any_rows<VnniDot<4>, 2>(p);
  else decode_any_rows<VnniDot<8>, 2>(p);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
