// Integer helpers of the host+device index headers (conv/im2win_index.h, quant/*_cuda_index.h,
// moe/fused_moe_cuda_index.h): one definition, pulled into each header's namespace with
// using-declarations so that kernels and simulators keep calling ix::ceil_div etc.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace index_math {

TORCH_EXT_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
// a rounded up to a multiple of b.
TORCH_EXT_HOST_DEVICE int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
TORCH_EXT_HOST_DEVICE int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
TORCH_EXT_HOST_DEVICE int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }
TORCH_EXT_HOST_DEVICE int clamp_int(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }
// Number of set bits.
TORCH_EXT_HOST_DEVICE int popc32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// log2 of a power of two (a shift where a kernel would otherwise divide by a run-time power of two:
// an integer division is a ~20-instruction sequence on the GPU).
TORCH_EXT_HOST_DEVICE int log2_pow2(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __ffs(int(v)) - 1;
#else
  return __builtin_ctz(v);
#endif
}

// CTA `pid` of a 1-D grid -> (m block, n block): groups of group_m consecutive m blocks (the
// last group may be shorter), n-major inside a group, so that the CTAs running together share
// their A and B strips in L2.
struct TileCoord {
  int64_t mb, nb;
};
TORCH_EXT_HOST_DEVICE TileCoord grouped_tile(int64_t pid, int64_t m_blocks, int64_t n_blocks, int64_t group_m) {
  const int64_t per_group = group_m * n_blocks;
  const int64_t group = pid / per_group;
  const int64_t first_m = group * group_m;
  const int64_t rows = min64(m_blocks - first_m, group_m);
  const int64_t in_group = pid - group * per_group;
  return TileCoord{first_m + in_group % rows, in_group / rows};
}

}  // namespace index_math
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
