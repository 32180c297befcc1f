// The two passes of fused_moe's CPU kernel, shared by the FMA micro-kernel (fused_moe_cpu.cpp,
// every ISA level) and the AVX512_BF16 one (fused_moe_cpu_bf16.cpp); defined in each file's
// ISA namespace.
//
// Structure (the same as the CUDA kernels'): group the (token, slot) pairs by expert
// (moe/expert_plan.h) and copy each pair's hidden row into grouped order (`gathered`, rows at an
// L1-friendly stride), then two passes over the active experts' weights, each weight row read
// from memory once per call:
//   pass 1  act[r, j] = act(W13[e][j] . h[t], W13[e][I + j] . h[t]) for every grouped row r of
//           expert e: gate and up rows side by side, the activation applied in the epilogue, so
//           no [T, k, 2I] tensor exists (act is [T * k, I] scratch, strided like gathered: fp32
//           for fp32 io, the io dtype otherwise, as the CUDA kernels round it).
//   pass 2  out[t, n] = sum over t's experts e, in increasing e, of w[t, j] * (W2[e][n] . act[r]):
//           each thread owns a slice of output columns n for all tokens, so the combine needs no
//           [T, k, H] tensor, no atomics, and the sum order does not depend on the thread count.
//
// Both passes are weight-streaming GEMMs with few rows per expert (T = 64, k = 2, E = 8 gives
// 16): the weights ([N, K] row-major, K contiguous) are used as stored, without packing, by a
// dot-product micro-kernel `Kernel::dot<R>(tokens, w, x, K, acc)`: acc[r][m] = w[r] . x[m] for
// R <= kRows weight rows and tokens <= kTokens token rows.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common/cpu/parallel.h"
#include "common/cpu/prefetch.h"
#include "common/cpu/vec.h"
#include "moe/expert_plan.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_cpu_panels.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_passes {

// Weight rows per micro-kernel call: gate and up rows of two intermediate columns in pass 1,
// four output columns in pass 2.
constexpr int kRows = 4;
// Token rows per micro-kernel call: kRows x kTokens accumulators plus kRows weight vectors and
// one token vector must fit the register file (32 zmm: 4 x 6 + 4 + 1 = 29; 16 ymm: 4 x 2 + 5;
// scalar: the compiler's choice).
constexpr int kTokens = VecF::kWidth == 16 ? 6 : (VecF::kWidth == 8 ? 2 : 4);
// Intermediate columns per pass-1 work item: 36 columns x 2 rows x H weights (288 KB at
// H = 1024 fp32, L2-resident while every token block of the expert passes over it) keeps the
// items many enough to balance two threads over skewed experts and large enough to amortize
// the scheduling; 72 rows are whole groups of the panel kernel's rows (4, 6 or 8,
// broadcast_panels::group_rows) in all items but the one holding I's tail.
constexpr int64_t kColumnsPerItem = 36;
// Output columns per pass-2 work item (all active experts' W2 rows for them): 24, whole groups
// of 4, 6 or 8 panel rows, and of the dot-product kernel's kRows.
constexpr int64_t kOutputColumnsPerItem = 24;

// Bytes ahead in each weight row that the dot-product kernels prefetch, into the L2: they stream
// an expert's rows from DRAM a few at a time (kRows streams, each dotted with at most kTokens
// tokens), and on a Sapphire Rapids VM the hardware prefetchers alone left that stream at half the
// copy bandwidth (bf16 Mixtral/4, T = 16: 12.8 -> 8.8 ms with 1 KiB into the L1; 4 KiB into the
// L2, where the requests do not wait for the L1's miss buffers: 8.5-9.5 -> 5.9-6.5 ms in a timing
// script, 2 and 8 KiB alike; docs/perf/moe.md).
constexpr int64_t kPrefetchBytes = 4096;
template <typename T>
inline void prefetch_ahead(const T* at) {
  prefetch_lines_to_l2(reinterpret_cast<const char*>(at) + kPrefetchBytes, kCacheLineBytes);
}

