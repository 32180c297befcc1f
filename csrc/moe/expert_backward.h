// One expert's share of fused_moe's backward: its GEMMs and the gated activation's backward,
// written into slices of the op's gradients. fused_moe_backward_composite runs it per expert.
#pragma once

#include <ATen/core/Tensor.h>

#include "moe/fused_moe.h"

namespace torch_ext::moe {

// An expert's grouped rows (n of them) and where their gradients go.
struct ExpertBackwardRows {
  at::Tensor x;        // [n, H] hidden rows routed to the expert
  at::Tensor dy;       // [n, H] grad_out of those rows' tokens
  at::Tensor weights;  // [n, 1] routing weights, in x's dtype
  at::Tensor gate_up;  // [n, 2I] the forward's pre-activation; undefined: recomputed
};
struct ExpertBackwardGrads {
  at::Tensor grad_x;        // [n, H], x's dtype
  at::Tensor grad_weights;  // [n] routing weights' gradient
  at::Tensor grad_w13;      // [2I, H] and [H, I]; both undefined when the weights need none
  at::Tensor grad_w2;
};

// Writes the expert's gradients: d act = dy W2 (before the routing weight), the gated
// activation's backward, grad_w2 = (w dy)^T act, grad_w13 = d gate_up^T x, grad_x = d gate_up W13.
// 16-bit experts on CPUs where torch's GEMM in their dtype is slow (fp16 anywhere, bf16 without
// AVX512_BF16 or AMX-BF16: common/cpu/gemm_dtype.h) run the GEMMs in fp32: their operands are
// widened a block at a time (weights a block of rows at a time, so nothing expert-sized is
// copied) and each output is rounded once.
void expert_backward(const ExpertBackwardRows& rows, const at::Tensor& w13, const at::Tensor& w2,
                     Activation activation, const ExpertBackwardGrads& grads);

}  // namespace torch_ext::moe
