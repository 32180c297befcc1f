// Hopper warpgroup tensor-core helpers (sm_90a only: wgmma needs the arch-specific target):
// the fences and group waits of wgmma.mma_async, the 8-bit shapes of the W8A8 GEMM (int8
// m64n256k32 -> s32, e4m3 m64n128k32 -> f32, operands in shared memory), the 16-bit m64n256k16
// of fused_moe's grouped GEMMs and the 16-bit ones of the attention forward (S = Q K^T from
// shared memory, O += P V with P in registers). Descriptor encodings and the accumulator map are
// host-testable in common/wgmma_gemm_tile.h and attention/block_sparse_attention_cuda_index.h.
// Call only from code compiled for sm_90a (sources built for other archs too guard the calls with
// __CUDA_ARCH_FEAT_SM90_ALL). No torch headers.
//
// Order of a k step (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"):
//   shared operands written by cp.async / st.shared: wait for them, fence_proxy_async_shared() in
//   every writing thread, then a CTA barrier (the tensor cores read through the async proxy);
//   wgmma_fence() before the first wgmma that touches accumulators other code wrote;
//   wgmma_* ...; wgmma_commit(); wgmma_wait<N>() before reading accumulators or reusing the
//   shared memory of all but the N most recent groups.
#pragma once

#include <cstdint>
#include <type_traits>

namespace torch_ext::cuda {

__device__ __forceinline__ void fence_proxy_async_shared() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}

// Warpgroup register reallocation (setmaxnreg): a producer warpgroup that only issues copies
// gives registers back (dec) so that the consumer warpgroups can hold their accumulators (inc).
// Effective only in a kernel with a register cap at entry (__launch_bounds__(threads, 1)) where
// each warpgroup role is one branch of an if / else (else ptxas ignores it: warning C7508).
template <int kRegisters>
__device__ __forceinline__ void warpgroup_release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}
template <int kRegisters>
__device__ __forceinline__ void warpgroup_claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters));
}

// Pins an accumulator array at this point of the program: the compiler may not move reads or
// writes of its registers across this statement. wgmma writes its accumulators asynchronously
// and the compiler does not know it, so a read of a batch's results goes after the
// wgmma_wait<> that completes the batch and a fence on that array (CUTLASS does the same).
template <typename T, int N>
__device__ __forceinline__ void wgmma_fence_operands(T (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    if constexpr (std::is_same_v<T, float>) {
      asm volatile("" : "+f"(d[i])::"memory");
    } else {
      asm volatile("" : "+r"(d[i])::"memory");
    }
  }
}
template <int N>
__device__ __forceinline__ void wgmma_fence_operands(float (&d)[N][4]) {
#pragma unroll
  for (int j = 0; j < N; ++j) wgmma_fence_operands(d[j]);
}

// Accumulator operand lists: %0..%63 and %64..%127 (the descriptors follow them).
#define TORCH_EXT_WGMMA_REGS_0_63 \
  "%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31, " \
  "%32, %33, %34, %35, %36, %37, %38, %39, " \
  "%40, %41, %42, %43, %44, %45, %46, %47, " \
  "%48, %49, %50, %51, %52, %53, %54, %55, " \
  "%56, %57, %58, %59, %60, %61, %62, %63"
#define TORCH_EXT_WGMMA_REGS_64_127 \
  "%64, %65, %66, %67, %68, %69, %70, %71, " \
  "%72, %73, %74, %75, %76, %77, %78, %79, " \
  "%80, %81, %82, %83, %84, %85, %86, %87, " \
  "%88, %89, %90, %91, %92, %93, %94, %95, " \
  "%96, %97, %98, %99, %100, %101, %102, %103, " \
  "%104, %105, %106, %107, %108, %109, %110, %111, " \
  "%112, %113, %114, %115, %116, %117, %118, %119, " \
  "%120, %121, %122, %123, %124, %125, %126, %127"
// Constraint c: "+r" for s32 accumulators, "+f" for fp32 ones (a .b32 operand on an .f32 wgmma
// makes the compiler copy the registers around every instruction, which serializes them).
#define TORCH_EXT_WGMMA_ACC8(c, d, i) \
  c(d[i]), c(d[i + 1]), c(d[i + 2]), c(d[i + 3]), c(d[i + 4]), c(d[i + 5]), c(d[i + 6]), c(d[i + 7])
