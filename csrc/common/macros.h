// Portable qualifiers for code shared by CPU and CUDA kernels (and tested on the CPU).
#pragma once

#if defined(__CUDACC__)
#define TORCH_EXT_HOST_DEVICE __host__ __device__ __forceinline__
// Full unrolling of a constant-trip loop in shared code: keeps small arrays in registers on the GPU.
#define TORCH_EXT_UNROLL _Pragma("unroll")
#else
#define TORCH_EXT_HOST_DEVICE inline
#define TORCH_EXT_UNROLL
#endif

// Inline code in headers that CPU kernel files include goes inside this namespace. A CPU
// kernel file is compiled once per ISA level (TORCH_EXT_CPU_ISA = scalar, avx2, avx512); if
// two copies of an inline function compiled with different -m flags shared one symbol, the
// linker would keep either, and AVX-512 code could run on an AVX2 CPU. The inline namespace
// gives each ISA level its own symbols while callers still write torch_ext::name.
#if defined(TORCH_EXT_CPU_ISA)
#define TORCH_EXT_ISA_LOCAL_NAMESPACE TORCH_EXT_CPU_ISA
#else
#define TORCH_EXT_ISA_LOCAL_NAMESPACE generic
#endif
