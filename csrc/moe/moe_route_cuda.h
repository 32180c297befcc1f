// CUDA launcher of moe_route (implemented in moe_route_cuda.cu, no torch headers).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/dtype.h"
#include "moe/routing.h"

namespace torch_ext::cuda {

struct MoeRouteParams {
  moe::RouteConfig config;
  int64_t tokens;
  ScalarKind logits_dtype;      // fp32, fp16 or bf16
  const void* logits;           // [tokens, E] contiguous
  const float* correction_bias; // [E] or nullptr
  float* topk_weights;          // [tokens, k]
  int32_t* topk_ids;            // [tokens, k]
};

// Bytes of device scratch moe_route needs: 0 where a warp routes each token (up to 512 experts
// and 32 groups), else per token moe::route_scratch_floats floats and E flags.
int64_t moe_route_workspace_bytes(const MoeRouteParams& p);

// A warp per token runs moe::route_token_warp, or beyond its limits a thread per token runs
// moe::route_token (the function the CPU op runs). Enqueues on `stream`; `workspace` holds
// moe_route_workspace_bytes(p) bytes, 4-byte aligned (may be null when that is 0).
cudaError_t moe_route(const MoeRouteParams& p, void* workspace, cudaStream_t stream);

}  // namespace torch_ext::cuda
