// A small fp32 SIMD vector for CPU kernels compiled once per ISA level.
//
// VecF holds kWidth floats: 16 (AVX-512), 8 (AVX2) or 1 (scalar). Loads and stores convert
// from/to the storage types float, Half and BFloat16 (round to nearest even), so kernels do
// all arithmetic in fp32 whatever the tensor dtype. Everything lives in the ISA's own
// namespace: the same inline function compiled with different -m flags must not be merged
// by the linker (that would be an ODR violation that runs AVX-512 code on an AVX2 CPU).
#pragma once

#include <cstdint>
#include <cstring>

#include "common/dtype.h"
#include "common/float_bits.h"

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#ifndef TORCH_EXT_CPU_ISA
#error "vec.h is for CPU kernel files compiled per ISA level (see CMakeLists.txt)"
#endif

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {

#if defined(__AVX512F__)

struct VecF {
  static constexpr int kWidth = 16;
  __m512 v;
};
inline VecF broadcast(float x) { return {_mm512_set1_ps(x)}; }
// 16 bf16 / fp16 bit patterns <-> fp32 lanes.
inline VecF from_bf16_bits(__m256i bits) {
  return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))};
}
inline __m256i to_bf16_bits(VecF x) {  // round to nearest even, NaN kept quiet
  const __m512i bits = _mm512_castps_si512(x.v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
  const __mmask16 is_nan = _mm512_cmp_ps_mask(x.v, x.v, _CMP_UNORD_Q);
  rounded = _mm512_mask_mov_epi32(rounded, is_nan, _mm512_set1_epi32(0x7FC00000));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
}
inline __m256i to_half_bits(VecF x) { return _mm512_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline VecF load(const float* p) { return {_mm512_loadu_ps(p)}; }
inline VecF load(const BFloat16* p) { return from_bf16_bits(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline VecF load(const Half* p) {
  return {_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))};
}
inline void store(float* p, VecF x) { _mm512_storeu_ps(p, x.v); }
// The first `count` lanes (0 <= count <= 16) only: masked loads (the other lanes read as 0) and
// stores, which touch no memory past p + count.
inline __mmask16 first_lanes(int count) { return __mmask16((1u << count) - 1); }
inline VecF load_first(const float* p, int count) { return {_mm512_maskz_loadu_ps(first_lanes(count), p)}; }
inline VecF load_first(const BFloat16* p, int count) {
  return from_bf16_bits(_mm256_maskz_loadu_epi16(first_lanes(count), p));
}
inline VecF load_first(const Half* p, int count) {
  return {_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first_lanes(count), p))};
}
inline void store_first(float* p, VecF x, int count) { _mm512_mask_storeu_ps(p, first_lanes(count), x.v); }
inline void store_first(BFloat16* p, VecF x, int count) {
  _mm256_mask_storeu_epi16(p, first_lanes(count), to_bf16_bits(x));
}
inline void store_first(Half* p, VecF x, int count) {
  _mm256_mask_storeu_epi16(p, first_lanes(count), to_half_bits(x));
}
// Lanes base[0], base[stride], ..., base[15 * stride]; 15 * stride must fit in int32.
inline VecF gather(const float* base, int64_t stride) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  return {_mm512_i32gather_ps(_mm512_mullo_epi32(lanes, _mm512_set1_epi32(int32_t(stride))), base, 4)};
}
inline void store(BFloat16* p, VecF x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(x)); }
inline void store(Half* p, VecF x) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half_bits(x)); }
inline VecF operator+(VecF a, VecF b) { return {_mm512_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm512_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm512_min_ps(a.v, b.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm512_max_ps(a.v, b.v)}; }
inline VecF abs(VecF a) { return {_mm512_abs_ps(a.v)}; }
inline float reduce_max(VecF a) { return _mm512_reduce_max_ps(a.v); }
// (GCC's _mm512_reduce_add_ps trips -Wmaybe-uninitialized in its own header: halve by hand.)
inline float reduce_add(VecF a) {
  const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(a.v), _mm512_extractf32x8_ps(a.v, 1));
  const __m128 quarter = _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
  const __m128 pair = _mm_add_ps(quarter, _mm_movehl_ps(quarter, quarter));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
inline VecF round_nearest(VecF a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// Sum of 16 int32 lanes (halved by hand: GCC's _mm512_reduce_add_epi32 warns like the float one).
inline int32_t reduce_add_epi32(__m512i a) {
  const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
  const __m128i quarter = _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
  const __m128i pair = _mm_add_epi32(quarter, _mm_shuffle_epi32(quarter, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(pair, _mm_shuffle_epi32(pair, 0xB1)));
}
// x * 2^n for integral n in [-126, 127] held as floats: one VSCALEFPS.
inline VecF times_exp2(VecF x, VecF n) { return {_mm512_scalef_ps(x.v, n.v)}; }
// In-register 16x16 transpose: rows[i].lane(j) becomes rows[j].lane(i). Interleave 32-bit
// pairs, then 64-bit pairs (each 128-bit lane L then holds column k + 4L of four rows), then
// gather the 128-bit lanes of the four row groups.
inline void transpose(VecF (&rows)[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(rows[2 * i].v, rows[2 * i + 1].v);
    t[2 * i + 1] = _mm512_unpackhi_ps(rows[2 * i].v, rows[2 * i + 1].v);
  }
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int k = 0; k < 4; ++k) {
    const __m512 low_ab = _mm512_shuffle_f32x4(u[k], u[4 + k], 0x44), low_cd = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0x44);
    const __m512 high_ab = _mm512_shuffle_f32x4(u[k], u[4 + k], 0xEE), high_cd = _mm512_shuffle_f32x4(u[8 + k], u[12 + k], 0xEE);
    rows[k].v = _mm512_shuffle_f32x4(low_ab, low_cd, 0x88);
    rows[k + 4].v = _mm512_shuffle_f32x4(low_ab, low_cd, 0xDD);
    rows[k + 8].v = _mm512_shuffle_f32x4(high_ab, high_cd, 0x88);
    rows[k + 12].v = _mm512_shuffle_f32x4(high_ab, high_cd, 0xDD);
  }
}

#elif defined(__AVX2__)

struct VecF {
  static constexpr int kWidth = 8;
  __m256 v;
};
inline VecF broadcast(float x) { return {_mm256_set1_ps(x)}; }
inline VecF load(const float* p) { return {_mm256_loadu_ps(p)}; }
inline VecF load(const BFloat16* p) {
  const __m256i widened = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(widened, 16))};
}
inline VecF load(const Half* p) { return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))}; }
inline void store(float* p, VecF x) { _mm256_storeu_ps(p, x.v); }
// Stores the first `count` lanes only.
inline void store_first(float* p, VecF x, int count) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(count), lane), x.v);
}
// Lanes base[0], base[stride], ..., base[7 * stride]; 7 * stride must fit in int32.
inline VecF gather(const float* base, int64_t stride) {
  const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  return {_mm256_i32gather_ps(base, _mm256_mullo_epi32(lanes, _mm256_set1_epi32(int32_t(stride))), 4)};
}
inline void store(BFloat16* p, VecF x) {
  const __m256i bits = _mm256_castps_si256(x.v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF)));
  const __m256 is_nan = _mm256_cmp_ps(x.v, x.v, _CMP_UNORD_Q);
  rounded = _mm256_castps_si256(
      _mm256_blendv_ps(_mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_set1_epi32(0x7FC00000)), is_nan));
  const __m256i high_halves = _mm256_srli_epi32(rounded, 16);
  // packus works within 128-bit lanes: [a0..a3 a0..a3 | a4..a7 a4..a7]; gather qwords 0 and 2.
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(high_halves, high_halves), 0x08);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
inline void store(Half* p, VecF x) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
inline VecF operator+(VecF a, VecF b) { return {_mm256_add_ps(a.v, b.v)}; }
inline VecF operator-(VecF a, VecF b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline VecF operator*(VecF a, VecF b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline VecF operator/(VecF a, VecF b) { return {_mm256_div_ps(a.v, b.v)}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline VecF min(VecF a, VecF b) { return {_mm256_min_ps(a.v, b.v)}; }
inline VecF max(VecF a, VecF b) { return {_mm256_max_ps(a.v, b.v)}; }
inline VecF abs(VecF a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.v)}; }
inline float reduce_max(VecF a) {
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 pair = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
inline float reduce_add(VecF a) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(a.v), _mm256_extractf128_ps(a.v, 1));
  const __m128 pair = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(pair, _mm_shuffle_ps(pair, pair, 1)));
}
inline VecF round_nearest(VecF a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
// Sum of 8 int32 lanes.
inline int32_t reduce_add_epi32(__m256i a) {
  const __m128i half = _mm_add_epi32(_mm256_castsi256_si128(a), _mm256_extracti128_si256(a, 1));
  const __m128i pair = _mm_add_epi32(half, _mm_shuffle_epi32(half, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(pair, _mm_shuffle_epi32(pair, 0xB1)));
}
// x * 2^n for integral n in [-126, 127] held as floats: 2^n built as an exponent field.
inline VecF times_exp2(VecF x, VecF n) {
  const __m256i biased = _mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127));
  return {_mm256_mul_ps(x.v, _mm256_castsi256_ps(_mm256_slli_epi32(biased, 23)))};
}
// In-register 8x8 transpose: rows[i].lane(j) becomes rows[j].lane(i).
inline void transpose(VecF (&rows)[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(rows[2 * i].v, rows[2 * i + 1].v);
    t[2 * i + 1] = _mm256_unpackhi_ps(rows[2 * i].v, rows[2 * i + 1].v);
  }
  for (int g = 0; g < 2; ++g) {
    s[4 * g] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
    s[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
    s[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
    s[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
  }
  for (int k = 0; k < 4; ++k) {
    rows[k].v = _mm256_permute2f128_ps(s[k], s[4 + k], 0x20);
    rows[k + 4].v = _mm256_permute2f128_ps(s[k], s[4 + k], 0x31);
  }
}

#else  // scalar: one lane, the same interface, so kernels are written once.

struct VecF {
  static constexpr int kWidth = 1;
  float v;
};
inline VecF broadcast(float x) { return {x}; }
template <typename T>
inline VecF load(const T* p) {
  return {to_float(*p)};
}
template <typename T>
inline void store(T* p, VecF x) {
  *p = from_float<T>(x.v);
}
inline VecF operator+(VecF a, VecF b) { return {a.v + b.v}; }
inline VecF operator-(VecF a, VecF b) { return {a.v - b.v}; }
inline VecF operator*(VecF a, VecF b) { return {a.v * b.v}; }
inline VecF operator/(VecF a, VecF b) { return {a.v / b.v}; }
inline VecF fmadd(VecF a, VecF b, VecF c) { return {a.v * b.v + c.v}; }
// Like the SIMD min/max: the second operand wins when either is NaN.
inline VecF min(VecF a, VecF b) { return {a.v < b.v ? a.v : b.v}; }
inline VecF max(VecF a, VecF b) { return {a.v > b.v ? a.v : b.v}; }
inline VecF abs(VecF a) { return {a.v < 0.0f ? -a.v : a.v}; }
inline float reduce_max(VecF a) { return a.v; }
inline float reduce_add(VecF a) { return a.v; }
inline VecF round_nearest(VecF a) { return {__builtin_rintf(a.v)}; }
inline VecF times_exp2(VecF x, VecF n) { return {x.v * bits_as_float(uint32_t(int32_t(n.v) + 127) << 23)}; }
inline void transpose(VecF (&)[1]) {}
inline VecF gather(const float* base, int64_t) { return {*base}; }
inline void store_first(float* p, VecF x, int count) {
  if (count > 0) *p = x.v;
}

#endif

// e^x in fp32, within 2 ulp for x in [-87.3, 88.0] (Cody-Waite range reduction, then a
// degree-6 polynomial on [-ln2/2, ln2/2]). Outside that range the input is clamped, so the
// result saturates at about 1.2e-38 and 1.7e38 instead of reaching 0 or inf: enough for
// sigmoid/softmax, where those values are swamped by the other terms.
inline VecF exp(VecF x) {
  x = max(min(x, broadcast(88.0f)), broadcast(-87.3f));
  const VecF n = round_nearest(x * broadcast(1.44269504088896341f));
  // ln2 split in two so that n * kLn2Hi is exact for |n| <= 128.
  VecF r = fmadd(n, broadcast(-0.693359375f), x);
  r = fmadd(n, broadcast(2.12194440e-4f), r);
  VecF p = broadcast(1.9875691500e-4f);
  p = fmadd(p, r, broadcast(1.3981999507e-3f));
  p = fmadd(p, r, broadcast(8.3334519073e-3f));
  p = fmadd(p, r, broadcast(4.1665795894e-2f));
  p = fmadd(p, r, broadcast(1.6666665459e-1f));
  p = fmadd(p, r, broadcast(5.0000001201e-1f));
  const VecF r2 = r * r;
  const VecF e_r = fmadd(p, r2, r + broadcast(1.0f));
  return times_exp2(e_r, n);
}

// 1 / (1 + e^-x)
inline VecF sigmoid(VecF x) { return broadcast(1.0f) / (broadcast(1.0f) + exp(broadcast(0.0f) - x)); }

// erfc(z) for z >= 0 as t * e^(-z^2 + P(t)), t = 1 / (1 + z / 2), P the degree-9 Chebyshev fit
// of Numerical Recipes (erfcc): relative error below 1.2e-7 over z >= 0.
inline VecF erfc_nonnegative(VecF z) {
  const VecF t = broadcast(1.0f) / fmadd(z, broadcast(0.5f), broadcast(1.0f));
  VecF p = broadcast(0.17087277f);
  p = fmadd(p, t, broadcast(-0.82215223f));
  p = fmadd(p, t, broadcast(1.48851587f));
  p = fmadd(p, t, broadcast(-1.13520398f));
  p = fmadd(p, t, broadcast(0.27886807f));
  p = fmadd(p, t, broadcast(-0.18628806f));
  p = fmadd(p, t, broadcast(0.09678418f));
  p = fmadd(p, t, broadcast(0.37409196f));
  p = fmadd(p, t, broadcast(1.00002368f));
  p = fmadd(p, t, broadcast(-1.26551223f));
  return t * exp(p - z * z);
}

// The exact (erf) GELU, x * (1 + erf(x / sqrt 2)) / 2, written as x/2 + |x|/2 * erf(|x| / sqrt 2)
// so that only erfc of a non-negative argument is needed.
inline VecF gelu(VecF x) {
  const VecF magnitude = abs(x);
  const VecF erf_part = broadcast(1.0f) - erfc_nonnegative(magnitude * broadcast(0.70710678118654752f));
  return fmadd(magnitude * broadcast(0.5f), erf_part, x * broadcast(0.5f));
}

// Tails: the last n % kWidth elements of a row go through a stack buffer, so no load or
// store ever touches memory past the end of the tensor.
// The first `count` (0 <= count <= kWidth) elements at p, the rest of the lanes zero / not stored.
// Kernels call these for every vector of a row whose length is not a multiple of kWidth, so the
// whole vector takes the plain path; partial ones are masked on AVX-512 and go through a small
// buffer elsewhere (AVX2 has no 16-bit masked moves, and valgrind, which runs the AVX2 level in
// tests/test_cpu_memcheck.py, checks the buffer copies exactly).
template <typename T>
inline VecF load_partial(const T* p, int count) {
  if (count == VecF::kWidth) return load(p);
#if defined(__AVX512F__)
  return load_first(p, count);
#else
  T buffer[VecF::kWidth];
  std::memset(buffer, 0, sizeof(buffer));
  std::memcpy(buffer, p, sizeof(T) * count);
  return load(buffer);
#endif
}
template <typename T>
inline void store_partial(T* p, VecF x, int count) {
  if (count == VecF::kWidth) return store(p, x);
#if defined(__AVX512F__)
  store_first(p, x, count);
#else
  T buffer[VecF::kWidth];
  store(buffer, x);
  std::memcpy(p, buffer, sizeof(T) * count);
#endif
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
