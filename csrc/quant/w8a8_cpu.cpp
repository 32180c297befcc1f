// CPU kernels of quantize_per_token and scaled_int8_mm, compiled once per ISA level.
//
// scaled_int8_mm multiplies packed operands (see pack_int8_b): A as unsigned bytes a + 128 in
// rows padded to a multiple of 4 columns, B in 16-column blocks with 4 consecutive k per
// 32-bit lane, the layout of AVX512-VNNI's vpdpbusd (u8 x s8, 4 products per lane). The +128
// makes A unsigned for vpdpbusd; sum_k (a + 128) b = sum_k a b + 128 colsum(b), so the epilogue
// subtracts 128 colsum(b)[n]. This file holds the packing, the epilogue and the portable
// kernel; the VNNI micro-kernel is in w8a8_cpu_vnni.cpp.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "common/float_bits.h"
#include "quant/w8a8.h"
#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

// Round half to even, saturate to [-128, 127].
inline int8_t round_to_int8(float v) { return int8_t(std::clamp(std::nearbyint(v), -128.0f, 127.0f)); }

inline void store_rounded_int8(int8_t* q, VecF v) {
#if defined(__AVX512F__)
  // vcvtps2dq rounds to nearest even (the default MXCSR mode); vpmovsdb saturates.
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(v.v)));
#elif defined(__AVX2__)
  const __m256 clamped = _mm256_min_ps(_mm256_max_ps(v.v, _mm256_set1_ps(-128.0f)), _mm256_set1_ps(127.0f));
  const __m256i words = _mm256_cvtps_epi32(clamped);
  const __m128i halves = _mm_packs_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256(words, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(q), _mm_packs_epi16(halves, halves));
#else
  *q = round_to_int8(v.v);
#endif
}

template <typename T>
void quantize_rows(const QuantizePerTokenParams& p) {
  constexpr int kW = VecF::kWidth;
  parallel_for(0, p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.k)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
      VecF amax = broadcast(0.0f);
      int64_t k = 0;
      for (; k + kW <= p.k; k += kW) amax = max(amax, abs(load(x + k)));
      if (k < p.k) amax = max(amax, abs(load_partial(x + k, int(p.k - k))));
      float row_max = reduce_max(amax);
      if (p.clip > 0.0f) row_max = std::min(row_max, p.clip);
      const float scale = row_max > 0.0f ? row_max / 127.0f : 1.0f;
      p.scale[r] = scale;
      int8_t* q = p.q + r * p.k;
      // x / scale, not x * (1 / scale): the reference divides, and the two can differ in the
      // last bit, which moves values that sit on a rounding boundary.
      const VecF divisor = broadcast(scale);
      for (k = 0; k + kW <= p.k; k += kW) store_rounded_int8(q + k, load(x + k) / divisor);
      for (; k < p.k; ++k) q[k] = round_to_int8(to_float(x[k]) / scale);
    }
  });
}

}  // namespace

void quantize_per_token(const QuantizePerTokenParams& p) {
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) quantize_rows<T>(p);
  });
}

void pack_int8_b(const ScaledInt8MmParams& p, uint8_t* packed) { w8a8::pack_b(p, packed); }

void scaled_int8_mm_packed(const ScaledInt8MmParams& p, const uint8_t* packed_b) {
  using namespace w8a8;
  // Portable: plain int32 loops over the packed layout (the compiler vectorizes the lanes).
  w8a8::gemm(p, packed_b, [](const uint8_t* const (&a)[kRows], const int8_t* b, int64_t blocks, int64_t k4,
                             int32_t (&acc)[kRows][kBlocks * kBlockN]) {
    for (int64_t block = 0; block < blocks; ++block) {
      const int8_t* bb = b + block * k4 * kBlockN * 4;
      for (int64_t s = 0; s < k4; ++s)
        for (int i = 0; i < kRows; ++i)
          for (int c = 0; c < kBlockN; ++c) {
            int32_t sum = 0;
            for (int j = 0; j < 4; ++j) sum += int32_t(a[i][4 * s + j]) * int32_t(bb[(s * kBlockN + c) * 4 + j]);
            acc[i][block * kBlockN + c] += sum;
          }
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
