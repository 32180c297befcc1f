// quantize_per_token and scaled_int8_mm: input checks, allocation, the packed-B cache, and
// the choice of kernel.
#include "quant/w8a8.h"

#include <array>
#include <cstring>

#include <ATen/ops/arange.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/matmul.h>
#include <ATen/ops/zeros.h>

#include "common/cpu/amx.h"
#include "common/cpu/isa.h"
#include "common/large_output.h"
#include "common/torch_utils.h"
#include "conv/packed_weight_cache.h"
#include "ops.h"
#include "quant/int8_outliers_index.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "quant/w8a8_cuda.h"
#endif

namespace torch_ext {
namespace {

constexpr const char* kQuantizeOp = "quantize_per_token";
constexpr const char* kMmOp = "scaled_int8_mm";
// Cache tags of packed int8 and fp8 B (the cache's "ISA" slot: the layouts are the same at every level).
constexpr int kPackedInt8Tag = 1000;
constexpr int kPackedFp8Tag = 1001;

// The bf16 bits of each of the 256 float8_e4m3fn codes (all exact in bf16; NaN codes give NaN),
// as torch converts them.
const uint16_t* e4m3_to_bf16() {
  static const std::array<uint16_t, 256> table = [] {
    const at::Tensor codes = at::arange(256, at::TensorOptions().dtype(at::kInt)).to(at::kByte);
    const at::Tensor values = codes.view(at::kFloat8_e4m3fn).to(at::kBFloat16).contiguous();
    std::array<uint16_t, 256> bits{};
    std::memcpy(bits.data(), values.data_ptr(), sizeof(bits));
    return bits;
  }();
  return table.data();
}

at::Tensor unit_column_stride(const at::Tensor& t) { return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous(); }

// The operands of a scaled GEMM after the checks both (int8, fp8) share: unit column strides,
// contiguous fp32 scales, the bias as fp32.
struct ScaledMmOperands {
  int64_t m, n, k;
  at::Tensor a, b, a_scale, b_scale, bias;
  bool a_scale_per_row, b_scale_per_channel;
};

// a [M, K] and b [N, K] of `operand_dtype`, a_scale fp32 [M, 1] (or one element when
// `a_scale_may_be_scalar`), b_scale fp32 [N] or [1], bias [N] float, out_dtype fp32/fp16/bf16.
ScaledMmOperands check_scaled_mm(const char* op, at::ScalarType operand_dtype, bool a_scale_may_be_scalar,
                                 const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                                 const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias,
                                 at::ScalarType out_dtype) {
  check_dtype(op, "a", a, {operand_dtype});
  check_dtype(op, "b", b, {operand_dtype});
  TORCH_EXT_CHECK(a.dim() == 2 && b.dim() == 2, op, "a and b must be 2-D ([M, K] and [N, K]), got shapes ", a.sizes(),
                  " and ", b.sizes());
  TORCH_EXT_CHECK(a.size(1) == b.size(1), op, "a [M, K] and b [N, K] must share K, got ", a.sizes(), " and ",
                  b.sizes());
  const int64_t m = a.size(0), n = b.size(0);
  check_dtype(op, "a_scale", a_scale, {at::kFloat});
  check_dtype(op, "b_scale", b_scale, {at::kFloat});
  const bool a_per_row = a_scale.numel() == m && (a_scale.dim() == 1 || (a_scale.dim() == 2 && a_scale.size(1) == 1));
  TORCH_EXT_CHECK(a_per_row || (a_scale_may_be_scalar && a_scale.numel() == 1), op, "a_scale must be [M, 1] = [", m,
                  ", 1]", a_scale_may_be_scalar ? " or one element" : "", ", got shape ", a_scale.sizes());
  TORCH_EXT_CHECK(b_scale.dim() <= 1 && (b_scale.numel() == n || b_scale.numel() == 1), op,
                  "b_scale must be [N] = [", n, "] or [1], got shape ", b_scale.sizes());
  TORCH_EXT_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16, op,
                  "out_dtype must be torch.float32, torch.float16 or torch.bfloat16, got ", dtype_name(out_dtype));
  for (const at::Tensor* t : {&b, &a_scale, &b_scale}) check_same_device(op, "every tensor", *t, "a", a);
  if (bias) {
    check_dtype(op, "bias", *bias, {at::kFloat, at::kHalf, at::kBFloat16});
    check_same_device(op, "bias", *bias, "a", a);
    TORCH_EXT_CHECK(bias->dim() == 1 && bias->size(0) == n, op, "bias must be [N] = [", n, "], got shape ",
                    bias->sizes());
  }
  return ScaledMmOperands{m, n, a.size(1), unit_column_stride(a), unit_column_stride(b), a_scale.contiguous(),
                          b_scale.contiguous(), bias ? bias->to(at::kFloat).contiguous() : at::Tensor(),
                          a_per_row && m > 1, b_scale.numel() == n && n > 1};
}

// quantize_per_token of checked x; the columns whose bits are set in zero_mask (int32
// [ceil(K / 32)] on x's device, or undefined) count as 0.
std::tuple<at::Tensor, at::Tensor> quantize_rows(const at::Tensor& x, c10::optional<double> clip,
                                                 const at::Tensor& zero_mask) {
  const at::Tensor rows = as_rows(x);
  at::Tensor q = empty_large_output(x.sizes(), x.options().dtype(at::kChar));
  std::vector<int64_t> scale_shape(x.sizes().begin(), x.sizes().end());
  scale_shape.back() = 1;
  at::Tensor scale = at::empty(scale_shape, x.options().dtype(at::kFloat));
  if (x.numel() == 0 && scale.numel() == 0) return {q, scale};
  QuantizePerTokenParams p{scalar_kind(x), rows.size(0), rows.size(1), rows.data_ptr(), rows.stride(0),
                           clip ? float(*clip) : 0.0f, q.data_ptr<int8_t>(), scale.data_ptr<float>()};
  if (zero_mask.defined()) {
    TORCH_INTERNAL_ASSERT(zero_mask.is_contiguous() && zero_mask.scalar_type() == at::kInt &&
                          zero_mask.numel() == quant::int8_outliers::mask_words(rows.size(1)));
    p.zero_mask = reinterpret_cast<const uint32_t*>(zero_mask.data_ptr<int32_t>());
  }
  if (x.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    C10_CUDA_CHECK(cuda::quantize_per_token(p, c10::cuda::getCurrentCUDAStream()));
    return {q, scale};
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  TORCH_EXT_CPU_DISPATCH(quantize_per_token, p);
  return {q, scale};
}

// max over rows of |rows[r, c]| (fp32 [K]) on the CPU.
at::Tensor column_abs_max_cpu(const at::Tensor& rows) {
  at::Tensor out = at::empty({rows.size(1)}, rows.options().dtype(at::kFloat));
  const ColumnAbsMaxParams p{scalar_kind(rows), rows.size(0), rows.size(1), rows.data_ptr(), rows.stride(0),
                             out.data_ptr<float>()};
  TORCH_EXT_CPU_DISPATCH(column_abs_max, p);
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> quantize_per_token(const at::Tensor& x, c10::optional<double> clip) {
  const char* op = kQuantizeOp;
  check_dim_at_least(op, "x", x, 1);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  TORCH_EXT_CHECK(!clip || *clip > 0.0, op, "clip must be positive, got ", clip ? *clip : 0.0);
  return quantize_rows(x, clip, at::Tensor());
}

at::Tensor scaled_int8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                          const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const ScaledMmOperands o = check_scaled_mm(kMmOp, at::kChar, false, a, b, a_scale, b_scale, bias, out_dtype);
  const int64_t m = o.m, n = o.n, k = o.k;
  at::Tensor out = empty_large_output({m, n}, a.options().dtype(out_dtype));
  if (out.numel() == 0) return out;
  const ScaledInt8MmParams p{m, n, k,
                             o.a.data_ptr<int8_t>(), o.a.stride(0), o.b.data_ptr<int8_t>(), o.b.stride(0),
                             o.a_scale.data_ptr<float>(), o.b_scale.data_ptr<float>(), o.b_scale_per_channel,
                             o.bias.defined() ? o.bias.data_ptr<float>() : nullptr,
                             scalar_kind(out), out.data_ptr(), out.stride(0)};
  if (a.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(a.device());
    C10_CUDA_CHECK(cuda::scaled_int8_mm(p, c10::cuda::getCurrentCUDAStream()));
    return out;
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  // Few rows read B as it is, unless its packed form is already cached (a weight the cache
  // holds, packed by an earlier call with more rows: faster at 5-16 rows, as fast at 1).
  at::Tensor packed = m <= kUnpackedInt8MaxRows ? find_packed_weight(b, kPackedInt8Tag, 0) : at::Tensor();
  if (m <= kUnpackedInt8MaxRows && !packed.defined()) {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
    if (cpu::avx512_vnni_active()) {
      cpu::avx512_vnni::scaled_int8_mm_unpacked_vnni(p);
      return out;
    }
#endif
    TORCH_EXT_CPU_DISPATCH(scaled_int8_mm_unpacked, p);
    return out;
  }
  const auto pack = [&] {
    at::Tensor packed = at::empty({packed_int8_b_bytes(n, k)}, b.options().dtype(at::kByte));
    TORCH_EXT_CPU_DISPATCH(pack_int8_b, p, packed.data_ptr<uint8_t>());
    return packed;
  };
  // B is usually a frozen weight: its packed form is cached like the conv weights' panels, while
  // the cache has room. Otherwise (a first call, an inference tensor, a model whose weights
  // overflow the cache and would evict each other on every call) each task packs its own column
  // blocks: measured on a Sapphire Rapids VM, M = 128 x 14336 x 4096 (docs/perf/w8a8.md), six
  // weights in turn over the 256 MB cache took 18.1 ms a call repacking whole weights byte by
  // byte, 9.9 ms with the vectorized packing, 5.1-5.4 ms packed per task on AMX; one weight,
  // cached, 3.5-3.8.
  if (!packed.defined() && packed_weight_cache_has_room(packed_int8_b_bytes(n, k)))
    packed = cached_packed_weight(b, kPackedInt8Tag, 0, pack);
  const uint8_t* const packed_b = packed.defined() ? packed.data_ptr<uint8_t>() : nullptr;  // null: per task
#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
  if (const cpu::AmxMode amx = cpu::amx_int8_kernel_mode(); amx != cpu::AmxMode::kOff) {
    cpu::avx512_amx::scaled_int8_mm_amx(p, packed_b, amx == cpu::AmxMode::kEmulate);
    return out;
  }
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX512_VNNI)
  if (cpu::avx512_vnni_active()) {
    cpu::avx512_vnni::scaled_int8_mm_vnni(p, packed_b);
    return out;
  }
#endif
  TORCH_EXT_CPU_DISPATCH(scaled_int8_mm_packed, p, packed_b);
  return out;
}

// scaled_fp8_mm. CUDA: the tensor-core kernel (sm_89+). CPU: e4m3 values are exact in bf16 (and
// fp32), so the product is a GEMM of exact products with fp32 sums and the epilogue in fp32 in the
// contract's order: bf16 dot products on a packed B (cached per weight) where the CPU has
// AVX512_BF16 (quant/w8a8_cpu_fp8.cpp), else an fp32 GEMM of the widened operands.
at::Tensor scaled_fp8_mm(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                         const at::Tensor& b_scale, const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const char* op = "scaled_fp8_mm";
  const ScaledMmOperands o =
      check_scaled_mm(op, at::kFloat8_e4m3fn, true, a, b, a_scale, b_scale, bias, out_dtype);
  const int64_t m = o.m, n = o.n;
  const auto params = [&](at::Tensor& out) {
    return ScaledFp8MmParams{m, n, o.k,
                             static_cast<const uint8_t*>(o.a.data_ptr()), o.a.stride(0),
                             static_cast<const uint8_t*>(o.b.data_ptr()), o.b.stride(0),
                             o.a_scale.data_ptr<float>(), o.a_scale_per_row,
                             o.b_scale.data_ptr<float>(), o.b_scale_per_channel,
                             o.bias.defined() ? o.bias.data_ptr<float>() : nullptr,
                             scalar_kind(out), out.data_ptr(), out.stride(0)};
  };
  if (a.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(a.device());
    at::Tensor out = at::empty({m, n}, a.options().dtype(out_dtype));
    if (out.numel() == 0) return out;
    const cudaError_t status = cuda::scaled_fp8_mm(params(out), c10::cuda::getCurrentCUDAStream());
    if (status == cudaErrorNotSupported) {
      (void)cudaGetLastError();  // the launcher's refusal is not a sticky error
      int major = 0, minor = 0;
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, a.get_device());
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, a.get_device());
      TORCH_EXT_CHECK(false, op, "needs FP8 tensor cores (compute capability 8.9+, and torch_ext built for such an "
                      "arch), this GPU is ", major, ".", minor, "; run it on the CPU or use scaled_int8_mm");
    }
    C10_CUDA_CHECK(status);
    return out;
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
  if (cpu::avx512_bf16_active()) {
    at::Tensor out = empty_large_output({m, n}, a.options().dtype(out_dtype));
    if (out.numel() == 0) return out;
    const ScaledFp8MmParams p = params(out);
    const uint16_t* const to_bf16 = e4m3_to_bf16();
    // Few rows read B as it is (its codes widened in registers), unless its packed form is cached.
    at::Tensor packed = m <= kUnpackedFp8MaxRows ? find_packed_weight(b, kPackedFp8Tag, 0) : at::Tensor();
    if (m <= kUnpackedFp8MaxRows && !packed.defined()) {
      cpu::avx512_bf16::scaled_fp8_mm_unpacked_bf16(p, to_bf16);
      return out;
    }
    const auto pack = [&] {
      at::Tensor packed = at::empty({packed_fp8_b_bytes(n, o.k)}, b.options().dtype(at::kByte));
      cpu::avx512_bf16::pack_fp8_b(p, to_bf16, packed.data_ptr<uint8_t>());
      return packed;
    };
    // B is usually a frozen weight: its packed form is cached like scaled_int8_mm's.
    if (!packed.defined()) packed = cached_packed_weight(b, kPackedFp8Tag, 0, pack);
    if (!packed.defined()) packed = pack();
    cpu::avx512_bf16::scaled_fp8_mm_bf16(p, to_bf16, packed.data_ptr<uint8_t>());
    return out;
  }
#endif
  at::Tensor y = at::matmul(o.a.to(at::kFloat), o.b.to(at::kFloat).t());
  y.mul_(o.a_scale.reshape({o.a_scale.numel() == 1 ? 1 : m, 1})).mul_(o.b_scale.reshape({1, o.b_scale.numel()}));
  if (o.bias.defined()) y.add_(o.bias);
  return y.to(out_dtype);
}

// y += outlier_x [M, C] x (the C columns of w_q, dequantized) ^T, on the CPU (see
// OutlierProductParams). y is scaled_int8_mm's fresh contiguous output.
void add_outlier_product_cpu(at::Tensor& y, const at::Tensor& outlier_x, const at::Tensor& columns,
                             const at::Tensor& w_q, const at::Tensor& w_scale) {
  const at::Tensor x = outlier_x.to(at::kFloat).contiguous();
  const at::Tensor index = columns.to(at::kLong).contiguous();
  const at::Tensor scale = w_scale.contiguous();
  const at::Tensor w = w_q.stride(1) == 1 ? w_q : w_q.contiguous();
  OutlierProductParams p{};
  p.m = y.size(0);
  p.n = y.size(1);
  p.columns_count = index.numel();
  p.x = x.data_ptr<float>();
  p.columns = index.data_ptr<int64_t>();
  p.w = w.data_ptr<int8_t>();
  p.w_row_stride = w.stride(0);
  p.w_scale = scale.data_ptr<float>();
  p.out_dtype = scalar_kind(y);
  p.out = y.data_ptr();
  p.out_row_stride = y.stride(0);
  TORCH_EXT_CPU_DISPATCH(add_outlier_product, p);
}

// Outlier features int8_linear routes through 16 bits at most: LLM.int8() reports a handful to
// a few dozen per layer; a fixed count keeps every shape static, so finding them needs no
// device-to-host synchronization (and features beyond the count stay in int8).
int64_t max_outlier_features(int64_t k) { return std::min<int64_t>(k, std::max<int64_t>(64, k / 64)); }

// quantize_per_token (the masked columns as 0, when zero_mask is defined) and scaled_int8_mm of
// x's rows against the int8 weight.
at::Tensor scaled_int8_mm_of_rows(const at::Tensor& rows, const at::Tensor& w_q, const at::Tensor& w_scale,
                                  const c10::optional<at::Tensor>& bias, at::ScalarType out_dtype,
                                  const at::Tensor& zero_mask) {
  const auto [x_q, x_scale] = quantize_rows(rows, c10::nullopt, zero_mask);
  return scaled_int8_mm(x_q, w_q, x_scale, w_scale.reshape({-1}), bias, out_dtype);
}

// LLM.int8(): input features whose magnitude exceeds the threshold anywhere in the batch go
// through a 16-bit GEMM with their weight columns dequantized on the fly; the rest through
// int8. At most max_outlier_features(K) features (the largest column maxima) take the 16-bit
// path. The quantizer zeroes them through a column bitmask; the 16-bit product is added to the
// fp32 int8 result and rounded once. CUDA: five launches, no host synchronization (column maxima
// and selection into a fixed number of slots, masked quantization, the GEMM, the outlier product
// with the cast); the CPU gathers the chosen features' x columns instead.
at::Tensor int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                       const c10::optional<at::Tensor>& bias, double outlier_threshold) {
  const char* op = "int8_linear";
  check_dim_at_least(op, "x", x, 1);
  check_dtype(op, "x", x, {at::kFloat, at::kHalf, at::kBFloat16});
  check_dtype(op, "w_q", w_q, {at::kChar});
  TORCH_EXT_CHECK(w_q.dim() == 2 && w_q.size(1) == x.size(-1), op, "w_q must be [N, K] with K = x.size(-1) = ",
                  x.size(-1), ", got shape ", w_q.sizes());
  const int64_t n = w_q.size(0);
  check_dtype(op, "w_scale", w_scale, {at::kFloat});
  TORCH_EXT_CHECK(w_scale.numel() == n || w_scale.numel() == 1, op, "w_scale must hold N = ", n,
                  " per-channel scales or one per-tensor scale, got shape ", w_scale.sizes());
  const at::Tensor x_rows = as_rows(x);
  const int64_t k = x_rows.size(1);
  const bool decompose = outlier_threshold > 0.0 && x_rows.size(0) > 0 && k > 0;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = n;
  if (!decompose) return scaled_int8_mm_of_rows(x_rows, w_q, w_scale, bias, x.scalar_type(), at::Tensor()).view(shape);
  const int64_t most = max_outlier_features(k);
  // With outliers, the two parts are summed in fp32 and rounded once (where they cancel, a
  // rounding of the int8 part to 16 bits first would be a large error relative to the result).
  if (x_rows.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(x.device());
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const at::Tensor rows = unit_column_stride(x_rows);
    const at::Tensor partial = at::empty({quant::int8_outliers::search_splits(rows.size(0)), k}, x.options().dtype(at::kFloat));
    const at::Tensor columns = at::empty({most}, x.options().dtype(at::kInt));
    const at::Tensor zero_mask = at::empty({quant::int8_outliers::mask_words(k)}, x.options().dtype(at::kInt));
    const OutlierSearchParams search{scalar_kind(rows), rows.size(0), k, rows.data_ptr(), rows.stride(0),
                                     float(outlier_threshold), int32_t(most), partial.data_ptr<float>(),
                                     columns.data_ptr<int32_t>(), reinterpret_cast<uint32_t*>(zero_mask.data_ptr<int32_t>())};
    C10_CUDA_CHECK(cuda::find_outlier_columns(search, stream));
    const at::Tensor y = scaled_int8_mm_of_rows(rows, w_q, w_scale, bias, at::kFloat, zero_mask);
    at::Tensor out = empty_large_output({rows.size(0), n}, x.options());
    const at::Tensor w = unit_column_stride(w_q), scale = w_scale.reshape({-1}).contiguous();
    const OutlierAddParams add{rows.size(0), n, int32_t(most), columns.data_ptr<int32_t>(),
                               scalar_kind(rows), rows.data_ptr(), rows.stride(0),
                               w.data_ptr<int8_t>(), w.stride(0), scale.data_ptr<float>(), scale.numel() == n && n > 1,
                               y.data_ptr<float>(), scalar_kind(out), out.data_ptr()};
    C10_CUDA_CHECK(cuda::add_outlier_product(add, stream));
    return out.view(shape);
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  // CPU: reading the count costs nothing, so only the columns above the threshold are gathered;
  // more than `most`: the largest maxima, equal ones lower column first (as on CUDA); ascending.
  const at::Tensor column_max = column_abs_max_cpu(unit_column_stride(x_rows));
  at::Tensor candidates = column_max.gt(outlier_threshold).nonzero().squeeze(1);
  if (candidates.numel() > most)
    candidates = std::get<0>(std::get<1>(column_max.sort(/*stable=*/true, 0, /*descending=*/true)).narrow(0, 0, most).sort());
  // No copies of x: the quantizer skips the outlier columns itself (without outliers it takes
  // its plain path: no mask).
  at::Tensor zero_mask;
  if (candidates.numel() > 0) {
    zero_mask = at::zeros({quant::int8_outliers::mask_words(k)}, x.options().dtype(at::kInt));
    uint32_t* const mask = reinterpret_cast<uint32_t*>(zero_mask.data_ptr<int32_t>());
    const int64_t* const listed = candidates.data_ptr<int64_t>();
    for (int64_t i = 0; i < candidates.numel(); ++i) mask[listed[i] / 32] |= 1u << (listed[i] % 32);
  }
  at::Tensor y = scaled_int8_mm_of_rows(x_rows, w_q, w_scale, bias, at::kFloat, zero_mask);
  if (candidates.numel() > 0)
    add_outlier_product_cpu(y, x_rows.index_select(1, candidates), candidates, w_q,
                            w_scale.reshape({-1}).expand({n}).contiguous());
  return y.to(x.scalar_type()).view(shape);
}

}  // namespace torch_ext
