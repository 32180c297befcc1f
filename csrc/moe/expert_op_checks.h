// Argument checks shared by the MoE expert ops (fused_moe*, fused_moe_quantized); torch-facing code only.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/_assert_async.h>
#include <ATen/ops/logical_or.h>

#include <string>

#include "common/torch_utils.h"
#include "moe/fused_moe.h"

namespace torch_ext::moe {

inline Activation parse_activation(const char* op, c10::string_view activation) {
  TORCH_EXT_CHECK(activation == "silu" || activation == "gelu", op, "activation must be 'silu' or 'gelu', got '",
                  std::string(activation), "'");
  return activation == "silu" ? Activation::kSilu : Activation::kGelu;
}

// topk_weights fp32 and topk_ids int32, both [T, k] with 1 <= k <= E, every id in [0, E). On
// CUDA the id range is checked by a device-side assert (no host sync; reported at the next
// synchronizing call), on the CPU with an error naming the offending range.
inline void check_routing(const char* op, const at::Tensor& topk_weights, const at::Tensor& topk_ids, int64_t tokens,
                          int64_t experts) {
  check_dtype(op, "topk_weights", topk_weights, {at::kFloat});
  check_dtype(op, "topk_ids", topk_ids, {at::kInt});
  TORCH_EXT_CHECK(topk_ids.dim() == 2 && topk_ids.size(0) == tokens, op, "topk_ids must be [T, k] with T = ", tokens,
                  ", got shape ", topk_ids.sizes());
  TORCH_EXT_CHECK(topk_weights.sizes() == topk_ids.sizes(), op, "topk_weights must have topk_ids' shape ",
                  topk_ids.sizes(), ", got ", topk_weights.sizes());
  const int64_t top_k = topk_ids.size(1);
  TORCH_EXT_CHECK(top_k >= 1 && top_k <= experts, op, "top_k (topk_ids.size(1)) must be in [1, E = ", experts,
                  "], got ", top_k);
  if (topk_ids.numel() == 0) return;
  const at::Tensor out_of_range = at::logical_or(topk_ids.lt(0), topk_ids.ge(experts)).any();
  if (topk_ids.is_cuda()) {
    at::_assert_async(out_of_range.logical_not(), "torch_ext: topk_ids out of range [0, E)");
  } else {
    TORCH_EXT_CHECK(!out_of_range.item<bool>(), op, "every topk_ids entry must be in [0, E = ", experts, "), got min ",
                    topk_ids.min().item<int32_t>(), " and max ", topk_ids.max().item<int32_t>());
  }
}

}  // namespace torch_ext::moe
