// fused_moe for bf16 with AVX512_BF16 dot products (vdpbf16ps). The passes: moe/fused_moe_cpu_passes.h.
//
// Compiled only at the AVX-512 level with -mavx512bf16, in its own ISA namespace (avx512_bf16),
// and called only when the CPU has the extension (avx512_bf16_active()). vdpbf16ps multiplies
// 16 pairs of adjacent bf16 values and adds both products into one fp32 lane: 32 multiply-adds
// per instruction, twice the fp32 FMA rate, with no widening of the operands. Products of bf16
// values are exact in fp32, so results match the FMA kernel up to summation order. The
// activated rows are bf16 (the second GEMM's operand), as in the FMA kernel's bf16 path.
#include <cstring>
#include <vector>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx.h"
#include "common/cpu/amx_pair_matmul.h"
#include "common/cpu/vec.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_cpu_passes.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using fused_moe_passes::Accumulators;
using fused_moe_passes::kRows;
using fused_moe_passes::kTokens;

// 32 bf16 values (16 pairs) at p, the first `count` of them when count < 32 (the rest zero).
inline __m512bh load_pairs(const BFloat16* p, int count = 32) {
  const __mmask32 mask = count >= 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1;
  return (__m512bh)_mm512_maskz_loadu_epi16(mask, p);
}

template <int R, int NT>
inline void dot_block(const BFloat16* const* w, const BFloat16* const* x, int64_t K, Accumulators& acc_out) {
  __m512 acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < NT; ++m) acc[r][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) {
      fused_moe_passes::prefetch_ahead(w[r] + k);
      wv[r] = load_pairs(w[r] + k);
    }
    for (int m = 0; m < NT; ++m) {
      const __m512bh xv = load_pairs(x[m] + k);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  if (k < K) {
    const int tail = int(K - k);
    __m512bh wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_pairs(w[r] + k, tail);
    for (int m = 0; m < NT; ++m) {
      const __m512bh xv = load_pairs(x[m] + k, tail);
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv[r], xv);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < NT; ++m) acc_out[r][m] = reduce_add(VecF{acc[r][m]});
}

// Panels of bf16 pairs (layout: moe/fused_moe_cpu_panels.h): vdpbf16ps of a broadcast weight
// pair (w[k], w[k + 1]) with 16 tokens' pairs (x[k], x[k + 1]).
struct Bf16PairMath {
  using T = BFloat16;
  using Weight = BFloat16;
  using Operand = __m512bh;
  static constexpr int kKPerStep = 2;
  static constexpr int kMinVectors = 1;  // T = 64 unchanged, T = 128 and 512 faster (docs/perf/moe.md)
  static Operand load_tokens(const BFloat16* p) { return (__m512bh)_mm512_loadu_si512(p); }
  static Operand broadcast_weights(const BFloat16* w) {
    uint32_t pair;
    std::memcpy(&pair, w, sizeof(pair));
    return (__m512bh)_mm512_set1_epi32(int(pair));
  }
  // (w[k], 0) for an odd K's last pair.
  static Operand broadcast_last_weight(const BFloat16* w) { return (__m512bh)_mm512_set1_epi32(w->bits); }
  // Whether tile_gemm takes the panel products (fused_moe_cpu_panels.h: then partial token
  // vectors go through panels too).
  static bool pads_partial_vectors() { return amx::bf16_products_on_tiles(); }
  // The whole panel product on AMX-BF16 tiles where cpu::amx_bf16_kernel_mode() says so (false:
  // not taken): the block's pairs are TDPBF16PS's B operand as they are (common/cpu/amx_pair_matmul.h).
  // The tiles are configured per call (a call is ~10^7 multiply-adds at H = 4096).
  static bool tile_gemm(const BFloat16* const* w, int rows, const BFloat16* block, int width, int64_t K, float* out) {
    const AmxMode mode = amx_bf16_kernel_mode();
    const auto run = [&](auto tiles) {
      using Tiles = decltype(tiles);
      thread_local LineAlignedVector<uint32_t> staging;
      thread_local std::vector<float*> out_rows;
      out_rows.resize(size_t(rows));
      for (int r = 0; r < rows; ++r) out_rows[r] = out + int64_t(r) * width;
      const amx::TileSession<Tiles> session;
      amx::tile_pair_matmul<Tiles>(w, rows, K, 1, reinterpret_cast<const uint32_t*>(block), width, int((K + 1) / 2),
                                   out_rows.data(), width, nullptr, 1.0f, staging);
    };
    switch (mode) {
      case AmxMode::kOn:
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
        run(amx::HardwareTiles{});
        return true;
#else
        return false;
#endif
      case AmxMode::kEmulate:
        run(amx::EmulatedTiles{});
        return true;
      case AmxMode::kOff:
        break;
    }
    return false;
  }
  static VecF multiply_add(Operand w, Operand x, VecF acc) { return {_mm512_dpbf16_ps(acc.v, w, x)}; }
  // 16 tokens' values of columns j (even) and j + 1, rounded to bf16, as their 16 pairs.
  static void store_column_pair(BFloat16* at, VecF first, VecF second) {
    const __m512i low = _mm512_cvtepu16_epi32(to_bf16_bits(first)), high = _mm512_cvtepu16_epi32(to_bf16_bits(second));
    _mm512_storeu_si512(at, _mm512_or_si512(low, _mm512_slli_epi32(high, 16)));
  }
};

struct Bf16DotKernel {
  template <typename T>
  using PanelMath = Bf16PairMath;
  template <int R>
  static void dot(int tokens, const BFloat16* const* w, const BFloat16* const* x, int64_t K, Accumulators& acc) {
    static_assert(kTokens == 6, "the AVX-512 register tile");
    switch (tokens) {
      case 1: return dot_block<R, 1>(w, x, K, acc);
      case 2: return dot_block<R, 2>(w, x, K, acc);
      case 3: return dot_block<R, 3>(w, x, K, acc);
      case 4: return dot_block<R, 4>(w, x, K, acc);
      case 5: return dot_block<R, 5>(w, x, K, acc);
      default: return dot_block<R, 6>(w, x, K, acc);
    }
  }
};

}  // namespace

void fused_moe_bf16_dot(const moe::FusedMoeParams& p, void* workspace) {
  fused_moe_passes::run<Bf16DotKernel, BFloat16, BFloat16>(p, workspace);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
