// fused_moe: out[t] = sum_j w[t, j] * W2[e] @ act(W13[e] @ h[t]), e = ids[t, j], the expert MLPs of
// a Mixture-of-Experts layer run only on their tokens, gated activation and combine fused.
// Torch-free: the parameter struct carries raw pointers; the torch-facing code in fused_moe.cpp
// fills it. The token grouping (moe/expert_plan.h) is shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/cpu/dispatch.h"
#include "common/dtype.h"

namespace torch_ext::moe {

// The gate half's activation: act(g, u) = silu(g) * u (SwiGLU) or gelu(g) * u with the exact
// erf GELU (GeGLU).
enum class Activation : int32_t { kSilu = 0, kGelu = 1 };

struct FusedMoeParams {
  ScalarKind dtype;            // of hidden, w13, w2 and out
  int64_t tokens;              // T
  int64_t hidden_size;         // H
  int64_t intermediate_size;   // I
  int32_t experts;             // E
  int32_t top_k;               // k
  Activation activation;
  const void* hidden;          // [T, H] contiguous
  const void* w13;             // [E, 2I, H] contiguous: rows [0, I) gate, [I, 2I) up
  const void* w2;              // [E, H, I] contiguous
  const float* topk_weights;   // [T, k]
  const int32_t* topk_ids;     // [T, k], every id in [0, E) (checked by the caller)
  void* out;                   // [T, H] contiguous
};

namespace cpu {
// Scratch floats the CPU kernel needs: the activated rows act(W13 h) of every (token, slot)
// pair, [T * k, I] fp32, plus the plan (moe/expert_plan.h).
int64_t fused_moe_workspace_bytes(const FusedMoeParams& p);
}  // namespace cpu

}  // namespace torch_ext::moe

namespace torch_ext::cpu {
// fp32, bf16 and fp16 (fp64 is served by the torch-facing code's ATen path). `workspace` holds
// moe::cpu::fused_moe_workspace_bytes(p) bytes, 64-byte aligned. Deterministic: each output
// element is summed over its experts in increasing expert id by one thread.
TORCH_EXT_DECLARE_CPU_KERNEL(void fused_moe(const moe::FusedMoeParams& p, void* workspace))
}  // namespace torch_ext::cpu
