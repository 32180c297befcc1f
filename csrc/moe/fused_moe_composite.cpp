// fused_moe as ATen ops. Pairs (token, slot) are sorted by expert (stable), each expert's rows
// run through at::mm, and results go back to pair order and are summed over the k slots of a
// token: a fixed summation order on every device (no index_add, whose CUDA kernel uses atomics).
#include "moe/fused_moe_composite.h"

#include <ATen/Parallel.h>
#include <ATen/TensorOperators.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/bincount.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/sort.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <vector>

#include "common/large_output.h"
#include "moe/expert_backward.h"

namespace torch_ext::moe {
namespace {

struct Grouping : PairOrder {
  std::vector<int64_t> counts;  // [E] on the host: rows per expert
};

Grouping group_pairs(const at::Tensor& topk_ids, int64_t experts) {
  Grouping g{sort_pairs_by_expert(topk_ids), {}};
  const at::Tensor counts = at::bincount(g.expert, {}, experts).cpu();
  g.counts.assign(counts.data_ptr<int64_t>(), counts.data_ptr<int64_t>() + experts);
  return g;
}

// Whether the CPU runs the experts side by side (for_each_active_expert).
bool experts_side_by_side(const at::Tensor& like, const std::vector<int64_t>& counts, int64_t max_rows) {
  if (!like.is_cpu() || max_rows <= 0 || at::in_parallel_region()) return false;
  int64_t active = 0;
  for (const int64_t count : counts) {
    if (count > max_rows) return false;
    active += count > 0 ? 1 : 0;
  }
  return active >= 2 * int64_t(at::get_num_threads());
}

// fn(e) for every expert with rows (counts[e] > 0). On the CPU, when no expert has more than
// max_rows rows and at least two per thread have some, side by side: each thread takes the next
// expert (largest first) and runs it alone, its nested parallel loops inline (small experts scale
// poorly over threads: a 704 x 512 4-bit GEMM of 6 rows takes 61 us on one thread, 44 on two).
// Otherwise in expert order. fn must then be callable from several threads at once.
void for_each_active_expert(const at::Tensor& like, const std::vector<int64_t>& counts, int64_t max_rows,
                            const std::function<void(int64_t)>& fn) {
  std::vector<int64_t> order;
  for (int64_t e = 0; e < int64_t(counts.size()); ++e)
    if (counts[size_t(e)] > 0) order.push_back(e);
  if (!experts_side_by_side(like, counts, max_rows)) {
    for (const int64_t e : order) fn(e);
    return;
  }
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return counts[size_t(a)] > counts[size_t(b)]; });
  std::atomic<size_t> next{0};
  const at::ThreadLocalState caller;  // grad mode and dispatch keys: fn runs ATen ops as the caller would
  at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
    const at::ThreadLocalStateGuard guard(caller);
    for (size_t i = next++; i < order.size(); i = next++) fn(order[i]);
  });
}

// The backward's experts of at most this many rows run side by side on the CPU: measured 1.06-1.31x
// for fused_moe's forward + backward at T = 16 and 64, Mixtral- and DeepSeek-V2-Lite-shaped
// experts, fp32 and bf16 (docs/perf/moe.md).
constexpr int64_t kBackwardSideBySideMaxRows = 64;

// Row of each expert's first grouped row: [E + 1] prefix sums of the counts.
std::vector<int64_t> first_rows(const std::vector<int64_t>& counts) {
  std::vector<int64_t> first(counts.size() + 1, 0);
  for (size_t e = 0; e < counts.size(); ++e) first[e + 1] = first[e] + counts[e];
  return first;
}

}  // namespace

