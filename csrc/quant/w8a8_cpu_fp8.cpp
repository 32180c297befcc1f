// scaled_fp8_mm on the CPU with bf16 dot products. Every e4m3 value is exact in bf16 (3 mantissa
// bits, exponents 2^-9 .. 2^8), so the products are exact in fp32, as in the widening reference,
// and only the order of the fp32 sums differs (where the sums stay exact the result is bit for
// bit the widening path's, and the GPU's). Compiled at the AVX-512 level with -mavx512bf16 (and
// the AMX flags where the compiler has them), in the avx512_bf16 namespace; called where
// cpu::avx512_bf16_active(). Measured on the project VM (Zen 4, 2 threads, M = 256, 4096 x 4096):
// see docs/perf/w8a8.md (the widening path took 96 ms there, F.linear bf16 21 ms).
//
// Packed B (per call, or cached per weight by the torch-facing code): bf16 [n_blocks][k2][16][2],
// k2 = ceil(K / 2), zero-padded in N and K; per block of 16 columns, rows of 64 bytes holding
// one k pair of each column. Such a row is one vdpbf16ps operand and one TDPBF16PS B tile row, so
// both paths below read the same packed weight. A is converted per call into bf16 rows of whole
// pairs, zero-padded (for the tiles: to whole 64-byte steps and 32-row blocks).
//   vdpbf16ps  the int8 VNNI kernel's 4 rows x 4 blocks micro-kernel (w8a8::micro_block) on
//              bf16 pairs.
//   AMX-BF16   amx::packed_b_tile_gemm (common/cpu/amx_gemm.h), where amx_bf16_kernel_mode() says.
// Up to kUnpackedFp8MaxRows rows of A (decode) read B as it is instead (gemm_unpacked).
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/cpu/amx.h"
#include "common/cpu/amx_gemm.h"
#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "quant/w8a8.h"
#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

// The int8 kernel's blocking: 16-column blocks, 4 rows x 4 blocks per micro-kernel call.
using w8a8::kBlockN;
using w8a8::kBlocks;
using w8a8::kRows;
constexpr int kMaxCols = kBlocks * kBlockN;
static_assert(kMaxCols >= amx::kBlockColumns, "epilogue_row takes either kernel's columns");

int64_t pairs_of(int64_t k) { return (k + 1) / 2; }
int64_t blocks_of(int64_t n) { return (n + kBlockN - 1) / kBlockN; }

// A's e4m3 codes as bf16 rows of `stride` values (K zero-padded), `rows` rows (those past m zero).
auto convert_a(const ScaledFp8MmParams& p, const uint16_t* to_bf16, int64_t rows, int64_t stride) {
  auto a = uninitialized_line_aligned<uint16_t>(size_t(rows * stride));
  parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      uint16_t* const dst = a.get() + m * stride;
      const int64_t real = m < p.m ? p.k : 0;
      const uint8_t* const src = p.a + (m < p.m ? m : 0) * p.a_row_stride;
      for (int64_t k = 0; k < real; ++k) dst[k] = to_bf16[src[k]];
      std::fill(dst + real, dst + stride, uint16_t(0));
    }
  });
  return a;
}

// Row m, columns n0 .. n0 + cols - 1 of out from fp32 sums: * a_scale, * b_scale (+ bias), each
// step rounded in fp32, then to T: the contract's order.
template <typename T>
void epilogue_row(const ScaledFp8MmParams& p, const float* sums, int64_t m, int64_t n0, int cols) {
  float v[kMaxCols];
  const float a_scale = p.a_scale[p.a_scale_per_row ? m : 0];
  for (int c = 0; c < cols; ++c) v[c] = sums[c] * a_scale;
  w8a8::finish_row(p.b_scale, p.b_scale_per_channel, p.bias, n0, v, cols,
                   static_cast<T*>(p.out) + m * p.out_row_stride + n0);
}

// vdpbf16ps: a pair of bf16 products per fp32 lane.
struct Bf16Pairs {
  using Acc = __m512;
  using Operand = __m512bh;
  static Acc zero() { return _mm512_setzero_ps(); }
  static Operand load(const uint8_t* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Operand broadcast(int32_t word) { return (__m512bh)_mm512_set1_epi32(word); }
  static Acc dot(Acc acc, Operand a, Operand b) { return _mm512_dpbf16_ps(acc, a, b); }
  static void store(float* out, Acc acc) { _mm512_storeu_ps(out, acc); }
};

template <typename T>
void gemm_dot(const ScaledFp8MmParams& p, const uint16_t* a, int64_t stride, const uint8_t* packed_b) {
  const int64_t k2 = pairs_of(p.k), blocks = blocks_of(p.n), block_bytes = k2 * kBlockN * 4;
  parallel_for(0, (blocks + kBlocks - 1) / kBlocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb0 = task * kBlocks;
      const int cols = int(std::min<int64_t>(kMaxCols, p.n - nb0 * kBlockN));
      // Past the last real block, block nb0 again (in bounds); those lanes are never stored.
      const uint8_t* block[kBlocks];
      for (int j = 0; j < kBlocks; ++j) block[j] = packed_b + (nb0 + (nb0 + j < blocks ? j : 0)) * block_bytes;
      for (int64_t m0 = 0; m0 < p.m; m0 += kRows) {
        const uint8_t* row[kRows];
        for (int i = 0; i < kRows; ++i) row[i] = reinterpret_cast<const uint8_t*>(a + (m0 + i) * stride);
        float sums[kRows][kMaxCols];
        w8a8::micro_block<Bf16Pairs>(row, block, k2, sums);
        for (int i = 0; i < kRows && m0 + i < p.m; ++i) epilogue_row<T>(p, sums[i], m0 + i, nb0 * kBlockN, cols);
      }
    }
  });
}

