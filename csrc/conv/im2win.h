// im2win convolution: geometry, parameters and the CPU kernel entry points. Torch-free.
//
// One general kernel serves the forward pass and both gradients (see conv/im2win.cpp):
//   out[n][k][i][j] = bias[k] + sum_{c < C/groups, h < R, w < S}
//                     x[n][g*Cg + c][i*sh + h*dh - pad_top][j*sw + w*dw - pad_left] * wt[k][c][h][w]
// where g is k's group and x is the input seen through `input_dilation` (input_dilation - 1
// zeros between neighbouring pixels; the data gradient runs the forward stride that way).
// Reads outside the input are zeros, so any padding, including negative padding (a crop),
// is just an offset. Output size is given, not derived: the gradient passes choose it.
//
// The im2win transform: for output row i, the R input rows it needs are interleaved column
// by column, so that every output pixel's receptive field for one kernel column is ONE
// contiguous run of R*Cg values (channels innermost here; the paper, NCHW-only, keeps
// channels outermost and runs of R). Logical shape [N, C, Ho, window_width*R]:
//   window[n][c][i][m*R + h] = x[n][c][i*sh + h*dh - pad_top][m - pad_left]   (virtual coordinates)
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"
#include "common/macros.h"

namespace torch_ext {

struct ConvGeometry {
  int64_t N, C, H, W;  // input batch, channels, rows, columns (real, before input dilation)
  int64_t K, R, S;     // output channels; kernel rows, columns
  int64_t Ho, Wo;      // output rows, columns
  int64_t groups;
  int64_t stride_h, stride_w;
  int64_t dilation_h, dilation_w;
  int64_t pad_top, pad_left;                    // may be negative (a crop)
  int64_t input_dilation_h, input_dilation_w;  // 1 = the input as it is
};

// Element strides of a 4-D tensor, in the logical order of its dimensions.
struct Strides4 {
  int64_t d0, d1, d2, d3;
};

// Inline helpers shared with per-ISA CPU code: ISA-local symbols (see common/macros.h).
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

// Output size of a convolution along one dimension (PyTorch's formula); <= 0 means empty.
TORCH_EXT_HOST_DEVICE int64_t conv_output_size(int64_t in, int64_t pad_before, int64_t pad_after, int64_t dilation,
                                               int64_t kernel, int64_t stride) {
  const int64_t span = in + pad_before + pad_after - dilation * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// Columns of the window buffer: the virtual input columns the output row touches.
TORCH_EXT_HOST_DEVICE int64_t window_width(const ConvGeometry& g) {
  return (g.Wo - 1) * g.stride_w + (g.S - 1) * g.dilation_w + 1;
}

// Maps a virtual input coordinate (after padding offset and input dilation) onto a real
// index; returns -1 where the virtual position is padding or an inserted zero.
TORCH_EXT_HOST_DEVICE int64_t real_input_index(int64_t virtual_index, int64_t input_dilation, int64_t size) {
  // The common case skips the 64-bit division (tens of cycles, per window element).
  if (input_dilation == 1) return virtual_index >= 0 && virtual_index < size ? virtual_index : -1;
  if (virtual_index < 0 || virtual_index % input_dilation != 0) return -1;
  const int64_t real = virtual_index / input_dilation;
  return real < size ? real : -1;
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE

struct Im2winTransformParams {
  ScalarKind dtype;  // of the input
  ConvGeometry geometry;
  const void* input;
  Strides4 input_strides;  // [N][C][H][W]
  // Destination [N][C][Ho][window_width*R] in the input's dtype, with these strides.
  void* window;
  Strides4 window_strides;
};

struct Im2winConvParams {
  ScalarKind dtype;  // of input, weight, bias and output
  ConvGeometry geometry;
  const void* input;
  Strides4 input_strides;  // [N][C][H][W]
  const void* weight;
  Strides4 weight_strides;  // [K][C/groups][R][S]
  const void* bias;         // [K], contiguous, or nullptr
  void* output;
  Strides4 output_strides;  // [N][K][Ho][Wo]
};

namespace cpu {
TORCH_EXT_DECLARE_CPU_KERNEL(void im2win_transform(const Im2winTransformParams& p))
// Floats of the weight panels im2win_pack_weight writes for p's geometry, in the layout of
// the ISA level it runs at (0 for float64, which needs none).
TORCH_EXT_DECLARE_CPU_KERNEL(int64_t im2win_packed_weight_size(const Im2winConvParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void im2win_pack_weight(const Im2winConvParams& p, float* packed))
// `packed`: im2win_pack_weight's output for this weight at the same ISA level, or nullptr to
// pack here. Scratch memory (window rows, bias, panels when packing) is per thread and reused.
TORCH_EXT_DECLARE_CPU_KERNEL(void im2win_conv(const Im2winConvParams& p, const float* packed))
// The 1x1 convolution of contiguous NCHW fp32 tensors (any stride; no padding or groups) as a
// broadcast-panel GEMM per image (conv/pointwise_conv_cpu.cpp), and whether p is one it takes
// (also: output pixel counts that fill this ISA's vectors to at least 7/8).
TORCH_EXT_DECLARE_CPU_KERNEL(bool pointwise_conv_supported(const Im2winConvParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void pointwise_conv(const Im2winConvParams& p))
}  // namespace cpu

}  // namespace torch_ext
