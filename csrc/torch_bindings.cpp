// Every torch_ext op schema, and which kernel serves it on which device.
//
// One line of comment per schema says what the op computes. Fake (meta) kernels for
// torch.compile and autograd formulas are registered in Python, beside each op's wrapper
// (torch_ext/ops/).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(torch_ext, m) {
  // out[..., d] = silu(x[..., :d]) * x[..., d:] for x [..., 2d] (SwiGLU gating); fp32/fp16/bf16 (fp64 for checks).
  m.def("silu_and_mul(Tensor x) -> Tensor");
  // grad_x [..., 2d] of silu_and_mul given grad_out [..., d] and the forward input x.
  m.def("silu_and_mul_backward(Tensor grad_out, Tensor x) -> Tensor");

  // F.conv2d semantics (zero padding) computed by im2win: window transform + register-blocked kernel.
  m.def("im2win_conv2d(Tensor input, Tensor weight, Tensor? bias, int[2] stride, int[2] padding, "
        "int[2] dilation, int groups) -> Tensor");
  // d input of im2win_conv2d: the flipped-kernel convolution of grad_output, input dilated by the stride.
  m.def("im2win_conv2d_grad_input(Tensor grad_output, Tensor weight, int[4] input_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // d weight of im2win_conv2d: a convolution of the input (channels as batch) by grad_output.
  m.def("im2win_conv2d_grad_weight(Tensor grad_output, Tensor input, int[4] weight_size, int[2] stride, "
        "int[2] padding, int[2] dilation, int groups) -> Tensor");
  // The window-order buffer [N, C, Ho, window_width*R] im2win convolves over (inspection, memory figures).
  m.def("im2win_transform(Tensor input, int[2] kernel_size, int[2] stride, int[2] padding, int[2] dilation) "
        "-> Tensor");

  // y = x @ W^T + bias with W [N, K] 4/8-bit weight-only quantized in the packed layout (docs/quant-layout.md).
  m.def("weight_only_linear(Tensor x, Tensor qweight, Tensor scales, Tensor? zeros, Tensor? bias, int bits, "
        "int group_size) -> Tensor");
  // W [N, K] = (q - zero) * scale in the scales' dtype; K = in_features (default 16 * qweight.size(1)).
  m.def("dequantize_weight(Tensor qweight, Tensor scales, Tensor? zeros, int bits, int group_size, "
        "int? in_features=None) -> Tensor");

  // Symmetric per-row int8 quantization of x [..., K]: (q int8 [..., K], scale fp32 [..., 1]), |x| clamped to clip.
  m.def("quantize_per_token(Tensor x, float? clip=None) -> (Tensor, Tensor)");
  // out [M, N] = (a @ b.T) * a_scale * b_scale + bias for int8 a [M, K], b [N, K]; exact int32 sums, fp32 epilogue.
  m.def("scaled_int8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype) "
        "-> Tensor");
  // out [M, N] = (a @ b.T) * a_scale * b_scale + bias for float8_e4m3fn a [M, K], b [N, K]; fp32 sums.
  m.def("scaled_fp8_mm(Tensor a, Tensor b, Tensor a_scale, Tensor b_scale, Tensor? bias, ScalarType out_dtype) "
        "-> Tensor");
  // MoE routing: scores (softmax / sigmoid + correction bias), expert groups, top-k, renormalize, scale.
  m.def("moe_route(Tensor router_logits, int top_k, bool renormalize, str scoring, int num_expert_group, "
        "int topk_group, Tensor? correction_bias, float routed_scaling_factor) -> (Tensor, Tensor)");
  // MoE experts: out [T, H] = sum_j w[t, j] * W2[e] act(W13[e] h[t]), e = ids[t, j]; act 'silu' or 'gelu' (gated).
  m.def("fused_moe(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, str activation) "
        "-> Tensor");
  // fused_moe for training: (out, gate_up [T*k, 2I]) with the pre-activation values the backward reuses.
  m.def("fused_moe_train(Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, Tensor topk_ids, "
        "str activation) -> (Tensor, Tensor)");
  // Gradients (hidden, w13, w2, topk_weights) of fused_moe given grad_out [T, H] (gate_up: saved, else recomputed;
  // weight_grads=False: frozen experts, grad_w13 and grad_w2 are empty and their GEMMs skipped).
  m.def("fused_moe_backward(Tensor grad_out, Tensor hidden, Tensor w13, Tensor w2, Tensor topk_weights, "
        "Tensor topk_ids, str activation, Tensor? gate_up=None, bool weight_grads=True) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  // fused_moe with each expert's W13 and W2 weight-only quantized (packed layout, stacked along a leading E).
  m.def("fused_moe_quantized(Tensor hidden, Tensor w13_qweight, Tensor w13_scales, Tensor? w13_zeros, "
        "Tensor w2_qweight, Tensor w2_scales, Tensor? w2_zeros, Tensor topk_weights, Tensor topk_ids, "
        "str activation, int bits, int group_size) -> Tensor");
  // LLM.int8() linear: x [..., K] @ (w_q * w_scale).T + bias, outlier input features (|x| > threshold) in 16 bits.
  m.def("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias, float outlier_threshold) -> Tensor");

  // softmax(q k^T * scale) v [B, Hq, Sq, D], each query block attending only its listed key blocks (MoBA: only
  // the blocks each token chose), and lse [B, Hq, Sq] fp32; causal bottom-right aligned (docs/attention.md).
  m.def("block_sparse_attention(Tensor q, Tensor k, Tensor v, Tensor kv_counts, Tensor kv_indices, "
        "int block_size_q, int block_size_kv, bool causal, float scale, Tensor? token_blocks=None) "
        "-> (Tensor out, Tensor lse)");
  // (grad_q, grad_k, grad_v) of block_sparse_attention, P recomputed from lse; deterministic (no atomics).
  m.def("block_sparse_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor kv_counts, Tensor kv_indices, int block_size_q, int block_size_kv, bool causal, float scale, "
        "Tensor? token_blocks=None) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // MoBA gating: per query token its top_k key blocks by q . mean(k_block), int32 [B, Hq, Sq, top_k], -1 padded.
  m.def("moba_select(Tensor q, Tensor k, int block_size, int top_k, bool causal) -> Tensor");
  // Per query block of block_size_q rows: the union of its tokens' chosen key blocks as (kv_counts, kv_indices).
  m.def("moba_block_lists(Tensor token_blocks, int num_kv_blocks, int block_size_q) "
        "-> (Tensor kv_counts, Tensor kv_indices)");
  // moba_block_lists(moba_select(q, k, ...), query blocks of 64 rows): the block lists of token-level MoBA.
  m.def("moba_route(Tensor q, Tensor k, int block_size, int top_k, bool causal) "
        "-> (Tensor kv_counts, Tensor kv_indices)");
  // Token-level MoBA attention given moba_select's choices: (out, lse) of block_sparse_attention over the union
  // lists; on CUDA computed key block by key block over the pairs that chose it (docs/attention.md).
  m.def("moba_attention(Tensor q, Tensor k, Tensor v, Tensor token_blocks, int block_size, bool causal, "
        "float scale) -> (Tensor out, Tensor lse)");
  // moba_attention's gradients (grad_q, grad_k, grad_v): the union lists' backward; on CUDA with
  // TORCH_EXT_MOBA_GATHER_BACKWARD=1, key block by key block over the pairs that chose it.
  m.def("moba_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor token_blocks, int block_size, bool causal, float scale) -> (Tensor, Tensor, Tensor)");
}

namespace {

// Ops whose one entry point serves both devices (it checks the device and calls the CPU or the
// CUDA kernel): registered for each dispatch key from this single list.
void register_device_dispatching_ops(torch::Library& m) {
  m.impl("im2win_conv2d", &torch_ext::im2win_conv2d);
  m.impl("im2win_conv2d_grad_input", &torch_ext::im2win_conv2d_grad_input);
  m.impl("im2win_conv2d_grad_weight", &torch_ext::im2win_conv2d_grad_weight);
  m.impl("im2win_transform", &torch_ext::im2win_transform);
  m.impl("weight_only_linear", &torch_ext::weight_only_linear);
  m.impl("dequantize_weight", &torch_ext::dequantize_weight);
  m.impl("quantize_per_token", &torch_ext::quantize_per_token);
  m.impl("scaled_int8_mm", &torch_ext::scaled_int8_mm);
  m.impl("int8_linear", &torch_ext::int8_linear);
  m.impl("scaled_fp8_mm", &torch_ext::scaled_fp8_mm);
  m.impl("moe_route", &torch_ext::moe_route);
  m.impl("fused_moe", &torch_ext::fused_moe);
  m.impl("fused_moe_train", &torch_ext::fused_moe_train);
  m.impl("fused_moe_backward", &torch_ext::fused_moe_backward);
  m.impl("fused_moe_quantized", &torch_ext::fused_moe_quantized);
  m.impl("block_sparse_attention", &torch_ext::block_sparse_attention);
  m.impl("block_sparse_attention_backward", &torch_ext::block_sparse_attention_backward);
  m.impl("moba_select", &torch_ext::moba_select);
  m.impl("moba_block_lists", &torch_ext::moba_block_lists);
  m.impl("moba_route", &torch_ext::moba_route);
  m.impl("moba_attention", &torch_ext::moba_attention);
  m.impl("moba_attention_backward", &torch_ext::moba_attention_backward);
}

}  // namespace

TORCH_LIBRARY_IMPL(torch_ext, CPU, m) {
  m.impl("silu_and_mul", &torch_ext::silu_and_mul_cpu);
  m.impl("silu_and_mul_backward", &torch_ext::silu_and_mul_backward_cpu);
  register_device_dispatching_ops(m);
}

#if defined(TORCH_EXT_WITH_CUDA)
TORCH_LIBRARY_IMPL(torch_ext, CUDA, m) {
  m.impl("silu_and_mul", &torch_ext::silu_and_mul_cuda);
  m.impl("silu_and_mul_backward", &torch_ext::silu_and_mul_backward_cuda);
  register_device_dispatching_ops(m);
}
#endif