#define TORCH_EXT_WGMMA_ACC64(c, d, i)                                                                 \
  TORCH_EXT_WGMMA_ACC8(c, d, i), TORCH_EXT_WGMMA_ACC8(c, d, i + 8), TORCH_EXT_WGMMA_ACC8(c, d, i + 16), \
      TORCH_EXT_WGMMA_ACC8(c, d, i + 24), TORCH_EXT_WGMMA_ACC8(c, d, i + 32),                          \
      TORCH_EXT_WGMMA_ACC8(c, d, i + 40), TORCH_EXT_WGMMA_ACC8(c, d, i + 48), TORCH_EXT_WGMMA_ACC8(c, d, i + 56)

// d += A B^T for a 64 x 32 int8 A and a 256 x 32 int8 B, both K-major in shared memory
// (descriptors), s32 accumulators (wrapping, as int32 arithmetic).
__device__ __forceinline__ void wgmma_m64n256k32_s8(int32_t (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {" TORCH_EXT_WGMMA_REGS_0_63
               ", " TORCH_EXT_WGMMA_REGS_64_127 "}, %128, %129, 1;\n"
               : TORCH_EXT_WGMMA_ACC64("+r", d, 0), TORCH_EXT_WGMMA_ACC64("+r", d, 64)
               : "l"(desc_a), "l"(desc_b)
               : "memory");
}

// d = (accumulate ? d : 0) + A B^T for a 64 x 32 and a 128 x 32 float8_e4m3fn operand (K-major,
// shared memory), fp32 accumulators; the two trailing 1s keep A and B unnegated.
__device__ __forceinline__ void wgmma_m64n128k32_e4m3(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {" TORCH_EXT_WGMMA_REGS_0_63 "}, %64, %65, p, 1, 1;\n}\n"
      : TORCH_EXT_WGMMA_ACC64("+f", d, 0)
      : "l"(desc_a), "l"(desc_b), "r"(int(accumulate))
      : "memory");
}

// d += A B^T for 16-bit A (64 x 16) and B (256 x 16), both K-major in shared memory, fp32
// accumulators in the flat m64nN layout (as the int8 shape above); the trailing 1, 1, 1, 0, 0:
// accumulate, unscaled, untransposed. kBf16: bf16, else fp16. fused_moe's Hopper GEMMs.
#define TORCH_EXT_WGMMA_M64N256K16_SS(ty)                                                             \
  asm volatile("wgmma.mma_async.sync.aligned.m64n256k16.f32." ty "." ty " {" TORCH_EXT_WGMMA_REGS_0_63 \
               ", " TORCH_EXT_WGMMA_REGS_64_127 "}, %128, %129, 1, 1, 1, 0, 0;\n"                      \
               : TORCH_EXT_WGMMA_ACC64("+f", d, 0), TORCH_EXT_WGMMA_ACC64("+f", d, 64)                 \
               : "l"(desc_a), "l"(desc_b)                                                              \
               : "memory")
template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n256k16_ss(float (&d)[128], uint64_t desc_a, uint64_t desc_b) {
  if constexpr (kBf16) {
    TORCH_EXT_WGMMA_M64N256K16_SS("bf16");
  } else {
    TORCH_EXT_WGMMA_M64N256K16_SS("f16");
  }
}

// 16-bit accumulators as [n8 tile][4] (the mma.m16n8 C layout of each warp's 16 rows, PTX
// "Register Fragments" of wgmma D): operand lists of 8 and 16 tiles.
#define TORCH_EXT_WGMMA_TILE(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define TORCH_EXT_WGMMA_TILES8(d, j)                                                              \
  TORCH_EXT_WGMMA_TILE(d, j), TORCH_EXT_WGMMA_TILE(d, j + 1), TORCH_EXT_WGMMA_TILE(d, j + 2),     \
      TORCH_EXT_WGMMA_TILE(d, j + 3), TORCH_EXT_WGMMA_TILE(d, j + 4), TORCH_EXT_WGMMA_TILE(d, j + 5), \
      TORCH_EXT_WGMMA_TILE(d, j + 6), TORCH_EXT_WGMMA_TILE(d, j + 7)
