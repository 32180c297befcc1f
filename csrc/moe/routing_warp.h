// moe::route_token (moe/routing.h) by the 32 lanes of a warp: one token per warp instead of one
// per thread, so T = 512 tokens become 512 warps over all SMs rather than 4 CTAs, and the E
// logits of a token are read by 32 lanes side by side (coalesced) instead of one thread.
//
// Lane l owns experts l, l + 32, l + 64, ... (at most kMaxExpertsPerLane of them, in registers).
// Every decision the serial route_token makes over all experts becomes a lane-local pass plus a
// warp reduction whose combine is commutative and associative, so the xor butterfly leaves the
// same result in every lane and no lane ever diverges from the others:
//   softmax           max of the logits, then the sum of exp(logit - max)
//   group scores      per group, the merge of the lanes' top-2 (max for softmax); lane g keeps
//                     group g's score (hence at most 32 groups)
//   group selection   topk_group rounds of "best not-yet-kept group" (ties: the lower group)
//   top-k             k rounds of "best eligible expert" (ties: the lower expert); the winner's
//                     score rides along, so every lane sums the chosen scores in rank order, as
//                     route_token does
// The only difference from route_token: the softmax denominator is summed in butterfly order,
// not index order (weights agree to rounding; the choice is unaffected, a common divisor keeping
// the order of the scores).
//
// The warp is a policy W, so this one function runs on the GPU (lanes are threads, reductions
// are shuffles) and on the CPU in the simulator (tests/cpp/moe_route_cuda_sim.cpp: 32 lane
// states, the same butterfly over arrays):
//   W::Lanes<S>                              per-lane state: S for this thread / S[32]
//   w.each(lanes, f)                         f(lane, state&) for every lane
//   w.reduce(lanes, value, combine) -> T     value(lane, state) combined over the warp
//   w.leader()                               true in one lane: it writes the token's outputs
#pragma once

#include <cmath>
#include <cstdint>

#include "common/macros.h"
#include "moe/routing.h"

