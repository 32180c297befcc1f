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

}  // namespace torch_ext::cuda
