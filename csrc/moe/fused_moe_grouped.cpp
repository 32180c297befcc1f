// fused_moe's forward and backward on torch's grouped GEMM: the composite's math
// (moe/fused_moe_composite.cpp) with its loop over experts replaced by at::_grouped_mm calls whose
// group offsets never leave the device. Pairs (token, slot) are sorted by expert (stable) as in
// the composite; the offsets are the running sums of a per-expert count made with an integer
// scatter-add (at::bincount reads the input's maximum on the host on CUDA).
#include "moe/fused_moe_grouped.h"

#include <cstdlib>
#include <cstring>

#include "common/env_switch.h"

#if __has_include(<ATen/ops/_grouped_mm.h>)
#define TORCH_EXT_HAVE_GROUPED_MM 1
#include <ATen/TensorOperators.h>
#include <ATen/ops/_grouped_mm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/ones_like.h>
#include <ATen/ops/zeros.h>

#include "moe/fused_moe_composite.h"
#endif

namespace torch_ext::moe {

namespace {

GroupedChoice choice_from(const char* variable) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return GroupedChoice::kAuto;
  return env_value_is_off(value) ? GroupedChoice::kNever : GroupedChoice::kAlways;
}

#if defined(TORCH_EXT_HAVE_GROUPED_MM)
// The pairs grouped by expert and the int32 end offset of each expert's rows, both on the device.
struct GroupedPairs : PairOrder {
  at::Tensor offsets;  // [E] int32
};

GroupedPairs group_on_device(const at::Tensor& topk_ids, int64_t experts) {
  GroupedPairs g{sort_pairs_by_expert(topk_ids), {}};
  const at::Tensor counts =  // integer: exact
      at::zeros({experts}, g.expert.options()).scatter_add_(0, g.expert, at::ones_like(g.expert));
  g.offsets = counts.cumsum(0).to(at::kInt);
  return g;
}
#endif

}  // namespace

GroupedChoice grouped_forward_choice() { return choice_from("TORCH_EXT_MOE_GROUPED_FORWARD"); }
GroupedChoice grouped_backward_choice() { return choice_from("TORCH_EXT_MOE_GROUPED_BACKWARD"); }

bool grouped_supported(const at::Tensor& hidden, const at::Tensor& w13) {
#if defined(TORCH_EXT_HAVE_GROUPED_MM)
  const at::ScalarType dtype = hidden.scalar_type();
  const int64_t hidden_size = hidden.size(1), intermediate = w13.size(1) / 2;
  // _grouped_mm takes fp32 / fp16 / bf16 with every stride a multiple of 16 bytes: H and I
  // multiples of 8 cover all three dtypes (and every real MoE config).
  return (dtype == at::kBFloat16 || dtype == at::kHalf || dtype == at::kFloat) && hidden.size(0) > 0 &&
         hidden_size % 8 == 0 && intermediate % 8 == 0;
#else
  (void)hidden;
  (void)w13;
  return false;
#endif
}

#if defined(TORCH_EXT_HAVE_GROUPED_MM)
// at::_grouped_mm(a, b, offsets): group e is rows [offsets[e - 1], offsets[e]) of a 2D `a` times
// b[e] (b 3D), or, with both 2D, columns of a times rows of b over that range (output [E, m, n]).
at::Tensor fused_moe_forward_grouped(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                                     const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                     Activation activation) {
  const GroupedPairs g = group_on_device(topk_ids, w13.size(0));
  const at::Tensor x = hidden.contiguous().index_select(0, g.tokens);
  const at::Tensor gate_up = at::_grouped_mm(x, w13.contiguous().transpose(1, 2), g.offsets);
  const at::Tensor act = gated_activation_kernel(gate_up, activation);
  // The routing weights and the sum over slots in fp32, rounded once (as the fused kernel's epilogue).
  const at::Tensor y = at::_grouped_mm(act, w2.contiguous().transpose(1, 2), g.offsets)
                           .to(at::kFloat)
                           .mul_(topk_weights.reshape({-1}).index_select(0, g.order).unsqueeze(1));
  return combine(y, g.order, hidden.size(0), topk_ids.size(1)).to(hidden.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_grouped(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation, const at::Tensor& gate_up,
    bool weight_grads) {
  const int64_t tokens = hidden.size(0), top_k = topk_ids.size(1);
  const GroupedPairs pairs = group_on_device(topk_ids, w13.size(0));
  const at::Tensor &order = pairs.order, &offsets = pairs.offsets;

  const at::Tensor w1 = w13.contiguous(), w2c = w2.contiguous();
  const at::Tensor x = hidden.contiguous().index_select(0, pairs.tokens);
  const at::Tensor dy = grad_out.to(hidden.scalar_type()).contiguous().index_select(0, pairs.tokens);
  const at::Tensor weights = topk_weights.reshape({-1}).index_select(0, order).to(hidden.scalar_type()).unsqueeze(1);
  // [P, 2I]: saved by the forward or recomputed (x W13[e]^T, W13 read as its transpose).
  const at::Tensor pre =
      gate_up.defined() ? gate_up.index_select(0, order) : at::_grouped_mm(x, w1.transpose(1, 2), offsets);
  const GatedBackward gb = gated_activation_backward(pre, at::_grouped_mm(dy, w2c, offsets), weights, activation);
  const at::Tensor grad_x = at::_grouped_mm(gb.d_gate_up, w1, offsets);

  at::Tensor grad_w13 = w13.new_empty({0}), grad_w2 = w2.new_empty({0});
  if (weight_grads) {
    // [E, H, I] and [E, 2I, H]: each expert's rows summed over its group (K-grouped GEMMs; an
    // expert without rows gets zeros).
    grad_w2 = at::_grouped_mm((dy * weights).t(), gb.act, offsets);
    grad_w13 = at::_grouped_mm(gb.d_gate_up.t(), x, offsets);
  }
  at::Tensor grad_weights_by_pair = at::empty(gb.grad_weights.sizes(), topk_weights.options());
  grad_weights_by_pair.index_copy_(0, order, gb.grad_weights.to(topk_weights.scalar_type()));
  return {combine(grad_x, order, tokens, top_k), grad_w13, grad_w2, grad_weights_by_pair.view({tokens, top_k})};
}
#else
at::Tensor fused_moe_forward_grouped(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const at::Tensor&, Activation) {
  TORCH_CHECK(false, "fused_moe_forward_grouped needs torch's _grouped_mm (torch >= 2.8)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_grouped(
    const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
    Activation, const at::Tensor&, bool) {
  TORCH_CHECK(false, "fused_moe_backward_grouped needs torch's _grouped_mm (torch >= 2.8)");
}
#endif

}  // namespace torch_ext::moe
