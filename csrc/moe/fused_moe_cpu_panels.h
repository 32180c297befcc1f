// The "panel" GEMM of fused_moe's CPU passes (moe/fused_moe_cpu_passes.h), fp32 and bf16 pairs,
// for the whole token vectors of each expert's rows; defined in the including file's ISA
// namespace.
//
// The dot-product micro-kernel of the passes (weights and tokens both K-contiguous) ends every
// call with horizontal sums and needs ten row streams per call; measured on the project VM
// (Zen 4, one core, fp32, K = 1024) it runs at 84-102 GFLOP/s depending on the rows' L1 sets.
// Here the tokens are transposed instead, into panels [K][width] (token fastest), so that a
// weight scalar broadcast against kVectors token vectors gives kPanelRows x kVectors
// independent accumulators and no reduction: 123 GFLOP/s in the same measurement, the core's
// FMA peak. Panels hold whole token vectors only, so an expert's rows [0, panel_rows(rows)) go
// through panels and the rest (fewer than kLanes; all of them for an expert below the type's
// kMinVectors) through the dot-product kernel.
//
// Panel layout of an expert's area (its rows' space in the gathered / act scratch, which has
// room since the stride is >= K rounded up to even): the panel rows split into blocks of at most
// kVectors token vectors, as even as possible (100 rows: 48 + 48 panel rows and 4 left, not
// 64 + 32: a two-vector block runs well below the FMA peak), block b at element
// start(b) * padded_k(K). fp32 blocks are [K][width]; bf16 blocks (AVX512_BF16, Bf16PairMath) are [K / 2][width][2]:
// each 32-bit lane holds one token's values at k and k + 1, the pair vdpbf16ps multiplies with
// a broadcast weight pair; an odd K ends in a pair with a zero.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu/vec.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_panels {

constexpr int kLanes = VecF::kWidth;
// Accumulators kPanelRows x kVectors, plus kVectors token vectors and one broadcast, fit the
// register file: 6 x 4 + 4 + 1 = 29 of 32 zmm; 4 x 3 + 3 + 1 = 16 ymm.
constexpr int kVectors = kLanes == 16 ? 4 : 3;
constexpr int kPanelRows = kLanes == 16 ? 6 : 4;
constexpr int kBlockTokens = kLanes * kVectors;
// K per pass of the row groups over a block: a [512][64] fp32 chunk (128 KB) stays in L2 while
// every row group of the work item reads it, instead of streaming the whole block from L3 per
// group (GEMM 2's K = I = 3584 gives 917 KB blocks). Measured at T = 512 (Mixtral / 4, fp32):
// 128 ran 5% slower than 512; 256, 512 and 1024 within the VM's noise.
constexpr int64_t kKChunk = 512;

// The blocks of an expert's `panel` rows (a multiple of kLanes).
struct PanelBlocks {
  int64_t count, vectors_each, wider;  // blocks [0, wider) hold vectors_each + 1 vectors
  explicit PanelBlocks(int64_t panel) {
    const int64_t vectors = panel / kLanes;
    count = (vectors + kVectors - 1) / kVectors;
    vectors_each = count == 0 ? 0 : vectors / count;
    wider = count == 0 ? 0 : vectors % count;
  }
  int64_t start(int64_t block) const { return (block * vectors_each + std::min(block, wider)) * kLanes; }
  int width(int64_t block) const { return int((vectors_each + (block < wider)) * kLanes); }
  int64_t block_of(int64_t row) const {
    const int64_t vector = row / kLanes, in_wider = wider * (vectors_each + 1);
    return vector < in_wider ? vector / (vectors_each + 1) : wider + (vector - in_wider) / vectors_each;
  }
};

// One weight widened to fp32 by the hardware where it can (F16C for fp16: the exact software
// to_float(Half) made the fp16 panels 2.5-3x slower than the dot-product kernel at T = 64).
template <typename T>
inline float widen(T value) {
  if constexpr (std::is_same_v<T, Half>) return _cvtsh_ss(value.bits);
  else return to_float(value);
}

// The arithmetic of a panel type: fp32 FMA on values of type T widened as they are loaded
// (fp32; fp16 and bf16 where vdpbf16ps is missing), one k per step. kMinVectors: the token
// vectors an expert needs before its rows take panels. 16-bit weights pay a conversion per
// broadcast, which few token vectors do not amortize (measured against the dot-product kernel,
// Mixtral / 4, two alternating rounds: bf16 on AVX2 at T = 512 160-166 vs 183-195 ms, but at
// T = 64, 2 vectors per expert, 37-38 vs 31-35 ms; fp16 on AVX-512 at T = 64 26-27 vs 20-22 ms,
// at T = 512 127 vs 125-135 ms), so they start at one full block.
template <typename ValueType>
struct WidenMath {
  using T = ValueType;
  using Operand = VecF;
  static constexpr int kKPerStep = 1;
  static constexpr int kMinVectors = std::is_same_v<T, float> ? 1 : kVectors;
  static Operand load_tokens(const T* p) { return load(p); }
  static Operand broadcast_weights(const T* w) { return broadcast(widen(*w)); }
  static Operand broadcast_last_weight(const T* w) { return broadcast(widen(*w)); }
  static VecF multiply_add(Operand w, Operand x, VecF acc) { return fmadd(w, x, acc); }
};

// The scalar build has no panels (one-lane vectors).
constexpr bool kHasPanels = kLanes > 1;