using Accumulators = float[kRows][kTokens];

// The panel arithmetic of a Kernel for io type T (moe/fused_moe_cpu_panels.h).
template <typename Kernel, typename T>
using PanelMath = typename Kernel::template PanelMath<T>;

inline VecF activate(torch_ext::moe::Activation activation, VecF gate) {
  return activation == torch_ext::moe::Activation::kSilu ? gate * sigmoid(gate) : gelu(gate);
}

struct Plan {
  int64_t* counts;        // [E]
  int64_t* offsets;       // [E + 1]
  int32_t* sorted_pairs;  // [T * k]
  int32_t* active;        // [E]: experts with at least one pair, increasing
  int32_t num_active;
};

template <typename T, typename Act>
struct Workspace {
  T* gathered;            // [T * k, hidden_stride] hidden rows in grouped order
  Act* act;               // [T * k, act_stride] activated rows in grouped order
  int64_t hidden_stride;  // both strides from moe::fused_moe_cpu_workspace (L1-set friendly)
  int64_t act_stride;
  float* sums;            // [T, H] fp32 output sums (16-bit output only)
  Plan plan;
  int64_t pad_partial_below = 0;  // experts below this many rows pad a partial vector (fused_moe_cpu_panels.h)
  // Expert e's first row in gathered / act (its grouped rows, then its spare rows).
  int64_t area_begin(int32_t e) const {
    return plan.offsets[e] + torch_ext::moe::kCpuSpareRowsPerExpert * e;
  }
};

template <typename T, typename Act>
Workspace<T, Act> make_workspace(const torch_ext::moe::FusedMoeParams& p, void* memory) {
  char* base = static_cast<char*>(memory);
  const torch_ext::moe::FusedMoeCpuWorkspace layout = torch_ext::moe::fused_moe_cpu_workspace(p);
  Workspace<T, Act> w;
  w.gathered = reinterpret_cast<T*>(base + layout.gathered);
  w.act = reinterpret_cast<Act*>(base + layout.act);
  w.hidden_stride = layout.hidden_stride;
  w.act_stride = layout.act_stride;
  w.sums = reinterpret_cast<float*>(base + layout.sums);
  w.plan.counts = reinterpret_cast<int64_t*>(base + layout.counts);
  w.plan.offsets = reinterpret_cast<int64_t*>(base + layout.offsets);
  w.plan.sorted_pairs = reinterpret_cast<int32_t*>(base + layout.sorted_pairs);
  w.plan.active = reinterpret_cast<int32_t*>(base + layout.active);
  torch_ext::moe::build_expert_plan_host(p.topk_ids, p.tokens * p.top_k, p.experts, 1, w.plan.counts,
                                         w.plan.offsets, w.plan.sorted_pairs);
  w.plan.num_active = 0;
  for (int32_t e = 0; e < p.experts; ++e)
    if (w.plan.counts[e] > 0) w.plan.active[w.plan.num_active++] = e;
  return w;
}

