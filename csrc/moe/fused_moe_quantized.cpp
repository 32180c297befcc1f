// fused_moe_quantized: the MoE experts with weights in the weight-only packed layout
// (docs/quant-layout.md), one packed matrix per expert stacked along a leading E dimension.
//   - CUDA decode (at most kRowExpertMaxPairs (token, slot) pairs): each GEMM is one launch of
//     the weight-only kernel in row-expert mode (a CTA per pair and column block, its expert's
//     weights found on the device): gate/up [pairs, 2I], the gated activation, down [pairs, H],
//     the slots weighted and summed in fp32. No host sync (CUDA-graph capturable); an expert
//     chosen by several pairs is streamed once per pair, which is why larger batches take:
//   - otherwise each expert's rows run through weight_only_linear, with grouping and combine
//     those of fused_moe's composite (moe/fused_moe_composite.h): the per-expert row counts are
//     read on the host (a device sync on CUDA).
// Both stream the 4-bit weights as stored (the fused dequantizing kernels of
// quant/weight_only.cpp) and sum a token's slots in slot order.
#include <ATen/TensorOperators.h>

#include <string>

#include "common/torch_utils.h"
#include "moe/fused_moe_composite.h"
#include "moe/expert_op_checks.h"
#include "ops.h"

namespace torch_ext {

namespace {

// Pairs up to which CUDA runs the row-expert GEMMs: a decode batch (Mixtral k = 2: 8 tokens;
// DeepSeek k = 6: 2). A first choice, not yet measured against the per-expert path.
constexpr int64_t kRowExpertMaxPairs = 16;

c10::optional<at::Tensor> expert_slice(const c10::optional<at::Tensor>& t, int64_t e) {
  return t ? c10::optional<at::Tensor>((*t)[e]) : c10::nullopt;
}

void check_stacked(const char* op, const char* prefix, const at::Tensor& qweight, const at::Tensor& scales,
                   const c10::optional<at::Tensor>& zeros, int64_t experts, int64_t out_features) {
  TORCH_EXT_CHECK(qweight.dim() == 4 && qweight.size(0) == experts, op, prefix,
                  "_qweight must be [E, N/16, K/16, 8*bits] with E = ", experts, ", got shape ", qweight.sizes());
  TORCH_EXT_CHECK(scales.dim() == 3 && scales.size(0) == experts && scales.size(2) == out_features, op, prefix,
                  "_scales must be [E, groups, N] = [", experts, ", groups, ", out_features, "], got shape ",
                  scales.sizes());
  if (zeros) {
    TORCH_EXT_CHECK(zeros->sizes() == scales.sizes(), op, prefix, "_zeros must have ", prefix, "_scales' shape ",
                    scales.sizes(), ", got ", zeros->sizes());
  }
}

}  // namespace

at::Tensor fused_moe_quantized(const at::Tensor& hidden, const at::Tensor& w13_qweight, const at::Tensor& w13_scales,
                               const c10::optional<at::Tensor>& w13_zeros, const at::Tensor& w2_qweight,
                               const at::Tensor& w2_scales, const c10::optional<at::Tensor>& w2_zeros,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                               c10::string_view activation, int64_t bits, int64_t group_size) {
  const char* op = "fused_moe_quantized";
  TORCH_EXT_CHECK(hidden.dim() == 2, op, "hidden must be [T, H], got shape ", hidden.sizes());
  TORCH_EXT_CHECK(w13_scales.dim() == 3 && w13_scales.size(2) % 2 == 0, op,
                  "w13_scales must be [E, groups, 2I], got shape ", w13_scales.sizes());
  const int64_t experts = w13_scales.size(0), hidden_size = hidden.size(1);
  check_stacked(op, "w13", w13_qweight, w13_scales, w13_zeros, experts, w13_scales.size(2));
  check_stacked(op, "w2", w2_qweight, w2_scales, w2_zeros, experts, hidden_size);
  check_same_device(op, "topk_weights", topk_weights, "hidden", hidden);
  check_same_device(op, "topk_ids", topk_ids, "hidden", hidden);
  moe::check_routing(op, topk_weights, topk_ids, hidden.size(0), experts);
  const moe::Activation act = moe::parse_activation(op, activation);
  if (hidden.is_cuda() && topk_ids.numel() <= kRowExpertMaxPairs) {
    const int64_t tokens = hidden.size(0), top_k = topk_ids.size(1);
    const at::Tensor ids = topk_ids.reshape({-1}).contiguous();
    const at::Tensor gate_up = weight_only_linear_row_experts(op, hidden, w13_qweight, w13_scales, w13_zeros, ids,
                                                              top_k, bits, group_size);
    const at::Tensor y = weight_only_linear_row_experts(op, moe::gated_activation_kernel(gate_up, act), w2_qweight,
                                                        w2_scales, w2_zeros, ids, 1, bits, group_size);
    return (y.view({tokens, top_k, hidden_size}).to(at::kFloat) * topk_weights.unsqueeze(2))
        .sum(1)
        .to(hidden.scalar_type());
  }
  return moe::run_grouped_experts(hidden, topk_weights, topk_ids, experts, [&](int64_t e, const at::Tensor& rows) {
    const at::Tensor gate_up = weight_only_linear(rows, w13_qweight[e], w13_scales[e], expert_slice(w13_zeros, e),
                                                  c10::nullopt, bits, group_size);
    const at::Tensor act_rows = moe::gated_activation(gate_up, act);
    return weight_only_linear(act_rows, w2_qweight[e], w2_scales[e], expert_slice(w2_zeros, e), c10::nullopt, bits,
                              group_size);
  });
}

}  // namespace torch_ext
