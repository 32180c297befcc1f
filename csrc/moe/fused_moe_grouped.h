// fused_moe on torch's grouped GEMM (at::_grouped_mm, torch >= 2.8) with the group offsets kept on
// the device: no host sync, so a layer or a training step that uses it captures in a CUDA graph.
// torch's _grouped_mm itself stays on the device only in its sm_90 bf16 (CUTLASS) kernels; its
// fallback elsewhere copies the offsets to the host, as the per-expert composite
// (moe/fused_moe_composite.h) does.
//   - Backward: picked by default there (bf16, sm_90), where the alternative is the per-expert
//     composite.
//   - Forward: picked by default there for prefill-sized batches (kGroupedForwardMinRowsPerExpert),
//     where Hopper's wgmma GEMMs behind _grouped_mm beat our mma.sync fused kernel even though they
//     write the [T * k, 2I] and [T * k, H] intermediates: measured on an H100 (2026-11-26,
//     docs/perf/gpu-h100.md), Mixtral bf16 T = 4096: fused kernel 12.6 ms, sort + _grouped_mm
//     5.8 ms; T = 1 the other way round (351 vs 495 us), and on an H200 at T = 64 1.68 vs 1.24 ms.
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

#include "moe/fused_moe.h"

namespace torch_ext::moe {

// TORCH_EXT_MOE_GROUPED_FORWARD / TORCH_EXT_MOE_GROUPED_BACKWARD: unset, empty or "auto" = kAuto
// (CUDA bf16 on sm_90; the forward from kGroupedForwardMinRowsPerExpert on), "0" / "false" /
// "off" / "no" = kNever, anything else = kAlways where supported (the CPU tests use it to run
// these paths).
enum class GroupedChoice { kAuto, kNever, kAlways };
GroupedChoice grouped_forward_choice();
GroupedChoice grouped_backward_choice();

// The forward's automatic choice takes the grouped GEMMs when the (token, slot) pairs average at
// least this many rows per expert (Mixtral: T >= 32). Between the two measured points (T = 1:
// fused 1.41x faster; T = 64, 16 rows per expert: grouped 1.35x faster); scripts/moe_grouped_sweep.py
// times both on a GPU to place it.
constexpr int64_t kGroupedForwardMinRowsPerExpert = 8;

// Whether this build's torch has _grouped_mm and the problem meets its rules: fp32 / fp16 / bf16,
// at least one token, H and I multiples of 8 (16-byte strides).
bool grouped_supported(const at::Tensor& hidden, const at::Tensor& w13);

// fused_moe's out [T, H] computed with two grouped GEMMs (pairs sorted by expert, x W13[e]^T,
// the gated activation, then W2[e]), weighted and summed per token in slot order; arguments
// already checked.
at::Tensor fused_moe_forward_grouped(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                                     const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                     Activation activation);

// fused_moe_backward_composite's results and contract (gate_up saved or recomputed, weight_grads),
// computed with grouped GEMMs; arguments already checked.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation, const at::Tensor& gate_up,
    bool weight_grads);

}  // namespace torch_ext::moe