// Copies hidden[token of the pair] for grouped rows [begin, end) into ws.gathered: panel rows
// transposed into their expert's panel blocks, the others as rows, so that a token block's rows
// are contiguous and conflict-free in L1 (hidden's own rows may be 4 KiB apart).
template <typename Kernel, typename T, typename Act>
void gather_hidden_rows(const torch_ext::moe::FusedMoeParams& p, const Workspace<T, Act>& ws, int64_t begin,
                        int64_t end) {
  namespace panels = fused_moe_panels;
  using Math = PanelMath<Kernel, T>;
  const T* hidden = static_cast<const T*>(p.hidden);
  const int64_t H = p.hidden_size, *offsets = ws.plan.offsets;
  int32_t e = int32_t(std::upper_bound(offsets, offsets + p.experts + 1, begin) - offsets) - 1;
  for (int64_t r = begin; r < end; ++r) {
    while (r >= offsets[e + 1]) ++e;
    const T* row = hidden + int64_t(ws.plan.sorted_pairs[r] / p.top_k) * H;
    const int64_t index = r - offsets[e], rows = ws.plan.counts[e];
    const int64_t panel = panels::panel_rows<Math>(rows, ws.pad_partial_below);
    if constexpr (panels::kHasPanels) {
      if (index < panel) {
        const panels::PanelBlocks blocks(panel);
        const int64_t block = blocks.block_of(index);
        T* const at = panels::block_start<Math>(ws.gathered, ws.area_begin(e), ws.hidden_stride, blocks, block, H);
        const int width = blocks.width(block), token = int(index - blocks.start(block));
        panels::transpose_into_block<Math>(row, H, at, width, token);
        if (index == rows - 1)  // the padding tokens of a partial last vector: zeros
          for (int pad = token + 1; pad < width; ++pad) panels::zero_block_column<Math>(H, at, width, pad);
        continue;
      }
    }
    std::copy_n(row, H, ws.gathered + (ws.area_begin(e) + index) * ws.hidden_stride);
  }
}

// 16 tokens' activated values at columns j and j + 1 into a block of k pairs: the Math's own
// pairs (bf16), or fp32 single-vector pairs.
template <class Math>
inline void store_column_pair(typename Math::T* at, VecF first, VecF second) {
  if constexpr (Math::kKPerStep == 2) {
    Math::store_column_pair(at, first, second);
  } else if constexpr (fused_moe_panels::single_vector_pairs<Math>()) {
#if defined(__AVX512F__)
    fused_moe_panels::store_k_pair(at, first, second);
#endif
  }
}

// Pass 1 through panels for the expert's panel rows: the gate and up rows of columns
// [j_begin, j_end) against each token block, activated along the tokens into the act panel.
template <class Math>
void gate_up_panels(const torch_ext::moe::FusedMoeParams& p, const Workspace<typename Math::T, typename Math::T>& ws,
                    int32_t e, int64_t j_begin, int64_t j_end) {
  namespace panels = fused_moe_panels;
  using T = typename Math::T;
  const int64_t rows = ws.plan.counts[e], panel = panels::panel_rows<Math>(rows, ws.pad_partial_below);
  if (panel == 0) return;
  const int64_t H = p.hidden_size, I = p.intermediate_size, row_begin = ws.plan.offsets[e], area = ws.area_begin(e);
  const T* w13 = static_cast<const T*>(p.w13) + int64_t(e) * 2 * I * H;
  const int columns = int(j_end - j_begin);
  const T* w[2 * kColumnsPerItem];  // gate rows, then up rows
  for (int c = 0; c < columns; ++c) w[c] = w13 + (j_begin + c) * H, w[columns + c] = w13 + (I + j_begin + c) * H;
  alignas(64) float gate_up[2 * kColumnsPerItem * panels::kBlockTokens];
  const panels::PanelBlocks blocks(panel);
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int width = blocks.width(b);
    panels::panel_gemm<Math>(w, 2 * columns,
                             panels::block_start<Math>(ws.gathered, area, ws.hidden_stride, blocks, b, H), width, H,
                             gate_up, panels::weight_rows_for_block(b));
    T* act_block = panels::block_start<Math>(ws.act, area, ws.act_stride, blocks, b, I);
    const auto activated = [&](int c, int m) {
      return activate(p.activation, load(gate_up + c * width + m)) * load(gate_up + (columns + c) * width + m);
    };
    for (int m = 0; m < width; m += VecF::kWidth) {
      if (panels::block_k_step<Math>(width) == 1) {
        for (int c = 0; c < columns; ++c)
          store(act_block + panels::panel_offset<Math>(j_begin + c, m, width), activated(c, m));
      } else {  // column pairs; an odd I's last column pairs with the zero of the padding
        static_assert(kColumnsPerItem % 2 == 0, "items start on a column pair");
        for (int c = 0; c < columns; c += 2)
          store_column_pair<Math>(act_block + panels::panel_offset<Math>(j_begin + c, m, width), activated(c, m),
                                  c + 1 < columns ? activated(c + 1, m) : broadcast(0.0f));
      }
    }
    if (p.gate_up == nullptr) continue;
    // Training: the pre-activation values too, by pair, for the backward (real tokens only).
    for (int m = 0, real = int(std::min<int64_t>(width, rows - blocks.start(b))); m < real; ++m) {
      T* saved = static_cast<T*>(p.gate_up) + int64_t(ws.plan.sorted_pairs[row_begin + blocks.start(b) + m]) * 2 * I;
      for (int c = 0; c < columns; ++c) {
        saved[j_begin + c] = from_float<T>(gate_up[c * width + m]);
        saved[I + j_begin + c] = from_float<T>(gate_up[(columns + c) * width + m]);
      }
    }
  }
}

