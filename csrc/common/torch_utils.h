// Helpers for the torch-facing code: input checks with uniform messages, dtype mapping.
// Messages name the op, the argument, what was expected and what was received, e.g.
//   torch_ext.silu_and_mul: x must have dtype float32, float16 or bfloat16, got Int
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>
#include <c10/util/accumulate.h>

#include <initializer_list>
#include <string>

#include "common/dtype.h"

namespace torch_ext {

// Throws a ValueError-like c10::Error: "torch_ext.<op>: <message>".
#define TORCH_EXT_CHECK(cond, op, ...) TORCH_CHECK(cond, "torch_ext.", op, ": ", __VA_ARGS__)

// The name a Python user writes: torch.float32, torch.int8, ...
inline std::string dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kFloat8_e4m3fn: return "torch.float8_e4m3fn";
    case at::kFloat8_e5m2: return "torch.float8_e5m2";
    default: return c10::toString(t);
  }
}

inline std::string dtype_list(std::initializer_list<at::ScalarType> dtypes) {
  std::string out;
  size_t i = 0;
  for (at::ScalarType t : dtypes) {
    if (i > 0) out += (i + 1 == dtypes.size()) ? " or " : ", ";
    out += dtype_name(t);
    ++i;
  }
  return out;
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t,
                        std::initializer_list<at::ScalarType> allowed) {
  bool ok = false;
  for (at::ScalarType s : allowed) ok = ok || t.scalar_type() == s;
  TORCH_EXT_CHECK(ok, op, name, " must have dtype ", dtype_list(allowed), ", got ", dtype_name(t.scalar_type()));
}

inline void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                             const at::Tensor& ref) {
  TORCH_EXT_CHECK(t.scalar_type() == ref.scalar_type(), op, name, " must have the dtype of ", ref_name, " (",
                  dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                              const at::Tensor& ref) {
  TORCH_EXT_CHECK(t.device() == ref.device(), op, name, " must be on the device of ", ref_name, " (", ref.device(),
                  "), got ", t.device());
}

inline void check_dim_at_least(const char* op, const char* name, const at::Tensor& t, int64_t min_dim) {
  TORCH_EXT_CHECK(t.dim() >= min_dim, op, name, " must have at least ", min_dim, " dimension(s), got shape ",
                  t.sizes());
}

inline ScalarKind scalar_kind(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ScalarKind::kFloat32;
    case at::kHalf:
      return ScalarKind::kFloat16;
    case at::kBFloat16:
      return ScalarKind::kBFloat16;
    case at::kDouble:
      return ScalarKind::kFloat64;
    default:
      TORCH_CHECK(false, "torch_ext: no kernel for dtype ", dtype_name(t.scalar_type()));
  }
}

// Views t as [rows, last] with a unit stride on the last dimension, copying only when the
// layout cannot be expressed that way (a transposed or otherwise non-uniform input).
inline at::Tensor as_rows(const at::Tensor& t) {
  const int64_t last = t.size(-1);
  const int64_t rows = c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
  const at::Tensor unit_stride = t.stride(-1) == 1 || last <= 1 ? t : t.contiguous();
  return unit_stride.reshape({rows, last});
}

}  // namespace torch_ext