PairOrder sort_pairs_by_expert(const at::Tensor& topk_ids) {
  PairOrder p;
  p.expert = topk_ids.reshape({-1}).to(at::kLong);
  p.order = std::get<1>(at::sort(p.expert, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  p.tokens = p.order.div(topk_ids.size(1), "floor");
  return p;
}

at::Tensor activate(const at::Tensor& gate, Activation activation) {
  return activation == Activation::kSilu ? at::silu(gate) : at::gelu(gate);
}

at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& gate, Activation activation) {
  return activation == Activation::kSilu ? at::silu_backward(grad, gate) : at::gelu_backward(grad, gate);
}

GatedBackward gated_activation_backward(const at::Tensor& gate_up, const at::Tensor& d_act_unweighted,
                                        const at::Tensor& weights, Activation activation) {
  const int64_t intermediate = gate_up.size(1) / 2;
  const at::Tensor gate = gate_up.narrow(1, 0, intermediate), up = gate_up.narrow(1, intermediate, intermediate);
  const at::Tensor act_gate = activate(gate, activation);
  GatedBackward gb;
  gb.act = act_gate * up;
  // d(act) before the routing weight dotted with act is the routing weight's gradient
  // (dy . (W2 act) = (W2^T dy) . act), so the expert output itself is never needed.
  gb.grad_weights = (d_act_unweighted * gb.act).sum(1);
  const at::Tensor d_act = d_act_unweighted * weights;
  gb.d_gate_up =
      at::cat(std::vector<at::Tensor>{activation_backward(d_act * up, gate, activation), d_act * act_gate}, 1);
  return gb;
}

at::Tensor combine(const at::Tensor& grouped, const at::Tensor& order, int64_t tokens, int64_t top_k) {
  at::Tensor by_pair = at::empty_like(grouped);
  by_pair.index_copy_(0, order, grouped);
  return by_pair.view({tokens, top_k, grouped.size(1)}).sum(1);
}

at::Tensor gated_activation(const at::Tensor& gate_up, Activation activation) {
  const int64_t intermediate = gate_up.size(1) / 2;
  return activate(gate_up.narrow(1, 0, intermediate), activation) * gate_up.narrow(1, intermediate, intermediate);
}

at::Tensor gated_activation_kernel(const at::Tensor& gate_up, Activation activation) {
  if (activation != Activation::kSilu || gate_up.scalar_type() == at::kDouble) return gated_activation(gate_up, activation);
  static const auto silu_and_mul = c10::Dispatcher::singleton()
                                       .findSchemaOrThrow("torch_ext::silu_and_mul", "")
                                       .typed<at::Tensor(const at::Tensor&)>();
  return silu_and_mul.call(gate_up);
}

at::Tensor run_grouped_experts(const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                               int64_t experts, const ExpertMlp& expert_mlp, int64_t side_by_side_max_rows) {
  const int64_t tokens = hidden.size(0), top_k = topk_ids.size(1);
  const Grouping g = group_pairs(topk_ids, experts);
  const at::Tensor x = hidden.index_select(0, g.tokens);
  const at::Tensor weights = topk_weights.reshape({-1}).index_select(0, g.order).to(hidden.scalar_type());
  at::Tensor y = at::empty_like(x);
  const std::vector<int64_t> first = first_rows(g.counts);
  for_each_active_expert(hidden, g.counts, side_by_side_max_rows, [&](int64_t e) {
    const int64_t row = first[size_t(e)], count = g.counts[size_t(e)];
    y.narrow(0, row, count).copy_(expert_mlp(e, x.narrow(0, row, count)));
  });
  y.mul_(weights.unsqueeze(1));
  return combine(y, g.order, tokens, top_k);
}

at::Tensor fused_moe_composite(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation) {
  return run_grouped_experts(hidden, topk_weights, topk_ids, w13.size(0), [&](int64_t e, const at::Tensor& rows) {
    return at::mm(gated_activation(at::mm(rows, w13[e].t()), activation), w2[e].t());
  });
}

at::Tensor gate_up_by_pair(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& topk_ids) {
  const Grouping g = group_pairs(topk_ids, w13.size(0));
  const at::Tensor x = hidden.index_select(0, g.tokens);
  at::Tensor grouped = at::empty({x.size(0), w13.size(1)}, hidden.options());
  int64_t row = 0;
  for (int64_t e = 0; e < int64_t(g.counts.size()); ++e) {
    const int64_t count = g.counts[e];
    if (count == 0) continue;
    at::Tensor rows = grouped.narrow(0, row, count);
    at::mm_out(rows, x.narrow(0, row, count), w13[e].t());
    row += count;
  }
  at::Tensor by_pair = at::empty_like(grouped);
  return by_pair.index_copy_(0, g.order, grouped);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation, const at::Tensor& gate_up,
    bool weight_grads) {
  const int64_t tokens = hidden.size(0), top_k = topk_ids.size(1);
  const Grouping g = group_pairs(topk_ids, w13.size(0));
  const at::Tensor x = hidden.index_select(0, g.tokens);
  const at::Tensor dy = grad_out.to(hidden.scalar_type()).index_select(0, g.tokens);
  const at::Tensor weights = topk_weights.reshape({-1}).index_select(0, g.order).to(hidden.scalar_type());
  const at::Tensor saved = gate_up.defined() ? gate_up.index_select(0, g.order) : at::Tensor();
  at::Tensor grad_x = at::empty_like(x);
  at::Tensor grad_weights = at::empty({x.size(0)}, topk_weights.options());
  // Every expert's gradient slice is written whole by its GEMMs; only idle experts need zeros
  // (zero-filling all of dW first would write the expert weights' size once more).
  at::Tensor grad_w13 = weight_grads ? empty_large_output(w13.sizes(), w13.options()) : w13.new_empty({0});
  at::Tensor grad_w2 = weight_grads ? empty_large_output(w2.sizes(), w2.options()) : w2.new_empty({0});
  const std::vector<int64_t> first = first_rows(g.counts);
  for (int64_t e = 0; e < int64_t(g.counts.size()) && weight_grads; ++e) {
    if (g.counts[size_t(e)] == 0) {
      grad_w13[e].zero_();
      grad_w2[e].zero_();
    }
  }
  for_each_active_expert(hidden, g.counts, kBackwardSideBySideMaxRows, [&](int64_t e) {
    const int64_t row = first[size_t(e)], count = g.counts[size_t(e)];
    const ExpertBackwardRows rows{x.narrow(0, row, count), dy.narrow(0, row, count),
                                  weights.narrow(0, row, count).unsqueeze(1),
                                  saved.defined() ? saved.narrow(0, row, count) : at::Tensor()};
    const ExpertBackwardGrads grads{grad_x.narrow(0, row, count), grad_weights.narrow(0, row, count),
                                    weight_grads ? grad_w13[e] : at::Tensor(), weight_grads ? grad_w2[e] : at::Tensor()};
    expert_backward(rows, w13[e], w2[e], activation, grads);
  });
  at::Tensor grad_weights_by_pair = at::empty_like(grad_weights);
  grad_weights_by_pair.index_copy_(0, g.order, grad_weights);
  return {combine(grad_x, g.order, tokens, top_k), grad_w13, grad_w2, grad_weights_by_pair.view({tokens, top_k})};
}

}  // namespace torch_ext::moe
