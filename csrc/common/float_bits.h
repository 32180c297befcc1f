// Bit-exact scalar conversions between float and the 16-bit float formats.
// Host-and-device, so the scalar CPU path and any CUDA code that wants them share one
// definition; the CPU tests compare them against torch's own conversions.
#pragma once

#include <cstdint>

#include "common/dtype.h"
#include "common/macros.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

TORCH_EXT_HOST_DEVICE uint32_t float_as_bits(float f) {
  union {
    float f;
    uint32_t u;
  } v{f};
  return v.u;
}

TORCH_EXT_HOST_DEVICE float bits_as_float(uint32_t u) {
  union {
    uint32_t u;
    float f;
  } v{u};
  return v.f;
}

TORCH_EXT_HOST_DEVICE float to_float(float x) { return x; }
TORCH_EXT_HOST_DEVICE float to_float(BFloat16 x) { return bits_as_float(uint32_t(x.bits) << 16); }

// IEEE binary16 -> binary32, exact for every input (normals, subnormals, inf, NaN).
TORCH_EXT_HOST_DEVICE float to_float(Half x) {
  const uint32_t sign = uint32_t(x.bits & 0x8000u) << 16;
  const uint32_t exponent = (x.bits >> 10) & 0x1Fu;
  uint32_t mantissa = x.bits & 0x3FFu;
  if (exponent == 0x1Fu) return bits_as_float(sign | 0x7F800000u | (mantissa << 13));  // inf/NaN
  if (exponent != 0) return bits_as_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_as_float(sign);  // signed zero
  // Subnormal half: value = mantissa * 2^-24, exactly representable as a float.
  const float magnitude = float(mantissa) * (1.0f / 16777216.0f);
  return sign ? -magnitude : magnitude;
}

// float -> bfloat16, round to nearest even; NaN stays a (quiet) NaN.
TORCH_EXT_HOST_DEVICE BFloat16 to_bfloat16(float f) {
  const uint32_t u = float_as_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return BFloat16{uint16_t((u >> 16) | 0x40u)};
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  return BFloat16{uint16_t((u + rounding_bias) >> 16)};
}

// float -> binary16, round to nearest even, overflow to inf, gradual underflow.
TORCH_EXT_HOST_DEVICE Half to_half(float f) {
  const uint32_t u = float_as_bits(f);
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  const uint32_t abs_bits = u & 0x7FFFFFFFu;
  if (abs_bits > 0x7F800000u) return Half{uint16_t(sign | 0x7E00u)};       // NaN
  if (abs_bits >= 0x477FF000u) return Half{uint16_t(sign | 0x7C00u)};      // rounds to inf
  if (abs_bits < 0x38800000u) {                                            // half subnormal/zero
    // Adding 0.5 (2^-1) aligns the half subnormal grid (2^-24) to the float's last
    // mantissa bits, so the FPU's own round-to-nearest-even does the rounding.
    const float shifted = bits_as_float(abs_bits) + 0.5f;
    return Half{uint16_t(sign | uint16_t(float_as_bits(shifted) - 0x3F000000u))};
  }
  const uint32_t mantissa_odd = (abs_bits >> 13) & 1u;
  // Rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
  const uint32_t rounded = abs_bits + 0xC8000FFFu + mantissa_odd;
  return Half{uint16_t(sign | uint16_t(rounded >> 13))};
}

template <typename T>
TORCH_EXT_HOST_DEVICE T from_float(float f);
template <>
TORCH_EXT_HOST_DEVICE float from_float<float>(float f) {
  return f;
}
template <>
TORCH_EXT_HOST_DEVICE BFloat16 from_float<BFloat16>(float f) {
  return to_bfloat16(f);
}
template <>
TORCH_EXT_HOST_DEVICE Half from_float<Half>(float f) {
  return to_half(f);
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
