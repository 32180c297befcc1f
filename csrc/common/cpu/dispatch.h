// Run-time choice among the per-ISA copies of a CPU kernel.
//
// A CPU kernel file is compiled once per ISA level (CMakeLists.txt, TORCH_EXT_CPU_ISAS) with
// TORCH_EXT_CPU_ISA set to the level's name, and defines its entry point inside
//   namespace torch_ext::cpu::TORCH_EXT_CPU_ISA { ... }
// Its header declares every copy with TORCH_EXT_DECLARE_CPU_KERNEL, and the torch-facing code
// calls TORCH_EXT_CPU_DISPATCH(name, args...), which calls the copy for active_cpu_isa().
#pragma once

#include "common/cpu/isa.h"

#define TORCH_EXT_DECLARE_CPU_KERNEL(signature) \
  namespace scalar {                            \
  signature;                                    \
  }                                             \
  namespace avx2 {                              \
  signature;                                    \
  }                                             \
  namespace avx512 {                            \
  signature;                                    \
  }

#if defined(TORCH_EXT_HAVE_CPU_AVX512)
#define TORCH_EXT_IF_CPU_AVX512(...) __VA_ARGS__
#else
#define TORCH_EXT_IF_CPU_AVX512(...)
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX2)
#define TORCH_EXT_IF_CPU_AVX2(...) __VA_ARGS__
#else
#define TORCH_EXT_IF_CPU_AVX2(...)
#endif

#define TORCH_EXT_CPU_DISPATCH(kernel, ...)                                                      \
  [&]() {                                                                                        \
    const ::torch_ext::cpu::CpuIsa isa_ = ::torch_ext::cpu::active_cpu_isa();                   \
    TORCH_EXT_IF_CPU_AVX512(if (isa_ == ::torch_ext::cpu::CpuIsa::kAvx512) return ::torch_ext:: \
                                cpu::avx512::kernel(__VA_ARGS__);)                               \
    TORCH_EXT_IF_CPU_AVX2(if (isa_ == ::torch_ext::cpu::CpuIsa::kAvx2) return ::torch_ext::     \
                              cpu::avx2::kernel(__VA_ARGS__);)                                   \
    return ::torch_ext::cpu::scalar::kernel(__VA_ARGS__);                                        \
  }()
