// Host-side predicates for choosing vectorized kernel variants.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace torch_ext {

TORCH_EXT_HOST_DEVICE bool is_aligned(const void* p, int64_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % uint64_t(bytes) == 0;
}

// Row stride (in elements) for scratch matrices that a CPU kernel reads several rows of at a
// time: whole 64-byte lines, and an odd number of them. A stride that is a multiple of 4 KiB
// (H = 1024 fp32) puts every row's k-th line in the same L1 set, and ten such streams overflow
// its eight ways: measured on the project VM (Zen 4), a 4-row x 6-row fp32 dot-product block at
// K = 1024 ran at 84 GFLOP/s per core with 4 KiB-strided token rows and 102 with this stride.
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {  // included by per-ISA kernel files (common/macros.h)
inline int64_t conflict_free_row_stride(int64_t elements, int64_t element_bytes) {
  int64_t lines = (elements * element_bytes + 63) / 64;
  if (lines % 2 == 0) ++lines;
  return lines * 64 / element_bytes;
}
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE

}  // namespace torch_ext
