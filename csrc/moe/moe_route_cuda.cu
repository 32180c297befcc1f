// moe_route on CUDA. Two kernels run the routing code the CPU op runs and tests:
//   route_warp_kernel: one warp per token (moe/routing_warp.h: lanes own experts l, l + 32, ...;
//     warp reductions by xor shuffles), for up to 512 experts and 32 expert groups: a token's
//     logits are read coalesced and T tokens are T warps, so even T = 512 spreads over the GPU.
//     No workspace.
//   route_thread_kernel: one thread per token runs moe::route_token (moe/routing.h) with its
//     scratch in a global workspace; any E. It ran DeepSeek-V3 routing (E = 256, 8 groups) at
//     T = 512 in 538 us on an H200, 0.29x of the same math in torch ops (4 CTAs of 128 threads,
//     each thread walking 256 experts several times): the reason for the warp kernel.
#include "common/float_bits.h"
#include "moe/moe_route_cuda.h"
#include "moe/routing_warp.h"

namespace torch_ext::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kTokensPerCta = kThreads / moe::kWarpLanes;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float shuffle_xor(float v, int offset) { return __shfl_xor_sync(kFullMask, v, offset); }
__device__ __forceinline__ moe::Top2 shuffle_xor(moe::Top2 v, int offset) {
  return moe::Top2{shuffle_xor(v.first, offset), shuffle_xor(v.second, offset)};
}
__device__ __forceinline__ moe::Candidate shuffle_xor(moe::Candidate v, int offset) {
  return moe::Candidate{shuffle_xor(v.value, offset), __shfl_xor_sync(kFullMask, v.index, offset),
                        shuffle_xor(v.payload, offset)};
}

// The warp policy of moe/routing_warp.h on the GPU: this thread is lane `lane`; a reduction is
// the xor butterfly (every lane ends with the same value: the combines are commutative).
// Host+device so that route_token_warp's host compilation sees callable members; only the
// device side runs.
struct DeviceWarp {
  int32_t lane;
  template <typename S>
  struct Lanes {
    S state;
  };
  template <typename S, typename F>
  TORCH_EXT_HOST_DEVICE void each(Lanes<S>& lanes, F f) const {
    f(lane, lanes.state);
  }
  template <typename S, typename V, typename C>
  TORCH_EXT_HOST_DEVICE auto reduce(const Lanes<S>& lanes, V value, C combine) const {
    auto v = value(lane, lanes.state);
#if defined(__CUDA_ARCH__)
#pragma unroll
    for (int offset = moe::kWarpLanes / 2; offset > 0; offset /= 2) v = combine(v, shuffle_xor(v, offset));
#endif
    return v;
  }
  TORCH_EXT_HOST_DEVICE bool leader() const { return lane == 0; }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) route_warp_kernel(MoeRouteParams p) {
  const int64_t t = int64_t(blockIdx.x) * kTokensPerCta + threadIdx.x / moe::kWarpLanes;
  if (t >= p.tokens) return;  // warp-uniform: a warp is one token
  const int64_t e = p.config.num_experts, k = p.config.top_k;
  moe::route_token_warp(DeviceWarp{int32_t(threadIdx.x % moe::kWarpLanes)}, p.config,
                        static_cast<const T*>(p.logits) + t * e, p.correction_bias, [](T v) { return to_float(v); },
                        p.topk_weights + t * k, p.topk_ids + t * k);
}

template <typename T>
__global__ void route_thread_kernel(MoeRouteParams p, float* scratch, bool* flags) {
  const int64_t t = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= p.tokens) return;
  const int64_t e = p.config.num_experts, k = p.config.top_k;
  float* scores = scratch + t * moe::route_scratch_floats(p.config);
  moe::route_token(p.config, static_cast<const T*>(p.logits) + t * e, p.correction_bias,
                   [](T v) { return to_float(v); }, scores, scores + e, flags + t * e, p.topk_weights + t * k,
                   p.topk_ids + t * k);
}

template <typename T>
void launch(const MoeRouteParams& p, void* workspace, cudaStream_t stream) {
  if (moe::warp_routing_supported(p.config)) {
    const unsigned blocks = unsigned((p.tokens + kTokensPerCta - 1) / kTokensPerCta);
    route_warp_kernel<T><<<blocks, kThreads, 0, stream>>>(p);
    return;
  }
  float* scratch = static_cast<float*>(workspace);
  bool* flags = reinterpret_cast<bool*>(scratch + p.tokens * moe::route_scratch_floats(p.config));
  const unsigned blocks = unsigned((p.tokens + kThreads - 1) / kThreads);
  route_thread_kernel<T><<<blocks, kThreads, 0, stream>>>(p, scratch, flags);
}

}  // namespace

int64_t moe_route_workspace_bytes(const MoeRouteParams& p) {
  if (moe::warp_routing_supported(p.config)) return 0;
  return p.tokens * (moe::route_scratch_floats(p.config) * int64_t(sizeof(float)) + p.config.num_experts);
}

cudaError_t moe_route(const MoeRouteParams& p, void* workspace, cudaStream_t stream) {
  if (p.tokens == 0) return cudaSuccess;
  if (p.config.num_experts < 1 || (workspace == nullptr && moe_route_workspace_bytes(p) > 0))
    return cudaErrorInvalidValue;
  switch (p.logits_dtype) {
    case ScalarKind::kFloat32:
      launch<float>(p, workspace, stream);
      break;
    case ScalarKind::kFloat16:
      launch<Half>(p, workspace, stream);
      break;
    case ScalarKind::kBFloat16:
      launch<BFloat16>(p, workspace, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace torch_ext::cuda
