// silu_and_mul: y = silu(x[..., :d]) * x[..., d:], the gated activation of SwiGLU MLPs,
// and its gradient. Torch-free: the parameter structs carry raw pointers and strides; the
// torch-facing code in silu_and_mul.cpp fills them.
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"

namespace torch_ext {

// x: rows x 2d (gate columns first, then up), last dimension contiguous; out: rows x d.
// Strides are in elements.
struct SiluAndMulParams {
  ScalarKind dtype;
  int64_t rows;
  int64_t d;
  const void* x;
  int64_t x_row_stride;
  void* out;
  int64_t out_row_stride;
};

// grad_x[:, :d] = grad_out * up * silu'(gate), grad_x[:, d:] = grad_out * silu(gate).
struct SiluAndMulBackwardParams {
  ScalarKind dtype;
  int64_t rows;
  int64_t d;
  const void* grad_out;
  int64_t grad_out_row_stride;
  const void* x;
  int64_t x_row_stride;
  void* grad_x;
  int64_t grad_x_row_stride;
};

namespace cpu {
TORCH_EXT_DECLARE_CPU_KERNEL(void silu_and_mul(const SiluAndMulParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void silu_and_mul_backward(const SiluAndMulBackwardParams& p))
}  // namespace cpu

}  // namespace torch_ext
