// The broadcast-panel GEMM of the CPU kernels, defined in the including file's ISA namespace:
// out[r][m] = w[r] . x(:, m) for weight rows w[r] (K-contiguous) and a panel x whose row k holds
// `width` columns contiguous (width a whole number of vectors). Each weight scalar is broadcast
// against kVectors column vectors: kPanelRows x kVectors independent accumulators and no
// horizontal sums, the core's FMA peak (measured in moe/fused_moe_cpu_panels.h, its first user;
// the pointwise convolution, conv/pointwise_conv_cpu.cpp, is the second). Rows of x and of out
// may lie any stride apart: fused_moe's panels are packed blocks (stride = width), an NCHW
// image's channels are rows of H * W pixels read and written in place.
//
// A Math type says what one k step multiplies: WidenMath<T> widens T to fp32 and issues FMAs
// (kKPerStep 1); fused_moe's Bf16PairMath multiplies bf16 pairs with vdpbf16ps (kKPerStep 2, x
// rows holding a pair per column) and may take a whole call on AMX tiles (tile_gemm). Math::T is
// the type of the panel and of the weights in memory, Math::Weight that of the weight rows the
// k steps broadcast from: where they differ, each row group's K chunk is converted first, and a
// packed block's K chunk of tokens once for all the row groups.
//
// One exception to "one k per step" for WidenMath: a packed block of a single vector on AVX-512
// holds k pairs ([K / 2][16][2], see single_vector_pairs), because broadcasting one weight per
// FMA leaves that block load-bound on cores that issue two loads a cycle.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "common/cpu/prefetch.h"
#include "common/cpu/vec.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::broadcast_panels {

constexpr int kLanes = VecF::kWidth;
// Accumulators kPanelRows x kVectors, plus kVectors column vectors and one broadcast, fit the
// register file: 6 x 4 + 4 + 1 = 29 of 32 zmm; 4 x 3 + 3 + 1 = 16 ymm.
constexpr int kVectors = kLanes == 16 ? 4 : 3;
constexpr int kPanelRows = kLanes == 16 ? 6 : 4;
// Weight rows per group for a block of V < kVectors vectors: the FMA unit needs about 8
// independent accumulators in flight (4 cycles of latency, 2 ports), which 6 rows x 1 vector
// (fused_moe's experts with 16 to 31 tokens) do not give: AVX-512 takes 8 rows for 1 to 3
// vectors, AVX2 8 x 1 and 6 x 2. Not more: 12 rows x 1 vector need more general registers than
// x86 has (a pointer per row, the panel pointer, k, its bound), and GCC moved row pointers through
// vector registers. Measured on a Sapphire Rapids VM, fused_moe Mixtral / 4 at T = 64 (experts
// of about 16 tokens), fastest of 5 calls summed over 4 routings: fp32 106-111 ms with 6 rows,
// 92-97 with 8; bf16 vdpbf16ps (AMX off) 77-78 / 68-71 ms; fp32 with exactly 16 tokens per
// expert 24.7-24.9 (6 rows) / 22.1-22.3 (12) / 20.2-20.4 ms (8); fp32 on AVX2 138-140 / 132 ms
// (4 / 8 rows). docs/perf/moe.md.
constexpr int group_rows(int vectors) {
  if (vectors >= kVectors) return kPanelRows;
  if constexpr (kLanes == 16) return 8;
  return vectors == 2 ? 6 : 8;
}
constexpr int kBlockTokens = kLanes * kVectors;  // columns of the widest block
// K per pass of the row groups over a block: a [512][64] fp32 chunk (128 KB) stays in L2 while
// every row group of the call reads it, instead of streaming the whole block from L3 per group
// (fused_moe's GEMM 2 with K = I = 3584 has 917 KB blocks). Measured at T = 512 (Mixtral / 4,
// fp32): 128 ran 5% slower than 512; 256, 512 and 1024 within the VM's noise.
constexpr int64_t kKChunk = 512;
// The same for a 16-bit packed block widened to fp32 once per K chunk (panel_gemm_vectors): 128,
// so that the widened chunk (32 KB at 4 vectors) stays in the L1 for all the row groups.
constexpr int64_t kWidenedKChunk = 128;
// The same for a single-vector block of k pairs (single_vector_pairs): 256, so that its 16 KB of
// x, a row group's 8 KB and the next group's 8 KB (asked for while it runs) fit the L1 together
// (48 KiB on recent Intel cores). fused_moe Mixtral / 4 fp32 at T = 64, Xeon VM, four routings:
// 75-76 ms summed against 79-81 with 512 (128: 75-76; 1024: 79).
constexpr int64_t kPairsKChunk = 256;

