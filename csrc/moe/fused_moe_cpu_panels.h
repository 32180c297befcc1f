// The panel layout of fused_moe's CPU passes (moe/fused_moe_cpu_passes.h), fp32 and bf16 pairs,
// for the whole token vectors of each expert's rows, on the broadcast-panel GEMM of
// common/cpu/broadcast_panel_gemm.h; defined in the including file's ISA namespace.
//
// The dot-product micro-kernel of the passes (weights and tokens both K-contiguous) ends every
// call with horizontal sums and needs ten row streams per call; measured on the project VM
// (Zen 4, one core, fp32, K = 1024) it runs at 84-102 GFLOP/s depending on the rows' L1 sets.
// Here the tokens are transposed instead, into panels [K][width] (token fastest), so that a
// weight scalar broadcast against kVectors token vectors gives kPanelRows x kVectors
// independent accumulators and no reduction: 123 GFLOP/s in the same measurement, the core's
// FMA peak. Panels hold whole token vectors (on AMX tiles, and for large fp32 experts with few
// rows, also a last partial one padded with zero tokens into the expert's spare rows:
// pad_partial_below), so an expert's rows [0, panel_rows(rows)) go
// through panels and the rest (fewer than kLanes; all of them for an expert below the type's
// kMinVectors) through the dot-product kernel.
//
// Panel layout of an expert's area (its rows' space in the gathered / act scratch, which has
// room since the stride is >= K rounded up to even): the panel rows split into blocks of at most
// kVectors token vectors, as even as possible (100 rows: 48 + 48 panel rows and 4 left, not
// 64 + 32: a two-vector block runs well below the FMA peak), block b at element
// start(b) * padded_k(K, width). Blocks of the FMA panels (fp32; fp16 and bf16 widened) are
// [K][width], except a single-vector block on AVX-512, [K / 2][16][2]
// (broadcast_panels::single_vector_pairs; an expert with such a block has no other); bf16 blocks
// on vdpbf16ps (AVX512_BF16, Bf16PairMath) are [K / 2][width][2]: each 32-bit lane
// holds one token's values at k and k + 1, the pair vdpbf16ps multiplies with a broadcast weight
// pair. Pair layouts end an odd K in a pair with a zero.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "common/cpu/broadcast_panel_gemm.h"
#include "common/cpu/vec.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_panels {

// The broadcast-panel GEMM itself (panel_gemm, WidenMath, the register blocking and K chunks).
using namespace ::torch_ext::cpu::TORCH_EXT_CPU_ISA::broadcast_panels;

// Where the panel products run on AMX tiles (Math::pads_partial_vectors()), an expert's last,
// partial token vector goes through panels too, padded with zero tokens, when it holds more than
// kPadPartialAbove tokens (the dot-product kernel's tokens per call: more stream the expert's
// weights again); the padding columns cost little there. Measured on a Sapphire Rapids VM,
// Mixtral / 4 bf16, fastest of 7 calls: T = 16 9.0 -> 7.8 ms, T = 64 13.7 -> 8.4 ms, T = 512
// 32.6 -> 26.8 ms.
constexpr int64_t kPadPartialAbove = 6;
// The FMA panels (WidenMath) pay the padding in FMAs, which only a weight stream from DRAM hides: they
// pad for experts of at least kPadStreamedExpertBytes of weights and fewer than kBlockTokens rows
// (few token vectors per weight: the pass waits on memory). Same VM, fp32, fastest of 5 calls
// summed over 4 routings, Mixtral / 4 (44 MB per expert) T = 64: 82-85 -> 76-80 ms (AVX2 101 ->
// 97). Padding for every expert and row count: T = 64 78-82 -> 71-73 ms, T = 128 101-113 -> 93-103,
// but T = 512 293 -> 299-305 ms, and DeepSeek-V2-Lite / 4 (2 MB per expert) T = 64 18-21 -> 22-24.
// 16-bit experts on the same FMA panels (weights widened) pad alike since their single-vector
// blocks hold k pairs: Xeon VM without AVX512_BF16, bf16 Mixtral / 4 (22 MB per expert) T = 64,
// four routings summed, 71.6-72.1 -> 65.4-68.4 ms.
constexpr int64_t kPadStreamedExpertBytes = int64_t(16) << 20;

