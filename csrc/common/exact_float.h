// fp32 arithmetic that rounds once per operation on both sides: on the device the compiler may
// contract a * b + c into one fma (one rounding instead of two), which would make a kernel
// differ from its CPU reference in the last bit. These use the _rn intrinsics, which are never
// contracted; on the host, plain operators (the CPU kernels are compiled without contraction
// across these calls' boundaries: each returns a rounded float).
#pragma once

#include "common/macros.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

TORCH_EXT_HOST_DEVICE float f32_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
TORCH_EXT_HOST_DEVICE float f32_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}
TORCH_EXT_HOST_DEVICE float f32_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
TORCH_EXT_HOST_DEVICE float f32_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
