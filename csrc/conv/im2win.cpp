// im2win convolution: input checks, output allocation and the kernel call, for the forward
// op, both gradient ops and the transform op. All four reduce to the one general
// convolution of conv/im2win.h (see run_convolution), on the CPU or the GPU.
#include "conv/im2win.h"

#include <ATen/ops/empty.h>
#include <c10/core/DeviceGuard.h>

#include <string>

#include "common/torch_utils.h"
#include "conv/packed_weight_cache.h"
#include "ops.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include "conv/im2win_cuda.h"
#endif

namespace torch_ext {
namespace {

constexpr const char* kConv = "im2win_conv2d";
constexpr const char* kTransform = "im2win_transform";
constexpr const char* kGradInput = "im2win_conv2d_grad_input";
constexpr const char* kGradWeight = "im2win_conv2d_grad_weight";

struct Pair {
  int64_t h, w;
};

Pair pair_arg(const char* op, const char* name, at::IntArrayRef v, int64_t min_value) {
  TORCH_EXT_CHECK(v.size() == 2, op, name, " must have 2 values (height, width), got ", v);
  TORCH_EXT_CHECK(v[0] >= min_value && v[1] >= min_value, op, name, " must be >= ", min_value, ", got ", v);
  return {v[0], v[1]};
}

Strides4 strides4(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

void check_conv_tensor(const char* op, const char* name, const at::Tensor& t) {
  TORCH_EXT_CHECK(t.dim() == 4, op, name, " must be a 4-D tensor, got shape ", t.sizes());
  check_dtype(op, name, t, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
}

// Output in the input's memory format: channels_last in, channels_last out.
bool wants_channels_last(const at::Tensor& input) {
  return !input.is_contiguous() && input.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::Tensor empty_conv_output(const at::Tensor& like, at::IntArrayRef sizes) {
  return at::empty(sizes, like.options().memory_format(wants_channels_last(like) ? at::MemoryFormat::ChannelsLast
                                                                                 : at::MemoryFormat::Contiguous));
}

// The geometry of the forward convolution, validated.
ConvGeometry forward_geometry(const char* op, at::IntArrayRef input_size, at::IntArrayRef weight_size,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  const Pair st = pair_arg(op, "stride", stride, 1), pad = pair_arg(op, "padding", padding, 0),
             dil = pair_arg(op, "dilation", dilation, 1);
  TORCH_EXT_CHECK(groups >= 1, op, "groups must be >= 1, got ", groups);
  const int64_t N = input_size[0], C = input_size[1], H = input_size[2], W = input_size[3];
  const int64_t K = weight_size[0], R = weight_size[2], S = weight_size[3];
  TORCH_EXT_CHECK(C % groups == 0, op, "input channels (", C, ") must be divisible by groups (", groups, ")");
  TORCH_EXT_CHECK(K % groups == 0, op, "output channels (weight.size(0) = ", K, ") must be divisible by groups (",
                  groups, ")");
  TORCH_EXT_CHECK(weight_size[1] * groups == C, op, "weight must have input channels / groups = ", C / groups,
                  " channels (weight shape [K, C/groups, R, S]), got weight shape ", weight_size,
                  " for input shape ", input_size, " and groups = ", groups);
  TORCH_EXT_CHECK(R >= 1 && S >= 1, op, "weight must have a kernel of at least 1x1, got shape ", weight_size);
  const int64_t Ho = conv_output_size(H, pad.h, pad.h, dil.h, R, st.h);
  const int64_t Wo = conv_output_size(W, pad.w, pad.w, dil.w, S, st.w);
  TORCH_EXT_CHECK(Ho > 0 && Wo > 0, op, "the kernel (", R, "x", S, ", dilation ", dilation,
                  ") is larger than the padded input (", H + 2 * pad.h, "x", W + 2 * pad.w, ")");
  return ConvGeometry{N, C, H, W, K, R, S, Ho, Wo, groups, st.h, st.w, dil.h, dil.w, pad.h, pad.w, 1, 1};
}

// The gradient ops' inputs: grad_output and the saved forward tensor agree in dtype and
// device, and the size argument names a 4-D tensor.
void check_gradient_inputs(const char* op, const at::Tensor& grad_output, const at::Tensor& saved,
                           const char* saved_name, at::IntArrayRef size, const char* size_name) {
  check_conv_tensor(op, "grad_output", grad_output);
  check_conv_tensor(op, saved_name, saved);
  check_same_dtype(op, saved_name, saved, "grad_output", grad_output);
  check_same_device(op, saved_name, saved, "grad_output", grad_output);
  TORCH_EXT_CHECK(size.size() == 4, op, size_name, " must have 4 values, got ", size);
}

void check_grad_output_shape(const char* op, const at::Tensor& grad_output, const ConvGeometry& f) {
  const std::vector<int64_t> expected{f.N, f.K, f.Ho, f.Wo};
  TORCH_EXT_CHECK(grad_output.sizes() == at::IntArrayRef(expected), op, "grad_output must have shape ",
                  at::IntArrayRef(expected), ", got ", grad_output.sizes());
}

// out[n][k][i][j] = bias + conv(input, weight) under `g`, on the tensors' device.
// `cache_weight`: on the CPU, reuse the packed panels of a weight that comes back unchanged
// (inference; conv/packed_weight_cache.h). The gradient passes' "weights" are fresh tensors.
void run_convolution(const ConvGeometry& g, const at::Tensor& input, const at::Tensor& weight,
                     const c10::optional<at::Tensor>& bias, at::Tensor& out, bool cache_weight = false) {
  if (out.numel() == 0) return;
  if (g.C == 0) {  // an empty sum (no input channels; in the gradients: an empty batch or no filters)
    if (bias.has_value()) {
      out.copy_(bias->view({1, -1, 1, 1}).expand_as(out));
    } else {
      out.zero_();
    }
    return;
  }
  const Im2winConvParams p{scalar_kind(input), g,
                           input.data_ptr(), strides4(input),
                           weight.data_ptr(), strides4(weight),
                           bias.has_value() ? bias->data_ptr() : nullptr,
                           out.data_ptr(), strides4(out)};
  if (input.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const int64_t bytes = cuda::im2win_conv_workspace_bytes(p);
    at::Tensor workspace = at::empty({bytes}, input.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::im2win_conv(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
    return;
#endif
  }
  // fp32 NCHW 1x1 convolutions without padding: a GEMM per image (conv/pointwise_conv_cpu.cpp).
  if (TORCH_EXT_CPU_DISPATCH(pointwise_conv_supported, p)) {
    TORCH_EXT_CPU_DISPATCH(pointwise_conv, p);
    return;
  }
  at::Tensor packed;
  if (cache_weight && p.dtype != ScalarKind::kFloat64) {
    packed = cached_packed_weight(weight, int(cpu::active_cpu_isa()), p.geometry.groups, [&] {
      const int64_t floats = TORCH_EXT_CPU_DISPATCH(im2win_packed_weight_size, p);
      at::Tensor panels = at::empty({floats}, weight.options().dtype(at::kFloat));
      TORCH_EXT_CPU_DISPATCH(im2win_pack_weight, p, panels.data_ptr<float>());
      return panels;
    });
  }
  TORCH_EXT_CPU_DISPATCH(im2win_conv, p, packed.defined() ? packed.data_ptr<float>() : nullptr);
}

}  // namespace

at::Tensor im2win_conv2d(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                         at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv_tensor(kConv, "input", input);
  check_conv_tensor(kConv, "weight", weight);
  check_same_dtype(kConv, "weight", weight, "input", input);
  check_same_device(kConv, "weight", weight, "input", input);
  const ConvGeometry g = forward_geometry(kConv, input.sizes(), weight.sizes(), stride, padding, dilation, groups);
  if (bias.has_value()) {
    check_same_dtype(kConv, "bias", *bias, "input", input);
    check_same_device(kConv, "bias", *bias, "input", input);
    TORCH_EXT_CHECK(bias->dim() == 1 && bias->size(0) == g.K, kConv, "bias must have shape [", g.K,
                    "] (output channels), got ", bias->sizes());
  }
  const c10::DeviceGuard device_guard(input.device());
  at::Tensor out = empty_conv_output(input, {g.N, g.K, g.Ho, g.Wo});
  const c10::optional<at::Tensor> contiguous_bias =
      bias.has_value() ? c10::optional<at::Tensor>(bias->contiguous()) : c10::nullopt;
  run_convolution(g, input, weight, contiguous_bias, out, /*cache_weight=*/true);
  return out;
}

// d input: the forward stride becomes input dilation of grad_output, the kernel is flipped
// and its in/out channels swapped per group, padding becomes dilation*(R-1) - padding.
at::Tensor im2win_conv2d_grad_input(const at::Tensor& grad_output, const at::Tensor& weight,
                                    at::IntArrayRef input_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                    at::IntArrayRef dilation, int64_t groups) {
  check_gradient_inputs(kGradInput, grad_output, weight, "weight", input_size, "input_size");
  const ConvGeometry f = forward_geometry(kGradInput, input_size, weight.sizes(), stride, padding, dilation, groups);
  check_grad_output_shape(kGradInput, grad_output, f);
  const c10::DeviceGuard device_guard(grad_output.device());
  const int64_t Cg = f.C / groups, Kg = f.K / groups;
  // [K, Cg, R, S] -> [C, Kg, R, S] with the kernel flipped.
  const at::Tensor flipped = weight.reshape({groups, Kg, Cg, f.R, f.S})
                                 .transpose(1, 2)
                                 .flip({3, 4})
                                 .reshape({f.C, Kg, f.R, f.S});
  const ConvGeometry g{f.N, f.K, f.Ho, f.Wo, f.C, f.R, f.S, f.H, f.W, groups, 1, 1,
                       f.dilation_h, f.dilation_w, f.dilation_h * (f.R - 1) - f.pad_top,
                       f.dilation_w * (f.S - 1) - f.pad_left, f.stride_h, f.stride_w};
  at::Tensor grad_input = empty_conv_output(grad_output, input_size);
  run_convolution(g, grad_output, flipped, c10::nullopt, grad_input);
  return grad_input;
}

// d weight[k][c][r][s] = sum_{n,i,j} grad_output[n][k][i][j] * input[n][c][i*sh + r*dh - ph][...]:
// a convolution whose batch is the input channels, whose channels are the images and whose
// kernel is grad_output, with stride and dilation swapped; one per group, written straight
// into the group's slice of the result through its strides.
at::Tensor im2win_conv2d_grad_weight(const at::Tensor& grad_output, const at::Tensor& input,
                                     at::IntArrayRef weight_size, at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, int64_t groups) {
  check_gradient_inputs(kGradWeight, grad_output, input, "input", weight_size, "weight_size");
  const ConvGeometry f = forward_geometry(kGradWeight, input.sizes(), weight_size, stride, padding, dilation, groups);
  check_grad_output_shape(kGradWeight, grad_output, f);
  const c10::DeviceGuard device_guard(input.device());
  const int64_t Cg = f.C / groups, Kg = f.K / groups;
  at::Tensor grad_weight = at::empty(weight_size, input.options());
  for (int64_t group = 0; group < groups; ++group) {
    const at::Tensor x = input.narrow(1, group * Cg, Cg).transpose(0, 1);         // [Cg, N, H, W]
    const at::Tensor gy = grad_output.narrow(1, group * Kg, Kg).transpose(0, 1);  // [Kg, N, Ho, Wo]
    at::Tensor out = grad_weight.narrow(0, group * Kg, Kg).transpose(0, 1);      // [Cg, Kg, R, S]
    const ConvGeometry g{Cg, f.N, f.H, f.W, Kg, f.Ho, f.Wo, f.R, f.S, 1, f.dilation_h, f.dilation_w,
                         f.stride_h, f.stride_w, f.pad_top, f.pad_left, 1, 1};
    run_convolution(g, x, gy, c10::nullopt, out);
  }
  return grad_weight;
}

at::Tensor im2win_transform(const at::Tensor& input, at::IntArrayRef kernel_size, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_tensor(kTransform, "input", input);
  const Pair k = pair_arg(kTransform, "kernel_size", kernel_size, 1);
  const ConvGeometry g = forward_geometry(kTransform, input.sizes(), {1, input.size(1), k.h, k.w}, stride, padding,
                                          dilation, 1);
  const c10::DeviceGuard device_guard(input.device());
  const int64_t columns = window_width(g) * g.R;
  // Logical [N, C, Ho, width*R]; physically channels innermost for a channels_last input.
  at::Tensor window = empty_conv_output(input, {g.N, g.C, g.Ho, columns});
  if (window.numel() == 0) return window;
  const Im2winTransformParams p{scalar_kind(input), g, input.data_ptr(), strides4(input),
                                window.data_ptr(), strides4(window)};
  if (input.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    C10_CUDA_CHECK(cuda::im2win_transform(p, c10::cuda::getCurrentCUDAStream()));
    return window;
#endif
  }
  TORCH_EXT_CPU_DISPATCH(im2win_transform, p);
  return window;
}

}  // namespace torch_ext
