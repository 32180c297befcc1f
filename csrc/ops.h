// The torch-facing entry points of every op, registered in torch_bindings.cpp.
// Each family's .cpp implements its CPU entry and, in CUDA builds, its CUDA entry.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace torch_ext {

// activation/silu_and_mul.cpp
at::Tensor silu_and_mul_cpu(const at::Tensor& x);
at::Tensor silu_and_mul_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x);
#if defined(TORCH_EXT_WITH_CUDA)
at::Tensor silu_and_mul_cuda(const at::Tensor& x);
at::Tensor silu_and_mul_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x);
#endif

// conv/im2win.cpp (one entry per op serves CPU and CUDA: only the kernel call differs)
at::Tensor im2win_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups);
at::Tensor im2win_conv2d_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups);
at::Tensor im2win_conv2d_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                     at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups);
at::Tensor im2win_transform(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation);

// quant/weight_only.cpp (one entry per op serves CPU and CUDA)
at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias,
                              int64_t bits, int64_t group_size);
at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             c10::optional<int64_t> in_features);
// Not an op: fused_moe_quantized's CUDA paths. y [R, N] = rows of x times stacked packed weights
// W [E, ...] (scales / zeros [E, groups, N]) picked by row_experts [R] (int32 on the device, ids
// checked by the caller), one GEMM launch for all rows, no host sync:
//   expert_rows = 1: row r = x[r / x_row_divisor] @ dequant(W[row_experts[r]])^T (decode);
//   expert_rows = 16 or 64 (weight_only_expert_block_rows): rows grouped by expert in blocks of
//   that many, block b = rows [b * expert_rows, (b + 1) * expert_rows) of x times
//   W[row_experts[b * expert_rows]], or zeros where that is -1; x_row_divisor 1.
// `op` names the calling op in error messages.
at::Tensor weight_only_linear_row_experts(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                          const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                          const at::Tensor& row_experts, int64_t expert_rows,
                                          int64_t x_row_divisor, int64_t bits, int64_t group_size);

// quant/w8a8.cpp
std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, c10::optional<double> clip);
at::Tensor scaled_int8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype);
at::Tensor scaled_fp8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                         const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype);
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, double outlier_threshold);

// moe/moe_route.cpp
std::tuple<at::Tensor, at::Tensor> moe_route(const at::Tensor& router_logits, int64_t top_k, bool renormalize,
                                             c10::string_view scoring, int64_t num_expert_group, int64_t topk_group,
                                             const c10::optional<at::Tensor>& correction_bias,
                                             double routed_scaling_factor);

// moe/fused_moe.cpp
at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor> fused_moe_train(const at::Tensor& hidden, const at::Tensor& w13,
                                                   const at::Tensor& w2, const at::Tensor& topk_weights,
                                                   const at::Tensor& topk_ids, c10::string_view activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation,
    const c10::optional<at::Tensor>& gate_up, bool weight_grads);

// moe/fused_moe_quantized.cpp
at::Tensor fused_moe_quantized(const at::Tensor& hidden, const at::Tensor& w13_qweight, const at::Tensor& w13_scales,
                               const c10::optional<at::Tensor>& w13_zeros, const at::Tensor& w2_qweight,
                               const at::Tensor& w2_scales, const c10::optional<at::Tensor>& w2_zeros,
                               const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                               c10::string_view activation, int64_t bits, int64_t group_size);

// attention/block_sparse_attention.cpp (one entry per op serves CPU and CUDA)
std::tuple<at::Tensor, at::Tensor> block_sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& kv_counts,
                                                          const at::Tensor& kv_indices, int64_t block_size_q,
                                                          int64_t block_size_kv, bool causal, double scale,
                                                          const c10::optional<at::Tensor>& token_blocks);
std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& kv_counts, const at::Tensor& kv_indices, int64_t block_size_q,
    int64_t block_size_kv, bool causal, double scale, const c10::optional<at::Tensor>& token_blocks);
at::Tensor moba_select(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_k, bool causal);
std::tuple<at::Tensor, at::Tensor> moba_block_lists(const at::Tensor& token_blocks, int64_t num_kv_blocks,
                                                    int64_t block_size_q);
std::tuple<at::Tensor, at::Tensor> moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                              int64_t top_k, bool causal);
std::tuple<at::Tensor, at::Tensor> moba_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& token_blocks, int64_t block_size, bool causal,
                                                  double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor> moba_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& token_blocks, int64_t block_size, bool causal, double scale);

}  // namespace torch_ext
