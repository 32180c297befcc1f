// fused_moe: checks, allocation, and the kernel for the device (moe/fused_moe_cpu.cpp on the
// CPU for fp32/fp16/bf16); float64 on any device runs the ATen composition of
// moe/fused_moe_composite.h, which also serves the backward.
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <string>

#include "common/cpu/isa.h"
#include "common/torch_utils.h"
#include "moe/fused_moe.h"
#include "moe/fused_moe_composite.h"
#include "moe/fused_moe_grouped.h"
#include "moe/expert_op_checks.h"
#include "ops.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "moe/fused_moe_cuda.h"
#endif

namespace torch_ext {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
namespace cpu::avx512_bf16 {
void fused_moe_bf16_dot(const moe::FusedMoeParams& p, void* workspace);
}
#endif

namespace {

moe::Activation check_fused_moe_args(const char* op, const at::Tensor& hidden, const at::Tensor& w13,
                                     const at::Tensor& w2, const at::Tensor& topk_weights,
                                     const at::Tensor& topk_ids, c10::string_view activation) {
  check_dtype(op, "hidden", hidden, {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble});
  check_same_dtype(op, "w13", w13, "hidden", hidden);
  check_same_dtype(op, "w2", w2, "hidden", hidden);
  check_same_device(op, "w13", w13, "hidden", hidden);
  check_same_device(op, "w2", w2, "hidden", hidden);
  check_same_device(op, "topk_weights", topk_weights, "hidden", hidden);
  check_same_device(op, "topk_ids", topk_ids, "hidden", hidden);
  TORCH_EXT_CHECK(hidden.dim() == 2, op, "hidden must be [T, H], got shape ", hidden.sizes());
  TORCH_EXT_CHECK(w13.dim() == 3, op, "w13 must be [E, 2I, H], got shape ", w13.sizes());
  const int64_t tokens = hidden.size(0), hidden_size = hidden.size(1), experts = w13.size(0);
  TORCH_EXT_CHECK(w13.size(1) % 2 == 0 && w13.size(2) == hidden_size, op,
                  "w13 must be [E, 2I, H] with H = hidden.size(1) = ", hidden_size, ", got shape ", w13.sizes());
  const int64_t intermediate = w13.size(1) / 2;
  TORCH_EXT_CHECK(experts >= 1 && intermediate >= 1 && hidden_size >= 1, op,
                  "E, I and H must be positive, got w13 shape ", w13.sizes());
  TORCH_EXT_CHECK(w2.dim() == 3 && w2.size(0) == experts && w2.size(1) == hidden_size && w2.size(2) == intermediate,
                  op, "w2 must be [E, H, I] = [", experts, ", ", hidden_size, ", ", intermediate, "], got shape ",
                  w2.sizes());
  moe::check_routing(op, topk_weights, topk_ids, tokens, experts);
  return moe::parse_activation(op, activation);
}

// Uninitialized bytes on the tensor's device, `data` aligned to `alignment` (a power of two).
struct Scratch {
  Scratch(int64_t bytes, int64_t alignment, const at::TensorOptions& options)
      : storage(at::empty({bytes + alignment}, options.dtype(at::kByte))),
        data(reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(storage.data_ptr()) + alignment - 1) &
                                     ~uintptr_t(alignment - 1))) {}
  at::Tensor storage;
  void* data;
};

// The forward on the device's kernel; with `gate_up` defined ([T * k, 2I], CPU kernel dtypes
// only) the kernel also writes the pre-activation values there.
at::Tensor run_fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                         const at::Tensor& topk_weights, const at::Tensor& topk_ids, moe::Activation act,
                         const at::Tensor& gate_up) {
  const at::Tensor h = hidden.contiguous(), a = w13.contiguous(), b = w2.contiguous();
  const at::Tensor weights = topk_weights.contiguous(), ids = topk_ids.contiguous();
  at::Tensor out = at::empty_like(h);
  moe::FusedMoeParams p{scalar_kind(h),        h.size(0),          h.size(1),
                        a.size(1) / 2,          int32_t(a.size(0)), int32_t(ids.size(1)),
                        act,                    h.data_ptr(),       a.data_ptr(),
                        b.data_ptr(),           weights.data_ptr<float>(), ids.data_ptr<int32_t>(),
                        out.data_ptr()};
  p.gate_up = gate_up.defined() ? gate_up.data_ptr() : nullptr;
  if (h.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(h.device());
    int num_sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, h.get_device()));
    const cuda::FusedMoeLaunch launch = cuda::plan_fused_moe(p, num_sms);
    const Scratch scratch(launch.workspace_bytes, 256, h.options());  // the launcher's alignment
    C10_CUDA_CHECK(cuda::fused_moe(p, launch, scratch.data, num_sms, c10::cuda::getCurrentCUDAStream()));
    return out;
#else
    TORCH_CHECK(false, "torch_ext was built without CUDA");
#endif
  }
  const Scratch scratch(moe::fused_moe_cpu_workspace(p).total, 64, h.options());  // cache-line aligned areas
  void* aligned = scratch.data;
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
  if (h.scalar_type() == at::kBFloat16 && cpu::avx512_bf16_active()) {
    cpu::avx512_bf16::fused_moe_bf16_dot(p, aligned);
    return out;
  }
