// weight_only_linear and dequantize_weight: input checks, allocation, and the choice of path.
//
// Few rows of x (decode, small batches) run the fused kernels, which read the packed weight
// once. Many rows (prefill) are a GEMM whose cost is the multiply, so the weight is
// dequantized (in cache-sized panels on the CPU, whole on CUDA) and torch's GEMM does the rest.
// Where the CPU has AMX-BF16, bf16 x of 8 to 1024 rows and 4-bit weights run on the tiles instead
// (quant/weight_only_cpu_amx.cpp), dequantizing into tile operands that never reach memory.
#include "quant/weight_only.h"

#include <limits>

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include "common/alignment.h"
#include "common/cpu/amx.h"
#include "common/cpu/gemm_dtype.h"
#include "common/cpu/isa.h"
#include "common/large_output.h"
#include "common/torch_utils.h"
#include "ops.h"
#include "quant/weight_only_cuda_index.h"
#include "quant/weight_only_layout.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "quant/weight_only_cuda.h"
#endif

namespace torch_ext {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
namespace cpu::avx512_vnni {
void weight_only_linear_vnni_dot(const WeightOnlyLinearParams& p);
}
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
namespace cpu::avx512_amx {
bool weight_only_amx_supports(const QuantizedWeightView& w);
void weight_only_linear_amx(const WeightOnlyLinearParams& p, bool emulate, bool scaled_weights);
}
#endif

namespace {

constexpr const char* kLinearOp = "weight_only_linear";
constexpr const char* kDequantizeOp = "dequantize_weight";

// The dtype of the dequantized panels and of torch's GEMM on them (common/cpu/gemm_dtype.h):
// measured on a Xeon VM without bf16 dot products (docs/perf/quant.md), 4-bit 4096 x 4096 at 256
// rows, bf16 panels 152 ms, fp32 panels 35.6 ms (F.linear bf16 142 ms).
at::ScalarType panel_dtype_cpu(at::ScalarType x) { return cpu::fast_gemm_dtype(x); }

// Rows of x up to which the fused CPU kernel beats dequantize + GEMM (measured on the
// project's AVX-512 VM, docs/perf/quant.md: the fused kernel re-reads the weight from cache
// once per 4 rows, the GEMM path pays one dequantization of the whole weight). Where the CPU has
// AMX-BF16, torch's bf16 GEMM runs on it and the crossover for bf16 x comes earlier: measured on
// a Sapphire Rapids VM at 4096 x 4096 g128, the fused kernel takes 0.18 ms a row (2.9 ms at 16,
// 5.8 at 32, 11.8 at 64), the panels about 5.2 ms at any of these M.
constexpr int64_t kDirectRowsCpu = 64;
constexpr int64_t kDirectRowsCpuAmxBf16 = 28;
// 16-bit x whose panels would run in fp32 takes the AVX512-VNNI kernel at any M: measured on a
// Xeon VM without bf16 dot products (4-bit g128 4096 x 4096, bf16 x), it took 9.3 / 12.5 / 24.7 /
// 101 / 220 ms at 96 / 128 / 256 / 1024 / 2048 rows against 17.3 / 20.5 / 35.6 / 125 / 255 for
// the fp32 panels. (Without VNNI nothing changes: our AVX2 kernels, forced on that VM, took 39.6
// ms at 96 rows against 17.0 for the panels, whose GEMM was still torch's AVX-512 code there.)
constexpr int64_t kDirectRowsCpuVnni = std::numeric_limits<int64_t>::max();

// Whether the fused kernel for x is the AVX512-VNNI one (compiled in, and active on this CPU):
// x rounded to int16 per span of columns (error at most 1/32512 of the span's largest |x|) is as
// precise as 16-bit x needs; fp32 x keeps the fp32 kernel.
bool runs_vnni_kernel(const at::Tensor& x) {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
  return x.scalar_type() != at::kFloat && cpu::avx512_vnni_active();
#else
  return false;
#endif
}

int64_t direct_rows_cpu(const at::Tensor& x) {
  const at::ScalarType dtype = x.scalar_type();
  if (dtype == at::kBFloat16 && cpu::amx_bf16_detected()) return kDirectRowsCpuAmxBf16;
  if (runs_vnni_kernel(x) && panel_dtype_cpu(dtype) == at::kFloat) return kDirectRowsCpuVnni;
  return kDirectRowsCpu;
}

#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
// Rows of bf16 x that run on AMX-BF16 tiles (quant/weight_only_cpu_amx.cpp), and from how many
// rows the tiles take scaled B (the dequantized weight in bf16) rather than exact B, measured on a
// Sapphire Rapids VM against the kernels beside it (docs/perf/quant.md, 4-bit g128, 4096 x 4096):
// the tiles took 950 us at 2-4 rows against 510-780 for the VNNI kernel (dequantizing every weight
// costs more than the few rows' products), 980 against 1060-1170 at 8; exact and scaled B ran even
// at 64 rows (2.1 ms), scaled B ahead from 128 (2.7 against 3.0 ms); at 1024 rows scaled B took
// 21.6 ms against 37.7 for the dequantized panels and torch's GEMM, at 2048 50 against 36 ms.
constexpr int64_t kAmxMinRows = 8;
constexpr int64_t kAmxScaledWeightsMinRows = 64;
constexpr int64_t kAmxMaxRows = 1024;

// The AMX mode weight_only_linear runs m rows of x in (off: the other kernels).
cpu::AmxMode amx_rows_mode(const at::Tensor& x, const QuantizedWeightView& w, int64_t m) {
  if (x.scalar_type() != at::kBFloat16 || m < kAmxMinRows || m > kAmxMaxRows || !cpu::avx512_vbmi_detected() ||
      !cpu::avx512_bf16_active() || !cpu::avx512_amx::weight_only_amx_supports(w))
    return cpu::AmxMode::kOff;
  return cpu::amx_bf16_kernel_mode();
}
#endif

// Bytes of one dequantized weight panel on the CPU: a few hundred rows, so that each GEMM call
// is large enough for oneDNN, while the panel stays in the last-level cache between the
// dequantization that writes it and the GEMM that reads it.
constexpr int64_t kPanelBytes = 4 * 1024 * 1024;
// ... but never fewer rows than this: narrower GEMM calls lose to F.linear (measured at
// K = 14336, M = 256: 144-row panels ran 0.53x of F.linear).
constexpr int64_t kMinPanelRows = 256;

struct Layout {
  int64_t n, k, group_size;  // group_size as the kernels see it (> 0)
};

// Checks qweight / scales / zeros against each other and against K; returns the geometry.
Layout check_weight(const char* op, const at::Tensor& qweight, const at::Tensor& scales,
                    const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size, int64_t k) {
  TORCH_EXT_CHECK(bits == 4 || bits == 8, op, "bits must be 4 or 8, got ", bits);
  TORCH_EXT_CHECK(group_size == -1 || (group_size > 0 && group_size % quant::kTileK == 0), op,
                  "group_size must be -1 (per output channel) or a positive multiple of 16, got ", group_size);
  check_dtype(op, "qweight", qweight, {at::kInt});
  TORCH_EXT_CHECK(qweight.dim() == 3 && qweight.size(2) == quant::words_per_tile(int(bits)), op,
                  "qweight must be [ceil(N/16), ceil(K/16), ", quant::words_per_tile(int(bits)), "] for ", bits,
                  "-bit weights (docs/quant-layout.md), got shape ", qweight.sizes());
  TORCH_EXT_CHECK(qweight.is_contiguous(), op, "qweight must be contiguous");
  TORCH_EXT_CHECK(qweight.size(1) == quant::tiles_for(k), op, "qweight holds ", qweight.size(1),
                  " tiles of 16 input features, but K = ", k, " needs ", quant::tiles_for(k));
  check_dtype(op, "scales", scales, {at::kFloat, at::kHalf, at::kBFloat16});
  check_same_device(op, "scales", scales, "qweight", qweight);
  TORCH_EXT_CHECK(scales.dim() == 2, op, "scales must be [groups, N], got shape ", scales.sizes());
  const int64_t n = scales.size(1);
  TORCH_EXT_CHECK(qweight.size(0) == quant::tiles_for(n), op, "qweight holds ", qweight.size(0),
                  " tiles of 16 output features, but scales has N = ", n, " columns (needs ", quant::tiles_for(n), ")");
  // (Per channel with K = 0: one empty group; no division by a zero group below.)
  const int64_t group = group_size > 0 ? group_size : std::max<int64_t>(1, quant::tiles_for(k)) * quant::kTileK;
  const int64_t groups = std::max<int64_t>(1, (k + group - 1) / group);
  TORCH_EXT_CHECK(scales.size(0) == groups, op, "scales must be [ceil(K / group_size), N] = [", groups, ", ", n,
                  "] for K = ", k, " and group_size = ", group_size, ", got shape ", scales.sizes());
  if (zeros) {
    check_same_dtype(op, "zeros", *zeros, "scales", scales);
    check_same_device(op, "zeros", *zeros, "scales", scales);
    TORCH_EXT_CHECK(zeros->sizes() == scales.sizes(), op, "zeros must have the shape of scales ", scales.sizes(),
                    ", got ", zeros->sizes());
  }
  return Layout{n, k, group};
}

// qweight as the CUDA kernels read it: 16-byte cp.async / uint4 loads need a 16-byte aligned base,
// which a contiguous view into a larger buffer need not have (then a copy, freshly aligned).
at::Tensor aligned_qweight(const at::Tensor& qweight) {
  return !qweight.is_cuda() || is_aligned(qweight.data_ptr(), 16) ? qweight : qweight.clone();
}

QuantizedWeightView weight_view(const Layout& l, int64_t bits, const at::Tensor& qweight, const at::Tensor& scales,
                                const at::Tensor& zeros) {
  return QuantizedWeightView{int(bits),           l.group_size,         l.n, l.k, qweight.data_ptr<int32_t>(),
                             scalar_kind(scales), scales.data_ptr(),    zeros.defined() ? zeros.data_ptr() : nullptr};
}

// The scales and zeros as contiguous tensors (the kernels read [groups, N] rows), converted to
// `dtype` when given (the CUDA GEMM reads them in the activation dtype; a checkpoint whose
// scales differ costs one small conversion per call).
std::pair<at::Tensor, at::Tensor> group_params(const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                               c10::optional<at::ScalarType> dtype = c10::nullopt) {
  const auto convert = [&](const at::Tensor& t) { return (dtype ? t.to(*dtype) : t).contiguous(); };
  return {convert(scales), zeros ? convert(*zeros) : at::Tensor()};
}

void dequantize_cpu(const QuantizedWeightView& w, int64_t row_begin, int64_t row_end, at::Tensor& out) {
  const DequantizeWeightParams p{w, scalar_kind(out), row_begin, row_end, out.data_ptr()};
  TORCH_EXT_CPU_DISPATCH(dequantize_weight, p);
}

// Prefill on the CPU: y = x @ W^T panel by panel, each panel dequantized into a buffer that
// stays in cache for the GEMM.
void linear_by_panels_cpu(const QuantizedWeightView& w, const at::Tensor& x_rows, at::Tensor& y) {
  const at::ScalarType compute = panel_dtype_cpu(x_rows.scalar_type());
  const at::Tensor x = x_rows.to(compute);
  const int64_t panel_rows = std::max<int64_t>(
      kMinPanelRows, kPanelBytes / (w.k * int64_t(c10::elementSize(compute))) / quant::kTileN * quant::kTileN);
  at::Tensor panel = at::empty({std::min(panel_rows, w.n), w.k}, x.options());
  for (int64_t row = 0; row < w.n; row += panel_rows) {
    const int64_t rows = std::min(panel_rows, w.n - row);
    at::Tensor part = panel.narrow(0, 0, rows);
    dequantize_cpu(w, row, row + rows, part);
    y.narrow(1, row, rows).copy_(at::mm(x, part.t()));
  }
}

#if defined(TORCH_EXT_WITH_CUDA)
// The CUDA GEMM with its split-K workspace, on the current stream of x's device.
void run_linear_cuda(const WeightOnlyLinearParams& p, const at::Tensor& x) {
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  at::Tensor workspace =
      at::empty({cuda::weight_only_linear_workspace_bytes(p, num_sms)}, x.options().dtype(at::kByte));
  C10_CUDA_CHECK(cuda::weight_only_linear(p, workspace.numel() ? workspace.data_ptr() : nullptr, num_sms,
                                          c10::cuda::getCurrentCUDAStream()));
}
#endif

at::Tensor output_for(const at::Tensor& x, int64_t n) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  return empty_large_output(shape, x.options());
}

}  // namespace

