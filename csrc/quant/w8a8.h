// W8A8 (int8 weights and activations): per-token activation quantization and the scaled int8
// GEMM. Parameters and CPU kernel entry points. Torch-free.
//
//   quantize_per_token: for each row r of x [rows, k]: amax = max_k |x[r, k]| (clamped to
//     `clip` when clip > 0), scale[r] = amax / 127 (1 when amax == 0), q[r, k] =
//     saturate_int8(round_half_even(x[r, k] / scale[r])).
//   scaled_int8_mm: out[m, n] = float(sum_k a[m, k] * b[n, k]) * a_scale[m] * b_scale[n or 0]
//     + bias[n], with exact int32 accumulation, the scaling in fp32 and one rounding to out.
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"
#include "common/macros.h"

namespace torch_ext {

struct QuantizePerTokenParams {
  ScalarKind x_dtype;  // fp32, fp16 or bf16
  int64_t rows, k;
  const void* x;  // [rows, k], unit column stride
  int64_t x_row_stride;
  float clip;       // <= 0: no clipping
  int8_t* q;        // [rows, k] contiguous
  float* scale;     // [rows]
  // int8_linear: bit c % 32 of word c / 32 set = column c of x counts as 0 (its feature takes the
  // 16-bit path); [ceil(k / 32)] words, or null.
  const uint32_t* zero_mask = nullptr;
};

// max over rows of |x[r, c]| per column c (fp32 [k]): int8_linear's outlier search, without
// the |x| temporary torch would allocate.
struct ColumnAbsMaxParams {
  ScalarKind x_dtype;  // fp32, fp16 or bf16
  int64_t rows, k;
  const void* x;       // [rows, k], unit column stride
  int64_t x_row_stride;
  float* out;          // [k]
};

struct ScaledInt8MmParams {
  int64_t m, n, k;
  const int8_t* a;  // [m, k], unit column stride
  int64_t a_row_stride;
  const int8_t* b;  // [n, k], unit column stride (nn.Linear's weight layout)
  int64_t b_row_stride;
  const float* a_scale;      // [m]
  const float* b_scale;      // [n], or [1] when !b_scale_per_channel
  bool b_scale_per_channel;
  const float* bias;         // [n] or nullptr
  ScalarKind out_dtype;      // fp32, fp16 or bf16
  void* out;                 // [m, n], unit column stride
  int64_t out_row_stride;
};

// Bytes of B packed for the CPU kernels (quant/w8a8_cpu_packing.h): int8 blocks of 16 columns
// x 4 k plus the int32 column sums.
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
inline int64_t packed_int8_b_bytes(int64_t n, int64_t k) {
  const int64_t values = (n + 15) / 16 * 16 * ((k + 3) / 4 * 4);
  return (values + 63) / 64 * 64 + (n + 15) / 16 * 16 * 4;
}
// Bytes of B packed for the CPU scaled_fp8_mm (quant/w8a8_cpu_fp8.cpp): bf16 pairs in blocks
// of 16 columns.
inline int64_t packed_fp8_b_bytes(int64_t n, int64_t k) { return (n + 15) / 16 * 16 * ((k + 1) / 2) * 4; }
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE

//   scaled_fp8_mm: out[m, n] = float(sum_k a[m, k] * b[n, k]) * a_scale[m or 0] * b_scale[n or 0]
//     + bias[n], a and b float8_e4m3fn (OCP E4M3: bias 7, no infinities, 0x7F/0xFF = NaN),
//     products exact, sums in fp32, one rounding to out.
struct ScaledFp8MmParams {
  int64_t m, n, k;
  const uint8_t* a;  // [m, k] e4m3 bits, unit column stride
  int64_t a_row_stride;
  const uint8_t* b;  // [n, k] e4m3 bits, unit column stride
  int64_t b_row_stride;
  const float* a_scale;  // [m], or [1] when !a_scale_per_row
  bool a_scale_per_row;
  const float* b_scale;  // [n], or [1] when !b_scale_per_channel
  bool b_scale_per_channel;
  const float* bias;     // [n] or nullptr
  ScalarKind out_dtype;  // fp32, fp16 or bf16
  void* out;             // [m, n], unit column stride
  int64_t out_row_stride;
};

//   add_outlier_product: out[m, n] += sum_c x[m, c] * w[n, columns[c]] * w_scale[n], in fp32
//     with one rounding into out: int8_linear's 16-bit path for its few outlier features, with
//     the weight columns gathered and dequantized in place (a [m, C] x [C, n] product with C a
//     handful is a poor GEMM: torch's took 300-1000 us at 256 x 4 x 4096 on the project VM).
struct OutlierProductParams {
  int64_t m, n, columns_count;
  const float* x;           // [m, C] contiguous: the outlier features of the rows
  const int64_t* columns;   // [C]: their indices in w's rows
  const int8_t* w;          // [n, k], unit column stride
  int64_t w_row_stride;
  const float* w_scale;     // [n]
  ScalarKind out_dtype;     // fp32, fp16 or bf16
  void* out;                // [m, n], unit column stride
  int64_t out_row_stride;
};

// int8_linear's outlier features on CUDA, found without a host synchronization: the column
// maxima of |x|, then the columns whose maximum exceeds `threshold`, or, when more than `slots`
// do, the `slots` largest maxima (equal maxima: lower columns first). NaN in x: the maxima skip
// it (fmax), where the CPU's vector max may not, so the choice may differ from the CPU's.
struct OutlierSearchParams {
  ScalarKind x_dtype;  // fp32, fp16 or bf16
  int64_t rows, k;     // rows >= 1
  const void* x;       // [rows, k], unit column stride
  int64_t x_row_stride;
  float threshold;     // >= 0 (a positive double threshold may round to 0 in fp32, as on the CPU)
  int32_t slots;       // 1 <= slots <= k
  float* partial;      // workspace [int8_outliers::search_splits(rows), k]
  int32_t* columns;    // [slots]: the outlier columns ascending, then -1
  uint32_t* zero_mask; // [ceil(k / 32)]: their bits (QuantizePerTokenParams::zero_mask)
};

// int8_linear's last pass on CUDA: out[m, n] = y[m, n] + sum over the listed columns c in
// ascending order of x[m, c] * (float(w[n, c]) * w_scale[n]), fp32 fused multiply-adds as the
// CPU's add_outlier_product, one rounding to out's dtype.
struct OutlierAddParams {
  int64_t m, n;
  int32_t slots;
  const int32_t* columns;  // [slots]: ascending, then -1
  ScalarKind x_dtype;      // fp32, fp16 or bf16
  const void* x;           // [m, k], unit column stride
  int64_t x_row_stride;
  const int8_t* w;         // [n, k], unit column stride
  int64_t w_row_stride;
  const float* w_scale;    // [n] or [1]
  bool w_scale_per_channel;
  const float* y;          // [m, n] contiguous
  ScalarKind out_dtype;    // fp32, fp16 or bf16
  void* out;               // [m, n] contiguous
};

// Up to this many rows of A (decode), the CPU scaled_int8_mm reads B as it is: B is read once
// either way, so packing it would only add a pass over it (or, cached, a second copy of every
// weight: the packed-weight cache's 256 MB budget is far below an LLM's int8 weights, and a
// two-layer Llama-3-8B-shaped model repacked every weight on every token, 3x slower than bf16).
constexpr int64_t kUnpackedInt8MaxRows = 16;
// The same for the CPU scaled_fp8_mm (w8a8_cpu_fp8.cpp).
constexpr int64_t kUnpackedFp8MaxRows = 16;

namespace cpu {
TORCH_EXT_DECLARE_CPU_KERNEL(void quantize_per_token(const QuantizePerTokenParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void add_outlier_product(const OutlierProductParams& p))
TORCH_EXT_DECLARE_CPU_KERNEL(void column_abs_max(const ColumnAbsMaxParams& p))
// B (p.b, p.n, p.k) into the packed layout, packed_int8_b_bytes(n, k) bytes.
TORCH_EXT_DECLARE_CPU_KERNEL(void pack_int8_b(const ScaledInt8MmParams& p, uint8_t* packed))
// out from A (p.a) and packed B (p.b not read), or with packed_b null from p.b, each task packing
// its column blocks into its thread's buffer.
TORCH_EXT_DECLARE_CPU_KERNEL(void scaled_int8_mm_packed(const ScaledInt8MmParams& p, const uint8_t* packed_b))
// out from A and B as they are (row-major [N, K]), for at most kUnpackedInt8MaxRows rows of A.
TORCH_EXT_DECLARE_CPU_KERNEL(void scaled_int8_mm_unpacked(const ScaledInt8MmParams& p))
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
namespace avx512_vnni {
void scaled_int8_mm_vnni(const ScaledInt8MmParams& p, const uint8_t* packed_b);
void scaled_int8_mm_unpacked_vnni(const ScaledInt8MmParams& p);
}
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
namespace avx512_bf16 {
// B's e4m3 codes (p.b) through to_bf16 (the bf16 value of each of the 256 codes) into the packed
// layout of w8a8_cpu_fp8.cpp, packed_fp8_b_bytes(n, k) bytes.
void pack_fp8_b(const ScaledFp8MmParams& p, const uint16_t* to_bf16, uint8_t* packed);
// out from A's e4m3 codes and packed B with bf16 dot products (vdpbf16ps, or AMX-BF16 tiles as
// cpu::amx_bf16_kernel_mode() says); p.b is not read.
void scaled_fp8_mm_bf16(const ScaledFp8MmParams& p, const uint16_t* to_bf16, const uint8_t* packed_b);
// out from A and B as they are, for at most kUnpackedFp8MaxRows rows of A (B's codes widened in
// registers).
void scaled_fp8_mm_unpacked_bf16(const ScaledFp8MmParams& p, const uint16_t* to_bf16);
}
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
namespace avx512_amx {
// The packed path on AMX-INT8 tiles (w8a8_cpu_amx.cpp), or with packed_b null from p.b, each task
// packing its pair of column blocks into its thread's buffer; `emulate`: on emulated tiles.
void scaled_int8_mm_amx(const ScaledInt8MmParams& p, const uint8_t* packed_b, bool emulate);
}
#endif
}  // namespace cpu

}  // namespace torch_ext