#endif
  TORCH_EXT_CPU_DISPATCH(fused_moe, p, aligned);
  return out;
}

// Whether a pass runs on grouped GEMMs (moe/fused_moe_grouped.h): forced by `choice`, else only
// where torch's _grouped_mm keeps the group offsets on the device (bf16 on sm_90): elsewhere the
// per-expert composite is as fast for the backward and syncs either way, and the fused kernel
// needs no sync.
bool use_grouped(moe::GroupedChoice choice, const at::Tensor& hidden, const at::Tensor& w13) {
  if (choice == moe::GroupedChoice::kNever || !moe::grouped_supported(hidden, w13)) return false;
  if (choice == moe::GroupedChoice::kAlways) return true;
  if (!hidden.is_cuda() || hidden.scalar_type() != at::kBFloat16) return false;
#if defined(TORCH_EXT_WITH_CUDA)
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, hidden.get_device()));
  return major == 9;
#else
  return false;
#endif
}

// float64 (checks) everywhere and fp32 on CUDA run the ATen composition (cuBLAS on CUDA).
bool kernel_dtype(const at::Tensor& hidden) {
  return hidden.scalar_type() != at::kDouble && (!hidden.is_cuda() || hidden.scalar_type() != at::kFloat);
}

}  // namespace

at::Tensor fused_moe(const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
                     const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation) {
  const moe::Activation act = check_fused_moe_args("fused_moe", hidden, w13, w2, topk_weights, topk_ids, activation);
  if (!kernel_dtype(hidden)) return moe::fused_moe_composite(hidden, w13, w2, topk_weights, topk_ids, act);
  // The grouped GEMMs for prefill-sized batches (kAuto: moe/fused_moe_grouped.h's threshold).
  const moe::GroupedChoice grouped = moe::grouped_forward_choice();
  const bool enough_rows = topk_ids.numel() >= moe::kGroupedForwardMinRowsPerExpert * w13.size(0);
  if ((grouped != moe::GroupedChoice::kAuto || enough_rows) && use_grouped(grouped, hidden, w13)) {
    return moe::fused_moe_forward_grouped(hidden, w13, w2, topk_weights, topk_ids, act);
  }
  return run_fused_moe(hidden, w13, w2, topk_weights, topk_ids, act, at::Tensor());
}

std::tuple<at::Tensor, at::Tensor> fused_moe_train(const at::Tensor& hidden, const at::Tensor& w13,
                                                   const at::Tensor& w2, const at::Tensor& topk_weights,
                                                   const at::Tensor& topk_ids, c10::string_view activation) {
  const moe::Activation act =
      check_fused_moe_args("fused_moe_train", hidden, w13, w2, topk_weights, topk_ids, activation);
  // The CPU kernel writes the activations as it goes; elsewhere they come from the composition.
  if (hidden.is_cuda() || !kernel_dtype(hidden)) {
    return {moe::fused_moe_composite(hidden, w13, w2, topk_weights, topk_ids, act),
            moe::gate_up_by_pair(hidden, w13, topk_ids)};
  }
  at::Tensor gate_up = at::empty({topk_ids.numel(), w13.size(1)}, hidden.options());
  return {run_fused_moe(hidden, w13, w2, topk_weights, topk_ids, act, gate_up), gate_up};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_moe_backward(
    const at::Tensor& grad_out, const at::Tensor& hidden, const at::Tensor& w13, const at::Tensor& w2,
    const at::Tensor& topk_weights, const at::Tensor& topk_ids, c10::string_view activation,
    const c10::optional<at::Tensor>& gate_up, bool weight_grads) {
  const char* op = "fused_moe_backward";
  const moe::Activation act = check_fused_moe_args(op, hidden, w13, w2, topk_weights, topk_ids, activation);
  check_same_device(op, "grad_out", grad_out, "hidden", hidden);
  TORCH_EXT_CHECK(grad_out.sizes() == hidden.sizes(), op, "grad_out must have hidden's shape ", hidden.sizes(),
                  ", got ", grad_out.sizes());
  if (gate_up) {
    check_same_dtype(op, "gate_up", *gate_up, "hidden", hidden);
    check_same_device(op, "gate_up", *gate_up, "hidden", hidden);
    TORCH_EXT_CHECK(gate_up->dim() == 2 && gate_up->size(0) == topk_ids.numel() && gate_up->size(1) == w13.size(1),
                    op, "gate_up must be [T * k, 2I] = [", topk_ids.numel(), ", ", w13.size(1), "], got shape ",
                    gate_up->sizes());
  }
  const at::Tensor saved = gate_up ? *gate_up : at::Tensor();
  if (use_grouped(moe::grouped_backward_choice(), hidden, w13)) {
    return moe::fused_moe_backward_grouped(grad_out, hidden, w13, w2, topk_weights, topk_ids, act, saved,
                                           weight_grads);
  }
  return moe::fused_moe_backward_composite(grad_out, hidden, w13, w2, topk_weights, topk_ids, act, saved,
                                           weight_grads);
}

}  // namespace torch_ext