at::Tensor weight_only_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& zeros, const c10::optional<at::Tensor>& bias,
                              int64_t bits, int64_t group_size) {
  const char* op = kLinearOp;
  check_dim_at_least(op, "x", x, 1);
  if (x.is_cuda()) {
    check_dtype(op, "x", x, {at::kHalf, at::kBFloat16});
  } else {
    check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  }
  check_same_device(op, "qweight", qweight, "x", x);
  const Layout layout = check_weight(op, qweight, scales, zeros, bits, group_size, x.size(-1));
  if (bias) {
    check_same_dtype(op, "bias", *bias, "x", x);
    check_same_device(op, "bias", *bias, "x", x);
    TORCH_EXT_CHECK(bias->dim() == 1 && bias->size(0) == layout.n, op, "bias must be [N] = [", layout.n,
                    "], got shape ", bias->sizes());
  }
  const at::Tensor x_rows = as_rows(x);
  const int64_t m = x_rows.size(0);
  at::Tensor y = output_for(x, layout.n);
  if (y.numel() == 0) return y;
  at::Tensor y_rows = y.view({m, layout.n});
  const at::Tensor bias_c = bias ? bias->contiguous() : at::Tensor();
  if (layout.k == 0) {  // an empty sum: the bias or zeros, as F.linear gives
    if (bias) {
      y_rows.copy_(bias_c.expand_as(y_rows));
    } else {
      y_rows.zero_();
    }
    return y;
  }

  if (x.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    const auto [s, z] = group_params(scales, zeros, x.scalar_type());
    const at::Tensor qw = aligned_qweight(qweight);
    const QuantizedWeightView w = weight_view(layout, bits, qw, s, z);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (m > kWeightOnlyDirectRowsCuda) {
      at::Tensor dense = at::empty({layout.n, layout.k}, x.options());
      C10_CUDA_CHECK(cuda::dequantize_weight(DequantizeWeightParams{w, scalar_kind(x), 0, layout.n, dense.data_ptr()},
                                             stream));
      at::mm_out(y_rows, x_rows, dense.t());
      if (bias) y_rows.add_(bias_c);
      return y;
    }
    run_linear_cuda(WeightOnlyLinearParams{w, scalar_kind(x), m, x_rows.data_ptr(), x_rows.stride(0),
                                           bias ? bias_c.data_ptr() : nullptr, y_rows.data_ptr(), y_rows.stride(0)},
                    x);
    return y;
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }

  const auto [s, z] = group_params(scales, zeros);
  const QuantizedWeightView w = weight_view(layout, bits, qweight, s, z);
  const WeightOnlyLinearParams p{w, scalar_kind(x), m, x_rows.data_ptr(), x_rows.stride(0),
                                 bias ? bias_c.data_ptr() : nullptr, y_rows.data_ptr(), y_rows.stride(0)};
#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
  if (const cpu::AmxMode amx = amx_rows_mode(x, w, m); amx != cpu::AmxMode::kOff) {
    cpu::avx512_amx::weight_only_linear_amx(p, amx == cpu::AmxMode::kEmulate, m >= kAmxScaledWeightsMinRows);
    return y;
  }
#endif
  if (m > direct_rows_cpu(x)) {
    linear_by_panels_cpu(w, x_rows, y_rows);
    if (bias) y_rows.add_(bias_c);
    return y;
  }
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
  if (runs_vnni_kernel(x)) {
    cpu::avx512_vnni::weight_only_linear_vnni_dot(p);
    return y;
  }
#endif
  TORCH_EXT_CPU_DISPATCH(weight_only_linear, p);
  return y;
}

