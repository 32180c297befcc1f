// The dtype a CPU op should hand torch's GEMMs for 16-bit operands.
#pragma once

#include <c10/core/ScalarType.h>

#include "common/cpu/amx.h"
#include "common/cpu/isa.h"

namespace torch_ext::cpu {

// fp32 where torch's GEMM in the operands' own dtype is slow: fp16 always (2 GFLOP/s measured for
// a 16 x 1024 x 3584 product on an AVX-512 Xeon, against 134 in fp32), bf16 on CPUs without
// AVX512_BF16 or AMX-BF16 (32-46 GFLOP/s there); otherwise the dtype itself.
inline at::ScalarType fast_gemm_dtype(at::ScalarType dtype) {
  if (dtype == at::kHalf) return at::kFloat;
  if (dtype == at::kBFloat16 && !avx512_bf16_detected() && !amx_bf16_detected()) return at::kFloat;
  return dtype;
}

}  // namespace torch_ext::cpu
