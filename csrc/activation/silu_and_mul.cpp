// silu_and_mul: input checks, allocation and the call into the CPU or CUDA kernel.
#include "activation/silu_and_mul.h"

#include <ATen/ops/empty.h>

#include "common/torch_utils.h"
#include "ops.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "activation/silu_and_mul_cuda.h"
#endif

namespace torch_ext {
namespace {

constexpr const char* kOp = "silu_and_mul";
constexpr const char* kBackwardOp = "silu_and_mul_backward";

void check_x(const char* op, const at::Tensor& x) {
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_dim_at_least(op, "x", x, 1);
  TORCH_EXT_CHECK(x.size(-1) % 2 == 0, op, "x must have an even last dimension [..., 2*d], got shape ", x.sizes());
}

std::vector<int64_t> output_shape(const at::Tensor& x) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() /= 2;
  return shape;
}

SiluAndMulParams forward_params(const at::Tensor& x_rows, at::Tensor& out) {
  return SiluAndMulParams{scalar_kind(x_rows), x_rows.size(0), x_rows.size(1) / 2, x_rows.data_ptr(),
                          x_rows.stride(0),    out.data_ptr(),  x_rows.size(1) / 2};
}

struct Backward {
  at::Tensor x_rows, grad_rows, grad_x;
  SiluAndMulBackwardParams params;
};

Backward prepare_backward(const at::Tensor& grad_out, const at::Tensor& x) {
  check_x(kBackwardOp, x);
  check_same_dtype(kBackwardOp, "grad_out", grad_out, "x", x);
  check_same_device(kBackwardOp, "grad_out", grad_out, "x", x);
  TORCH_EXT_CHECK(grad_out.sizes() == at::IntArrayRef(output_shape(x)), kBackwardOp, "grad_out must have shape ",
                  at::IntArrayRef(output_shape(x)), " (x's shape with the last dimension halved), got ",
                  grad_out.sizes());
  Backward b;
  b.x_rows = as_rows(x);
  b.grad_rows = as_rows(grad_out);
  b.grad_x = at::empty(x.sizes(), x.options());
  const int64_t d = b.x_rows.size(1) / 2;
  b.params = SiluAndMulBackwardParams{scalar_kind(x), b.x_rows.size(0), d,
                                      b.grad_rows.data_ptr(), b.grad_rows.stride(0),
                                      b.x_rows.data_ptr(),   b.x_rows.stride(0),
                                      b.grad_x.data_ptr(),   2 * d};
  return b;
}

}  // namespace

at::Tensor silu_and_mul_cpu(const at::Tensor& x) {
  check_x(kOp, x);
  const at::Tensor x_rows = as_rows(x);
  at::Tensor out = at::empty(output_shape(x), x.options());
  TORCH_EXT_CPU_DISPATCH(silu_and_mul, forward_params(x_rows, out));
  return out;
}

at::Tensor silu_and_mul_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x) {
  Backward b = prepare_backward(grad_out, x);
  TORCH_EXT_CPU_DISPATCH(silu_and_mul_backward, b.params);
  return b.grad_x;
}

#if defined(TORCH_EXT_WITH_CUDA)
at::Tensor silu_and_mul_cuda(const at::Tensor& x) {
  check_x(kOp, x);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_rows = as_rows(x);
  at::Tensor out = at::empty(output_shape(x), x.options());
  C10_CUDA_CHECK(cuda::silu_and_mul(forward_params(x_rows, out), c10::cuda::getCurrentCUDAStream()));
  return out;
}

at::Tensor silu_and_mul_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x) {
  const c10::cuda::CUDAGuard guard(x.device());
  Backward b = prepare_backward(grad_out, x);
  C10_CUDA_CHECK(cuda::silu_and_mul_backward(b.params, c10::cuda::getCurrentCUDAStream()));
  return b.grad_x;
}
#endif

}  // namespace torch_ext
