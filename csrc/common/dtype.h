// Element types as the torch-free kernels see them. The torch-facing code maps
// at::ScalarType onto this enum; kernels never include torch headers.
#pragma once

#include <cstdint>

namespace torch_ext {

enum class ScalarKind : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// 16-bit storage types: raw bits with the layout of at::Half / at::BFloat16 / __half /
// __nv_bfloat16, so pointers to any of them can be reinterpreted as pointers to these.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

// Calls fn(T{}) with T the storage type of `kind`: kernels template on T once and
// dispatch with visit_storage_type(kind, [&](auto tag) { run<decltype(tag)>(...); }).
template <typename Fn>
void visit_storage_type(ScalarKind kind, Fn&& fn) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return fn(float{});
    case ScalarKind::kFloat16:
      return fn(Half{});
    case ScalarKind::kBFloat16:
      return fn(BFloat16{});
    case ScalarKind::kFloat64:
      return fn(double{});
  }
}

}  // namespace torch_ext
