// fused_moe: out[t] = sum_j w[t, j] * W2[e] @ act(W13[e] @ h[t]), e = ids[t, j], the expert MLPs of
// a Mixture-of-Experts layer run only on their tokens, gated activation and combine fused.
// Torch-free: the parameter struct carries raw pointers; the torch-facing code in fused_moe.cpp
// fills it. The token grouping (moe/expert_plan.h) is shared by the CPU and CUDA kernels.
#pragma once

#include <cstdint>

#include "common/alignment.h"
#include "common/cpu/dispatch.h"
#include "common/dtype.h"
#include "common/macros.h"

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
  // Optional (training; CPU kernel only): the pre-activation [gate; up] of every (token, slot)
  // pair, [T * k, 2I] in pair order (row t * k + j), written for the backward.
  void* gate_up = nullptr;
};

// The CPU kernel's scratch: byte offsets of its areas (each 64-byte aligned) and the total.
// Rows that the micro-kernels read several of at once are stored with
// conflict_free_row_stride (common/alignment.h), not packed: H = 1024 fp32 rows 4 KiB apart
// would share one L1 set.
// Each expert's rows in gathered / act are followed by kCpuSpareRowsPerExpert spare rows: room
// for its last token vector's panel padded with zero tokens (moe/fused_moe_cpu_panels.h).
constexpr int64_t kCpuSpareRowsPerExpert = 16;

struct FusedMoeCpuWorkspace {
  int64_t hidden_stride;  // elements between gathered hidden rows
  int64_t act_stride;     // elements between act rows
  int64_t gathered;       // [T * k + spare, hidden_stride] io dtype: hidden[token of the pair] in grouped order
  int64_t act;            // [T * k + spare, act_stride] io dtype: the activated rows act(W13 h), grouped order
  int64_t sums;           // [T, H] fp32 output sums (fp16/bf16 output only; fp32 sums in place)
  int64_t counts;         // the plan (moe/expert_plan.h): [E] int64
  int64_t offsets;        // [E + 1] int64
  int64_t sorted_pairs;   // [T * k] int32
  int64_t active;         // [E] int32: the experts with pairs, increasing
  int64_t total;
};

inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
inline FusedMoeCpuWorkspace fused_moe_cpu_workspace(const FusedMoeParams& p) {
  const auto aligned = [](int64_t bytes) { return (bytes + 63) / 64 * 64; };
  const int64_t pairs = p.tokens * p.top_k;
  const int64_t io_bytes = p.dtype == ScalarKind::kFloat32 ? 4 : 2;  // fp64 never reaches the kernel
  FusedMoeCpuWorkspace w;
  w.hidden_stride = conflict_free_row_stride(p.hidden_size, io_bytes);
  w.act_stride = conflict_free_row_stride(p.intermediate_size, io_bytes);
  const int64_t rows = pairs + kCpuSpareRowsPerExpert * p.experts;
  w.gathered = 0;
  w.act = w.gathered + aligned(rows * w.hidden_stride * io_bytes);
  w.sums = w.act + aligned(rows * w.act_stride * io_bytes);
  w.counts = w.sums + (p.dtype == ScalarKind::kFloat32 ? 0 : aligned(p.tokens * p.hidden_size * 4));
  w.offsets = w.counts + aligned(int64_t(p.experts) * 8);
  w.sorted_pairs = w.offsets + aligned((int64_t(p.experts) + 1) * 8);
  w.active = w.sorted_pairs + aligned(pairs * 4);
  w.total = w.active + aligned(int64_t(p.experts) * 4);
  return w;
}
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE

}  // namespace torch_ext::moe

namespace torch_ext::cpu {
// fp32, bf16 and fp16 (fp64 is served by the torch-facing code's ATen path). `workspace` holds
// moe::fused_moe_cpu_workspace(p).total bytes, 64-byte aligned. Deterministic: each output
// element is summed over its experts in increasing expert id by one thread.
TORCH_EXT_DECLARE_CPU_KERNEL(void fused_moe(const moe::FusedMoeParams& p, void* workspace))
}  // namespace torch_ext::cpu
