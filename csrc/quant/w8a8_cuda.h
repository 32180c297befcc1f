// CUDA launchers of the W8A8 kernels (implemented in w8a8_cuda.cu, no torch headers). Semantics and
// parameters: quant/w8a8.h (the CPU kernels there are the reference, bit for bit).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "quant/w8a8.h"

namespace torch_ext::cuda {

// Per-token (per-row) symmetric int8 quantization: scale[r] = max(|x[r, :]|, clipped) / 127
// (1 for an all-zero row), q = saturate_int8(round_half_even(x / scale)), bitwise as the CPU kernel.
// Requires x_dtype fp32, fp16 or bf16; rows, k >= 0; any x row stride and alignment (x and its
// row stride 16-byte aligned take 16-byte loads, otherwise element loads); q contiguous [rows, k]
// (any alignment), scale [rows]. rows == 0 is a no-op; k == 0 writes scale = 1 for every row.
// Enqueues on `stream` and returns the launch status; cudaErrorInvalidValue for unsupported
// parameters (also rows > 2^31 - 1 CTAs' worth or null pointers that would be accessed).
// With p.zero_mask (int8_linear), the masked columns count as 0 (absmax and q), as on the CPU.
cudaError_t quantize_per_token(const QuantizePerTokenParams& p, cudaStream_t stream);

// int8_linear's outlier search (OutlierSearchParams, quant/int8_outliers_cuda.cu): two launches,
// no host synchronization; the chosen columns, ascending with -1 padding, and their zero mask,
// the same as the CPU's choice (the columns above the threshold, or the `slots` largest maxima,
// equal maxima lower column first). cudaErrorInvalidValue for unsupported parameters.
cudaError_t find_outlier_columns(const OutlierSearchParams& p, cudaStream_t stream);

// int8_linear's last pass (OutlierAddParams): out = y + the outlier features' 16-bit product, in
// the CPU kernel's order of operations (bitwise the CPU's add_outlier_product for the same y).
cudaError_t add_outlier_product(const OutlierAddParams& p, cudaStream_t stream);

// out[m, n] = float(sum_k a[m, k] b[n, k]) * a_scale[m] * b_scale[n or 0] (+ bias[n]), int32
// accumulation on the int8 tensor cores (mma.m16n8k32, sm_80+), fp32 epilogue, one rounding to
// out_dtype (fp32, fp16 or bf16), bitwise as the CPU kernel. Any m, n, k >= 0 below 2^31 - 256
// (k == 0 writes the bias or zeros; the int32 sums are exact for k <= 131072 and wrap beyond, as
// int32 arithmetic does); any row strides and alignments: a, b and their row strides all 16-byte
// aligned take the cp.async path, otherwise byte loads (correct, slower). a_scale, b_scale, bias
// and out need only their natural alignment. m == 0 or n == 0: cudaSuccess without a launch.
// Deterministic (no split-K, no atomics). Enqueues on `stream` (the current device's SM count
// picks the tile) and returns the launch status; cudaErrorInvalidValue for unsupported
// parameters or null pointers that would be accessed.
cudaError_t scaled_int8_mm(const ScaledInt8MmParams& p, cudaStream_t stream);

// out[m, n] = float(sum_k a[m, k] b[n, k]) * a_scale[m or 0] * b_scale[n or 0] (+ bias[n]) with
// a, b float8_e4m3fn bits: the kernel of scaled_int8_mm (same tiles, pipeline, alignment rules,
// limits on m, n, k and determinism) on mma.m16n8k32 .e4m3 with fp32 accumulators. Products are
// exact; the order and rounding of the fp32 sums inside the mma are the hardware's (not those of
// the CPU reference), so results match a reference to a tolerance, bitwise only where every
// partial sum is exact in fp32. NaN operands (0x7F / 0xFF) propagate to their row / column.
// Then the epilogue in fp32 (acc * a_scale, * b_scale, + bias, each rounded) and one rounding
// to out_dtype. Returns cudaErrorInvalidValue for unsupported parameters or null pointers that
// would be accessed, then cudaErrorNotSupported when the current device is below compute
// capability 8.9 (also for empty outputs), then cudaSuccess without a launch when m == 0 or n == 0;
// also cudaErrorNotSupported when the build holds no code for compute_89+ that the device can
// run (the sm_80 build of the kernel is a trap). sm_90 runs it on the fp16 tensor cores (Hopper
// has no fp8 mma.sync): correct, not fp8 speed; problems that fill the GPU can take the wgmma
// kernel of quant/w8a8_wgmma.h instead (sm_90a builds; TORCH_EXT_WGMMA=0 turns it off), as
// scaled_int8_mm's.
cudaError_t scaled_fp8_mm(const ScaledFp8MmParams& p, cudaStream_t stream);

}  // namespace torch_ext::cuda
