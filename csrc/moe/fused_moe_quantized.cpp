// fused_moe_quantized: the MoE experts with weights in the weight-only packed layout
// (docs/quant-layout.md), one packed matrix per expert stacked along a leading E dimension.
// CUDA, all without host synchronization (CUDA-graph capturable) up to kGroupedMaxRowsPerExpert:
//   - one token (decode at batch 1): each GEMM is one launch of the weight-only kernel in
//     row-expert mode, a CTA per (token, slot) pair and column block, its expert's weights found
//     on the device (a token's top-k experts are distinct, so no expert is streamed twice);
//   - more tokens: the pairs grouped by expert on the device (cuda::expert_row_plan, fused_moe's
//     plan kernels, each expert's rows padded to the GEMM's 16- or 64-row block), the hidden
//     rows gathered in that order, and each GEMM one launch over the grouped rows, a CTA per
//     block of one expert's rows: every active expert's weights are streamed once per block,
//     not once per pair. The grid covers the most rows any routing can need; blocks past the
//     grouped rows skip the k loop and write zeros, which nothing reads.
// Both: gate/up, the gated activation, down, then per token its slots weighted and summed in
// fp32 in slot order. Beyond kGroupedMaxRowsPerExpert rows per expert on average (prefill) and
// on the CPU, each expert's rows run through weight_only_linear (on CUDA: dequantize + cuBLAS
// for an expert of more than 256 rows), with the grouping and combine of fused_moe's composite
// (moe/fused_moe_composite.h): the per-expert row counts are read on the host (a device sync on
// CUDA). On the CPU, small experts run side by side, one per thread, rather than each on all
// threads in turn.
#include <ATen/TensorOperators.h>

#include <algorithm>
#include <string>

#include "common/torch_utils.h"
#include "moe/expert_op_checks.h"
#include "moe/expert_plan.h"
#include "moe/fused_moe_composite.h"
#include "ops.h"
#include "quant/weight_only.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe/fused_moe_cuda.h"
#include "quant/weight_only_cuda.h"
#endif

namespace torch_ext {

namespace {

// Average rows per expert up to which CUDA runs the grouped GEMMs: weight_only_linear's own bound
// for its fused kernel (beyond it, dequantize + cuBLAS is faster).
constexpr int64_t kGroupedMaxRowsPerExpert = kWeightOnlyDirectRowsCuda;
// CPU: experts of at most this many rows (weight_only_linear's decode kernel) run side by side,
// one per thread (moe::run_grouped_experts): measured 1.04-1.21x at T = 16 and 64 for Mixtral-
// and DeepSeek-V2-Lite-shaped experts (0.97x at DeepSeek T = 4), docs/perf/moe.md.
constexpr int64_t kSideBySideMaxRows = 64;

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

// out [T, H]: y_by_pair [T k, H] (pair t k + j = token t's slot j) weighted by topk_weights [T, k]
// and summed over each token's slots in slot order, in fp32, rounded once to `dtype`.
at::Tensor weighted_slot_sum(const at::Tensor& y_by_pair, const at::Tensor& topk_weights, at::ScalarType dtype) {
  const int64_t tokens = topk_weights.size(0), top_k = topk_weights.size(1);
  return (y_by_pair.view({tokens, top_k, y_by_pair.size(1)}).to(at::kFloat) * topk_weights.unsqueeze(2))
      .sum(1)
      .to(dtype);
}

// The (token, slot) pairs grouped by expert on the device (cuda::expert_row_plan): for each grouped
// row its expert (-1 past the rows) and token, each pair's row, and the row block.
struct GroupedRows {
  at::Tensor expert, token, of_pair;
  int64_t block;
};
GroupedRows group_rows_by_expert(const at::Tensor& hidden, const at::Tensor& topk_ids, int64_t experts) {
#if defined(TORCH_EXT_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(hidden.device());
  const int64_t top_k = topk_ids.size(1), pairs = topk_ids.numel();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, hidden.get_device()));
  GroupedRows g;
  g.block = cuda::weight_only_expert_block_rows(pairs, experts);
  const int64_t rows = moe::max_grouped_rows(pairs, experts, g.block);
  const at::TensorOptions ints = hidden.options().dtype(at::kInt);
  g.expert = at::empty({rows}, ints);
  g.token = at::empty({rows}, ints);
  g.of_pair = at::empty({pairs}, ints);
  const at::Tensor workspace = at::empty(
      {cuda::expert_row_plan_workspace_bytes(pairs, int32_t(experts), g.block, num_sms)}, ints.dtype(at::kByte));
  const at::Tensor ids = topk_ids.reshape({-1}).contiguous();
  const cuda::ExpertRowPlan plan{ids.data_ptr<int32_t>(), pairs, int(top_k), int32_t(experts), g.block,
                                 g.expert.data_ptr<int32_t>(), g.token.data_ptr<int32_t>(),
                                 g.of_pair.data_ptr<int32_t>()};
  C10_CUDA_CHECK(cuda::expert_row_plan(plan, workspace.data_ptr(), num_sms, c10::cuda::getCurrentCUDAStream()));
  return g;
#else
  (void)hidden, (void)topk_ids, (void)experts;
  TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
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
  const int64_t tokens = hidden.size(0), top_k = topk_ids.size(1), pairs = tokens * top_k;
  const int64_t experts_used = std::min(pairs, experts);  // that can have rows
  if (hidden.is_cuda() && pairs <= kGroupedMaxRowsPerExpert * experts_used) {
    // The same two GEMMs for both CUDA paths, rows picked by row_experts in blocks of expert_rows.
    const auto experts_mlp = [&](const at::Tensor& x, const at::Tensor& row_experts, int64_t expert_rows,
                                 int64_t x_row_divisor) {
      const at::Tensor gate_up = weight_only_linear_row_experts(op, x, w13_qweight, w13_scales, w13_zeros, row_experts,
                                                                expert_rows, x_row_divisor, bits, group_size);
      return weight_only_linear_row_experts(op, moe::gated_activation_kernel(gate_up, act), w2_qweight, w2_scales,
                                            w2_zeros, row_experts, expert_rows, 1, bits, group_size);
    };
    if (tokens <= 1) {
      const at::Tensor ids = topk_ids.reshape({-1}).contiguous();
      return weighted_slot_sum(experts_mlp(hidden, ids, 1, top_k), topk_weights, hidden.scalar_type());
    }
    const GroupedRows rows = group_rows_by_expert(hidden, topk_ids, experts);
    const at::Tensor y = experts_mlp(hidden.index_select(0, rows.token), rows.expert, rows.block, 1);
    return weighted_slot_sum(y.index_select(0, rows.of_pair), topk_weights, hidden.scalar_type());
  }
  const auto expert_mlp = [&](int64_t e, const at::Tensor& rows) {
    const at::Tensor gate_up = weight_only_linear(rows, w13_qweight[e], w13_scales[e], expert_slice(w13_zeros, e),
                                                  c10::nullopt, bits, group_size);
    const at::Tensor act_rows = moe::gated_activation_kernel(gate_up, act);
    return weight_only_linear(act_rows, w2_qweight[e], w2_scales[e], expert_slice(w2_zeros, e), c10::nullopt, bits,
                              group_size);
  };
  return moe::run_grouped_experts(hidden, topk_weights, topk_ids, experts, expert_mlp, kSideBySideMaxRows);
}

}  // namespace torch_ext