// Pass 2 through panels for the expert's panel rows: W2 rows [n_begin, n_end) (at most
// kOutputColumnsPerItem: down_columns' chunk) against each act block, weighted and added to sums.
template <class Math>
void down_panels(const torch_ext::moe::FusedMoeParams& p, const Workspace<typename Math::T, typename Math::T>& ws,
                 float* sums, int32_t e, int64_t n_begin, int64_t n_end) {
  namespace panels = fused_moe_panels;
  using T = typename Math::T;
  const int64_t rows = ws.plan.counts[e], panel = panels::panel_rows<Math>(rows, ws.pad_partial_below);
  if (panel == 0) return;
  const int64_t H = p.hidden_size, I = p.intermediate_size, row_begin = ws.plan.offsets[e], area = ws.area_begin(e);
  const T* w2 = static_cast<const T*>(p.w2) + int64_t(e) * H * I;
  alignas(64) float partial[kOutputColumnsPerItem * panels::kBlockTokens];
  const int count = int(n_end - n_begin);
  const T* w[kOutputColumnsPerItem];
  for (int i = 0; i < count; ++i) w[i] = w2 + (n_begin + i) * I;
  const panels::PanelBlocks blocks(panel);
  for (int64_t b = 0; b < blocks.count; ++b) {
    const int width = blocks.width(b);
    panels::panel_gemm<Math>(w, count, panels::block_start<Math>(ws.act, area, ws.act_stride, blocks, b, I), width, I,
                             partial, panels::weight_rows_for_block(b));
    for (int m = 0, real = int(std::min<int64_t>(width, rows - blocks.start(b))); m < real; ++m) {
      const int32_t pair = ws.plan.sorted_pairs[row_begin + blocks.start(b) + m];
      const float weight = p.topk_weights[pair];
      float* out_row = sums + int64_t(pair / p.top_k) * H + n_begin;
      for (int i = 0; i < count; ++i) out_row[i] += weight * partial[i * width + m];
    }
  }
}

