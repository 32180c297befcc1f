// moe_route: checks, allocation, and the per-token routing of moe/routing.h over the batch on
// the CPU, or its CUDA launcher (moe/moe_route_cuda.cu runs the same routing functions).
#include <ATen/ops/empty.h>

#include <memory>
#include <string>
#include <vector>

#include "common/cpu/parallel.h"
#include "common/float_bits.h"
#include "common/torch_utils.h"
#include "moe/routing.h"
#include "ops.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe/moe_route_cuda.h"
#endif

namespace torch_ext {

std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& router_logits, int64_t top_k, bool renormalize,
                                             c10::string_view scoring, int64_t num_expert_group, int64_t topk_group,
                                             const c10::optional<at::Tensor>& correction_bias,
                                             double routed_scaling_factor) {
  const char* op = "moe_route";
  check_dtype(op, "router_logits", router_logits, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_EXT_CHECK(router_logits.dim() == 2, op, "router_logits must be [T, E], got shape ", router_logits.sizes());
  const int64_t tokens = router_logits.size(0), experts = router_logits.size(1);
  TORCH_EXT_CHECK(scoring == "softmax" || scoring == "sigmoid", op, "scoring must be 'softmax' or 'sigmoid', got '",
                  std::string(scoring), "'");
  TORCH_EXT_CHECK(experts >= 1, op, "router_logits must have at least one expert column");
  TORCH_EXT_CHECK(num_expert_group >= 1 && experts % num_expert_group == 0, op,
                  "num_expert_group must be >= 1 and divide the number of experts ", experts, ", got ",
                  num_expert_group);
  TORCH_EXT_CHECK(topk_group >= 1 && topk_group <= num_expert_group, op, "topk_group must be in [1, ",
                  num_expert_group, "], got ", topk_group);
  const int64_t eligible_experts = topk_group * (experts / num_expert_group);
  TORCH_EXT_CHECK(top_k >= 1 && top_k <= eligible_experts, op, "top_k must be in [1, ", eligible_experts,
                  "] (experts in the kept groups), got ", top_k);
  at::Tensor bias;
  if (correction_bias) {
    check_same_device(op, "correction_bias", *correction_bias, "router_logits", router_logits);
    TORCH_EXT_CHECK(correction_bias->dim() == 1 && correction_bias->size(0) == experts, op,
                    "correction_bias must be [E] = [", experts, "], got shape ", correction_bias->sizes());
    bias = correction_bias->to(at::kFloat).contiguous();
  }
  const at::Tensor logits = router_logits.contiguous();
  at::Tensor weights = at::empty({tokens, top_k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, top_k}, logits.options().dtype(at::kInt));
  const moe::RouteConfig config{int32_t(experts), int32_t(top_k),
                                scoring == "softmax" ? moe::Scoring::kSoftmax : moe::Scoring::kSigmoid, renormalize,
                                int32_t(num_expert_group), int32_t(topk_group), float(routed_scaling_factor)};
  const float* bias_data = bias.defined() ? bias.data_ptr<float>() : nullptr;
  if (logits.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(logits.device());
    const cuda::MoeRouteParams p{config, tokens, scalar_kind(logits), logits.data_ptr(), bias_data,
                                 weights.data_ptr<float>(), ids.data_ptr<int32_t>()};
    at::Tensor workspace = at::empty({cuda::moe_route_workspace_bytes(p)}, logits.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::moe_route(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
    return {weights, ids};
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  float* weight_data = weights.data_ptr<float>();
  int32_t* id_data = ids.data_ptr<int32_t>();
  visit_storage_type(scalar_kind(logits), [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      const T* data = static_cast<const T*>(logits.data_ptr());
      cpu::parallel_for(0, tokens, std::max<int64_t>(1, 4096 / experts), [&](int64_t begin, int64_t end) {
        std::vector<float> scores(size_t(moe::route_scratch_floats(config)));
        std::unique_ptr<bool[]> eligible(new bool[size_t(experts)]);
        for (int64_t t = begin; t < end; ++t) {
          moe::route_token(config, data + t * experts, bias_data, [](T v) { return to_float(v); }, scores.data(),
                           scores.data() + experts, eligible.get(),
                           weight_data + t * top_k, id_data + t * top_k);
        }
      });
    }
  });
  return {weights, ids};
}

}  // namespace torch_ext
