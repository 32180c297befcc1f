// scaled_int8_mm's micro-kernel with AVX512-VNNI (vpdpbusd: 4 u8 x s8 products per int32
// lane). Compiled only at the AVX-512 level with -mavx512vnni, in its own ISA namespace
// (avx512_vnni), and called only where the CPU has the extension (avx512_vnni_active()).
//
// Register blocking: 4 rows of A x 4 blocks of 16 columns = 16 accumulators (of 32 zmm). Per
// step of 4 k: 4 loads of B (one per block), 4 broadcasts of A (one dword per row), 16
// vpdpbusd: each B vector feeds 4 rows and each A broadcast 4 blocks, and the 16 independent
// chains hide vpdpbusd's latency.
#include <immintrin.h>

#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {

void scaled_int8_mm_vnni(const ScaledInt8MmParams& p, const uint8_t* packed_b) {
  using namespace w8a8;
  w8a8::gemm(p, packed_b, [](const uint8_t* const (&a)[kRows], const int8_t* b, int64_t blocks, int64_t k4,
                             int32_t (&out)[kRows][kBlocks * kBlockN]) {
    const int64_t block_stride = k4 * kBlockN * 4;
    // Past the last real block, reuse block 0 (in bounds); those lanes are never stored.
    const int8_t* block_ptr[kBlocks];
    for (int j = 0; j < kBlocks; ++j) block_ptr[j] = b + (j < blocks ? j : 0) * block_stride;
    __m512i acc[kRows][kBlocks];
    for (auto& row : acc)
      for (auto& v : row) v = _mm512_setzero_si512();
    for (int64_t s = 0; s < k4; ++s) {
      __m512i bv[kBlocks];
#pragma GCC unroll 4
      for (int j = 0; j < kBlocks; ++j) bv[j] = _mm512_loadu_si512(block_ptr[j] + s * kBlockN * 4);
#pragma GCC unroll 8
      for (int i = 0; i < kRows; ++i) {
        int32_t dword;
        std::memcpy(&dword, a[i] + 4 * s, 4);
        const __m512i av = _mm512_set1_epi32(dword);
#pragma GCC unroll 4
        for (int j = 0; j < kBlocks; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], av, bv[j]);
      }
    }
    for (int i = 0; i < kRows; ++i)
      for (int j = 0; j < kBlocks; ++j) _mm512_storeu_si512(out[i] + j * kBlockN, acc[i][j]);
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
