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
#include <vector>

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

// Row r of x [k] into q (p.q + r k) and p.scale[r].
template <typename T>
void quantize_row(const QuantizePerTokenParams& p, int64_t r, const T* x) {
  constexpr int kW = VecF::kWidth;
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

template <typename T>
void quantize_rows(const QuantizePerTokenParams& p) {
  parallel_for(0, p.rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.k)), [&](int64_t begin, int64_t end) {
    std::vector<float> masked(p.zero_mask != nullptr ? size_t(p.k) : 0);
    for (int64_t r = begin; r < end; ++r) {
      const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride;
      if (p.zero_mask == nullptr) {
        quantize_row(p, r, x);
        continue;
      }
      // The row in fp32 with the outlier columns zeroed (exact: every input dtype widens exactly).
      for (int64_t k = 0; k < p.k; ++k) masked[size_t(k)] = to_float(x[k]);
      for (int64_t w = 0; w < (p.k + 31) / 32; ++w)  // the set bits only: a handful per row
        for (uint32_t bits = p.zero_mask[w]; bits != 0u; bits &= bits - 1u) masked[size_t(32 * w + __builtin_ctz(bits))] = 0.0f;
      quantize_row(p, r, masked.data());
    }
  });
}

template <typename T>
void column_abs_max_of(const ColumnAbsMaxParams& p) {
  constexpr int kW = VecF::kWidth;
  constexpr int64_t kColumns = 16 * kW;  // a chunk's running maxima stay in registers
  parallel_for(0, (p.k + kColumns - 1) / kColumns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t c0 = chunk * kColumns, width = std::min(kColumns, p.k - c0);
      if (width < kColumns) {  // the tail chunk: scalar
        for (int64_t c = c0; c < p.k; ++c) {
          float m = 0.0f;
          for (int64_t r = 0; r < p.rows; ++r)
            m = std::max(m, std::fabs(to_float(static_cast<const T*>(p.x)[r * p.x_row_stride + c])));
          p.out[c] = m;
        }
        continue;
      }
      VecF m[16];
      for (auto& v : m) v = broadcast(0.0f);
      for (int64_t r = 0; r < p.rows; ++r) {
        const T* x = static_cast<const T*>(p.x) + r * p.x_row_stride + c0;
        for (int v = 0; v < 16; ++v) m[v] = max(m[v], abs(load(x + v * kW)));
      }
      for (int v = 0; v < 16; ++v) store(p.out + c0 + v * kW, m[v]);
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

void add_outlier_product(const OutlierProductParams& p) {
  constexpr int kW = VecF::kWidth;
  // The dequantized weight columns, transposed: C rows of n floats, so a row of out takes C
  // contiguous fmadd passes. Gathered row by row of w: one visit to each weight row's page.
  std::vector<float> columns(size_t(p.columns_count * p.n));
  parallel_for(0, p.n, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j)
      for (int64_t c = 0; c < p.columns_count; ++c)
        columns[size_t(c * p.n + j)] = float(p.w[j * p.w_row_stride + p.columns[c]]) * p.w_scale[j];
  });
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      parallel_for(0, p.m, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.n)), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) {
          T* out = static_cast<T*>(p.out) + i * p.out_row_stride;
          const float* x = p.x + i * p.columns_count;
          int64_t j = 0;
          for (; j + kW <= p.n; j += kW) {
            VecF acc = load(out + j);
            for (int64_t c = 0; c < p.columns_count; ++c) acc = fmadd(broadcast(x[c]), load(&columns[size_t(c * p.n + j)]), acc);
            store(out + j, acc);
          }
          for (; j < p.n; ++j) {
            float acc = to_float(out[j]);
            for (int64_t c = 0; c < p.columns_count; ++c) acc = std::fma(x[c], columns[size_t(c * p.n + j)], acc);
            out[j] = from_float<T>(acc);
          }
        }
      });
    }
  });
}

void column_abs_max(const ColumnAbsMaxParams& p) {
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) column_abs_max_of<T>(p);
  });
}