// K rounded up to whole steps: a block's length is padded_k(K) * width.
template <class Math>
inline int64_t padded_k(int64_t K) {
  return (K + Math::kKPerStep - 1) / Math::kKPerStep * Math::kKPerStep;
}

// The expert's rows [0, panel_rows) that go through panels: whole token vectors, once it has
// Math::kMinVectors. fp32 from one on, measured against the dot-product kernel for those rows
// (Mixtral / 4 and DeepSeek-V2-Lite / 4, medians of alternating builds): 16 rows per expert
// (Mixtral T = 64) 23.4 vs 25.4 ms, 32 rows (T = 128) 34.2 vs 36.4 ms, 48 rows (DeepSeek
// T = 512) 21.1 vs 27.9 ms.
template <class Math>
inline int64_t panel_rows(int64_t rows) {
  if constexpr (kHasPanels) return rows >= Math::kMinVectors * kLanes ? rows / kLanes * kLanes : 0;
  return 0;
}

// Where block b of an expert's panel starts in a scratch area of rows `stride` apart whose
// expert rows begin at `row_begin` (K values per token).
template <class Math, typename T>
inline T* block_start(T* area, int64_t row_begin, int64_t stride, const PanelBlocks& blocks, int64_t b, int64_t K) {
  return area + row_begin * stride + blocks.start(b) * padded_k<Math>(K);
}

// Element offset of (k, token) in a block of `width` tokens.
template <class Math>
inline int64_t panel_offset(int64_t k, int64_t token, int64_t width) {
  constexpr int step = Math::kKPerStep;
  return (k / step * width + token) * step + k % step;
}

// out[r][v * kLanes + lane] (+)= sum_k w[r][k] * x(k, v * kLanes + lane) for k < K (K even for
// pairs, except at the end of a row).
template <class Math, int R, int V>
inline void panel_block(const typename Math::T* const* w, const typename Math::T* x, int64_t width, int64_t K,
                        bool accumulate, float* out) {
  using Operand = typename Math::Operand;
  constexpr int step = Math::kKPerStep;
  VecF acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = accumulate ? load(out + r * width + v * kLanes) : broadcast(0.0f);
  const auto step_at = [&](int64_t k, bool last) {
    Operand xv[V];
    for (int v = 0; v < V; ++v) xv[v] = Math::load_tokens(x + k * width + v * kLanes * step);
    for (int r = 0; r < R; ++r) {
      // A pair past the row's end would read the next row's first value (or past the tensor).
      const Operand weight = last ? Math::broadcast_last_weight(w[r] + k) : Math::broadcast_weights(w[r] + k);
      for (int v = 0; v < V; ++v) acc[r][v] = Math::multiply_add(weight, xv[v], acc[r][v]);
    }
  };
  int64_t k = 0;
  for (; k + step <= K; k += step) step_at(k, false);
  if (k < K) step_at(k, true);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(out + r * width + v * kLanes, acc[r][v]);
}

// panel_block with rows <= R and vectors <= V chosen at run time.
template <class Math, int R, int V>
inline void panel_block_upto(int rows, int vectors, const typename Math::T* const* w, const typename Math::T* x,
                             int64_t width, int64_t K, bool accumulate, float* out) {
  if constexpr (R > 1)
    if (rows < R) return panel_block_upto<Math, R - 1, V>(rows, vectors, w, x, width, K, accumulate, out);
  if constexpr (V > 1)
    if (vectors < V) return panel_block_upto<Math, R, V - 1>(rows, vectors, w, x, width, K, accumulate, out);
  panel_block<Math, R, V>(w, x, width, K, accumulate, out);
}

// out[r][m] = w[r] . block(:, m) for `rows` weight rows (K-contiguous) and one panel block;
// out is [rows][width] fp32.
template <class Math>
void panel_gemm(const typename Math::T* const* w, int rows, const typename Math::T* block, int width, int64_t K,
                float* out) {
  // A Math with a tile product (AMX) may take the whole call.
  if constexpr (requires { Math::tile_gemm(w, rows, block, width, K, out); }) {
    if (Math::tile_gemm(w, rows, block, width, K, out)) return;
  }
  static_assert(kKChunk % 2 == 0, "chunks start on a k pair");
  for (int64_t k0 = 0; k0 < K; k0 += kKChunk) {
    const int64_t chunk = std::min(kKChunk, K - k0);
    for (int r0 = 0; r0 < rows; r0 += kPanelRows) {
      const int group = std::min(kPanelRows, rows - r0);
      const typename Math::T* rows_at_k0[kPanelRows];
      for (int i = 0; i < group; ++i) rows_at_k0[i] = w[r0 + i] + k0;
      panel_block_upto<Math, kPanelRows, kVectors>(group, width / kLanes, rows_at_k0,
                                                   block + panel_offset<Math>(k0, 0, width), width, chunk, k0 > 0,
                                                   out + int64_t(r0) * width);
    }
  }
}

// Writes one token's row (K values) as column `token` of its panel block (and the zero that
// completes an odd K's last pair).
template <class Math>
void transpose_into_block(const typename Math::T* row, int64_t K, typename Math::T* block, int width, int token) {
  for (int64_t k = 0; k < K; ++k) block[panel_offset<Math>(k, token, width)] = row[k];
  if (K % Math::kKPerStep != 0) block[panel_offset<Math>(K, token, width)] = typename Math::T{};
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_panels
