// CPU kernel of fused_moe, compiled once per ISA level (see common/cpu/dispatch.h).
//
// Structure (the same as the CUDA kernels'): group the (token, slot) pairs by expert
// (moe/expert_plan.h), then two passes over the active experts' weights, each weight row read
// from memory once per call:
//   pass 1  act[r, j] = act(W13[e][j] . h[t], W13[e][I + j] . h[t]) for every grouped row r of
//           expert e: gate and up rows side by side, the activation applied in the epilogue, so
//           no [T, k, 2I] tensor exists (act is [T * k, I] fp32 scratch).
//   pass 2  out[t, n] = sum over t's experts e, in increasing e, of w[t, j] * (W2[e][n] . act[r]):
//           each thread owns a slice of output columns n for all tokens, so the combine needs no
//           [T, k, H] tensor, no atomics, and the sum order does not depend on the thread count.
//
// Both passes are weight-streaming GEMMs with few rows per expert (T = 64, k = 2, E = 8 gives
// 16): the weights ([N, K] row-major, K contiguous) are used as stored, without packing, by a
// dot-product micro-kernel: kRows weight rows x up to kTokens token rows of fp32 accumulators
// over K, reduced horizontally at the end. Each weight vector loaded feeds kTokens FMAs, each
// token vector kRows FMAs.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "moe/expert_plan.h"
#include "moe/fused_moe.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

// Weight rows per micro-kernel call: gate and up rows of two intermediate columns in pass 1,
// four output columns in pass 2.
constexpr int kRows = 4;
// Token rows per micro-kernel call: kRows x kTokens accumulators plus kRows weight vectors and
// one token vector must fit the register file (32 zmm: 4 x 6 + 4 + 1 = 29; 16 ymm: 4 x 2 + 5;
// scalar: the compiler's choice).
constexpr int kTokens = VecF::kWidth == 16 ? 6 : (VecF::kWidth == 8 ? 2 : 4);
// Intermediate columns per pass-1 work item: 32 columns x 2 rows x H weights (256 KB at
// H = 1024 fp32) per item keeps the work items many enough to balance two threads over skewed
// experts and large enough to amortize the scheduling.
constexpr int64_t kColumnsPerItem = 32;
// Output columns per pass-2 work item (all active experts' W2 rows for them).
constexpr int64_t kOutputColumnsPerItem = 16;

