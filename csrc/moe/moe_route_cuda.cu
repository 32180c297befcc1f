// moe_route on CUDA: one thread per token runs moe::route_token from moe/routing.h, the same
// code the CPU op runs and tests, with its scratch (scores, biased scores, eligibility) in a
// global workspace. Routing reads T x E logits once; a thread per token is enough for the
// decode and prefill batch sizes this serves, and keeps the selection logic in one place
// (a warp-cooperative top-k is the next step if routing shows up in profiles).
#include "common/float_bits.h"
#include "moe/moe_route_cuda.h"

namespace torch_ext::cuda {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void route_kernel(MoeRouteParams p, float* scratch, bool* flags) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.tokens) return;
  const int64_t e = p.config.num_experts, k = p.config.top_k;
  float* scores = scratch + t * 2 * e;
  moe::route_token(p.config, static_cast<const T*>(p.logits) + t * e, p.correction_bias,
                   [](T v) { return to_float(v); }, scores, scores + e, flags + t * e, p.topk_weights + t * k,
                   p.topk_ids + t * k);
}

}  // namespace

int64_t moe_route_workspace_bytes(const MoeRouteParams& p) {
  return p.tokens * p.config.num_experts * int64_t(2 * sizeof(float) + sizeof(bool));
}

cudaError_t moe_route(const MoeRouteParams& p, void* workspace, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (workspace == nullptr || p.config.num_experts < 1) return cudaErrorInvalidValue;
  float* scratch = static_cast<float*>(workspace);
  bool* flags = reinterpret_cast<bool*>(scratch + p.tokens * 2 * p.config.num_experts);
  const unsigned blocks = unsigned((p.tokens + kThreads - 1) / kThreads);
  switch (p.logits_dtype) {
    case ScalarKind::kFloat32:
      route_kernel<float><<<blocks, kThreads, 0, stream>>>(p, scratch, flags);
      break;
    case ScalarKind::kFloat16:
      route_kernel<Half><<<blocks, kThreads, 0, stream>>>(p, scratch, flags);
      break;
    case ScalarKind::kBFloat16:
      route_kernel<BFloat16><<<blocks, kThreads, 0, stream>>>(p, scratch, flags);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace torch_ext::cuda
