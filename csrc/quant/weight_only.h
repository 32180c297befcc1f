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

// Rows of x up to which CUDA runs the fused kernel, built for decode and small batches (its batch
// tile is 64 tokens); beyond this, cuBLAS on a dequantized weight. A first guess, to be tuned on
// the H100.
constexpr int64_t kWeightOnlyDirectRowsCuda = 256;

struct WeightOnlyLinearParams {
  QuantizedWeightView w;
  ScalarKind x_dtype;  // of x, bias and y
  int64_t m;           // rows of x (tokens)
  const void* x;       // [m, k], unit column stride
  int64_t x_row_stride;
  const void* bias;  // [n] or nullptr
  void* y;           // [m, n], unit column stride
  int64_t y_row_stride;
  // Row experts (CUDA only; fused_moe_quantized): when set, `w` is expert 0 of a stack of
  // same-shaped weights, expert e's starting e * expert_qweight_words words / e *
  // expert_scale_elems scales (and zeros) after it, and row_experts (device memory, ids the
  // caller has checked) picks them:
  //   expert_rows = 1 (decode): y row r = x row (r / x_row_divisor) times expert row_experts[r];
  //   expert_rows = 16 or 64 (rows grouped by expert, each expert's padded to a multiple of it):
  //   the rows of block b = [b * expert_rows, (b + 1) * expert_rows) times expert
  //   row_experts[b * expert_rows], or written as zeros where that is -1 (blocks past the
  //   grouped rows); x_row_divisor 1.
  const int32_t* row_experts = nullptr;
  int64_t expert_rows = 1;
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
