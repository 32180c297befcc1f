// route_warp_kernel of csrc/moe/moe_route_cuda.cu simulated on the CPU: moe::route_token_warp
// (csrc/moe/routing_warp.h) runs with 32 lane states and the same xor butterfly over arrays that
// the device does with shuffles, on random routing problems, against moe::route_token (the
// serial function the CPU op runs): the same experts in the same order, weights to rounding
// (the softmax denominator is summed in another order), and every combine leaves all 32 lanes
// equal (what lets the device code stay warp-uniform).
//   moe_route_cuda_sim CASES SEED
#include <cmath>
#include <random>

#include "moe/routing.h"
#include "moe/routing_warp.h"
#include "sim_common.h"

namespace moe = torch_ext::moe;

namespace {

std::mt19937_64 rng;

int uniform(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); }

// The warp policy of routing_warp.h with 32 lanes in lockstep: the device's DeviceWarp, unrolled.
struct HostWarp {
  template <typename S>
  struct Lanes {
    S state[moe::kWarpLanes];
  };
  template <typename S, typename F>
  void each(Lanes<S>& lanes, F f) const {
    for (int lane = 0; lane < moe::kWarpLanes; ++lane) f(lane, lanes.state[lane]);
  }
  template <typename S, typename V, typename C>
  auto reduce(const Lanes<S>& lanes, V value, C combine) const {
    using T = decltype(value(0, lanes.state[0]));
    T v[moe::kWarpLanes], next[moe::kWarpLanes];
    for (int lane = 0; lane < moe::kWarpLanes; ++lane) v[lane] = value(lane, lanes.state[lane]);
    for (int offset = moe::kWarpLanes / 2; offset > 0; offset /= 2) {
      for (int lane = 0; lane < moe::kWarpLanes; ++lane) next[lane] = combine(v[lane], v[lane ^ offset]);
      std::copy(next, next + moe::kWarpLanes, v);
    }
    for (int lane = 1; lane < moe::kWarpLanes; ++lane) CHECK(memcmp(&v[lane], &v[0], sizeof(T)) == 0);
    return v[0];
  }
  bool leader() const { return true; }  // the lanes' shared part runs once here
};

struct Problem {
  moe::RouteConfig config;
  std::vector<float> logits, bias;
  bool with_bias;
};

Problem random_problem() {
  static const int kExperts[] = {1, 2, 7, 8, 31, 32, 33, 60, 64, 128, 160, 256, 512};
  Problem p{};
  moe::RouteConfig& c = p.config;
  c.num_experts = kExperts[uniform(0, int(std::size(kExperts)) - 1)];
  c.scoring = uniform(0, 1) ? moe::Scoring::kSigmoid : moe::Scoring::kSoftmax;
  c.renormalize = uniform(0, 1);
  c.routed_scaling_factor = uniform(0, 1) ? 1.0f : 2.5f;
  c.num_expert_group = c.topk_group = 1;
  if (uniform(0, 2) > 0) {  // groups: a divisor of E up to 32
    std::vector<int> divisors;
    for (int g = 2; g <= std::min(32, c.num_experts); ++g)
      if (c.num_experts % g == 0) divisors.push_back(g);
    if (!divisors.empty()) {
      c.num_expert_group = divisors[uniform(0, int(divisors.size()) - 1)];
      c.topk_group = uniform(1, c.num_expert_group);
    }
  }
  const int eligible = c.topk_group * (c.num_experts / c.num_expert_group);
  c.top_k = uniform(1, std::min(eligible, 9));
  // Integer-valued logits in a narrow range plant ties (broken by the lower index on both
  // sides); continuous ones are the common case.
  const bool ties = uniform(0, 3) == 0;
  std::normal_distribution<float> normal(0.0f, 2.0f);
  for (int i = 0; i < c.num_experts; ++i) p.logits.push_back(ties ? float(uniform(-2, 2)) : normal(rng));
  p.with_bias = c.scoring == moe::Scoring::kSigmoid && uniform(0, 1);
  for (int i = 0; i < c.num_experts; ++i) p.bias.push_back(ties ? 0.25f * uniform(-1, 1) : 0.1f * normal(rng));
  return p;
}

void check_case() {
  const Problem p = random_problem();
  const moe::RouteConfig& c = p.config;
  CHECK(moe::warp_routing_supported(c));
  const auto to_f32 = [](float v) { return v; };
  const float* bias = p.with_bias ? p.bias.data() : nullptr;
  const int e = c.num_experts, k = c.top_k;

  std::vector<float> scratch(size_t(moe::route_scratch_floats(c))), weights(k, NAN), warp_weights(k, NAN);
  std::vector<int32_t> ids(k, -7), warp_ids(k, -7);
  std::vector<uint8_t> flags(e);
  bool* eligible = reinterpret_cast<bool*>(flags.data());
  moe::route_token(c, p.logits.data(), bias, to_f32, scratch.data(), scratch.data() + e, eligible, weights.data(),
                   ids.data());
  moe::route_token_warp(HostWarp{}, c, p.logits.data(), bias, to_f32, warp_weights.data(), warp_ids.data());
  // Softmax totals summed in two orders differ by up to E roundings of the serial sum.
  const float tolerance = std::max(1e-6f, 2.0f * float(e) * 0x1p-24f);
  for (int j = 0; j < k; ++j) {
    if (warp_ids[j] != ids[j] || !(std::fabs(warp_weights[j] - weights[j]) <= tolerance * std::fabs(weights[j]) + 1e-7f)) {
      fprintf(stderr, "E=%d k=%d %s groups %d/%d bias %d rank %d: warp (%d, %.9g) serial (%d, %.9g)\n", e, k,
              c.scoring == moe::Scoring::kSoftmax ? "softmax" : "sigmoid", c.topk_group, c.num_expert_group,
              int(p.with_bias), j, warp_ids[j], warp_weights[j], ids[j], weights[j]);
      abort();
    }
  }
}

void check_limits() {
  moe::RouteConfig c{};
  c.num_experts = 512, c.num_expert_group = 32, c.top_k = 8;
  CHECK(moe::warp_routing_supported(c));
  c.num_experts = 513;
  CHECK(!moe::warp_routing_supported(c));
  c.num_experts = 512, c.num_expert_group = 64;
  CHECK(!moe::warp_routing_supported(c));
  // Candidates: larger value, then lower index, "none" loses; commutative.
  const moe::Candidate a{1.0f, 5, 0.0f}, b{1.0f, 3, 0.0f}, none{-INFINITY, moe::kNoCandidate, 0.0f};
  CHECK(moe::better_candidate(a, b).index == 3 && moe::better_candidate(b, a).index == 3);
  CHECK(moe::better_candidate(none, a).index == 5 && moe::better_candidate(a, none).index == 5);
  const moe::Top2 t = moe::merge_top2({3.0f, 1.0f}, {3.0f, 2.0f});
  CHECK(t.first == 3.0f && t.second == 3.0f);
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 100;
  const uint64_t seed = argc > 2 ? strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  check_limits();
  for (int i = 0; i < 20 * cases; ++i) check_case();
  printf("all ok\n");
  return 0;
}
