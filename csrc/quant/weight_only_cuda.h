// CUDA launchers of the weight-only quantized linear (implemented in weight_only_cuda.cu, no
// torch headers). Semantics and parameters: quant/weight_only.h; the packed layout:
// quant/weight_only_layout.h and docs/quant-layout.md.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant/weight_only.h"

namespace torch_ext::cuda {

// Bytes of device workspace weight_only_linear needs for these parameters on a device with
// `num_sms` multiprocessors (split-K partial sums; 0 when it does not split). Pure host function
// of (m, n, k, bits, num_sms); at most num_sms * 128 KB.
int64_t weight_only_linear_workspace_bytes(const WeightOnlyLinearParams& p, int num_sms);

// y = x @ dequant(W)^T + bias with fp32 accumulation and one rounding to x's dtype; every
// weight is (q - zero) * scale rounded to x's dtype first, as dequantize_weight computes it.
// Requires x_dtype fp16 or bf16 and w.scale_dtype == x_dtype (the caller converts scales);
// any m, n, k >= 0 (k == 0 writes the bias or zeros), any x/y row strides and alignments
// (unaligned x or scales take a slower load path). `workspace` holds at least
// weight_only_linear_workspace_bytes(p, num_sms) bytes (16-byte aligned); nullptr runs unsplit
// (correct, slower for small m). Deterministic: the same inputs and num_sms give the same bits.
// Enqueues on `stream` and returns the launch status; cudaErrorInvalidValue for unsupported
// parameters (also m >= 2^31 - 64, n > 65535 * 256, k >= 2^30).
cudaError_t weight_only_linear(const WeightOnlyLinearParams& p, void* workspace, int num_sms,
                               cudaStream_t stream);

// The block size of grouped row experts (WeightOnlyLinearParams::expert_rows) for `pairs` rows
// over `experts` experts: the decode config's 16 rows while the experts that can have rows
// average at most that many (few rows per expert: the weights stream once per 16 rows, little
// padding), else the batch config's 64 (more rows per weight tile). Host function.
int64_t weight_only_expert_block_rows(int64_t pairs, int64_t experts);

// out[n, k] = (q - zero) * scale rounded once to out_dtype (fp16, bf16 or fp32); any scale dtype.
cudaError_t dequantize_weight(const DequantizeWeightParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
