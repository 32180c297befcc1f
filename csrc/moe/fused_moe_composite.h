// The MoE layer as a composition of ATen ops (sort by expert, one GEMM pair per expert, a
// deterministic combine): the float64 forward, and the backward on every device.
#pragma once

#include <ATen/core/Tensor.h>

#include <functional>
#include <tuple>

#include "moe/fused_moe.h"

namespace torch_ext::moe {

// The (token, slot) pairs grouped by expert: pair t * k + j of topk_ids [T, k], in a stable sort
// by expert id (the grouping every path shares).
struct PairOrder {
  at::Tensor expert;  // [P] int64: each pair's expert, in pair order
  at::Tensor order;   // [P] int64: pair indices sorted by expert
  at::Tensor tokens;  // [P] int64: the token of each grouped row
};
PairOrder sort_pairs_by_expert(const at::Tensor& topk_ids);

// act(gate) * up for gate_up [rows, 2I] (gate columns first).
at::Tensor gated_activation(const at::Tensor& gate_up, Activation activation);
// The same through torch_ext's silu_and_mul kernel for silu (one pass over gate_up; fp32, fp16 or
// bf16), gated_activation otherwise: the middle step of the grouped and row-expert forwards.
at::Tensor gated_activation_kernel(const at::Tensor& gate_up, Activation activation);
// act(gate), and d act / d gate applied to grad.
at::Tensor activate(const at::Tensor& gate, Activation activation);
at::Tensor activation_backward(const at::Tensor& grad, const at::Tensor& gate, Activation activation);
// The elementwise middle of the backward for rows of one or many experts, given their
// pre-activation gate_up [rows, 2I], d_act_unweighted = dy W2[e] [rows, I] (before the routing
// weight) and their routing weights [rows, 1]: act(gate) * up, d gate_up [rows, 2I] and the
// routing weights' gradient [rows] (in gate_up's dtype).
struct GatedBackward {
  at::Tensor act, d_gate_up, grad_weights;
};
GatedBackward gated_activation_backward(const at::Tensor& gate_up, const at::Tensor& d_act_unweighted,
                                        const at::Tensor& weights, Activation activation);
// Rows [P, C] in grouped order (row i is pair order[i]) back to pair order, summed over each
// token's k slots in slot order: [T, C], the same summation order on every device.
at::Tensor combine(const at::Tensor& grouped, const at::Tensor& order, int64_t tokens, int64_t top_k);

// The forward skeleton: pairs grouped by expert, expert_mlp(e, rows of hidden routed to e) ->
// [rows, H] for every expert with tokens, results weighted and summed per token in slot order.
// On the CPU, when no expert has more than side_by_side_max_rows rows and at least two per
// thread have some, the experts run side by side, one per thread at a time (expert_mlp must then
// be callable from several threads at once); the results are the same.
using ExpertMlp = std::function<at::Tensor(int64_t expert, const at::Tensor& rows)>;
at::Tensor run_grouped_experts(const at::Tensor& hidden, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                               int64_t experts, const ExpertMlp& expert_mlp, int64_t side_by_side_max_rows = 0);

// out [T, H] of fused_moe (arguments already checked).
at::Tensor fused_moe_composite(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation);

// The pre-activation [gate; up] = W13[e] h[t] of every (token, slot) pair, [T * k, 2I] in pair order.
at::Tensor gate_up_by_pair(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& topk_ids);

// (grad_hidden, grad_w13, grad_w2, grad_topk_weights) of fused_moe given grad_out [T, H], with the
// forward's gate_up (gate_up_by_pair's layout) or, when undefined, the first GEMM recomputed.
// Without weight_grads the two weight-gradient GEMMs per expert are skipped (half of the
// backward's FLOPs) and grad_w13 / grad_w2 are empty [0] tensors. Reads the per-expert token
// counts on the host (a device sync on CUDA). On the CPU, experts of at most 64 rows run side by
// side, one per thread (as run_grouped_experts).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward_composite(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, Activation activation, const at::Tensor& gate_up,
    bool weight_grads);

}  // namespace torch_ext::moe
