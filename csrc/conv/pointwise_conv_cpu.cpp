// The 1x1 convolution of NCHW fp32 tensors on the CPU (any stride; no padding, input dilation or
// groups; conv/im2win.h declares it), compiled once per ISA level.
//
// Such a convolution is one GEMM per image: out[n] [K][Ho*Wo] = weight [K][C] x the input pixels
// it samples, [C][Ho*Wo] (+ bias). A task takes one image's run of up to kBlockTokens output
// pixels (whole vectors) and computes every output channel for it with the broadcast-panel GEMM
// (common/cpu/broadcast_panel_gemm.h). At stride 1 the input's channel rows are the panel's rows
// as they lie (H*W apart): nothing is transposed or packed. At stride 2 (ResNet's downsampling
// layers) the run's input pixels are first gathered into a [C][width] panel in per-thread scratch,
// C x width loads against 2 x C x K x width flops. Either way the results are stored as whole
// vectors into the output's NCHW rows, and the run's panel stays in L1 / L2 while the weight rows
// stream past it.
//
// Why a path of its own: the general kernel (conv/im2win_cpu.cpp) first builds channels-innermost
// window rows (a transpose of NCHW) and its register tiles hold 32 output channels of 12 pixels,
// which it stores across 32 output rows. On ResNet-50's 1x1 layers (batch 8, project VM, 2
// threads) it ran at 0.43x of oneDNN for 64 -> 64 channels at 56x56, 0.57x for 64 -> 256, and
// 0.85-0.97x for the stride-2 layers it now takes (docs/perf/conv.md).
//
// Output pixels past the last whole vector of an image (Ho*Wo % lanes of them) go through a
// zero-padded one-vector panel; pointwise_conv_supported keeps such padding at most 1/8 of the
// lanes computed (7x7 outputs, 49 pixels: 64 lanes, take the general kernel).
#include <algorithm>
#include <vector>

#include "common/cpu/broadcast_panel_gemm.h"
#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "conv/im2win.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

namespace bp = broadcast_panels;
using Math = bp::WidenMath<float>;

// Per task: a gathered input panel [C][width] and, for a tail, its result rows [K][lanes].
thread_local std::vector<float> task_scratch;

// Copies the input pixels that output pixels [q0, q0 + count) read, channel by channel, into
// panel [C][width] (zeros past count). x: the image's first channel plane.
void gather_panel(const ConvGeometry& g, const float* x, int64_t q0, int count, int width, float* panel) {
  int64_t source[bp::kBlockTokens];
  for (int m = 0; m < count; ++m) {
    const int64_t q = q0 + m;
    source[m] = q / g.Wo * g.stride_h * g.W + q % g.Wo * g.stride_w;
  }
  const int64_t plane = g.H * g.W;
  for (int64_t c = 0; c < g.C; ++c) {
    const float* row = x + c * plane;
    float* dst = panel + c * width;
    for (int m = 0; m < count; ++m) dst[m] = row[source[m]];
    std::fill(dst + count, dst + width, 0.0f);
  }
}

// out's K rows (out_stride apart, `width` columns each) += bias[k], where there is a bias.
void add_bias(const float* bias, int64_t K, int width, float* out, int64_t out_stride) {
  if (bias == nullptr) return;
  for (int64_t k = 0; k < K; ++k) {
    const VecF b = broadcast(bias[k]);
    for (int m = 0; m < width; m += bp::kLanes) store(out + k * out_stride + m, load(out + k * out_stride + m) + b);
  }
}

}  // namespace

bool pointwise_conv_supported(const Im2winConvParams& p) {
  const ConvGeometry& g = p.geometry;
  if constexpr (!bp::kHasPanels) return false;
  const int64_t pixels = g.Ho * g.Wo, padded = (pixels + bp::kLanes - 1) / bp::kLanes * bp::kLanes;
  const Strides4 &is = p.input_strides, &ws = p.weight_strides, &os = p.output_strides;
  return p.dtype == ScalarKind::kFloat32 && g.R == 1 && g.S == 1 && g.groups == 1 && g.pad_top == 0 &&
         g.pad_left == 0 && g.input_dilation_h == 1 && g.input_dilation_w == 1 && pixels > 0 && is.d3 == 1 &&
         is.d2 == g.W && is.d1 == g.H * g.W && os.d3 == 1 && os.d2 == g.Wo && os.d1 == pixels && ws.d1 == 1 &&
         8 * (padded - pixels) <= padded;
}

void pointwise_conv(const Im2winConvParams& p) {
  const ConvGeometry& g = p.geometry;
  const int64_t C = g.C, K = g.K, pixels = g.Ho * g.Wo;
  const bool in_place = g.stride_h == 1 && g.stride_w == 1;  // then Ho, Wo = H, W
  const float* input = static_cast<const float*>(p.input);
  const float* weight = static_cast<const float*>(p.weight);
  const float* bias = static_cast<const float*>(p.bias);
  float* output = static_cast<float*>(p.output);
  std::vector<const float*> rows(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) rows[size_t(k)] = weight + k * p.weight_strides.d0;

  const bp::PanelBlocks runs(pixels);  // runs of whole vectors per image
  const int64_t tail = pixels % bp::kLanes, tasks_per_image = runs.count + (tail > 0);
  parallel_for(0, g.N * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_image, run = task % tasks_per_image;
      const float* x = input + n * p.input_strides.d0;
      float* out = output + n * p.output_strides.d0;
      if (run < runs.count && in_place) {
        const int64_t q0 = runs.start(run);
        const int width = runs.width(run);
        bp::panel_gemm<Math>(rows.data(), int(K), x + q0, width, C, out + q0, bp::PanelStrides{pixels, pixels});
        add_bias(bias, K, width, out + q0, pixels);
        continue;
      }
      // A gathered panel: a strided run, or the tail zero-padded to one vector (computed into
      // result rows and copied back).
      const bool is_tail = run == runs.count;
      const int64_t q0 = is_tail ? pixels - tail : runs.start(run);
      const int count = is_tail ? int(tail) : runs.width(run), width = is_tail ? bp::kLanes : count;
      const size_t floats = size_t(C * width + (is_tail ? K * bp::kLanes : 0));
      if (task_scratch.size() < floats) task_scratch.resize(floats);
      float* panel = task_scratch.data();
      gather_panel(g, x, q0, count, width, panel);
      if (!is_tail) {
        bp::panel_gemm<Math>(rows.data(), int(K), panel, width, C, out + q0, bp::PanelStrides{width, pixels});
        add_bias(bias, K, width, out + q0, pixels);
        continue;
      }
      float* result = panel + C * width;
      bp::panel_gemm<Math>(rows.data(), int(K), panel, width, C, result, bp::PanelStrides{width, width});
      add_bias(bias, K, width, result, width);
      for (int64_t k = 0; k < K; ++k) store_partial(out + k * pixels + q0, load(result + k * width), count);
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
