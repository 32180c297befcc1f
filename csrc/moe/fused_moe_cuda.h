// CUDA launchers of fused_moe (implemented in fused_moe_cuda.cu, no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "moe/fused_moe.h"

namespace torch_ext::cuda {

// Bytes of device scratch fused_moe needs for `p` on a device with `num_sms` SMs: the device
// plans, the activated intermediate rows [grouped rows, I] in the io dtype and (k > 1, outside
// the decode path) an fp32 [T, H] output accumulator. A pure host function of the shapes: every
// buffer is sized with moe::max_grouped_rows, so no device value is ever read back. 0 for T = 0.
int64_t fused_moe_workspace_bytes(const moe::FusedMoeParams& p, int num_sms);

// Enqueues the fused MoE on `stream` (no host synchronization): the expert plans on the device,
// grouped GEMM 1 with the gated activation fused (act rounded to the io dtype before GEMM 2),
// grouped GEMM 2 with the routing weights and the combine fused, or the decode kernels for
// T * k <= 64. fp16 / bf16 only (cudaErrorInvalidValue otherwise); any T >= 0, H, I >= 1, E,
// k <= E. Deterministic: each out[t, n] is summed over the token's experts in increasing expert
// id, in fp32, and rounded once. `workspace` holds `workspace_bytes` >=
// fused_moe_workspace_bytes(p, num_sms) bytes, 256-byte aligned; `num_sms` must be the value given
// to fused_moe_workspace_bytes. On sm_90a builds, TORCH_EXT_MOE_WGMMA=1 runs the grouped GEMMs on
// Hopper wgmma (moe/fused_moe_wgmma.h).
cudaError_t fused_moe(const moe::FusedMoeParams& p, void* workspace, int64_t workspace_bytes, int num_sms,
                      cudaStream_t stream);

}  // namespace torch_ext::cuda