// The scalar build has no panels (one-lane vectors).
constexpr bool kHasPanels = kLanes > 1;

// The whole vectors of `columns` split into blocks of at most kVectors vectors, as even as
// possible (the last columns % kLanes are the caller's): 100 columns give 48 + 48 and 4 left, not
// 64 + 32, since a two-vector block runs well below the FMA peak. fused_moe's token blocks, the
// pointwise convolution's pixel runs.
struct PanelBlocks {
  int64_t count, vectors_each, wider;  // blocks [0, wider) hold vectors_each + 1 vectors
  explicit PanelBlocks(int64_t columns) {
    const int64_t vectors = columns / kLanes;
    count = (vectors + kVectors - 1) / kVectors;
    vectors_each = count == 0 ? 0 : vectors / count;
    wider = count == 0 ? 0 : vectors % count;
  }
  int64_t start(int64_t block) const { return (block * vectors_each + std::min(block, wider)) * kLanes; }
  int width(int64_t block) const { return int((vectors_each + (block < wider)) * kLanes); }
  int64_t block_of(int64_t column) const {
    const int64_t vector = column / kLanes, in_wider = wider * (vectors_each + 1);
    return vector < in_wider ? vector / (vectors_each + 1) : wider + (vector - in_wider) / vectors_each;
  }
};

// fp32 FMA on values of type T widened to fp32 (fp32; fp16 and bf16 where vdpbf16ps is missing),
// one k per step. The tokens are widened as they are loaded, 16-bit weights a row group's K chunk
// at a time into an fp32 scratch that the FMAs broadcast from (Weight = float, see
// panel_gemm_vectors): one vector conversion per 16 weights instead of a scalar conversion per
// broadcast (docs/perf/moe.md). kMinVectors: the column vectors a fused_moe expert needs before
// its rows take panels.
template <typename ValueType>
struct WidenMath {
  using T = ValueType;
  using Weight = float;
  using Operand = VecF;
  static constexpr int kKPerStep = 1;
  static constexpr int kMinVectors = 1;
  template <typename X>  // T, or fp32 where a block's K chunk was widened once (panel_gemm_vectors)
  static Operand load_tokens(const X* p) {
    return load(p);
  }
  static Operand broadcast_weights(const float* w) { return broadcast(*w); }
  static Operand broadcast_last_weight(const float* w) { return broadcast(*w); }
  static VecF multiply_add(Operand w, Operand x, VecF acc) { return fmadd(w, x, acc); }
};

// Packed blocks of a single vector (fused_moe's experts with 16 to 31 tokens) of the fp32 FMA
// Math (WidenMath: fp32, and 16-bit values widened) on AVX-512 hold k pairs, [K / 2][16][2]
// (an odd K's last pair ends in a zero): a weight pair broadcast as one 64-bit value multiplies
// two vectors (tokens 0-7 and 8-15, each lane a (token, k parity)), 8 row pairs + 2 panel loads
// per 16 FMAs. With one k per step the block needs a broadcast load per FMA, 9 loads per 8 FMAs,
// and Intel cores issue two loads a cycle to their two FMA ports: a loop of 8 rows x 1 vector
// from L1 ran 126-134 GFLOP/s on one core of a Xeon VM whose FMA peak is 172, the pair loop
// 166-171 (docs/perf/moe.md). The adjacent lanes are added once per call.
template <class Math>
constexpr bool single_vector_pairs() {
  return kLanes == 16 && Math::kKPerStep == 1 && std::is_same_v<typename Math::Weight, float>;
}

// k values per step of a packed block `width` columns wide.
template <class Math>
constexpr int block_k_step(int width) {
  return single_vector_pairs<Math>() && width == kLanes ? 2 : Math::kKPerStep;
}

