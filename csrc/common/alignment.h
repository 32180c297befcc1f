// Host-side predicates for choosing vectorized kernel variants.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace torch_ext {

TORCH_EXT_HOST_DEVICE bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0;
}

}  // namespace torch_ext