#define TORCH_EXT_WGMMA_REGS_0_31 \
  "%0, %1, %2, %3, %4, %5, %6, %7, " \
  "%8, %9, %10, %11, %12, %13, %14, %15, " \
  "%16, %17, %18, %19, %20, %21, %22, %23, " \
  "%24, %25, %26, %27, %28, %29, %30, %31"

// d (64 x 64, fp32) = (accumulate ? d : 0) + A B^T for 16-bit A (64 x 16) and B (64 x 16), both
// K-major in shared memory (the trailing 1, 1, 0, 0: unscaled, untransposed). kBf16: bf16, else
// fp16 (ty: the PTX type of both operands).
#define TORCH_EXT_WGMMA_M64N64K16_SS(ty)                                                                  \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                             \
               "wgmma.mma_async.sync.aligned.m64n64k16.f32." ty "." ty " {" TORCH_EXT_WGMMA_REGS_0_31       \
               "}, %32, %33, p, 1, 1, 0, 0;\n}\n"                                                         \
               : TORCH_EXT_WGMMA_TILES8(d, 0)                                                              \
               : "l"(desc_a), "l"(desc_b), "r"(int(accumulate))                                            \
               : "memory")
template <bool kBf16>
__device__ __forceinline__ void wgmma_m64n64k16_ss(float (&d)[8][4], uint64_t desc_a, uint64_t desc_b,
                                                   bool accumulate) {
  if constexpr (kBf16) {
    TORCH_EXT_WGMMA_M64N64K16_SS("bf16");
  } else {
    TORCH_EXT_WGMMA_M64N64K16_SS("f16");
  }
}

// d (64 x N, fp32) += A B for a 16-bit A (64 x 16) from registers (each warp's 16 rows in the
// mma.m16n8k16 A fragment) and B (16 x N) in shared memory: K-major, or MN-major read transposed
// (kTransB: the last immediate, imm-trans-b). N = 64 and 128.
#define TORCH_EXT_WGMMA_M64N64K16_RS(ty)                                                             \
  asm volatile("wgmma.mma_async.sync.aligned.m64n64k16.f32." ty "." ty " {" TORCH_EXT_WGMMA_REGS_0_31 \
               "}, {%32, %33, %34, %35}, %36, 1, 1, 1, %37;\n"                                        \
               : TORCH_EXT_WGMMA_TILES8(d, 0)                                                         \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(int(kTransB))           \
               : "memory")
#define TORCH_EXT_WGMMA_M64N128K16_RS(ty)                                                             \
  asm volatile("wgmma.mma_async.sync.aligned.m64n128k16.f32." ty "." ty " {" TORCH_EXT_WGMMA_REGS_0_63 \
               "}, {%64, %65, %66, %67}, %68, 1, 1, 1, %69;\n"                                         \
               : TORCH_EXT_WGMMA_TILES8(d, 0), TORCH_EXT_WGMMA_TILES8(d, 8)                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "n"(int(kTransB))            \
               : "memory")
template <bool kBf16, bool kTransB>
__device__ __forceinline__ void wgmma_m64n64k16_rs(float (&d)[8][4], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (kBf16) {
    TORCH_EXT_WGMMA_M64N64K16_RS("bf16");
  } else {
    TORCH_EXT_WGMMA_M64N64K16_RS("f16");
  }
}
template <bool kBf16, bool kTransB>
__device__ __forceinline__ void wgmma_m64n128k16_rs(float (&d)[16][4], const uint32_t (&a)[4], uint64_t desc_b) {
  if constexpr (kBf16) {
    TORCH_EXT_WGMMA_M64N128K16_RS("bf16");
  } else {
    TORCH_EXT_WGMMA_M64N128K16_RS("f16");
  }
}

#undef TORCH_EXT_WGMMA_M64N256K16_SS
#undef TORCH_EXT_WGMMA_M64N128K16_RS
#undef TORCH_EXT_WGMMA_M64N64K16_RS
#undef TORCH_EXT_WGMMA_M64N64K16_SS
#undef TORCH_EXT_WGMMA_REGS_0_31
#undef TORCH_EXT_WGMMA_TILES8
#undef TORCH_EXT_WGMMA_TILE
#undef TORCH_EXT_WGMMA_ACC64
#undef TORCH_EXT_WGMMA_ACC8
#undef TORCH_EXT_WGMMA_REGS_64_127
#undef TORCH_EXT_WGMMA_REGS_0_63

}  // namespace torch_ext::cuda
