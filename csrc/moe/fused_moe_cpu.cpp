// CPU kernel of fused_moe with fp32 FMA dot products, compiled once per ISA level (see
// common/cpu/dispatch.h). The passes and their reasoning: moe/fused_moe_cpu_passes.h.
#include <type_traits>

#include "common/cpu/vec.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_cpu_passes.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using fused_moe_passes::Accumulators;
using fused_moe_passes::kRows;
using fused_moe_passes::kTokens;

// acc[r][m] = dot(w[r][0:K], x[m][0:K]) for R weight rows and NT token rows, fp32 FMA on the
// widened values: each weight vector loaded feeds NT FMAs, each token vector R.
template <int R, int NT, typename TW, typename TX>
inline void dot_block(const TW* const* w, const TX* const* x, int64_t K, Accumulators& acc_out) {
  VecF acc[R][NT];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < NT; ++m) acc[r][m] = broadcast(0.0f);
  int64_t k = 0;
  for (; k + VecF::kWidth <= K; k += VecF::kWidth) {
    VecF wv[R];
    for (int r = 0; r < R; ++r) {
      fused_moe_passes::prefetch_ahead(w[r] + k);
      wv[r] = load(w[r] + k);
    }
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

struct FmaKernel {
  template <typename T>
  using PanelMath = fused_moe_panels::WidenMath<T>;
  // dot_block with the token count chosen at run time (1..kTokens).
  template <int R, typename TW, typename TX>
  static void dot(int tokens, const TW* const* w, const TX* const* x, int64_t K, Accumulators& acc) {
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
};

}  // namespace

void fused_moe(const moe::FusedMoeParams& p, void* workspace) {
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    // fp32 keeps the activated rows in fp32; fp16/bf16 round them to the io dtype (as on CUDA).
    if constexpr (!std::is_same_v<T, double>) fused_moe_passes::run<FmaKernel, T, T>(p, workspace);
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
