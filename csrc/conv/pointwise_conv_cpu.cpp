// The 1x1 convolution of NCHW fp32 tensors on the CPU (stride 1, no padding, dilation, input
// dilation or groups; conv/im2win.h declares it), compiled once per ISA level.
//
// Such a convolution is one GEMM per image on the tensors as they lie: out[n] [K][H*W] =
// weight [K][C] x input[n] [C][H*W] (+ bias). A task takes one image's run of up to
// kBlockTokens pixels (whole vectors) and computes every output channel for it with the
// broadcast-panel GEMM (common/cpu/broadcast_panel_gemm.h): the input's channel rows are the
// panel's rows and the output's channel rows the result's, both H*W apart, so nothing is
// transposed or packed and the results are stored as whole vectors into NCHW rows. The run's
// C x width panel stays in L1 / L2 while the weight rows stream past it.
//
// Why a path of its own: the general kernel (conv/im2win_cpu.cpp) first builds channels-innermost
// window rows (a transpose of NCHW) and its register tiles hold 32 output channels of 12 pixels,
// which it stores across 32 output rows. On ResNet-50's 1x1 layers (batch 8, project VM, 2
// threads) it ran at 0.43x of oneDNN for 64 -> 64 channels at 56x56 and 0.57x for 64 -> 256.
//
// Pixels past the last whole vector of an image (H*W % lanes of them) go through a zero-padded
// one-vector panel in per-thread scratch; pointwise_conv_supported keeps such padding at most
// 1/8 of the lanes computed (7x7 images, 49 pixels: 64 lanes, take the general kernel).
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

// A tail's input panel [C][lanes] and result rows [K][lanes].
thread_local std::vector<float> tail_scratch;

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
  const int64_t HW = g.Ho * g.Wo, padded = (HW + bp::kLanes - 1) / bp::kLanes * bp::kLanes;
  const Strides4 &is = p.input_strides, &ws = p.weight_strides, &os = p.output_strides;
  return p.dtype == ScalarKind::kFloat32 && g.R == 1 && g.S == 1 && g.groups == 1 && g.stride_h == 1 &&
         g.stride_w == 1 && g.dilation_h == 1 && g.dilation_w == 1 && g.pad_top == 0 && g.pad_left == 0 &&
         g.input_dilation_h == 1 && g.input_dilation_w == 1 && g.Ho == g.H && g.Wo == g.W && HW > 0 &&
         is.d3 == 1 && is.d2 == g.W && is.d1 == HW && os.d3 == 1 && os.d2 == g.Wo && os.d1 == HW && ws.d1 == 1 &&
         8 * (padded - HW) <= padded;
}

void pointwise_conv(const Im2winConvParams& p) {
  const ConvGeometry& g = p.geometry;
  const int64_t C = g.C, K = g.K, HW = g.Ho * g.Wo;
  const float* input = static_cast<const float*>(p.input);
  const float* weight = static_cast<const float*>(p.weight);
  const float* bias = static_cast<const float*>(p.bias);
  float* output = static_cast<float*>(p.output);
  std::vector<const float*> rows(static_cast<size_t>(K));
  for (int64_t k = 0; k < K; ++k) rows[size_t(k)] = weight + k * p.weight_strides.d0;

  const bp::PanelBlocks runs(HW);  // runs of whole vectors per image
  const int64_t tail = HW % bp::kLanes, tasks_per_image = runs.count + (tail > 0);
  parallel_for(0, g.N * tasks_per_image, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / tasks_per_image, run = task % tasks_per_image;
      const float* x = input + n * p.input_strides.d0;
      float* out = output + n * p.output_strides.d0;
      if (run < runs.count) {
        const int64_t p0 = runs.start(run);
        const int width = runs.width(run);
        bp::panel_gemm<Math>(rows.data(), int(K), x + p0, width, C, out + p0, bp::PanelStrides{HW, HW});
        add_bias(bias, K, width, out + p0, HW);
        continue;
      }
      // The tail: its pixels zero-padded to one vector, computed there, copied back.
      const int64_t p0 = HW - tail;
      if (tail_scratch.size() < size_t((C + K) * bp::kLanes)) tail_scratch.resize(size_t((C + K) * bp::kLanes));
      float *panel = tail_scratch.data(), *result = panel + C * bp::kLanes;
      for (int64_t c = 0; c < C; ++c) store(panel + c * bp::kLanes, load_partial(x + c * HW + p0, int(tail)));
      bp::panel_gemm<Math>(rows.data(), int(K), panel, bp::kLanes, C, result, bp::PanelStrides{bp::kLanes, bp::kLanes});
      add_bias(bias, K, bp::kLanes, result, bp::kLanes);
      for (int64_t k = 0; k < K; ++k) store_partial(out + k * HW + p0, load(result + k * bp::kLanes), int(tail));
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