// Pass 1 for one expert and intermediate columns [j_begin, j_end): gate and up dot products for
// all of the expert's rows (panel rows through gate_up_panels), the activated product written
// to act.
template <typename Kernel, typename T, typename Act>
void gate_up_columns(const torch_ext::moe::FusedMoeParams& p, const Workspace<T, Act>& ws, int32_t e,
                     int64_t j_begin, int64_t j_end) {
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  const T* w13 = static_cast<const T*>(p.w13) + int64_t(e) * 2 * I * H;
  const int64_t row_begin = ws.plan.offsets[e], rows = ws.plan.counts[e], area = ws.area_begin(e);
  const int columns = int(j_end - j_begin);
  using Math = PanelMath<Kernel, T>;
  if constexpr (fused_moe_panels::kHasPanels) gate_up_panels<Math>(p, ws, e, j_begin, j_end);
  // Gate and up values of the item's columns for one token block, token-major, until the
  // epilogue activates them (SIMD along the columns).
  float gate[kTokens][kColumnsPerItem], up[kTokens][kColumnsPerItem];
  for (int64_t r0 = fused_moe_panels::panel_rows<Math>(rows, ws.pad_partial_below); r0 < rows; r0 += kTokens) {
    const int tokens = int(std::min<int64_t>(kTokens, rows - r0));
    const T* x[kTokens];
    for (int m = 0; m < tokens; ++m) x[m] = ws.gathered + (area + r0 + m) * ws.hidden_stride;
    for (int c = 0; c < columns; c += 2) {
      const int64_t j = j_begin + c;
      Accumulators acc;
      if (c + 1 < columns) {
        const T* w[kRows] = {w13 + j * H, w13 + (j + 1) * H, w13 + (I + j) * H, w13 + (I + j + 1) * H};
        Kernel::template dot<4>(tokens, w, x, H, acc);
        for (int m = 0; m < tokens; ++m) {
          gate[m][c] = acc[0][m], gate[m][c + 1] = acc[1][m];
          up[m][c] = acc[2][m], up[m][c + 1] = acc[3][m];
        }
      } else {
        const T* w[kRows] = {w13 + j * H, w13 + (I + j) * H};
        Kernel::template dot<2>(tokens, w, x, H, acc);
        for (int m = 0; m < tokens; ++m) gate[m][c] = acc[0][m], up[m][c] = acc[1][m];
      }
    }
    for (int m = 0; m < tokens; ++m) {
      Act* a = ws.act + (area + r0 + m) * ws.act_stride + j_begin;
      // Training: the pre-activation values too, by pair, for the backward.
      T* saved = p.gate_up == nullptr ? nullptr
                                      : static_cast<T*>(p.gate_up) + int64_t(ws.plan.sorted_pairs[row_begin + r0 + m]) * 2 * I;
      for (int c = 0; c < columns; c += VecF::kWidth) {
        const int n = std::min(VecF::kWidth, columns - c);
        const VecF g = load_partial(gate[m] + c, n), u = load_partial(up[m] + c, n);
        store_partial(a + c, activate(p.activation, g) * u, n);
        if (saved != nullptr) {
          store_partial(saved + j_begin + c, g, n);
          store_partial(saved + I + j_begin + c, u, n);
        }
      }
    }
  }
}

// Pass 2 by dot products for the expert's rows past its panel rows, output columns
// [n_begin, n_end): W2 rows against act rows, weighted and added to sums.
template <typename Kernel, typename T, typename Act>
void down_dot_rows(const torch_ext::moe::FusedMoeParams& p, const Workspace<T, Act>& ws, float* sums, int32_t e,
                   int64_t n_begin, int64_t n_end) {
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  const T* w2 = static_cast<const T*>(p.w2) + int64_t(e) * H * I;
  const int64_t row_begin = ws.plan.offsets[e], rows = ws.plan.counts[e], area = ws.area_begin(e);
  using Math = PanelMath<Kernel, T>;
  for (int64_t n = n_begin; n < n_end; n += kRows) {
    const int row_count = int(std::min<int64_t>(kRows, n_end - n));
    const T* w[kRows];
    for (int i = 0; i < row_count; ++i) w[i] = w2 + (n + i) * I;
    for (int64_t r0 = fused_moe_panels::panel_rows<Math>(rows, ws.pad_partial_below); r0 < rows; r0 += kTokens) {
      const int tokens = int(std::min<int64_t>(kTokens, rows - r0));
      const Act* x[kTokens];
      for (int m = 0; m < tokens; ++m) x[m] = ws.act + (area + r0 + m) * ws.act_stride;
      Accumulators acc;
      if (row_count == kRows) {
        Kernel::template dot<4>(tokens, w, x, I, acc);
      } else {
        for (int i = 0; i < row_count; ++i) {
          Accumulators one;
          Kernel::template dot<1>(tokens, w + i, x, I, one);
          for (int m = 0; m < tokens; ++m) acc[i][m] = one[0][m];
        }
      }
      for (int m = 0; m < tokens; ++m) {
        const int32_t pair = ws.plan.sorted_pairs[row_begin + r0 + m];
        const float weight = p.topk_weights[pair];
        float* out_row = sums + int64_t(pair / p.top_k) * H;
        for (int i = 0; i < row_count; ++i) out_row[n + i] += weight * acc[i][m];
      }
    }
  }
}