void pack_int8_b(const ScaledInt8MmParams& p, uint8_t* packed) { w8a8::pack_b(p, packed); }

namespace {

// The unpacked path's dot products without VNNI: products widened to int16 and summed in pairs
// (vpmaddwd, exact in int32 for K < 2^17), 4 rows of B against the m rows of A (widened once per
// call into rows of a multiple of 32 values, zero tail) in passes of kPassRows rows, whose
// accumulators fit the register file (AVX-512: 16 of 32 zmm; AVX2: 8 of 16 ymm).
constexpr int kRowsB = 4;

struct WideningDot : w8a8::PreparedA<int16_t, 32> {
  explicit WideningDot(const ScaledInt8MmParams& params) : PreparedA(params, [](int8_t v) { return int16_t(v); }) {}

#if defined(__AVX512BW__)
  using Vec = __m512i;
  static constexpr int kStep = 32, kPassRows = 4;
  static Vec zero() { return _mm512_setzero_si512(); }
  static Vec widen_b(const int8_t* b) {
    return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
  }
  static Vec load_a(const int16_t* a) { return _mm512_loadu_si512(a); }
  static Vec madd_add(Vec acc, Vec a, Vec b) { return _mm512_add_epi32(acc, _mm512_madd_epi16(a, b)); }
#elif defined(__AVX2__)
  using Vec = __m256i;
  static constexpr int kStep = 16, kPassRows = 2;
  static Vec zero() { return _mm256_setzero_si256(); }
  static Vec widen_b(const int8_t* b) { return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b))); }
  static Vec load_a(const int16_t* a) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a)); }
  static Vec madd_add(Vec acc, Vec a, Vec b) { return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b)); }
#endif

  void operator()(const int8_t* const (&b)[kRowsB], int count,
                  int32_t (&acc)[kUnpackedInt8MaxRows][kRowsB]) const {
    const int64_t m = p->m, k = p->k;
    int64_t j = 0;
#if defined(__AVX512BW__) || defined(__AVX2__)
    j = k / kStep * kStep;
    w8a8::for_row_passes<kPassRows>(m, [&](auto rows, auto, int64_t i0) { pass<decltype(rows)::value>(b, i0, j, acc); });
#endif
    for (; j < k; ++j)  // the tail (everything, on the scalar level)
      for (int r = 0; r < count; ++r)
        for (int64_t i = 0; i < m; ++i) acc[i][r] += int32_t(a[size_t(i * stride + j)]) * int32_t(b[r][j]);
  }

#if defined(__AVX512BW__) || defined(__AVX2__)
  // Rows i0 .. i0 + kRows - 1 of A, k < k_vec (whole vectors).
  template <int kRows>
  void pass(const int8_t* const (&b)[kRowsB], int64_t i0, int64_t k_vec,
            int32_t (&acc)[kUnpackedInt8MaxRows][kRowsB]) const {
    Vec vacc[kRows][kRowsB];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < kRowsB; ++r) vacc[i][r] = zero();
    const int16_t* const a_rows = a.data() + i0 * stride;
    for (int64_t j = 0; j < k_vec; j += kStep) {
      Vec b16[kRowsB];
#pragma GCC unroll 16
      for (int r = 0; r < kRowsB; ++r) b16[r] = widen_b(b[r] + j);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        const Vec a16 = load_a(a_rows + i * stride + j);
#pragma GCC unroll 16
        for (int r = 0; r < kRowsB; ++r) vacc[i][r] = madd_add(vacc[i][r], a16, b16[r]);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < kRowsB; ++r) acc[i0 + i][r] = reduce_add_epi32(vacc[i][r]);
  }
#endif
};

}  // namespace

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

void scaled_int8_mm_unpacked(const ScaledInt8MmParams& p) {
  w8a8::unpacked_gemm<kRowsB>(p, [](const ScaledInt8MmParams& rows) { return WideningDot(rows); });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