at::Tensor weight_only_linear_row_experts(const char* op, const at::Tensor& x, const at::Tensor& qweight,
                                          const at::Tensor& scales, const c10::optional<at::Tensor>& zeros,
                                          const at::Tensor& row_experts, int64_t expert_rows,
                                          int64_t x_row_divisor, int64_t bits, int64_t group_size) {
  TORCH_EXT_CHECK(x.is_cuda() && x.dim() == 2, op, "row experts need a CUDA x [rows, K], got ", x.sizes(), " on ",
                  x.device());
  TORCH_EXT_CHECK(quant::wo_cuda::expert_rows_valid(expert_rows), op, "row experts come one row or ",
                  quant::wo_cuda::kDecodeBlockM, " or ", quant::wo_cuda::kBatchBlockM, " rows per block, got ",
                  expert_rows);
  TORCH_EXT_CHECK(expert_rows == 1 || (x_row_divisor == 1 && row_experts.numel() == x.size(0) &&
                                       row_experts.numel() % expert_rows == 0),
                  op, "row experts in blocks of ", expert_rows, " rows need x [R, K] and row_experts [R] with R a ",
                  "multiple of it, got x ", x.sizes(), " and ", row_experts.numel(), " row experts");
  check_dtype(op, "x", x, {at::kHalf, at::kBFloat16});
  check_dtype(op, "row_experts", row_experts, {at::kInt});
  check_same_device(op, "qweight", qweight, "x", x);
  check_same_device(op, "scales", scales, "x", x);
  if (zeros) check_same_device(op, "zeros", *zeros, "x", x);
  check_same_device(op, "row_experts", row_experts, "x", x);
  TORCH_EXT_CHECK(qweight.dim() == 4 && scales.dim() == 3 && x_row_divisor >= 1, op,
                  "expects stacked qweight [E, N/16, K/16, words] and scales [E, groups, N], got ", qweight.sizes(),
                  " and ", scales.sizes());
  const Layout layout = check_weight(op, qweight[0], scales[0], zeros ? c10::optional<at::Tensor>((*zeros)[0]) : zeros,
                                     bits, group_size, x.size(1));
  const int64_t rows = row_experts.numel(), x_rows_needed = (rows + x_row_divisor - 1) / x_row_divisor;
  TORCH_EXT_CHECK(x_rows_needed <= x.size(0), op, "row_experts' ", rows, " rows at ", x_row_divisor,
                  " per x row need ", x_rows_needed, " rows of x, got ", x.size(0));
  at::Tensor y = at::empty({rows, layout.n}, x.options());
  if (y.numel() == 0) return y;
  if (layout.k == 0) return y.zero_();
#if defined(TORCH_EXT_WITH_CUDA)
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x_rows = x.stride(1) == 1 ? x : x.contiguous();
  const auto [s, z] = group_params(scales, zeros, x.scalar_type());
  const at::Tensor qw = aligned_qweight(qweight.contiguous());
  const at::Tensor ids = row_experts.reshape({-1}).contiguous();
  WeightOnlyLinearParams p{weight_view(layout, bits, qw, s, z), scalar_kind(x), rows, x_rows.data_ptr(),
                           x_rows.stride(0), nullptr, y.data_ptr(), y.stride(0)};
  p.row_experts = ids.data_ptr<int32_t>();
  p.expert_rows = expert_rows;
  p.x_row_divisor = x_row_divisor;
  p.expert_qweight_words = qw.stride(0);
  p.expert_scale_elems = s.stride(0);
  run_linear_cuda(p, x);
  return y;
#else
  TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
}

