#include "moe/expert_backward.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>

#include "common/cpu/gemm_dtype.h"
#include "moe/fused_moe_composite.h"

namespace torch_ext::moe {
namespace {

// fp32 bytes of a widened block: a weight block and its product rows stay in a 2 MiB L2 while
// the GEMM runs over them.
constexpr int64_t kWidenedBlockBytes = int64_t(512) << 10;

int64_t block_rows(int64_t columns) {
  return std::max<int64_t>(1, kWidenedBlockBytes / (columns * int64_t(sizeof(float))));
}

// a [n, K] fp32 @ w [K, N] (16-bit): w widened a block of its rows (of K) at a time, the
// products summed into the fp32 result.
at::Tensor widened_mm(const at::Tensor& a, const at::Tensor& w) {
  const int64_t k = w.size(0), step = block_rows(w.size(1));
  at::Tensor out = at::empty({a.size(0), w.size(1)}, a.options());
  at::Tensor block = at::empty({std::min(step, k), w.size(1)}, a.options());
  for (int64_t k0 = 0; k0 < k; k0 += step) {
    const int64_t rows = std::min(step, k - k0);
    const at::Tensor widened = block.narrow(0, 0, rows).copy_(w.narrow(0, k0, rows));
    const at::Tensor a_block = a.narrow(1, k0, rows);
    if (k0 == 0) {
      at::mm_out(out, a_block, widened);
    } else {
      out.addmm_(a_block, widened);
    }
  }
  return out;
}

// a [n, K] fp32 @ w [N, K]^T (16-bit): w widened a block of its rows (of N) at a time, each
// block giving its columns of the result.
at::Tensor widened_mm_t(const at::Tensor& a, const at::Tensor& w) {
  const int64_t n = w.size(0), step = block_rows(w.size(1));
  at::Tensor out = at::empty({a.size(0), n}, a.options());
  at::Tensor block = at::empty({std::min(step, n), w.size(1)}, a.options());
  for (int64_t n0 = 0; n0 < n; n0 += step) {
    const int64_t rows = std::min(step, n - n0);
    const at::Tensor widened = block.narrow(0, 0, rows).copy_(w.narrow(0, n0, rows));
    at::Tensor out_block = out.narrow(1, n0, rows);
    at::mm_out(out_block, a, widened.t());
  }
  return out;
}

// out (16-bit) [R, C] = a [R, k] @ b [k, C], both fp32: a block of R rows at a time into an fp32
// block, rounded once into out.
void rounded_mm_out(const at::Tensor& out, const at::Tensor& a, const at::Tensor& b) {
  const int64_t r = out.size(0), step = block_rows(out.size(1));
  at::Tensor block = at::empty({std::min(step, r), out.size(1)}, b.options());
  for (int64_t r0 = 0; r0 < r; r0 += step) {
    const int64_t rows = std::min(step, r - r0);
    at::Tensor product = block.narrow(0, 0, rows);
    at::mm_out(product, a.narrow(0, r0, rows), b);
    out.narrow(0, r0, rows).copy_(product);
  }
}

void expert_backward_native(const ExpertBackwardRows& rows, const at::Tensor& w13, const at::Tensor& w2,
                            Activation activation, const ExpertBackwardGrads& grads) {
  const at::Tensor gate_up = rows.gate_up.defined() ? rows.gate_up : at::mm(rows.x, w13.t());
  const GatedBackward gb = gated_activation_backward(gate_up, at::mm(rows.dy, w2), rows.weights, activation);
  grads.grad_weights.copy_(gb.grad_weights);
  if (grads.grad_w13.defined()) {
    at::Tensor grad_w2 = grads.grad_w2, grad_w13 = grads.grad_w13;
    at::mm_out(grad_w2, (rows.dy * rows.weights).t(), gb.act);
    at::mm_out(grad_w13, gb.d_gate_up.t(), rows.x);
  }
  at::Tensor grad_x = grads.grad_x;
  at::mm_out(grad_x, gb.d_gate_up, w13);
}

void expert_backward_fp32(const ExpertBackwardRows& rows, const at::Tensor& w13, const at::Tensor& w2,
                          Activation activation, const ExpertBackwardGrads& grads) {
  const at::Tensor x = rows.x.to(at::kFloat), dy = rows.dy.to(at::kFloat), weights = rows.weights.to(at::kFloat);
  const at::Tensor gate_up = rows.gate_up.defined() ? rows.gate_up.to(at::kFloat) : widened_mm_t(x, w13);
  const GatedBackward gb = gated_activation_backward(gate_up, widened_mm(dy, w2), weights, activation);
  grads.grad_weights.copy_(gb.grad_weights);
  if (grads.grad_w13.defined()) {
    rounded_mm_out(grads.grad_w2, (dy * weights).t(), gb.act);
    rounded_mm_out(grads.grad_w13, gb.d_gate_up.t(), x);
  }
  grads.grad_x.copy_(widened_mm(gb.d_gate_up, w13));
}

}  // namespace

void expert_backward(const ExpertBackwardRows& rows, const at::Tensor& w13, const at::Tensor& w2,
                     Activation activation, const ExpertBackwardGrads& grads) {
  if (rows.x.is_cpu() && cpu::fast_gemm_dtype(rows.x.scalar_type()) != rows.x.scalar_type()) {
    expert_backward_fp32(rows, w13, w2, activation, grads);
  } else {
    expert_backward_native(rows, w13, w2, activation, grads);
  }
}

}  // namespace torch_ext::moe
