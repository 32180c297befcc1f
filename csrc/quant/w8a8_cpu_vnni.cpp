// scaled_int8_mm's micro-kernel with AVX512-VNNI (vpdpbusd: 4 u8 x s8 products per int32
// lane). Compiled only at the AVX-512 level with -mavx512vnni, in its own ISA namespace
// (avx512_vnni), and called only where the CPU has the extension (avx512_vnni_active()).
//
// Register blocking (w8a8::micro_block): 4 rows of A x 4 blocks of 16 columns = 16 accumulators
// (of 32 zmm); per step of 4 k, 4 loads of B, 4 broadcasts of an A dword, 16 vpdpbusd.
#include <immintrin.h>

#include <vector>

#include "common/cpu/vec.h"
#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {

namespace {
// vpdpbusd: 4 u8 (A + 128) x s8 (B) products per int32 lane.
struct U8S8Words {
  using Acc = __m512i;
  using Operand = __m512i;
  static Acc zero() { return _mm512_setzero_si512(); }
  static Operand load(const uint8_t* p) { return _mm512_loadu_si512(p); }
  static Operand broadcast(int32_t word) { return _mm512_set1_epi32(word); }
  static Acc dot(Acc acc, Operand a, Operand b) { return _mm512_dpbusd_epi32(acc, a, b); }
  static void store(int32_t* out, Acc acc) { _mm512_storeu_si512(out, acc); }
};
}  // namespace

void scaled_int8_mm_vnni(const ScaledInt8MmParams& p, const uint8_t* packed_b) {
  using namespace w8a8;
  w8a8::gemm(p, packed_b, [](const uint8_t* const (&a)[kRows], const int8_t* b, int64_t blocks, int64_t k4,
                             int32_t (&out)[kRows][kBlocks * kBlockN]) {
    const int64_t block_stride = k4 * kBlockN * 4;
    // Past the last real block, reuse block 0 (in bounds); those lanes are never stored.
    const uint8_t* block[kBlocks];
    for (int j = 0; j < kBlocks; ++j) block[j] = reinterpret_cast<const uint8_t*>(b) + (j < blocks ? j : 0) * block_stride;
    micro_block<U8S8Words>(a, block, k4, out);
  });
}

namespace {

// The unpacked path with VNNI: 4 rows of B x 4 rows of A per pass (16 accumulators of 16 lanes,
// 64 k per step), so each 64-byte load of A or B feeds 4 vpdpbusd; passes over further rows of
// A re-read the 4 rows of B from L1. vpdpbusd multiplies u8 x s8: B's bytes become the unsigned
// b + 128 (one xor per vector) and A stays signed, so 128 * sum_k a[m, k] (summed once per row
// of A when it is prepared) is taken back off. (Biasing A instead needs B's column sums: one more
// vpdpbusd per B vector, doubling the work of a one-row pass.) B's tail past K is loaded as zeros
// (128 after the xor) and meets A's zero padding.
constexpr int kVnniRowsB = 4;
constexpr int kVnniRowsA = 4;

struct VnniDot : w8a8::PreparedA<int8_t, 64> {
  explicit VnniDot(const ScaledInt8MmParams& params)
      : PreparedA(params, [](int8_t v) { return v; }), a_sum(size_t(params.m), 0) {
    for (int64_t i = 0; i < params.m; ++i)
      for (int64_t j = 0; j < params.k; ++j) a_sum[size_t(i)] += a[size_t(i * stride + j)];
  }

  void operator()(const int8_t* const (&b)[kVnniRowsB], int, int32_t (&acc)[kUnpackedInt8MaxRows][kVnniRowsB]) const {
    w8a8::for_row_passes<kVnniRowsA>(p->m, [&](auto rows, auto, int64_t i0) { pass<decltype(rows)::value>(b, i0, acc); });
  }

  // Rows i0 .. i0 + kRows - 1 of A against the 4 rows of B.
  template <int kRows>
  void pass(const int8_t* const (&b)[kVnniRowsB], int64_t i0, int32_t (&acc)[kUnpackedInt8MaxRows][kVnniRowsB]) const {
    const int64_t k = p->k;
    const __m512i bias = _mm512_set1_epi8(char(0x80));
    __m512i vacc[kRows][kVnniRowsB];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < kVnniRowsB; ++r) vacc[i][r] = _mm512_setzero_si512();
    const int8_t* const a_rows = a.data() + i0 * stride;
    for (int64_t j = 0; j < k; j += 64) {
      const __mmask64 live = k - j >= 64 ? ~__mmask64(0) : (__mmask64(1) << (k - j)) - 1;
      __m512i bv[kVnniRowsB];
#pragma GCC unroll 16
      for (int r = 0; r < kVnniRowsB; ++r) bv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(live, b[r] + j), bias);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        const __m512i av = _mm512_loadu_si512(a_rows + i * stride + j);
#pragma GCC unroll 16
        for (int r = 0; r < kVnniRowsB; ++r) vacc[i][r] = _mm512_dpbusd_epi32(vacc[i][r], bv[r], av);
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i)
#pragma GCC unroll 16
      for (int r = 0; r < kVnniRowsB; ++r)
        acc[i0 + i][r] = reduce_add_epi32(vacc[i][r]) - 128 * a_sum[size_t(i0 + i)];
  }

  std::vector<int32_t> a_sum;  // sum_k a[m, k] per row
};

}  // namespace

void scaled_int8_mm_unpacked_vnni(const ScaledInt8MmParams& p) {
  w8a8::unpacked_gemm<kVnniRowsB>(p, [](const ScaledInt8MmParams& rows) { return VnniDot(rows); });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
