// fused_moe's backward on torch's grouped GEMM (at::_grouped_mm, torch >= 2.8) with the group
// offsets kept on the device: no host sync, so a training step that uses it captures in a CUDA
// graph. torch's _grouped_mm itself stays on the device only in its sm_90 bf16 (CUTLASS) kernels;
// its fallback elsewhere copies the offsets to the host, as the per-expert composite
// (moe/fused_moe_composite.h) does, so fused_moe_backward picks this path there by default.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "moe/fused_moe.h"

namespace torch_ext::moe {

// TORCH_EXT_MOE_GROUPED_BACKWARD: unset or empty = kAuto (CUDA bf16 on sm_90), "0" = kNever,
// anything else = kAlways where supported (the CPU tests use it to run this path).
enum class GroupedBackwardChoice { kAuto, kNever, kAlways };
GroupedBackwardChoice grouped_backward_choice();

// Whether this build's torch has _grouped_mm and the problem meets its rules: fp32 / fp16 / bf16,
// at least one token, H and I multiples of 8 (16-byte strides).
bool grouped_backward_supported(const at::Tensor& hidden, const at::Tensor& w13);

// fused_moe_backward_composite's results and contract (gate_up saved or recomputed, weight_grads),
// computed with grouped GEMMs; arguments already checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation, const at::Tensor& gate_up,
    bool weight_grads);

}  // namespace torch_ext::moe