// Few rows (decode): B read as it is, 4 rows at a time, its e4m3 codes widened to bf16 in
// registers: half the bytes of the packed bf16 weight, and no packing pass when the weight is
// not in the cache (an LLM's weights are far beyond the cache's budget: every token would repack
// them, as scaled_int8_mm's unpacked path found). Up to 4 rows of A: one pass, B widened as it
// is loaded. More: the 4 B rows are widened once per task into a per-thread buffer (4 x K bf16)
// that passes of 4 A rows read. 16 accumulators of 16 pairs along K, reduced at the end.
constexpr int kUnpackedRowsB = 4;
constexpr int kUnpackedRowsA = 4;
constexpr int kCodesPerVector = 32;  // e4m3 codes per zmm of bf16

// The bf16 bits of 32 e4m3 codes s eeee mmm. Normal codes: exponent e - 7 + 127, mantissa
// m << 4, i.e. ((eeee mmm) << 4) + (120 << 7); e = 0 (zero, subnormals m 2^-9): a table of 8;
// eeee mmm = 1111 111: NaN; the sign ORed back.
class E4m3Widener {
 public:
  explicit E4m3Widener(const uint16_t* to_bf16) {
    alignas(64) uint16_t small[32] = {};
    std::copy_n(to_bf16, 8, small);
    subnormals_ = _mm512_load_si512(small);
  }
  __m512i operator()(__m256i codes) const {
    const __m512i words = _mm512_cvtepu8_epi16(codes);
    const __m512i magnitude = _mm512_and_si512(words, _mm512_set1_epi16(0x7F));
    __m512i bits = _mm512_add_epi16(_mm512_slli_epi16(magnitude, 4), _mm512_set1_epi16(120 << 7));
    bits = _mm512_mask_permutexvar_epi16(bits, _mm512_cmplt_epu16_mask(magnitude, _mm512_set1_epi16(8)), magnitude,
                                         subnormals_);
    bits = _mm512_mask_mov_epi16(bits, _mm512_cmpeq_epi16_mask(magnitude, _mm512_set1_epi16(0x7F)),
                                 _mm512_set1_epi16(0x7FC0));
    return _mm512_or_si512(bits, _mm512_slli_epi16(_mm512_srli_epi16(words, 7), 15));
  }

 private:
  __m512i subnormals_;
};

// B row `row`'s codes k .. k + 31 as bf16, zero past K.
inline __m512i widened(const E4m3Widener& widen, const uint8_t* row, int64_t k, int64_t K) {
  const int64_t live = std::clamp<int64_t>(K - k, 0, kCodesPerVector);
  const __mmask32 mask = live >= kCodesPerVector ? ~__mmask32(0) : (__mmask32(1) << live) - 1;
  return _mm512_maskz_mov_epi16(mask, widen(_mm256_maskz_loadu_epi8(mask, row + k)));
}

