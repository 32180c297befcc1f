// Weight-only quantized linear: parameters and CPU kernel entry points. Torch-free.
//
//   y[m, n] = bias[n] + sum_k x[m, k] * (q[n, k] - zero[g, n]) * scale[g, n],  g = k / group_size
// with q the unsigned 4- or 8-bit values packed as quant/weight_only_layout.h (and
// docs/quant-layout.md) describe, scale and zero [groups, N] (zero is an integer stored in the
// scale dtype; absent = symmetric, zero = 2^(bits-1)), groups = ceil(K / group_size).
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"

namespace torch_ext {

struct QuantizedWeightView {
  int bits;            // 4 or 8
  int64_t group_size;  // > 0, a multiple of 16 (per-channel quantization passes K rounded up to 16)
  int64_t n, k;        // logical out_features, in_features
  const int32_t* qweight;  // [tiles_for(n), tiles_for(k), words_per_tile(bits)]
  ScalarKind scale_dtype;  // of scales and zeros: fp32, fp16 or bf16
  const void* scales;      // [groups, n], contiguous
  const void* zeros;       // [groups, n], contiguous, integer values; nullptr = symmetric
};

struct WeightOnlyLinearParams {
  QuantizedWeightView w;
  ScalarKind x_dtype;  // of x, bias and y
  int64_t m;           // rows of x (tokens)
  const void* x;       // [m, k], unit column stride
  int64_t x_row_stride;
  const void* bias;  // [n] or nullptr
  void* y;           // [m, n], unit column stride
  int64_t y_row_stride;
  // Row experts (CUDA only; fused_moe_quantized's decode path): when set, `w` is expert 0 of a
  // stack of same-shaped weights and y row r = x row (r / x_row_divisor) times the weight of
  // expert row_experts[r] (device memory, ids the caller has checked), which starts
  // expert_qweight_words words / expert_scale_elems scales (and zeros) after expert 0's.
  const int32_t* row_experts = nullptr;
  int64_t x_row_divisor = 1;
  int64_t expert_qweight_words = 0, expert_scale_elems = 0;
};

struct DequantizeWeightParams {
  QuantizedWeightView w;
  ScalarKind out_dtype;  // of out
  // Rows [row_begin, row_end) of W are written (row_begin a multiple of 16): the CPU's
  // large-batch path dequantizes one cache-sized panel at a time. CUDA takes the full range.
  int64_t row_begin, row_end;
  void* out;  // [row_end - row_begin, k] contiguous
};

namespace cpu {
TORCH_EXT_DECLARE_CPU_KERNEL(void weight_only_linear(const WeightOnlyLinearParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void dequantize_weight(const DequantizeWeightParams& p))
}  // namespace cpu

}  // namespace torch_ext
