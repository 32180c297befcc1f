// The torch-facing entry points of every op, registered in torch_bindings.cpp.
// Each family's .cpp implements its CPU entry and, in CUDA builds, its CUDA entry.
#pragma once

#include <ATen/core/Tensor.h>

namespace torch_ext {

// activation/silu_and_mul.cpp
at::Tensor silu_and_mul_cpu(const at::Tensor& x);
at::Tensor silu_and_mul_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x);
#if defined(TORCH_EXT_WITH_CUDA)
at::Tensor silu_and_mul_cuda(const at::Tensor& x);
at::Tensor silu_and_mul_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x);
#endif

}  // namespace torch_ext
