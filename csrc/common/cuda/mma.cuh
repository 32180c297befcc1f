// Tensor-core helpers (sm_80+): mma.sync.m16n8k16 (fp16/bf16, fp32 accumulation), m16n8k32
// (int8, int32 accumulation; e4m3 fp8, fp32 accumulation, sm_89+ only) and the ldmatrix loads
// that feed them. CUDA-only; no torch headers.
// Fragment layouts (which lane holds which row/column) are spelled out, host-testable, in
// conv/im2win_index.h (mma_a_row, mma_acc_row...) and quant/w8a8_cuda_index.h (int8).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/dtype.h"

namespace torch_ext::cuda {

// Four 8x8 matrices of 16-bit elements from shared memory: lanes 8j..8j+7 give the 16-byte row
// addresses of matrix j; register j of lane l receives row l/4, columns 2*(l%4), +1 of matrix j.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}

// Two 8x8 matrices (lanes 0..15 give the row addresses).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row)));
}

// One 8x8 matrix (lanes 0..7 give the row addresses).
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r) : "r"(shared_address(smem_row)));
}

// ldmatrix_x4 transposed: register j of lane l receives column l/4, rows 2*(l%4), +1 of matrix j
// (loads a [k][n] row-major tile as the "col" B operand).
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(smem_row)));
}

// ldmatrix_x2 transposed.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(shared_address(smem_row)));
}

// d += a * b, m16n8k16, A row-major fp16 (4 regs), B "col" fp16 (2 regs), fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a * b, m16n8k16, bf16 operands, fp32 accumulators.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// d += a * b, m16n8k32, A row-major int8 (4 regs: 4 k-consecutive bytes each), B "col" int8
// (2 regs), exact int32 accumulators (wrapping on overflow). Fragment maps: quant/w8a8_cuda_index.h.
__device__ __forceinline__ void mma_m16n8k32_s8(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// True where mma .e4m3 exists: device code compiled for sm_89 and later (also the host pass,
// which compiles no device code). Kernels built for older archs replace their fp8 body with a trap
// under `if constexpr (!fp8_mma_available())`; the launchers refuse devices below 8.9.
__host__ __device__ constexpr bool fp8_mma_available() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 890
  return false;
#else
  return true;
#endif
}

// d += a * b, m16n8k32, A row-major float8_e4m3fn (4 regs: 4 k-consecutive bytes each), B "col"
// e4m3 (2 regs), fp32 accumulators (products exact; the order and rounding of the in-mma sums are
// implementation-defined). Same fragment maps as mma_m16n8k32_s8. sm_89+; traps elsewhere.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
  (void)d;
  (void)a;
  (void)b;
  __trap();
#endif
}

// Four e4m3 bytes to two f16x2 (exact: e4m3 is a subset of fp16): bytes 0, 1 -> h[0] (byte 0 in
// the low half), bytes 2, 3 -> h[1]. sm_89+; traps elsewhere.
__device__ __forceinline__ void cvt_e4m3x4_to_f16x4(uint32_t v, uint32_t (&h)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
  asm("{\n.reg .b16 lo, hi;\nmov.b32 {lo, hi}, %2;\ncvt.rn.f16x2.e4m3x2 %0, lo;\ncvt.rn.f16x2.e4m3x2 %1, hi;\n}\n"
      : "=r"(h[0]), "=r"(h[1])
      : "r"(v));
#else
  (void)v;
  h[0] = h[1] = 0;
  __trap();
#endif
}

// The m16n8k16 mma of storage type T (Half or BFloat16), for kernels templated on T.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_m16n8k16<Half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  mma_m16n8k16_f16(d, a, b);
}
template <>
__device__ __forceinline__ void mma_m16n8k16<BFloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                       const uint32_t (&b)[2]) {
  mma_m16n8k16_bf16(d, a, b);
}

// The B fragments of two adjacent n8 tiles of an [n][k] shared tile: ldmatrix.x4 matrices 0, 1
// (rows n 0..7, k chunks 0, 1) are b0, b1 of `lo`; matrices 2, 3 (rows n 8..15) those of `hi`.
// kTrans: of a [k][n] tile read transposed (ldmatrix_x4_trans; matrices 0, 1: k rows 0..7, 8..15
// of n columns 0..7; matrices 2, 3: n columns 8..15).
template <bool kTrans = false>
__device__ __forceinline__ void ldmatrix_x4_b_pair(uint32_t (&lo)[2], uint32_t (&hi)[2], const void* smem_row) {
  uint32_t r[4];
  if constexpr (kTrans)
    ldmatrix_x4_trans(r, smem_row);
  else
    ldmatrix_x4(r, smem_row);
  lo[0] = r[0];
  lo[1] = r[1];
  hi[0] = r[2];
  hi[1] = r[3];
}

// Zeroes accumulator fragments of any shape (arrays of arrays of float / int), fully unrolled so
// they stay in registers.
template <typename T>
__device__ __forceinline__ void zero_accumulators(T& acc) {
  if constexpr (std::is_array_v<T>) {
#pragma unroll
    for (auto& inner : acc) zero_accumulators(inner);
  } else {
    acc = T(0);
  }
}

}  // namespace torch_ext::cuda