#if defined(__AVX512F__)
// (w[0], w[1]) in every 64-bit lane pair.
inline VecF broadcast_k_pair(const float* w) {
  double pair;
  std::memcpy(&pair, w, sizeof(pair));
  return {_mm512_castpd_ps(_mm512_set1_pd(pair))};
}
// (w[0], 0) in every lane pair: a row's last value when K is odd (w[1] may lie past the tensor).
inline VecF broadcast_last_k_pair(const float* w) {
  uint32_t bits;
  std::memcpy(&bits, w, sizeof(bits));
  return {_mm512_castsi512_ps(_mm512_set1_epi64(int64_t(bits)))};
}
// Lanes (token, k parity) of tokens 0-7 (low) and 8-15 (high) summed over the parity: 16 tokens.
inline VecF add_k_pairs(VecF low, VecF high) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  return {_mm512_add_ps(_mm512_permutex2var_ps(low.v, even, high.v), _mm512_permutex2var_ps(low.v, odd, high.v))};
}
// 16 tokens' values at k (first) and k + 1 (second) stored as the block's pair row [16][2] of T.
template <typename T>
inline void store_k_pair(T* at, VecF first, VecF second) {
  const __m512 low = _mm512_unpacklo_ps(first.v, second.v);   // per 128-bit lane: tokens 4L, 4L + 1
  const __m512 high = _mm512_unpackhi_ps(first.v, second.v);  // tokens 4L + 2, 4L + 3
  const __m512i tokens_0_7 = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
  const __m512i tokens_8_15 = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
  store(at, VecF{_mm512_permutex2var_ps(low, tokens_0_7, high)});
  store(at + kLanes, VecF{_mm512_permutex2var_ps(low, tokens_8_15, high)});
}
#endif

// Where panel rows lie: x's row k at x + k * x_stride (x_stride counts elements per k, so a
// pair row spans 2 * x_stride), out's row r at out + r * out_stride.
struct PanelStrides {
  int64_t x, out;
};

// Where a call's weight rows are expected: kFromMemory (their first use, e.g. fused_moe's first
// token block of an expert) makes each row group ask for the next group's rows while it runs.
// Why: a group reads 8 rows a K chunk at a time (2 KiB of each, fp32), too short a run for the
// hardware prefetchers to ramp up on, so a narrow block waited on DRAM between FMAs. Measured on
// a Sapphire Rapids VM: a loop of this kernel on one core, 8 rows x 1 vector over a 2 GB stream
// of 72-row items (fused_moe's), 54-59 GFLOP/s without, 72-76 with the next group's lines
// requested into the L1 (into the L2: about the same); fused_moe Mixtral / 4 fp32, fastest of 5
// calls summed over 4 routings, T = 64 92-97 -> 86-89 ms, T = 512 355-376 -> 345-353,
// DeepSeek-V2-Lite / 4 T = 512 91-98 -> 73-74, AVX2 T = 64 135 -> 113-115 (docs/perf/moe.md).
// Requests on weights already cached only cost: asking on every token block, T = 512 lost 4%.
enum class WeightRows { kCached, kFromMemory };

// The rows a panel_block call asks for while it runs: the next row group's, `k` values of each.
template <typename T, int P>
struct NextRows {
  const T* rows[P];
  int64_t k;  // 0: none
};

// out[r][v * kLanes + lane] (+)= sum_k w[r][k] * x(k, v * kLanes + lane) for k < K (K even for
// pairs, except at the end of a row); asks for a cache line of each of `next`'s rows per line of
// its own.
template <class Math, int R, int V, int P, typename X>
inline void panel_block(const typename Math::Weight* const* w, const X* x, PanelStrides strides, int64_t K,
                        bool accumulate, float* out, const NextRows<typename Math::T, P>& next) {
  using Operand = typename Math::Operand;
  constexpr int step = Math::kKPerStep;
  constexpr int64_t kPerLine = kCacheLineBytes / int64_t(sizeof(typename Math::T));
  static_assert(kPerLine % step == 0, "a cache line holds whole steps");
  VecF acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? load(out + r * strides.out + v * kLanes) : broadcast(0.0f);
  const auto step_at = [&](int64_t k, bool last) {
    Operand xv[V];
    for (int v = 0; v < V; ++v) xv[v] = Math::load_tokens(x + k * strides.x + v * kLanes * step);
    for (int r = 0; r < R; ++r) {
      // A pair past the row's end would read the next row's first value (or past the tensor).
      const Operand weight = last ? Math::broadcast_last_weight(w[r] + k) : Math::broadcast_weights(w[r] + k);
      for (int v = 0; v < V; ++v) acc[r][v] = Math::multiply_add(weight, xv[v], acc[r][v]);
    }
  };
  int64_t k = 0;
  for (const int64_t asked = std::min(K, next.k); k + kPerLine <= asked; k += kPerLine) {
    for (int i = 0; i < P; ++i) prefetch_lines(next.rows[i] + k, 1);
    for (int64_t kk = 0; kk < kPerLine; kk += step) step_at(k + kk, false);
  }
  for (; k + step <= K; k += step) step_at(k, false);
  if (k < K) step_at(k, true);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) store(out + r * strides.out + v * kLanes, acc[r][v]);
}

