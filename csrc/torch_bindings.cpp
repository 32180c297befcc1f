// Every torch_ext op schema, and which kernel serves it on which device.
//
// One line of comment per schema says what the op computes. Fake (meta) kernels for
// torch.compile and autograd formulas are registered in Python, beside each op's wrapper
// (torch_ext/ops/).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(torch_ext, m) {
  // out[..., d] = silu(x[..., :d]) * x[..., d:] for x [..., 2d] (SwiGLU gating); fp32/fp16/bf16 (fp64 for checks).
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // grad_x [..., 2d] of silu_and_mul given grad_out [..., d] and the forward input x.
  m.def("silu_and_mul_backward(Tensor grad_out, Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("silu_and_mul", &torch_ext::silu_and_mul_cpu);
  m.impl("silu_and_mul_backward", &torch_ext::silu_and_mul_backward_cpu);
}

#if defined(TORCH_EXT_WITH_CUDA)
TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("silu_and_mul", &torch_ext::silu_and_mul_cuda);
  m.impl("silu_and_mul_backward", &torch_ext::silu_and_mul_backward_cuda);
}
#endif