at::Tensor dequantize_weight(const at::Tensor& qweight, const at::Tensor& scales,
                             const c10::optional<at::Tensor>& zeros, int64_t bits, int64_t group_size,
                             c10::optional<int64_t> in_features) {
  const char* op = kDequantizeOp;
  TORCH_EXT_CHECK(qweight.dim() == 3, op, "qweight must be [ceil(N/16), ceil(K/16), words], got shape ",
                  qweight.sizes());
  const int64_t k = in_features ? *in_features : qweight.size(1) * quant::kTileK;
  TORCH_EXT_CHECK(k > 0, op, "in_features must be positive, got ", k);
  const Layout layout = check_weight(op, qweight, scales, zeros, bits, group_size, k);
  const auto [s, z] = group_params(scales, zeros);
  const at::Tensor qw = aligned_qweight(qweight);
  const QuantizedWeightView w = weight_view(layout, bits, qw, s, z);
  at::Tensor out = empty_large_output({layout.n, layout.k}, scales.options());
  if (out.numel() == 0) return out;
  if (qweight.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(qweight.device());
    C10_CUDA_CHECK(cuda::dequantize_weight(DequantizeWeightParams{w, scalar_kind(out), 0, layout.n, out.data_ptr()},
                                           c10::cuda::getCurrentCUDAStream()));
    return out;
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  dequantize_cpu(w, 0, layout.n, out);
  return out;
}

}  // namespace torch_ext