#if defined(__AVX512F__)
// panel_block for a single-vector block of k pairs (single_vector_pairs; x's pair p at x + 32 p,
// x and w fp32 or widened to fp32, out [R][16] in token order).
template <class Math, int R, int P, typename X>
inline void panel_block_pairs(const float* const* w, const X* x, int64_t K, bool accumulate, float* out,
                              const NextRows<typename Math::T, P>& next) {
  static_assert(single_vector_pairs<Math>(), "fp32 FMA pairs on AVX-512");
  constexpr int64_t kPerLine = kCacheLineBytes / int64_t(sizeof(typename Math::T));
  VecF acc[R][2];  // tokens 0-7, 8-15
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = broadcast(0.0f);
  const auto step_at = [&](int64_t k, bool last) {
    const VecF low = load(x + k * kLanes), high = load(x + k * kLanes + kLanes);
    for (int r = 0; r < R; ++r) {
      const VecF weights = last ? broadcast_last_k_pair(w[r] + k) : broadcast_k_pair(w[r] + k);
      acc[r][0] = fmadd(weights, low, acc[r][0]);
      acc[r][1] = fmadd(weights, high, acc[r][1]);
    }
  };
  int64_t k = 0;
  for (const int64_t asked = std::min(K, next.k); k + kPerLine <= asked; k += kPerLine) {
    for (int i = 0; i < P; ++i) prefetch_lines(next.rows[i] + k, 1);
    for (int64_t kk = 0; kk < kPerLine; kk += 2) step_at(k + kk, false);
  }
  for (; k + 2 <= K; k += 2) step_at(k, false);
  if (k < K) step_at(k, true);
  for (int r = 0; r < R; ++r) {
    const VecF sums = add_k_pairs(acc[r][0], acc[r][1]);
    store(out + r * kLanes, accumulate ? sums + load(out + r * kLanes) : sums);
  }
}
#endif

// panel_block (panel_block_pairs for kPairs, x of type X) with rows <= R chosen at run time.
template <class Math, int R, int V, int P, bool kPairs, typename X>
inline void panel_block_upto(int rows, const typename Math::Weight* const* w, const X* x, PanelStrides strides,
                             int64_t K, bool accumulate, float* out, const NextRows<typename Math::T, P>& next) {
  if constexpr (R > 1)
    if (rows < R) return panel_block_upto<Math, R - 1, V, P, kPairs>(rows, w, x, strides, K, accumulate, out, next);
#if defined(__AVX512F__)
  if constexpr (kPairs) return panel_block_pairs<Math, R, P>(w, x, K, accumulate, out, next);
#endif
  if constexpr (!kPairs) panel_block<Math, R, V, P>(w, x, strides, K, accumulate, out, next);
}

// The `count` values at `from` widened to fp32 at `to`.
template <typename T>
inline void widen_values(const T* from, int64_t count, float* to) {
  int64_t k = 0;
  for (; k + kLanes <= count; k += kLanes) store(to + k, load(from + k));
  if (k < count) store_partial(to + k, load_partial(from + k, int(count - k)), int(count - k));
}