// Pass 2 for output columns [n_begin, n_end): every active expert's W2 rows against its act
// rows, weighted and summed into sums[t, n] in increasing expert order.
template <typename Kernel, typename T, typename Act>
void down_columns(const torch_ext::moe::FusedMoeParams& p, const Workspace<T, Act>& ws, float* sums, int64_t n_begin,
                  int64_t n_end) {
  const int64_t H = p.hidden_size;
  for (int64_t t = 0; t < p.tokens; ++t) std::fill(sums + t * H + n_begin, sums + t * H + n_end, 0.0f);
  for (int32_t a = 0; a < ws.plan.num_active; ++a) {
    const int32_t e = ws.plan.active[a];
    // Chunks of kOutputColumnsPerItem columns, panels then dot products, so that the dot products
    // find the chunk's W2 rows (336 KB at I = 3584 fp32) in the L2 where the panels left them;
    // over a thread's whole column range (7 MB per expert at Mixtral / 4) they were read from
    // memory a second time (Mixtral / 4 fp32 T = 64, four routings: 75-76 -> 70 ms).
    for (int64_t n0 = n_begin; n0 < n_end; n0 += kOutputColumnsPerItem) {
      const int64_t n0_end = std::min(n_end, n0 + kOutputColumnsPerItem);
      if constexpr (fused_moe_panels::kHasPanels) down_panels<PanelMath<Kernel, T>>(p, ws, sums, e, n0, n0_end);
      down_dot_rows<Kernel, T>(p, ws, sums, e, n0, n0_end);
    }
  }
}

// Both passes for io type T with the activated rows stored as Act.
template <typename Kernel, typename T, typename Act>
void run(const torch_ext::moe::FusedMoeParams& p, void* workspace) {
  if (p.tokens == 0) return;
  Workspace<T, Act> ws = make_workspace<T, Act>(p, workspace);
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  ws.pad_partial_below = fused_moe_panels::pad_partial_below<PanelMath<Kernel, T>>(3 * H * I * int64_t(sizeof(T)));
  parallel_for(0, p.tokens * p.top_k, 16,
               [&](int64_t begin, int64_t end) { gather_hidden_rows<Kernel>(p, ws, begin, end); });

  // Pass 1: items column-chunk-major over the active experts, so that torch's contiguous split
  // of the item range gives every thread a share of every expert (balanced under skew).
  const int64_t chunks = (I + kColumnsPerItem - 1) / kColumnsPerItem;
  parallel_for(0, chunks * ws.plan.num_active, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / ws.plan.num_active;
      const int32_t e = ws.plan.active[item % ws.plan.num_active];
      gate_up_columns<Kernel, T>(p, ws, e, chunk * kColumnsPerItem, std::min(I, (chunk + 1) * kColumnsPerItem));
    }
  });

  // Pass 2: fp32 output accumulates in place; fp16/bf16 in the fp32 scratch, rounded once.
  float* sums = std::is_same_v<T, float> ? reinterpret_cast<float*>(p.out) : ws.sums;
  const int64_t items = (H + kOutputColumnsPerItem - 1) / kOutputColumnsPerItem;
  parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_begin = begin * kOutputColumnsPerItem, n_end = std::min(H, end * kOutputColumnsPerItem);
    down_columns<Kernel, T>(p, ws, sums, n_begin, n_end);
    if constexpr (!std::is_same_v<T, float>) {
      T* out = static_cast<T*>(p.out);
      for (int64_t t = 0; t < p.tokens; ++t) {
        for (int64_t n = n_begin; n < n_end; n += VecF::kWidth) {
          const int count = int(std::min<int64_t>(VecF::kWidth, n_end - n));
          store_partial(out + t * H + n, load_partial(sums + t * H + n, count), count);
        }
      }
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::fused_moe_passes