namespace torch_ext::moe {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

constexpr int32_t kWarpLanes = 32;
// Up to 512 experts per token in registers (DeepSeek-V3 has 256: 8 per lane).
constexpr int32_t kMaxExpertsPerLane = 16;
constexpr int32_t kMaxWarpGroups = kWarpLanes;

// Whether route_token_warp handles this configuration (else the thread-per-token kernel does).
TORCH_EXT_HOST_DEVICE bool warp_routing_supported(const RouteConfig& c) {
  return c.num_experts >= 1 && c.num_experts <= kWarpLanes * kMaxExpertsPerLane &&
         c.num_expert_group <= kMaxWarpGroups;
}

// The largest two values seen (a multiset: two equal values are first and second).
struct Top2 {
  float first, second;
};
TORCH_EXT_HOST_DEVICE Top2 merge_top2(Top2 a, Top2 b) {
  return Top2{fmaxf(a.first, b.first), fmaxf(fminf(a.first, b.first), fmaxf(a.second, b.second))};
}

// A candidate of an argmax: larger value wins, then the lower index; `payload` rides along.
struct Candidate {
  float value;
  int32_t index;  // kNoCandidate: none
  float payload;
};
constexpr int32_t kNoCandidate = INT32_MAX;
TORCH_EXT_HOST_DEVICE Candidate better_candidate(Candidate a, Candidate b) {
  if (a.index == kNoCandidate) return b;
  if (b.index == kNoCandidate) return a;
  if (a.value != b.value) return a.value > b.value ? a : b;
  return a.index < b.index ? a : b;
}

// One lane's share of a token.
struct LaneRoute {
  float score[kMaxExpertsPerLane];   // softmax / sigmoid score of expert lane + 32 j
  float biased[kMaxExpertsPerLane];  // score + correction bias: what selection compares
  uint8_t group[kMaxExpertsPerLane];  // expert lane + 32 j's group (grouped selection only)
  uint32_t eligible;                 // bit j: expert lane + 32 j exists and may still be chosen
  float group_score;                 // of group `lane` (lane < num_expert_group)
  bool group_kept;
  float part;                        // a partial max / sum on its way into a reduction
};

TORCH_EXT_HOST_DEVICE int32_t expert_of(int32_t lane, int32_t slot) { return lane + kWarpLanes * slot; }

template <class W, typename T, typename ToFloat>
TORCH_EXT_HOST_DEVICE void route_token_warp(const W& w, const RouteConfig& c, const T* logits,
                                            const float* correction_bias, ToFloat to_f32, float* topk_weights,
                                            int32_t* topk_ids) {
  const int32_t e = c.num_experts;
  typename W::template Lanes<LaneRoute> lanes;
  const auto max_of = [](float a, float b) { return fmaxf(a, b); };
  const auto sum_of = [](float a, float b) { return a + b; };

  // Scores.
  w.each(lanes, [&](int32_t lane, LaneRoute& s) {
    s.eligible = 0;
    s.part = -INFINITY;
TORCH_EXT_UNROLL
    for (int32_t j = 0; j < kMaxExpertsPerLane; ++j) {
      const int32_t i = expert_of(lane, j);
      s.score[j] = i < e ? to_f32(logits[i]) : -INFINITY;
      if (i < e) s.eligible |= 1u << j, s.part = fmaxf(s.part, s.score[j]);
    }
  });
  if (c.scoring == Scoring::kSoftmax) {
    const float max_logit = w.reduce(lanes, [](int32_t, const LaneRoute& s) { return s.part; }, max_of);
    w.each(lanes, [&](int32_t, LaneRoute& s) {
      s.part = 0.0f;
TORCH_EXT_UNROLL
      for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
        if (s.eligible >> j & 1u) s.part += s.score[j] = expf(s.score[j] - max_logit);
    });
    const float total = w.reduce(lanes, [](int32_t, const LaneRoute& s) { return s.part; }, sum_of);
    w.each(lanes, [&](int32_t, LaneRoute& s) {
TORCH_EXT_UNROLL
      for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
        if (s.eligible >> j & 1u) s.score[j] /= total;
    });
  } else {
    w.each(lanes, [&](int32_t, LaneRoute& s) {
TORCH_EXT_UNROLL
      for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
        if (s.eligible >> j & 1u) s.score[j] = 1.0f / (1.0f + expf(-s.score[j]));
    });
  }
  w.each(lanes, [&](int32_t lane, LaneRoute& s) {
TORCH_EXT_UNROLL
    for (int32_t j = 0; j < kMaxExpertsPerLane; ++j) {
      const int32_t i = expert_of(lane, j);
      s.biased[j] = s.score[j] + (correction_bias && i < e ? correction_bias[i] : 0.0f);
    }
  });

  // Expert groups: score each, keep the best topk_group, drop the experts of the others.
  if (c.num_expert_group > 1) {
    const int32_t groups = c.num_expert_group, size = e / groups;
    // Each expert's group, divided out once: the loops below ask groups x experts times, and an
    // integer division by a run-time value is a ~20-instruction sequence on the GPU.
    w.each(lanes, [&](int32_t lane, LaneRoute& s) {
TORCH_EXT_UNROLL
      for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
        s.group[j] = (s.eligible >> j & 1u) ? uint8_t(expert_of(lane, j) / size) : uint8_t(0);
    });
    for (int32_t g = 0; g < groups; ++g) {
      const Top2 top = w.reduce(
          lanes,
          [&](int32_t lane, const LaneRoute& s) {
            Top2 t{-INFINITY, -INFINITY};
TORCH_EXT_UNROLL
            for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
              if ((s.eligible >> j & 1u) && s.group[j] == g) t = merge_top2(t, Top2{s.biased[j], -INFINITY});
            return t;
          },
          merge_top2);
      const float score = c.scoring == Scoring::kSoftmax || size < 2 ? top.first : top.first + top.second;
      w.each(lanes, [&](int32_t lane, LaneRoute& s) {
        if (lane == g) s.group_score = score, s.group_kept = false;
      });
    }
    uint32_t kept_groups = 0;
    for (int32_t round = 0; round < c.topk_group; ++round) {
      const Candidate best = w.reduce(
          lanes,
          [&](int32_t lane, const LaneRoute& s) {
            return lane < groups && !s.group_kept ? Candidate{s.group_score, lane, 0.0f}
                                                  : Candidate{-INFINITY, kNoCandidate, 0.0f};
          },
          better_candidate);
      kept_groups |= 1u << best.index;
      w.each(lanes, [&](int32_t lane, LaneRoute& s) {
        if (lane == best.index) s.group_kept = true;
      });
    }
    w.each(lanes, [&](int32_t lane, LaneRoute& s) {
TORCH_EXT_UNROLL
      for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
        if ((s.eligible >> j & 1u) && !(kept_groups >> s.group[j] & 1u)) s.eligible &= ~(1u << j);
    });
  }

  // Top-k over the eligible experts, in descending order; the weights are scaled once all are known.
  float chosen_sum = 0.0f;
  for (int32_t rank = 0; rank < c.top_k; ++rank) {
    const Candidate best = w.reduce(
        lanes,
        [&](int32_t lane, const LaneRoute& s) {
          Candidate local{-INFINITY, kNoCandidate, 0.0f};
TORCH_EXT_UNROLL
          for (int32_t j = 0; j < kMaxExpertsPerLane; ++j)
            if ((s.eligible >> j & 1u) && (local.index == kNoCandidate || s.biased[j] > local.value))
              local = Candidate{s.biased[j], expert_of(lane, j), s.score[j]};
          return local;
        },
        better_candidate);
    w.each(lanes, [&](int32_t lane, LaneRoute& s) {
      if (best.index % kWarpLanes == lane) s.eligible &= ~(1u << (best.index / kWarpLanes));
    });
    if (w.leader()) topk_ids[rank] = best.index, topk_weights[rank] = best.payload;
    chosen_sum += best.payload;
  }
  const float scale = (c.renormalize && chosen_sum > 0.0f ? 1.0f / chosen_sum : 1.0f) * c.routed_scaling_factor;
  if (w.leader())
    for (int32_t rank = 0; rank < c.top_k; ++rank) topk_weights[rank] *= scale;
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