template <typename T>
void gemm_unpacked(const ScaledFp8MmParams& p, const uint16_t* to_bf16, const uint16_t* a, int64_t stride) {
  const E4m3Widener widen(to_bf16);
  const int64_t tasks = (p.n + kUnpackedRowsB - 1) / kUnpackedRowsB;
  const bool one_pass = p.m <= kUnpackedRowsA;
  parallel_for(0, tasks, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.k)), [&](int64_t begin, int64_t end) {
    const auto buffer = uninitialized_line_aligned<uint16_t>(one_pass ? 0 : size_t(kUnpackedRowsB * stride));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kUnpackedRowsB;
      const int count = int(std::min<int64_t>(kUnpackedRowsB, p.n - n0));
      const uint8_t* b_rows[kUnpackedRowsB];  // rows past count: row n0 again, never stored
      for (int r = 0; r < kUnpackedRowsB; ++r) b_rows[r] = p.b + (n0 + (r < count ? r : 0)) * p.b_row_stride;
      if (!one_pass) {
        for (int r = 0; r < kUnpackedRowsB; ++r)
          for (int64_t k = 0; k < stride; k += kCodesPerVector)
            _mm512_storeu_si512(buffer.get() + r * stride + k, widened(widen, b_rows[r], k, p.k));
      }
      float sums[kUnpackedFp8MaxRows][kUnpackedRowsB];
      const auto pass = [&](auto rows, auto, int64_t i0) {
        constexpr int kPassRows = decltype(rows)::value;
        __m512 acc[kPassRows][kUnpackedRowsB];
        for (auto& row : acc)
          for (auto& v : row) v = _mm512_setzero_ps();
        for (int64_t k = 0; k < stride; k += kCodesPerVector) {
          __m512bh bv[kUnpackedRowsB];
#pragma GCC unroll 4
          for (int r = 0; r < kUnpackedRowsB; ++r)
            bv[r] = (__m512bh)(one_pass ? widened(widen, b_rows[r], k, p.k)
                                        : _mm512_loadu_si512(buffer.get() + r * stride + k));
#pragma GCC unroll 4
          for (int i = 0; i < kPassRows; ++i) {
            const __m512bh av = (__m512bh)_mm512_loadu_si512(a + (i0 + i) * stride + k);
#pragma GCC unroll 4
            for (int r = 0; r < kUnpackedRowsB; ++r) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], av, bv[r]);
          }
        }
        for (int i = 0; i < kPassRows; ++i)
          for (int r = 0; r < kUnpackedRowsB; ++r) sums[i0 + i][r] = reduce_add(VecF{acc[i][r]});
      };
      w8a8::for_row_passes<kUnpackedRowsA>(p.m, pass);
      for (int64_t i = 0; i < p.m; ++i) epilogue_row<T>(p, sums[i], i, n0, count);
    }
  });
}

template <typename T, typename Tiles>
void gemm_tiles(const ScaledFp8MmParams& p, const uint16_t* a, int64_t stride, int64_t rows,
                const uint8_t* packed_b) {
  const int64_t k2 = pairs_of(p.k);
  amx::packed_b_tile_gemm<amx::TileDot::kBf16, Tiles, float>(
      reinterpret_cast<const uint8_t*>(a), stride * 2, rows, packed_b, k2 * kBlockN * 4, blocks_of(p.n), k2,
      [&](int64_t m0, int64_t nb0, const float (&sums)[amx::kBlockRows][amx::kBlockColumns]) {
        const int cols = int(std::min<int64_t>(amx::kBlockColumns, p.n - nb0 * kBlockN));
        for (int i = 0; i < amx::kBlockRows && m0 + i < p.m; ++i)
          epilogue_row<T>(p, sums[i], m0 + i, nb0 * kBlockN, cols);
      });
}

}  // namespace

void pack_fp8_b(const ScaledFp8MmParams& p, const uint16_t* to_bf16, uint8_t* packed) {
  const int64_t k2 = pairs_of(p.k);
  parallel_for(0, blocks_of(p.n), 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      uint16_t* const out = reinterpret_cast<uint16_t*>(packed) + nb * k2 * kBlockN * 2;
      std::fill(out, out + k2 * kBlockN * 2, uint16_t(0));
      for (int c = 0; c < kBlockN && nb * kBlockN + c < p.n; ++c) {
        const uint8_t* const row = p.b + (nb * kBlockN + c) * p.b_row_stride;
        for (int64_t k = 0; k < p.k; ++k) out[((k / 2) * kBlockN + c) * 2 + k % 2] = to_bf16[row[k]];
      }
    }
  });
}

void scaled_fp8_mm_unpacked_bf16(const ScaledFp8MmParams& p, const uint16_t* to_bf16) {
  const int64_t stride = (p.k + kCodesPerVector - 1) / kCodesPerVector * kCodesPerVector;
  const auto a = convert_a(p, to_bf16, p.m, stride);
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) gemm_unpacked<T>(p, to_bf16, a.get(), stride);
  });
}

void scaled_fp8_mm_bf16(const ScaledFp8MmParams& p, const uint16_t* to_bf16, const uint8_t* packed_b) {
  AmxMode amx = amx_bf16_kernel_mode();
#if !(defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__))
  if (amx == AmxMode::kOn) amx = AmxMode::kOff;
#endif
  const bool tiles = amx != AmxMode::kOff;
  const int64_t pairs = pairs_of(p.k);
  const int64_t step = amx::kStepBytes / 2;  // bf16 values per tile step
  const int64_t stride = tiles ? (2 * pairs + step - 1) / step * step : 2 * pairs;
  const int64_t row_block = tiles ? amx::kBlockRows : kRows;
  const int64_t rows = (p.m + row_block - 1) / row_block * row_block;
  const auto a = convert_a(p, to_bf16, rows, stride);
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
      if (amx == AmxMode::kOn) return gemm_tiles<T, amx::HardwareTiles>(p, a.get(), stride, rows, packed_b);
#endif
      if (amx == AmxMode::kEmulate) return gemm_tiles<T, amx::EmulatedTiles>(p, a.get(), stride, rows, packed_b);
      gemm_dot<T>(p, a.get(), stride, packed_b);
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