// panel_gemm (below) for a width of V vectors (kPairs: one vector of k pairs): row groups of
// group_rows(V); with kFromMemory, each asks for the next group's rows (after the last group: the
// first group's next K chunk). A k pair's 32 values start at 16 k, as one k's 16 do otherwise.
template <class Math, int V, bool kPacked, bool kPairs = false>
void panel_gemm_vectors(const typename Math::T* const* w, int rows, const typename Math::T* x, int64_t K, float* out,
                        PanelStrides strides, WeightRows weight_rows) {
  static_assert(kKChunk % 2 == 0 && kPairsKChunk % 2 == 0 && kWidenedKChunk % 2 == 0, "chunks start on a k pair");
  constexpr int kGroup = group_rows(V);
  using Weight = typename Math::Weight;
  constexpr bool kWidens = !std::is_same_v<Weight, typename Math::T>;
  static_assert(!kWidens || std::is_same_v<Weight, float>, "rows are widened to fp32");
  alignas(64) float widened_rows[kWidens ? kGroup : 1][kWidens ? kKChunk : 1];  // 16 KB at most
  // A packed block's K chunk of 16-bit values widened once for all the row groups: the
  // conversions, one or two per 8 FMAs if done per group, compete with the FMAs for their ports.
  constexpr bool kWidensX = kPacked && kWidens;
  constexpr int64_t kChunk = kPairs ? kPairsKChunk : kWidensX ? kWidenedKChunk : kKChunk;
  alignas(64) float widened_x[kWidensX ? kChunk * V * kLanes : 1];
  // The group of rows from r0 at k0, its slots past the last row repeating that row (a next
  // group's requests then need no count).
  const auto group_at = [&](int64_t k0, int r0, const typename Math::T** at) {
    const int group = std::min(kGroup, rows - r0);
    for (int i = 0; i < kGroup; ++i) at[i] = w[r0 + std::min(i, group - 1)] + k0;
  };
  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    const int64_t chunk = std::min(kChunk, K - k0);
    if constexpr (kWidensX) widen_values(x + k0 * strides.x, (kPairs ? (chunk + 1) / 2 * 2 : chunk) * strides.x, widened_x);
    for (int r0 = 0; r0 < rows; r0 += kGroup) {
      const int group = std::min(kGroup, rows - r0);
      const typename Math::T* rows_at_k0[kGroup];
      group_at(k0, r0, rows_at_k0);
      NextRows<typename Math::T, kGroup> next{{}, 0};
      if (weight_rows == WeightRows::kFromMemory) {
        const bool last_group = r0 + kGroup >= rows;
        const int64_t next_k0 = last_group ? k0 + kChunk : k0;
        if (next_k0 < K) {
          group_at(next_k0, last_group ? 0 : r0 + kGroup, next.rows);
          next.k = std::min(kChunk, K - next_k0);
        }
      }
      const Weight* weights_at[kGroup];  // the rows themselves, or their widened copies
      for (int i = 0; i < kGroup; ++i) {
        if constexpr (kWidens) {
          if (i < group) widen_values(rows_at_k0[i], chunk, widened_rows[i]);
          weights_at[i] = widened_rows[std::min(i, group - 1)];
        } else {
          weights_at[i] = rows_at_k0[i];
        }
      }
      if constexpr (kWidensX)
        panel_block_upto<Math, kGroup, V, kGroup, kPairs>(group, weights_at, widened_x, strides, chunk, k0 > 0,
                                                          out + r0 * strides.out, next);
      else
        panel_block_upto<Math, kGroup, V, kGroup, kPairs>(group, weights_at, x + k0 * strides.x, strides, chunk, k0 > 0,
                                                          out + r0 * strides.out, next);
    }
  }
}

// panel_gemm_vectors with vectors <= V chosen at run time.
template <class Math, int V, bool kPacked>
void panel_gemm_upto(int vectors, const typename Math::T* const* w, int rows, const typename Math::T* x, int64_t K,
                     float* out, PanelStrides strides, WeightRows weight_rows) {
  if constexpr (V > 1)
    if (vectors < V) return panel_gemm_upto<Math, V - 1, kPacked>(vectors, w, rows, x, K, out, strides, weight_rows);
  panel_gemm_vectors<Math, V, kPacked>(w, rows, x, K, out, strides, weight_rows);
}

// out[r][m] = w[r] . x(:, m) for `rows` weight rows (K-contiguous) and `width` columns (whole
// vectors, at most kBlockTokens) of the panel x.
template <class Math>
void panel_gemm(const typename Math::T* const* w, int rows, const typename Math::T* x, int width, int64_t K,
                float* out, PanelStrides strides, WeightRows weight_rows = WeightRows::kCached) {
  panel_gemm_upto<Math, kVectors, false>(width / kLanes, w, rows, x, K, out, strides, weight_rows);
}

// The same for a packed block ([K][width] in k steps of block_k_step(width), out [rows][width]);
// a Math with a tile product (AMX) may take the whole call.
template <class Math>
void panel_gemm(const typename Math::T* const* w, int rows, const typename Math::T* block, int width, int64_t K,
                float* out, WeightRows weight_rows = WeightRows::kCached) {
  if constexpr (requires { Math::tile_gemm(w, rows, block, width, K, out); }) {
    if (Math::tile_gemm(w, rows, block, width, K, out)) return;
  }
  if constexpr (single_vector_pairs<Math>())
    if (block_k_step<Math>(width) == 2)
      return panel_gemm_vectors<Math, 1, true, true>(w, rows, block, K, out, PanelStrides{width, width}, weight_rows);
  panel_gemm_upto<Math, kVectors, true>(width / kLanes, w, rows, block, K, out, PanelStrides{width, width},
                                        weight_rows);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::broadcast_panels
