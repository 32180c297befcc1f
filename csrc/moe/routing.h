// MoE routing of one token: scores, optional expert groups, top-k, renormalization, scaling.
// Host+device functions (the CPU kernel runs them per token; a CUDA kernel can run them per
// thread or warp), so the selection logic is written and tested once.
//
//   scores  = softmax(logits) ('softmax': Mixtral, Qwen-MoE) or sigmoid(logits) ('sigmoid':
//             DeepSeek-V3)
//   biased  = scores + correction_bias (selection only; the weights use `scores`)
//   groups  : experts split into num_expert_group equal groups; a group's score is the max of
//             its biased scores (softmax, DeepSeek-V2) or the sum of its two largest (sigmoid,
//             DeepSeek-V3); only the topk_group best groups stay eligible
//   top-k   : the k eligible experts with the largest biased score, in descending order (ties:
//             the lower expert index first)
//   weights = scores of the chosen experts, divided by their sum when renormalize, times
//             routed_scaling_factor
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"

namespace torch_ext::moe {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

enum class Scoring : int32_t { kSoftmax = 0, kSigmoid = 1 };

struct RouteConfig {
  int32_t num_experts, top_k;
  Scoring scoring;
  bool renormalize;
  int32_t num_expert_group, topk_group;  // 1, 1: no grouping
  float routed_scaling_factor;
};

// Group score: max of the group's values (softmax), or the sum of its two largest (sigmoid).
TORCH_EXT_HOST_DEVICE float group_score(const float* values, int32_t size, Scoring scoring) {
  float first = -INFINITY, second = -INFINITY;
  for (int32_t i = 0; i < size; ++i) {
    if (values[i] > first) {
      second = first;
      first = values[i];
    } else if (values[i] > second) {
      second = values[i];
    }
  }
  if (scoring == Scoring::kSoftmax || size < 2) return first;
  return first + second;
}

// Bytes of the floats route_token needs per token: scores[E] and biased[E + num_expert_group]
// (the groups' scores after the experts'); plus E bools of eligibility.
TORCH_EXT_HOST_DEVICE int64_t route_scratch_floats(const RouteConfig& c) {
  return 2 * int64_t(c.num_experts) + (c.num_expert_group > 1 ? c.num_expert_group : 0);
}

// Appends expert `id` with selection value `value` to the ranking ids[0..count) / values[0..count),
// kept in descending value (ties: the lower id first, as experts arrive in increasing id) and
// capped at k entries. Returns the new count.
TORCH_EXT_HOST_DEVICE int32_t rank_insert(int32_t* ids, float* values, int32_t count, int32_t k, int32_t id,
                                          float value) {
  if (count == k && !(value > values[k - 1])) return count;
  int32_t pos = count < k ? count : k - 1;
  while (pos > 0 && value > values[pos - 1]) {
    ids[pos] = ids[pos - 1];
    values[pos] = values[pos - 1];
    --pos;
  }
  ids[pos] = id;
  values[pos] = value;
  return count < k ? count + 1 : count;
}

// Routes one token. scratch: scores (E floats), biased (E + num_expert_group floats, see
// route_scratch_floats) and eligible (E bools) of caller memory. logits may be any float type T.
// One pass scores the experts, one scores the groups, one ranks the eligible experts (the top-k
// list is built in place in topk_ids / topk_weights, then the weights are read from scores).
template <typename T, typename ToFloat>
TORCH_EXT_HOST_DEVICE void route_token(const RouteConfig& c, const T* logits, const float* correction_bias,
                                       ToFloat to_f32, float* scores, float* biased, bool* eligible,
                                       float* topk_weights, int32_t* topk_ids) {
  const int32_t e = c.num_experts;
  if (c.scoring == Scoring::kSoftmax) {
    float max_logit = -INFINITY;
    for (int32_t i = 0; i < e; ++i) max_logit = fmaxf(max_logit, to_f32(logits[i]));
    float total = 0.0f;
    for (int32_t i = 0; i < e; ++i) total += scores[i] = expf(to_f32(logits[i]) - max_logit);
    for (int32_t i = 0; i < e; ++i) scores[i] /= total;
  } else {
    for (int32_t i = 0; i < e; ++i) scores[i] = 1.0f / (1.0f + expf(-to_f32(logits[i])));
  }
  for (int32_t i = 0; i < e; ++i) {
    biased[i] = scores[i] + (correction_bias ? correction_bias[i] : 0.0f);
    eligible[i] = true;
  }
  if (c.num_expert_group > 1) {
    // Groups are ranked by score; the best topk_group stay (ties: the lower group). The
    // eligibility flag of each group's first expert marks "kept" while ranking.
    const int32_t groups = c.num_expert_group, size = e / groups;
    float* const group_scores = biased + e;
    for (int32_t g = 0; g < groups; ++g) {
      group_scores[g] = group_score(biased + g * size, size, c.scoring);
      eligible[g * size] = false;
    }
    for (int32_t round = 0; round < c.topk_group; ++round) {
      int32_t best = -1;
      for (int32_t g = 0; g < groups; ++g)
        if (!eligible[g * size] && (best < 0 || group_scores[g] > group_scores[best])) best = g;
      eligible[best * size] = true;
    }
    for (int32_t g = 0; g < groups; ++g) {
      const bool kept = eligible[g * size];
      for (int32_t i = 0; i < size; ++i) eligible[g * size + i] = kept;
    }
  }
  int32_t count = 0;
  for (int32_t i = 0; i < e; ++i)
    if (eligible[i]) count = rank_insert(topk_ids, topk_weights, count, c.top_k, i, biased[i]);
  float chosen_sum = 0.0f;
  for (int32_t j = 0; j < c.top_k; ++j) {
    topk_weights[j] = scores[topk_ids[j]];
    chosen_sum += topk_weights[j];
  }
  const float scale = (c.renormalize && chosen_sum > 0.0f ? 1.0f / chosen_sum : 1.0f) * c.routed_scaling_factor;
  for (int32_t j = 0; j < c.top_k; ++j) topk_weights[j] *= scale;
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