// Experts with fewer rows than this pad their partial last token vector into the panels (0:
// none); expert_weight_bytes: one expert's W13 and W2.
template <class Math>
int64_t pad_partial_below(int64_t expert_weight_bytes) {
  if constexpr (requires { Math::pads_partial_vectors(); })
    if (Math::pads_partial_vectors()) return std::numeric_limits<int64_t>::max();
  if constexpr (std::is_same_v<typename Math::Weight, float>)
    if (expert_weight_bytes >= kPadStreamedExpertBytes) return kBlockTokens;
  return 0;
}

// Where panel_gemm finds an expert's weight rows for its token block b: the first block reads
// them from memory (the rows ask for the next group's lines), later blocks find them in the L2.
inline WeightRows weight_rows_for_block(int64_t b) { return b == 0 ? WeightRows::kFromMemory : WeightRows::kCached; }

// K rounded up to whole steps: a block's length is padded_k(K, width) * width.
template <class Math>
inline int64_t padded_k(int64_t K, int width) {
  const int step = block_k_step<Math>(width);
  return (K + step - 1) / step * step;
}

// The expert's rows [0, panel_rows) that go through panels: whole token vectors (below
// pad_partial_below rows, also a last partial one: panel_rows may exceed rows), once it has
// Math::kMinVectors. fp32 from one on, measured against the dot-product kernel for those rows
// (Mixtral / 4 and DeepSeek-V2-Lite / 4, medians of alternating builds): 16 rows per expert
// (Mixtral T = 64) 23.4 vs 25.4 ms, 32 rows (T = 128) 34.2 vs 36.4 ms, 48 rows (DeepSeek
// T = 512) 21.1 vs 27.9 ms.
template <class Math>
inline int64_t panel_rows(int64_t rows, int64_t pad_partial_below) {
  if constexpr (kHasPanels) {
    const int64_t whole = rows / kLanes * kLanes;
    const int64_t panel = rows < pad_partial_below && rows - whole > kPadPartialAbove ? whole + kLanes : whole;
    return panel >= Math::kMinVectors * kLanes ? panel : 0;
  }
  return 0;
}

// Where block b of an expert's panel starts in a scratch area of rows `stride` apart whose
// expert rows begin at `row_begin` (K values per token). (Blocks before b have b's width or one
// vector more, and the same k step: a single-vector block is an expert's only one.)
template <class Math, typename T>
inline T* block_start(T* area, int64_t row_begin, int64_t stride, const PanelBlocks& blocks, int64_t b, int64_t K) {
  return area + row_begin * stride + blocks.start(b) * padded_k<Math>(K, blocks.width(b));
}

// Element offset of (k, token) in a block of `width` tokens. (The k step is 1 or 2, known only
// with the width: a shift and a mask instead of a division per element of the gather.)
template <class Math>
inline int64_t panel_offset(int64_t k, int64_t token, int width) {
  static_assert(Math::kKPerStep == 1 || Math::kKPerStep == 2, "one k or a k pair per step");
  const int pair = block_k_step<Math>(width) - 1;
  return ((k >> pair) * width + token) * (pair + 1) + (k & pair);
}

// Zeros as column `token` of a panel block (a padding token).
template <class Math>
void zero_block_column(int64_t K, typename Math::T* block, int width, int token) {
  for (int64_t k = 0; k < padded_k<Math>(K, width); ++k) block[panel_offset<Math>(k, token, width)] = typename Math::T{};
}

// Writes one token's row (K values) as column `token` of its panel block (and the zero that
// completes an odd K's last pair).
template <class Math>
void transpose_into_block(const typename Math::T* row, int64_t K, typename Math::T* block, int width, int token) {
  for (int64_t k = 0; k < K; ++k) block[panel_offset<Math>(k, token, width)] = row[k];
  if (padded_k<Math>(K, width) != K) block[panel_offset<Math>(K, token, width)] = typename Math::T{};
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_panels
