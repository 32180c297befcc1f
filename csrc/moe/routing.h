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

// Index of the largest value among `count` values with eligible[i], lowest index on ties; -1 if none.
TORCH_EXT_HOST_DEVICE int32_t argmax_eligible(const float* values, const bool* eligible, int32_t count) {
  int32_t best = -1;
  for (int32_t i = 0; i < count; ++i)
    if (eligible[i] && (best < 0 || values[i] > values[best])) best = i;
  return best;
}

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

// Routes one token. scratch: 3 * num_experts floats-or-flags worth of caller memory:
// scores[E], biased[E] (floats) and eligible[E] (bools). logits may be any float type T.
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
    const int32_t size = e / c.num_expert_group;
    // Groups are ranked by score; the best topk_group stay. group_kept marks them, using the
    // eligibility flags of each group's first expert as scratch for "not yet ranked".
    for (int32_t g = 0; g < c.num_expert_group; ++g) eligible[g * size] = false;  // false: not kept (yet)
    for (int32_t round = 0; round < c.topk_group; ++round) {
      int32_t best = -1;
      float best_score = -INFINITY;
      for (int32_t g = 0; g < c.num_expert_group; ++g) {
        if (eligible[g * size]) continue;
        const float s = group_score(biased + g * size, size, c.scoring);
        if (best < 0 || s > best_score) best = g, best_score = s;
      }
      eligible[best * size] = true;
    }
    for (int32_t g = 0; g < c.num_expert_group; ++g) {
      const bool kept = eligible[g * size];
      for (int32_t i = 0; i < size; ++i) eligible[g * size + i] = kept;
    }
  }
  float chosen_sum = 0.0f;
  for (int32_t j = 0; j < c.top_k; ++j) {
    const int32_t best = argmax_eligible(biased, eligible, e);
    eligible[best] = false;
    topk_ids[j] = best;
    topk_weights[j] = scores[best];
    chosen_sum += scores[best];
  }
  const float scale = (c.renormalize && chosen_sum > 0.0f ? 1.0f / chosen_sum : 1.0f) * c.routed_scaling_factor;
  for (int32_t j = 0; j < c.top_k; ++j) topk_weights[j] *= scale;
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