// acc[r][m] = dot(w[r][0:K], x[m][0:K]) for R weight rows and NT token rows.
template <int R, int NT, typename TW, typename TX>
inline void dot_block(const TW* const* w, const TX* const* x, int64_t K, float (&acc_out)[kRows][kTokens]) {
  VecF acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < NT; ++m) acc[r][m] = broadcast(0.0f);
  int64_t k = 0;
  for (; k + VecF::kWidth <= K; k += VecF::kWidth) {
    VecF wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load(w[r] + k);
    for (int m = 0; m < NT; ++m) {
      const VecF xv = load(x[m] + k);
      for (int r = 0; r < R; ++r) acc[r][m] = fmadd(wv[r], xv, acc[r][m]);
    }
  }
  if (k < K) {
    const int tail = int(K - k);
    VecF wv[R];
    for (int r = 0; r < R; ++r) wv[r] = load_partial(w[r] + k, tail);
    for (int m = 0; m < NT; ++m) {
      const VecF xv = load_partial(x[m] + k, tail);
      for (int r = 0; r < R; ++r) acc[r][m] = fmadd(wv[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < NT; ++m) acc_out[r][m] = reduce_add(acc[r][m]);
}

// dot_block with the token count chosen at run time (1..kTokens).
template <int R, typename TW, typename TX>
inline void dot_block_tokens(int tokens, const TW* const* w, const TX* const* x, int64_t K,
                             float (&acc)[kRows][kTokens]) {
  static_assert(kTokens <= 6, "extend the switch");
  switch (tokens) {
    case 1: return dot_block<R, 1>(w, x, K, acc);
    case 2: if constexpr (kTokens >= 2) return dot_block<R, 2>(w, x, K, acc); break;
    case 3: if constexpr (kTokens >= 3) return dot_block<R, 3>(w, x, K, acc); break;
    case 4: if constexpr (kTokens >= 4) return dot_block<R, 4>(w, x, K, acc); break;
    case 5: if constexpr (kTokens >= 5) return dot_block<R, 5>(w, x, K, acc); break;
    case 6: if constexpr (kTokens >= 6) return dot_block<R, 6>(w, x, K, acc); break;
  }
}

struct Plan {
  int64_t* counts;        // [E]
  int64_t* offsets;       // [E + 1]
  int32_t* sorted_pairs;  // [T * k]
  int32_t* active;        // [E]: experts with at least one pair, increasing
  int32_t num_active;
};

struct Workspace {
  float* act;
  float* sums;
  Plan plan;
};

Workspace carve_workspace(const moe::FusedMoeParams& p, void* memory) {
  char* base = static_cast<char*>(memory);
  const moe::FusedMoeCpuWorkspace layout = moe::fused_moe_cpu_workspace(p);
  Workspace w;
  w.act = reinterpret_cast<float*>(base + layout.act);
  w.sums = reinterpret_cast<float*>(base + layout.sums);
  w.plan.counts = reinterpret_cast<int64_t*>(base + layout.counts);
  w.plan.offsets = reinterpret_cast<int64_t*>(base + layout.offsets);
  w.plan.sorted_pairs = reinterpret_cast<int32_t*>(base + layout.sorted_pairs);
  w.plan.active = reinterpret_cast<int32_t*>(base + layout.active);
  return w;
}

// Pass 1 for one expert and intermediate columns [j_begin, j_end): gate and up dot products for
// all of the expert's rows, the activated product written to act.
template <typename T>
void gate_up_columns(const moe::FusedMoeParams& p, const Workspace& ws, int32_t e, int64_t j_begin, int64_t j_end) {
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  const T* w13 = static_cast<const T*>(p.w13) + int64_t(e) * 2 * I * H;
  const T* hidden = static_cast<const T*>(p.hidden);
  const int64_t row_begin = ws.plan.offsets[e], rows = ws.plan.counts[e];
  // Raw gate values go to act first; the up values wait here until the activation pass.
  float up[kColumnsPerItem * kTokens];
  for (int64_t r0 = 0; r0 < rows; r0 += kTokens) {
    const int tokens = int(std::min<int64_t>(kTokens, rows - r0));
    const T* x[kTokens];
    float* act_rows[kTokens];
    for (int m = 0; m < tokens; ++m) {
      const int64_t r = row_begin + r0 + m;
      x[m] = hidden + int64_t(ws.plan.sorted_pairs[r] / p.top_k) * H;
      act_rows[m] = ws.act + r * I;
    }
    for (int64_t j = j_begin; j < j_end; j += 2) {
      float acc[kRows][kTokens];
      if (j + 1 < j_end) {
        const T* w[kRows] = {w13 + j * H, w13 + (j + 1) * H, w13 + (I + j) * H, w13 + (I + j + 1) * H};
        dot_block_tokens<4>(tokens, w, x, H, acc);
        for (int m = 0; m < tokens; ++m) {
          act_rows[m][j] = acc[0][m];
          act_rows[m][j + 1] = acc[1][m];
          up[(j - j_begin) * kTokens + m] = acc[2][m];
          up[(j + 1 - j_begin) * kTokens + m] = acc[3][m];
        }
      } else {
        const T* w[kRows] = {w13 + j * H, w13 + (I + j) * H};
        dot_block_tokens<2>(tokens, w, x, H, acc);
        for (int m = 0; m < tokens; ++m) {
          act_rows[m][j] = acc[0][m];
          up[(j - j_begin) * kTokens + m] = acc[1][m];
        }
      }
    }
    // Epilogue over the item's columns, SIMD along j (up is j-major: gather it per token).
    const int columns = int(j_end - j_begin);
    for (int m = 0; m < tokens; ++m) {
      float up_row[kColumnsPerItem];
      for (int c = 0; c < columns; ++c) up_row[c] = up[c * kTokens + m];
      float* a = act_rows[m] + j_begin;
      for (int c = 0; c < columns; c += VecF::kWidth) {
        const int n = std::min(VecF::kWidth, columns - c);
        const VecF gate = load_partial(a + c, n), upv = load_partial(up_row + c, n);
        const VecF activated = p.activation == moe::Activation::kSilu ? gate * sigmoid(gate) : gelu(gate);
        store_partial(a + c, activated * upv, n);
      }
    }
  }
}

// Pass 2 for output columns [n_begin, n_end): every active expert's W2 rows against its act
// rows, weighted and summed into sums[t, n] in increasing expert order.
template <typename T>
void down_columns(const moe::FusedMoeParams& p, const Workspace& ws, float* sums, int64_t n_begin, int64_t n_end) {
  const int64_t H = p.hidden_size, I = p.intermediate_size;
  for (int64_t t = 0; t < p.tokens; ++t) std::fill(sums + t * H + n_begin, sums + t * H + n_end, 0.0f);
  for (int32_t a = 0; a < ws.plan.num_active; ++a) {
    const int32_t e = ws.plan.active[a];
    const T* w2 = static_cast<const T*>(p.w2) + int64_t(e) * H * I;
    const int64_t row_begin = ws.plan.offsets[e], rows = ws.plan.counts[e];
    for (int64_t n = n_begin; n < n_end; n += kRows) {
      const int row_count = int(std::min<int64_t>(kRows, n_end - n));
      const T* w[kRows];
      for (int i = 0; i < row_count; ++i) w[i] = w2 + (n + i) * I;
      for (int64_t r0 = 0; r0 < rows; r0 += kTokens) {
        const int tokens = int(std::min<int64_t>(kTokens, rows - r0));
        const float* x[kTokens];
        for (int m = 0; m < tokens; ++m) x[m] = ws.act + (row_begin + r0 + m) * I;
        float acc[kRows][kTokens];
        if (row_count == kRows) {
          dot_block_tokens<4>(tokens, w, x, I, acc);
        } else {
          for (int i = 0; i < row_count; ++i) {
            float one[kRows][kTokens];
            dot_block_tokens<1>(tokens, w + i, x, I, one);
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
}

template <typename T>
void run(const moe::FusedMoeParams& p, void* workspace) {
  if (p.tokens == 0) return;
  const Workspace ws = [&] {
    Workspace w = carve_workspace(p, workspace);
    moe::build_expert_plan_host(p.topk_ids, p.tokens * p.top_k, p.experts, 1, w.plan.counts, w.plan.offsets,
                                w.plan.sorted_pairs);
    w.plan.num_active = 0;
    for (int32_t e = 0; e < p.experts; ++e)
      if (w.plan.counts[e] > 0) w.plan.active[w.plan.num_active++] = e;
    return w;
  }();
  const int64_t H = p.hidden_size, I = p.intermediate_size;

  // Pass 1: items column-chunk-major over the active experts, so that torch's contiguous split
  // of the item range gives every thread a share of every expert (balanced under skew).
  const int64_t chunks = (I + kColumnsPerItem - 1) / kColumnsPerItem;
  parallel_for(0, chunks * ws.plan.num_active, 1, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t chunk = item / ws.plan.num_active;
      const int32_t e = ws.plan.active[item % ws.plan.num_active];
      gate_up_columns<T>(p, ws, e, chunk * kColumnsPerItem, std::min(I, (chunk + 1) * kColumnsPerItem));
    }
  });

  // Pass 2: fp32 output accumulates in place; fp16/bf16 in the fp32 scratch, rounded once.
  const bool in_place = std::is_same_v<T, float>;
  float* sums = in_place ? reinterpret_cast<float*>(p.out) : ws.sums;
  const int64_t items = (H + kOutputColumnsPerItem - 1) / kOutputColumnsPerItem;
  parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_begin = begin * kOutputColumnsPerItem, n_end = std::min(H, end * kOutputColumnsPerItem);
    down_columns<T>(p, ws, sums, n_begin, n_end);
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

}  // namespace

void fused_moe(const moe::FusedMoeParams& p, void* workspace) {
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) run<T>(p, workspace);
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
