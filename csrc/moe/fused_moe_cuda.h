// CUDA launchers of fused_moe (implemented in fused_moe_cuda.cu, no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moe/fused_moe.h"

namespace torch_ext::cuda {

// How fused_moe runs `p` on a device with `num_sms` SMs, decided once per call: the grouped GEMMs'
// row tile (the plans' segment padding: 128 for the Hopper kernels of moe/fused_moe_wgmma.h, which
// TORCH_EXT_MOE_WGMMA=1 turns on for sm_90a builds on compute capability 9.0, else 64) and the
// bytes of device scratch it needs (the device plans, the activated intermediate rows
// [grouped rows, I] in the io dtype and, k > 1 outside the decode path, an fp32 [T, H] output
// accumulator). A host function of the shapes, pointers and switch: every buffer is sized with
// moe::max_grouped_rows, so no device value is ever read back. 0 bytes for T = 0.
struct FusedMoeLaunch {
  int64_t gemm_rows;
  int64_t workspace_bytes;
};
FusedMoeLaunch plan_fused_moe(const moe::FusedMoeParams& p, int num_sms);

// Enqueues the fused MoE on `stream` (no host synchronization): the expert plans on the device,
// grouped GEMM 1 with the gated activation fused (act rounded to the io dtype before GEMM 2),
// grouped GEMM 2 with the routing weights and the combine fused, or the decode kernels for
// T * k <= 64. fp16 / bf16 only (cudaErrorInvalidValue otherwise); any T >= 0, H, I >= 1, E,
// k <= E. Deterministic: each out[t, n] is summed over the token's experts in increasing expert
// id, in fp32, and rounded once. `launch` is plan_fused_moe(p, num_sms) with the same num_sms;
// `workspace` holds its workspace_bytes, 256-byte aligned.
cudaError_t fused_moe(const moe::FusedMoeParams& p, const FusedMoeLaunch& launch, void* workspace, int num_sms,
                      cudaStream_t stream);

// The expert plan alone, for fused_moe_quantized's grouped GEMMs (no host synchronization): the
// (token, slot) pairs of ids [pairs] (pair p = t * top_k + j, every id in [0, experts)) grouped
// by expert on the device as fused_moe's GEMMs group them, each expert's rows padded to a
// multiple of `block` (in increasing expert id, pairs in increasing order within an expert).
// For each of the moe::max_grouped_rows(pairs, experts, block) rows it writes row_expert (the
// expert whose rows hold it; -1 past the last expert's rows) and row_token (its pair's token;
// 0 on padding rows and past the rows, a valid row whose products are never read); row_of_pair
// [pairs]: each pair's row. `workspace` holds expert_row_plan_workspace_bytes(...) bytes,
// 256-byte aligned, with the same num_sms.
struct ExpertRowPlan {
  const int32_t* ids;
  int64_t pairs;
  int top_k;
  int32_t experts;
  int64_t block;
  int32_t* row_expert;
  int32_t* row_token;
  int32_t* row_of_pair;
};
int64_t expert_row_plan_workspace_bytes(int64_t pairs, int32_t experts, int64_t block, int num_sms);
cudaError_t expert_row_plan(const ExpertRowPlan& p, void* workspace, int num_sms, cudaStream_t stream);

}  // namespace torch_ext::cuda
