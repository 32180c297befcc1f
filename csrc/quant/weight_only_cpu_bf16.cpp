// weight_only_linear with AVX512_BF16 dot products (vdpbf16ps), for bf16 x and 4-bit weights.
//
// Compiled only at the AVX-512 level with -mavx512bf16, in its own ISA namespace
// (avx512_bf16), and called only when the CPU has the extension (avx512_bf16_active()).
// vdpbf16ps multiplies pairs of bf16 and adds both products into one fp32 lane: 32
// multiply-adds per instruction, twice the fp32 FMA variant, and the weight needs no
// conversion: OR-ing a nibble into the bf16 exponent of 128 (0x4300) gives exactly 128 + q
// (bf16 has 8 significant bits), and the nibble pair (s, s + 4) of the layout is the same
// row at columns k, k + 1, the pair vdpbf16ps multiplies with (x[k], x[k + 1]). The bias of
// 128 joins the zero point: sum x (128 + q - (128 + z)) = sum x (q - z). Products of bf16
// values are exact in fp32, so the result matches the fp32 variant up to summation order.
#include "quant/weight_only_cpu_kernel.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace weight_only;

struct Bf16Dot {
  using XType = uint16_t;  // bf16 bits, x in its natural order
  static constexpr float kZeroBias = 128.0f;
  static void prepare_tile(const float* x16, int valid, XType* out) {
    for (int k = 0; k < kTileK; ++k) out[k] = k < valid ? to_bfloat16(x16[k]).bits : 0;
  }
  static float prepared_value(const XType* tile, int k) { return bits_as_float(uint32_t(tile[k]) << 16); }

  template <int kRows>
  static void tile(const int32_t* words, const XType* const (&x)[kRows], Accumulators<kRows>& acc) {
    const __m512i nibble_pairs = _mm512_set1_epi32(0x000F000F);
    const __m512i exponent_128 = _mm512_set1_epi32(0x43004300);
#pragma GCC unroll 2
    for (int load = 0; load < 2; ++load) {
      const __m512i v = load_words(words + load * kW);
#pragma GCC unroll 4
      for (int slot = 0; slot < 4; ++slot) {
        // (v >> 4 slot) & 0x000F000F | 0x43004300: lanes of bf16 pairs (128 + q_k, 128 + q_k+1).
        const __m512bh w = (__m512bh)_mm512_ternarylogic_epi32(shift_right(v, 4 * slot), nibble_pairs, exponent_128,
                                                               0xEA);
        const int offset = quant::tile_col(4, 0, slot);  // x[offset + 2q], x[offset + 2q + 1] per lane
#pragma GCC unroll 4
        for (int m = 0; m < kRows; ++m) {
          const __m512bh xp = (__m512bh)_mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x[m] + offset)));
          acc[m][load][slot % 2].v = _mm512_dpbf16_ps(acc[m][load][slot % 2].v, w, xp);
        }
      }
    }
  }
};

}  // namespace

void weight_only_linear_bf16_dot(const WeightOnlyLinearParams& p) {
  // 4 accumulators per row of x; 4 rows use 16 of the 32 registers.
  decode_any_rows<Bf16Dot, 4>(p);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
