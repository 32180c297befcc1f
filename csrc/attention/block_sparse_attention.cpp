// block_sparse_attention, its backward, moba_select, moba_block_lists and moba_route: checks,
// allocation, the block lists built with tensor ops (no host synchronization), and the call into
// the CPU kernels or the CUDA launchers. One entry per op serves both devices.
#include "attention/block_sparse_attention.h"

#include <ATen/ops/arange.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>
#include <vector>

#include "common/cuda/grid_limits.h"
#include "common/torch_utils.h"
#include "ops.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "attention/block_sparse_attention_cuda.h"
#include "attention/block_sparse_attention_cuda_index.h"
#include "attention/moba_gather_cuda.h"
#include "attention/moba_gather_index.h"
#include "common/cuda/hopper_switch.h"
#endif

namespace torch_ext {

#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
namespace cpu::avx512_bf16 {
// block_sparse_attention_cpu_bf16.cpp: the forward with vdpbf16ps products, bf16 q/k/v, head dim a
// multiple of 32 (see uses_bf16_dot).
void block_sparse_attention_forward_bf16(const attention::BlockSparseForwardParams& p);
// The backward with vdpbf16ps products (P and dS rounded to bf16), under the same conditions.
void block_sparse_attention_backward_bf16(const attention::BlockSparseBackwardParams& p);
}  // namespace cpu::avx512_bf16
#endif

namespace {

using attention::Bhsd;
using attention::BlockList;
using attention::MutableBhsd;
using attention::TokenSelection;

constexpr const char* kForward = "block_sparse_attention";
constexpr const char* kBackward = "block_sparse_attention_backward";
// moba_route lists key blocks per query block of this many rows (the union of their selections).
constexpr int64_t kMobaQueryBlock = 64;
// Block sizes and top_k reach the kernels as int32.
constexpr int64_t kMaxBlockSize = std::numeric_limits<int32_t>::max();

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Shapes {
  int64_t batch, heads_q, heads_kv, seq_q, seq_kv, head_dim;
};

// q [B, Hq, Sq, D] and k (and v) [B, Hk, Sk, D] of one floating dtype on one device.
Shapes check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor* v) {
  if (q.is_cuda()) {
    check_dtype(op, "q", q, {at::kHalf, at::kBFloat16});
  } else {
    check_dtype(op, "q", q, {at::kFloat, at::kBFloat16, at::kHalf, at::kDouble});
  }
  check_same_dtype(op, "k", k, "q", q);
  check_same_device(op, "k", k, "q", q);
  TORCH_EXT_CHECK(q.dim() == 4, op, "q must be [B, Hq, Sq, D], got shape ", q.sizes());
  TORCH_EXT_CHECK(k.dim() == 4 && k.size(0) == q.size(0) && k.size(3) == q.size(3), op, "k must be [B, Hk, Sk, D] = [",
                  q.size(0), ", Hk, Sk, ", q.size(3), "] (batch and head dim of q), got shape ", k.sizes());
  if (v != nullptr) {
    check_same_dtype(op, "v", *v, "q", q);
    check_same_device(op, "v", *v, "q", q);
    TORCH_EXT_CHECK(v->sizes() == k.sizes(), op, "v must have the shape of k ", k.sizes(), ", got ", v->sizes());
  }
  const Shapes s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_EXT_CHECK(s.heads_kv >= 1 && s.heads_q % s.heads_kv == 0, op, "the query heads Hq = ", s.heads_q,
                  " must be a multiple of the key/value heads Hk = ", s.heads_kv);
  if (q.is_cuda()) {
    TORCH_EXT_CHECK(s.head_dim == 64 || s.head_dim == 128, op, "head dim must be 64 or 128 on CUDA, got ",
                    s.head_dim);
  } else {
    TORCH_EXT_CHECK(s.head_dim > 0 && s.head_dim % 16 == 0 && s.head_dim <= 256, op,
                    "head dim must be a multiple of 16 up to 256 on the CPU, got ", s.head_dim);
  }
  return s;
}

// The CPU kernels need a unit stride on the head dim only; the CUDA kernels' 16-byte cp.async
// loads also need a 16-byte aligned base and the other strides multiples of 8 elements. Other
// layouts are copied to a contiguous tensor.
at::Tensor kernel_layout(const at::Tensor& t) {
  bool usable = t.stride(-1) == 1;
  if (usable && t.is_cuda()) {
    usable = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
    for (int64_t d = 0; d + 1 < t.dim(); ++d) usable = usable && (t.stride(d) % 8 == 0 || t.size(d) == 1);
  }
  return usable ? t : t.contiguous();
}
Bhsd bhsd(const at::Tensor& t) { return Bhsd{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }
MutableBhsd mutable_bhsd(at::Tensor& t) { return MutableBhsd{t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

void check_block_sizes(const char* op, bool cuda, int64_t block_q, int64_t block_kv) {
  if (cuda) {
    TORCH_EXT_CHECK(block_q == 64 || block_q == 128, op, "block_size_q must be 64 or 128 on CUDA, got ", block_q);
    TORCH_EXT_CHECK(block_kv == 16 || block_kv == 32 || block_kv == 64 || block_kv == 128, op,
                    "block_size_kv must be 16, 32, 64 or 128 on CUDA, got ", block_kv);
  } else {
    TORCH_EXT_CHECK(block_q >= 1 && block_q <= kMaxBlockSize, op, "block_size_q must be in [1, ", kMaxBlockSize,
                    "], got ", block_q);
    TORCH_EXT_CHECK(block_kv >= 1 && block_kv <= kMaxBlockSize, op, "block_size_kv must be in [1, ", kMaxBlockSize,
                    "], got ", block_kv);
  }
}

// The block size the kernels get (CUDA attention: the checked size itself): a block longer than
// the sequence holds all of it, so the same lists mean the same thing with the size clamped, and
// the CPU kernels' per-block scratch is bounded by the sequence, not by the argument.
int32_t effective_block_size(int64_t block, int64_t seq) { return int32_t(std::min(block, std::max<int64_t>(seq, 1))); }

// kv_counts [B or 1, Hq or 1, nq] and kv_indices [.., .., nq, max_blocks], int32. On the CPU the
// values are checked too (on CUDA that would need a host synchronization).
struct Lists {
  at::Tensor counts, indices;
  BlockList view;
};
Lists check_lists(const char* op, const at::Tensor& counts, const at::Tensor& indices, const at::Tensor& q,
                  const Shapes& s, int64_t nq, int64_t nk) {
  check_dtype(op, "kv_counts", counts, {at::kInt});
  check_dtype(op, "kv_indices", indices, {at::kInt});
  check_same_device(op, "kv_counts", counts, "q", q);
  check_same_device(op, "kv_indices", indices, "q", q);
  TORCH_EXT_CHECK(counts.dim() == 3 && (counts.size(0) == s.batch || counts.size(0) == 1) &&
                      (counts.size(1) == s.heads_q || counts.size(1) == 1) && counts.size(2) == nq,
                  op, "kv_counts must be [B, H, nq] = [", s.batch, " or 1, ", s.heads_q, " or 1, ", nq,
                  "] (nq = ceil(Sq / block_size_q)), got shape ", counts.sizes());
  TORCH_EXT_CHECK(indices.dim() == 4 && indices.sizes().slice(0, 3) == counts.sizes(), op,
                  "kv_indices must be [", counts.size(0), ", ", counts.size(1), ", ", nq,
                  ", max_blocks] (kv_counts' shape, then max_blocks), got shape ", indices.sizes());
  Lists l{counts.contiguous(), indices.contiguous(), {}};
  const int64_t max_blocks = indices.size(3);
  if (!q.is_cuda()) {
    const int32_t* c = l.counts.data_ptr<int32_t>();
    const int32_t* idx = l.indices.data_ptr<int32_t>();
    // seen[j] = 1 + the last list that named key block j: a repeat within a list is refused (the
    // forward would count the block twice, the dK / dV pass, which walks lists transposed, once).
    std::vector<int64_t> seen(size_t(nk), 0);
    for (int64_t row = 0; row < l.counts.numel(); ++row) {
      TORCH_EXT_CHECK(c[row] >= 0 && c[row] <= max_blocks, op, "kv_counts holds ", c[row], " at flat position ", row,
                      ", outside [0, ", max_blocks, "] (max_blocks = kv_indices.size(3))");
      for (int32_t t = 0; t < c[row]; ++t) {
        const int32_t j = idx[row * max_blocks + t];
        TORCH_EXT_CHECK(j >= 0 && j < nk, op, "kv_indices holds key block ", j, " at list ", row, " slot ", t,
                        ", out of range [0, ", nk, ") (nk = ceil(Sk / block_size_kv))");
        TORCH_EXT_CHECK(seen[size_t(j)] != row + 1, op, "kv_indices names key block ", j, " twice in list ", row,
                        " (slot ", t, "); the ids of a list must be distinct");
        seen[size_t(j)] = row + 1;
      }
    }
  }
  l.view = BlockList{l.counts.data_ptr<int32_t>(),
                     l.indices.data_ptr<int32_t>(),
                     l.counts.size(0) == 1 ? 0 : l.counts.stride(0),
                     l.counts.size(1) == 1 ? 0 : l.counts.stride(1),
                     l.indices.size(0) == 1 ? 0 : l.indices.stride(0),
                     l.indices.size(1) == 1 ? 0 : l.indices.stride(1),
                     int32_t(max_blocks)};
  return l;
}

// token_blocks [B, Hq, Sq, top_k] int32, -1 or a key block id.
TokenSelection check_token_blocks(const char* op, const c10::optional<at::Tensor>& token_blocks, at::Tensor& storage,
                                  const at::Tensor& q, const Shapes& s, int64_t nk) {
  if (!token_blocks) return TokenSelection{nullptr, 0, 0, 0, 0};
  check_dtype(op, "token_blocks", *token_blocks, {at::kInt});
  check_same_device(op, "token_blocks", *token_blocks, "q", q);
  TORCH_EXT_CHECK(token_blocks->dim() == 4 && token_blocks->size(0) == s.batch && token_blocks->size(1) == s.heads_q &&
                      token_blocks->size(2) == s.seq_q,
                  op, "token_blocks must be [B, Hq, Sq, top_k] = [", s.batch, ", ", s.heads_q, ", ", s.seq_q,
                  ", top_k], got shape ", token_blocks->sizes());
  storage = token_blocks->contiguous();
  if (!q.is_cuda()) {
    const int32_t* sel = storage.data_ptr<int32_t>();
    for (int64_t i = 0; i < storage.numel(); ++i) {
      TORCH_EXT_CHECK(sel[i] >= -1 && sel[i] < nk, op, "token_blocks holds ", sel[i], " at flat position ", i,
                      ", outside [-1, ", nk, ")");
    }
  }
  const int64_t top_k = storage.size(3);
  return TokenSelection{storage.data_ptr<int32_t>(), s.heads_q * s.seq_q * top_k, s.seq_q * top_k, top_k,
                        int32_t(top_k)};
}

// The forward params' shapes, flags and inputs (q, k, v in a kernel layout); lists, selection and
// outputs left empty.
attention::BlockSparseForwardParams shape_params(const Shapes& s, const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v, int32_t block_q, int32_t block_kv, bool causal,
                                                 double scale) {
  attention::BlockSparseForwardParams p{};
  p.dtype = scalar_kind(q);
  p.batch = s.batch;
  p.heads_q = s.heads_q;
  p.heads_kv = s.heads_kv;
  p.seq_q = s.seq_q;
  p.seq_kv = s.seq_kv;
  p.head_dim = int32_t(s.head_dim);
  p.block_q = block_q;
  p.block_kv = block_kv;
  p.causal = causal;
  p.scale = float(scale);
  p.q = bhsd(q);
  p.k = bhsd(k);
  p.v = bhsd(v);
  return p;
}

// Everything the forward and the backward share: checked inputs and the forward params.
struct Prepared {
  at::Tensor q, k, v, token_blocks;
  Lists lists;
  attention::BlockSparseForwardParams params;
};
Prepared prepare(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const at::Tensor& kv_counts, const at::Tensor& kv_indices, int64_t block_q, int64_t block_kv,
                 bool causal, double scale, const c10::optional<at::Tensor>& token_blocks) {
  const Shapes s = check_qkv(op, q, k, &v);
  check_block_sizes(op, q.is_cuda(), block_q, block_kv);
  const int64_t nq = ceil_div(s.seq_q, block_q), nk = ceil_div(s.seq_kv, block_kv);
  Prepared pr;
  pr.q = kernel_layout(q);
  pr.k = kernel_layout(k);
  pr.v = kernel_layout(v);
  pr.lists = check_lists(op, kv_counts, kv_indices, q, s, nq, nk);
  auto& p = pr.params;
  p = shape_params(s, pr.q, pr.k, pr.v, q.is_cuda() ? int32_t(block_q) : effective_block_size(block_q, s.seq_q),
                   q.is_cuda() ? int32_t(block_kv) : effective_block_size(block_kv, s.seq_kv), causal, scale);
  p.blocks = pr.lists.view;
  p.selection = check_token_blocks(op, token_blocks, pr.token_blocks, q, s, nk);
  return pr;
}

#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
// The AVX512_BF16 forward takes bf16 on a CPU with the extension, at the AVX-512 level, for head
// dims that are whole 32-value vectors (the value packing interleaves 32 bf16 at a time).
bool uses_bf16_dot(const attention::BlockSparseForwardParams& p) {
  return p.dtype == ScalarKind::kBFloat16 && p.head_dim % 32 == 0 && cpu::avx512_bf16_active();
}
#endif

[[noreturn]] void no_cuda_kernels(const char* op) {
  TORCH_CHECK(false, "torch_ext.", op, ": torch_ext was built without CUDA");
}

#if defined(TORCH_EXT_WITH_CUDA)
// The CUDA kernels' own limits, as clear errors (a launch past them fails with "invalid
// argument"): grid y / z, the MoBA table in shared memory, and the dynamic shared memory per
// block (99 KB on sm_86 / sm_89: D = 128 with 128-blocks in the backward, or a large top_k).
// The attention and MoBA grids put query heads and batch on y and z.
using cuda::kMaxGridYZ;
void check_cuda_grid(const char* op, int64_t batch, int64_t heads_q) {
  TORCH_EXT_CHECK(batch <= kMaxGridYZ && heads_q <= kMaxGridYZ, op, "batch and query heads must be <= ", kMaxGridYZ,
                  " on CUDA, got ", batch, " and ", heads_q);
}

void check_cuda_limits(const char* op, const attention::BlockSparseForwardParams& p, bool backward, int device) {
  namespace ix = attention::bsa_cuda;
  check_cuda_grid(op, p.batch, p.heads_q);
  const int top_k = p.selection.blocks != nullptr ? int(p.selection.top_k) : 0;
  TORCH_EXT_CHECK(top_k <= ix::kMaxSelectionTopK, op, "token_blocks' top_k must be <= ", ix::kMaxSelectionTopK,
                  " on CUDA, got ", top_k);
  int limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  const int need = ix::attention_smem_bytes(int(p.head_dim), p.block_q, p.block_kv, top_k, backward);
  TORCH_EXT_CHECK(need <= limit, op, backward ? "the backward" : "the forward", " with head dim ", p.head_dim,
                  ", block_size_q ", p.block_q, ", block_size_kv ", p.block_kv, " and top_k ", top_k, " needs ", need,
                  " bytes of shared memory per block, this GPU allows ", limit,
                  " (smaller blocks or top_k fit, or run on the CPU)");
}
#endif

// flags [..., n] (uint8, 1 = listed) to (counts int32 [...], indices int32 [..., max_blocks]): the
// flagged positions in increasing order, by a stable descending sort of the flags.
std::tuple<at::Tensor, at::Tensor> lists_from_flags(const at::Tensor& flags, int64_t max_blocks) {
  at::Tensor counts = flags.sum(-1, /*keepdim=*/false, at::kInt);
  at::Tensor order = std::get<1>(flags.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  return {counts, order.narrow(-1, 0, max_blocks).to(at::kInt).contiguous()};
}

// One flag per (list, block id) of [..., rows, n]: slot t of row r sets entries[r, t] where valid.
at::Tensor flags_of(const at::Tensor& entries, const at::Tensor& valid, int64_t n) {
  const at::Tensor target = at::where(valid, entries.to(at::kLong), n);
  std::vector<int64_t> shape(entries.sizes().begin(), entries.sizes().end());
  shape.back() = n + 1;  // column n collects the unused slots
  return at::zeros(shape, entries.options().dtype(at::kByte)).scatter_(-1, target, 1).narrow(-1, 0, n);
}

}  // namespace

namespace {
// grad_out and out: q's dtype, device and shape; lse: fp32 [B, Hq, Sq] on q's device.
void check_backward_inputs(const char* op, const at::Tensor& grad_out, const at::Tensor& out, const at::Tensor& lse,
                           const at::Tensor& q) {
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"grad_out", grad_out}, {"out", out}}) {
    check_same_dtype(op, name, t, "q", q);
    check_same_device(op, name, t, "q", q);
    TORCH_EXT_CHECK(t.sizes() == q.sizes(), op, name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
  }
  check_dtype(op, "lse", lse, {at::kFloat});
  check_same_device(op, "lse", lse, "q", q);
  const at::IntArrayRef rows = q.sizes().slice(0, 3);
  TORCH_EXT_CHECK(lse.sizes() == rows, op, "lse must be [B, Hq, Sq] = ", rows, ", got shape ", lse.sizes());
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> block_sparse_attention(const at::Tensor& q, const at::Tensor& k,
                                                          const at::Tensor& v, const at::Tensor& kv_counts,
                                                          const at::Tensor& kv_indices, int64_t block_size_q,
                                                          int64_t block_size_kv, bool causal, double scale,
                                                          const c10::optional<at::Tensor>& token_blocks) {
  Prepared pr = prepare(kForward, q, k, v, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale,
                        token_blocks);
  auto& p = pr.params;
  at::Tensor out = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({p.batch, p.heads_q, p.seq_q}, q.options().dtype(at::kFloat));
  p.out = mutable_bhsd(out);
  p.lse = lse.data_ptr<float>();
  if (q.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda_limits(kForward, p, false, q.get_device());
    C10_CUDA_CHECK(cuda::block_sparse_attention_forward(p, c10::cuda::getCurrentCUDAStream()));
#else
    no_cuda_kernels(kForward);
#endif
  } else {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
    if (uses_bf16_dot(p)) {
      cpu::avx512_bf16::block_sparse_attention_forward_bf16(p);
      return {out, lse};
    }
#endif
    TORCH_EXT_CPU_DISPATCH(block_sparse_attention_forward, p);
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> block_sparse_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& kv_counts, const at::Tensor& kv_indices, int64_t block_size_q,
    int64_t block_size_kv, bool causal, double scale, const c10::optional<at::Tensor>& token_blocks) {
  Prepared pr = prepare(kBackward, q, k, v, kv_counts, kv_indices, block_size_q, block_size_kv, causal, scale,
                        token_blocks);
  const auto& f = pr.params;
  check_backward_inputs(kBackward, grad_out, out, lse, q);
  const at::Tensor grad_out_u = kernel_layout(grad_out), out_u = kernel_layout(out), lse_c = lse.contiguous();

  // The transposed lists: per (batch, query head, key block) the query blocks listing it.
  const int64_t nq = ceil_div(f.seq_q, f.block_q), nk = ceil_div(f.seq_kv, f.block_kv);
  const at::Tensor& counts = pr.lists.counts;
  const at::Tensor slots = at::arange(pr.lists.indices.size(3), counts.options());
  const at::Tensor flags = flags_of(pr.lists.indices, slots.lt(counts.unsqueeze(-1)), nk).transpose(-1, -2);
  auto [t_counts, t_indices] = lists_from_flags(flags, nq);
  t_counts = t_counts.expand({f.batch, f.heads_q, nk}).contiguous();
  t_indices = t_indices.expand({f.batch, f.heads_q, nk, nq}).contiguous();

  at::Tensor grad_q = at::empty(q.sizes(), q.options());
  at::Tensor grad_k = at::empty(k.sizes(), k.options());
  at::Tensor grad_v = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({f.batch, f.heads_q, f.seq_q}, q.options().dtype(at::kFloat));
  attention::BlockSparseBackwardParams p;
  p.forward = f;
  p.forward.out = MutableBhsd{out_u.data_ptr(), out_u.stride(0), out_u.stride(1), out_u.stride(2)};
  p.forward.lse = lse_c.data_ptr<float>();
  p.grad_out = bhsd(grad_out_u);
  p.grad_q = mutable_bhsd(grad_q);
  p.grad_k = mutable_bhsd(grad_k);
  p.grad_v = mutable_bhsd(grad_v);
  p.delta = delta.data_ptr<float>();
  p.transposed = BlockList{t_counts.data_ptr<int32_t>(), t_indices.data_ptr<int32_t>(), f.heads_q * nk, nk,
                           f.heads_q * nk * nq, nk * nq, int32_t(nq)};
  if (q.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    const c10::cuda::CUDAGuard guard(q.device());
    check_cuda_limits(kBackward, p.forward, true, q.get_device());
    C10_CUDA_CHECK(cuda::block_sparse_attention_backward(p, c10::cuda::getCurrentCUDAStream()));
#else
    no_cuda_kernels(kBackward);
#endif
  } else {
#if defined(TORCH_EXT_HAVE_CPU_AVX512_BF16)
    if (uses_bf16_dot(p.forward)) {
      cpu::avx512_bf16::block_sparse_attention_backward_bf16(p);
      return {grad_q, grad_k, grad_v};
    }
#endif
    TORCH_EXT_CPU_DISPATCH(block_sparse_attention_backward, p);
  }
  return {grad_q, grad_k, grad_v};
}

at::Tensor moba_select(const at::Tensor& q, const at::Tensor& k, int64_t block_size, int64_t top_k, bool causal) {
  const char* op = "moba_select";
  const Shapes s = check_qkv(op, q, k, nullptr);
  TORCH_EXT_CHECK(block_size >= 1 && block_size <= kMaxBlockSize, op, "block_size must be in [1, ", kMaxBlockSize,
                  "], got ", block_size);
  TORCH_EXT_CHECK(top_k >= 1 && top_k <= kMaxBlockSize, op, "top_k must be in [1, ", kMaxBlockSize, "], got ", top_k);
  const at::Tensor q_u = kernel_layout(q), k_u = kernel_layout(k);
  at::Tensor selected = at::empty({s.batch, s.heads_q, s.seq_q, top_k}, q.options().dtype(at::kInt));
  const int32_t block = effective_block_size(block_size, s.seq_kv);
  const attention::MobaSelectParams p{scalar_kind(q), s.batch,  s.heads_q,   s.heads_kv,
                                      s.seq_q,        s.seq_kv, int32_t(s.head_dim), block,
                                      int32_t(top_k), causal,   bhsd(q_u),   bhsd(k_u),
                                      selected.data_ptr<int32_t>()};
  if (q.is_cuda()) {
#if defined(TORCH_EXT_WITH_CUDA)
    TORCH_EXT_CHECK(top_k <= attention::bsa_cuda::kMaxMobaTopK, op, "top_k must be <= ",
                    attention::bsa_cuda::kMaxMobaTopK, " on CUDA (one candidate per lane of a warp), got ", top_k);
    check_cuda_grid(op, s.batch, s.heads_q);
    const c10::cuda::CUDAGuard guard(q.device());
    at::Tensor workspace = at::empty({cuda::moba_select_workspace_bytes(p)}, q.options().dtype(at::kByte));
    C10_CUDA_CHECK(cuda::moba_select(p, workspace.data_ptr(), c10::cuda::getCurrentCUDAStream()));
#else
    no_cuda_kernels(op);
#endif
  } else {
    TORCH_EXT_CPU_DISPATCH(moba_select, p);
  }
  return selected;
}

std::tuple<at::Tensor, at::Tensor> moba_block_lists(const at::Tensor& token_blocks, int64_t num_kv_blocks,
                                                    int64_t block_size_q) {
  const char* op = "moba_block_lists";
  check_dtype(op, "token_blocks", token_blocks, {at::kInt});
  TORCH_EXT_CHECK(token_blocks.dim() == 4, op, "token_blocks must be [B, H, Sq, top_k], got shape ",
                  token_blocks.sizes());
  TORCH_EXT_CHECK(num_kv_blocks >= 0, op, "num_kv_blocks must be >= 0, got ", num_kv_blocks);
  TORCH_EXT_CHECK(block_size_q >= 1 && block_size_q <= kMaxBlockSize, op, "block_size_q must be in [1, ",
                  kMaxBlockSize, "], got ", block_size_q);
  const int64_t batch = token_blocks.size(0), heads = token_blocks.size(1), seq_q = token_blocks.size(2);
  const int64_t top_k = token_blocks.size(3), nq = ceil_div(seq_q, block_size_q);
  const int64_t max_blocks = std::min(num_kv_blocks, block_size_q * top_k);
  if (!token_blocks.is_cuda()) {
    const at::Tensor chosen = token_blocks.contiguous();
    const int32_t* ids = chosen.data_ptr<int32_t>();
    for (int64_t i = 0; i < chosen.numel(); ++i) {
      TORCH_EXT_CHECK(ids[i] < num_kv_blocks, op, "token_blocks holds ", ids[i], " at flat position ", i,
                      ", not below num_kv_blocks = ", num_kv_blocks);
    }
    at::Tensor counts = at::empty({batch, heads, nq}, chosen.options());
    at::Tensor indices = at::empty({batch, heads, nq, max_blocks}, chosen.options());
    const attention::MobaBlockListsParams p{ids,           batch,           heads,
                                            seq_q,         int32_t(top_k),  int32_t(num_kv_blocks),
                                            int32_t(block_size_q), int32_t(max_blocks), counts.data_ptr<int32_t>(),
                                            indices.data_ptr<int32_t>()};
    TORCH_EXT_CPU_DISPATCH(moba_block_lists, p);
    return {counts, indices};
  }
#if defined(TORCH_EXT_WITH_CUDA)
  // The union through a shared bitmask per query block (one kernel); very many key blocks take
  // the tensor ops below.
  if (attention::bsa_cuda::list_smem_bytes(num_kv_blocks) <= attention::bsa_cuda::kMaxListSmemBytes) {
    const c10::cuda::CUDAGuard guard(token_blocks.device());
    const at::Tensor chosen = token_blocks.contiguous();
    at::Tensor counts = at::empty({batch, heads, nq}, chosen.options());
    at::Tensor indices = at::empty({batch, heads, nq, max_blocks}, chosen.options());
    const attention::MobaBlockListsParams p{chosen.data_ptr<int32_t>(), batch, heads, seq_q, int32_t(top_k),
                                            int32_t(num_kv_blocks), int32_t(block_size_q), int32_t(max_blocks),
                                            counts.data_ptr<int32_t>(), indices.data_ptr<int32_t>()};
    C10_CUDA_CHECK(cuda::moba_block_lists(p, c10::cuda::getCurrentCUDAStream()));
    return {counts, indices};
  }
#endif
  // Rows padded to whole query blocks with -1 (no block), then each block's rows as one list.
  const at::Tensor padded = at::constant_pad_nd(token_blocks, {0, 0, 0, nq * block_size_q - seq_q}, -1)
                                .reshape({batch, heads, nq, block_size_q * top_k});
  const at::Tensor flags = flags_of(padded, padded.ge(0), num_kv_blocks);
  return lists_from_flags(flags, max_blocks);
}

#if defined(TORCH_EXT_WITH_CUDA)
namespace {
// Workspace the key-block-major forward may hold at once (partials: 2 D + 4 bytes per (token,
// slot) pair, plus the plan's lists); larger calls run their (batch, head) lanes in chunks that
// fit (one lane at least), one after the other on the stream. TORCH_EXT_MOBA_GATHER_BUDGET_BYTES
// overrides it (tests force one-lane chunks with it).
int64_t moba_gather_workspace_budget() {
  constexpr int64_t kDefault = int64_t(1) << 30;
  const char* const value = std::getenv("TORCH_EXT_MOBA_GATHER_BUDGET_BYTES");
  if (value == nullptr) return kDefault;
  char* end = nullptr;
  const double bytes = std::strtod(value, &end);  // "1e9" as well as "1000000000"
  return end != value && bytes >= 1.0 && bytes < 9.0e18 ? int64_t(bytes) : kDefault;
}

// The key-block-major kernels' inputs: q, k, v in the kernels' layout (kept alive here while the
// parameters point into them), the token choices checked, the forward parameters.
struct GatherInputs {
  at::Tensor qu, ku, vu, choices;
  attention::BlockSparseForwardParams params;
  GatherInputs(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
               const at::Tensor& token_blocks, const Shapes& s, int64_t block_size, bool causal, double scale)
      : qu(kernel_layout(q)), ku(kernel_layout(k)), vu(kernel_layout(v)) {
    params = shape_params(s, qu, ku, vu, int32_t(kMobaQueryBlock), int32_t(block_size), causal, scale);
    params.selection = check_token_blocks(op, token_blocks, choices, q, s, ceil_div(s.seq_kv, block_size));
  }
};

// Chunks of (batch, head) lanes whose workspace fits the budget, in whole groups of `group` heads
// (the backward's dK / dV CTA sees every query head of its GQA group; the forward takes 1): as many
// heads as fit (all of them: then as many batches), one group at least. {heads, batches} per chunk.
std::pair<int64_t, int64_t> moba_gather_chunks(const Shapes& s, int64_t lane_bytes, int64_t group) {
  const int64_t fitting = moba_gather_workspace_budget() / std::max<int64_t>(lane_bytes, 1);
  const int64_t max_heads = std::min(s.heads_q, kMaxGridYZ / group * group);
  const int64_t heads = std::clamp<int64_t>(fitting / group * group, group, max_heads);
  const int64_t batches =
      heads < s.heads_q ? 1 : std::clamp<int64_t>(fitting / heads, 1, std::min(s.batch, kMaxGridYZ));
  return {heads, batches};
}

// Runs launch(g) for every chunk of heads x batches lanes, one after the other on the stream, with
// the workspace at `workspace`.
template <class Launch>
void for_each_chunk(const attention::BlockSparseForwardParams& p, const Shapes& s, int64_t heads, int64_t batches,
                    void* workspace, Launch&& launch) {
  for (int64_t b0 = 0; b0 < s.batch; b0 += batches) {
    for (int64_t h0 = 0; h0 < s.heads_q; h0 += heads) {
      const attention::MobaGatherParams g{p, b0, std::min(batches, s.batch - b0), h0, std::min(heads, s.heads_q - h0),
                                          workspace};
      C10_CUDA_CHECK(launch(g));
    }
  }
}

// moba_attention's key-block-major forward (attention/moba_gather_index.h), or false when the
// kernels do not take these inputs (the caller runs the union forward).
bool moba_gather_forward(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const at::Tensor& token_blocks, const Shapes& s, int64_t block_size, bool causal,
                         double scale, at::Tensor& out, at::Tensor& lse) {
  if (!cuda::kernel_switch_on("TORCH_EXT_MOBA_GATHER", true)) return false;
  if (s.batch == 0 || s.heads_q == 0) return false;  // the union forward's empty outputs
  GatherInputs in(op, q, k, v, token_blocks, s, block_size, causal, scale);
  attention::BlockSparseForwardParams& p = in.params;
  if (!cuda::moba_gather_supported(p)) return false;
  const int64_t nk = ceil_div(s.seq_kv, block_size);
  out = at::empty(q.sizes(), q.options());
  lse = at::empty({s.batch, s.heads_q, s.seq_q}, q.options().dtype(at::kFloat));
  p.out = mutable_bhsd(out);
  p.lse = lse.data_ptr<float>();
  const int top_k = p.selection.top_k;
  const auto bytes = [&](int64_t lanes) {
    return attention::moba_gather::workspace_layout(lanes, s.seq_q, top_k, nk, p.head_dim).bytes;
  };
  const auto [heads, batches] = moba_gather_chunks(s, bytes(1), 1);
  at::Tensor workspace = at::empty({bytes(batches * heads)}, q.options().dtype(at::kByte));
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  for_each_chunk(p, s, heads, batches, workspace.data_ptr(),
                 [&](const attention::MobaGatherParams& g) { return cuda::moba_gather_forward(g, stream); });
  return true;
}

// moba_attention's key-block-major backward (attention/moba_gather_cuda.h), opt-in until it has run
// on a GPU; false when it is off or the kernels do not take these inputs (the caller runs the union
// backward).
bool moba_gather_backward(const char* op, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                          const at::Tensor& token_blocks, const Shapes& s, int64_t block_size, bool causal,
                          double scale, at::Tensor& grad_q, at::Tensor& grad_k, at::Tensor& grad_v) {
  if (!cuda::kernel_switch_on("TORCH_EXT_MOBA_GATHER_BACKWARD", false)) return false;
  // Empty calls and grids past the delta pass's limits take the union backward (which handles or
  // refuses them).
  if (s.batch == 0 || s.heads_q == 0 || s.batch > kMaxGridYZ || s.heads_q > kMaxGridYZ) return false;
  GatherInputs in(op, q, k, v, token_blocks, s, block_size, causal, scale);
  attention::BlockSparseForwardParams& p = in.params;
  if (!cuda::moba_gather_backward_supported(p)) return false;
  const int64_t nk = ceil_div(s.seq_kv, block_size);
  const at::Tensor grad_out_u = kernel_layout(grad_out), out_u = kernel_layout(out), lse_c = lse.contiguous();
  p.out = MutableBhsd{out_u.data_ptr(), out_u.stride(0), out_u.stride(1), out_u.stride(2)};
  p.lse = lse_c.data_ptr<float>();
  grad_q = at::empty(q.sizes(), q.options());
  grad_k = at::empty(k.sizes(), k.options());
  grad_v = at::empty(v.sizes(), v.options());
  const at::Tensor delta = at::empty({s.batch, s.heads_q, s.seq_q}, q.options().dtype(at::kFloat));
  attention::BlockSparseBackwardParams bp{};
  bp.forward = p;
  bp.grad_out = bhsd(grad_out_u);
  bp.grad_q = mutable_bhsd(grad_q);
  bp.grad_k = mutable_bhsd(grad_k);
  bp.grad_v = mutable_bhsd(grad_v);
  bp.delta = delta.data_ptr<float>();
  const c10::cuda::CUDAGuard guard(q.device());  // before the sizes: the sort's depends on the device
  const int top_k = p.selection.top_k;
  const auto bytes = [&](int64_t lanes) {
    return cuda::moba_gather_backward_workspace_bytes(lanes, s.seq_q, top_k, nk, p.head_dim);
  };
  const int64_t group = s.heads_q / s.heads_kv;
  if (bytes(group) < 0) return false;  // one group is too large for the list sort: the union backward
  auto [heads, batches] = moba_gather_chunks(s, bytes(1), group);
  while (bytes(batches * heads) < 0) {  // fewer lanes a chunk for the sort's limits
    if (batches > 1) {
      batches = (batches + 1) / 2;
    } else {
      heads = std::max(group, (heads / 2) / group * group);
    }
  }
  at::Tensor workspace = at::empty({bytes(batches * heads)}, q.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(cuda::block_sparse_attention_delta(bp, stream));
  for_each_chunk(p, s, heads, batches, workspace.data_ptr(),
                 [&](const attention::MobaGatherParams& g) { return cuda::moba_gather_backward(g, bp, stream); });
  return true;
}
}  // namespace
#endif

std::tuple<at::Tensor, at::Tensor> moba_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const at::Tensor& token_blocks, int64_t block_size, bool causal,
                                                  double scale) {
  const char* op = "moba_attention";
  const Shapes s = check_qkv(op, q, k, &v);
  TORCH_EXT_CHECK(block_size >= 1 && block_size <= kMaxBlockSize, op, "block_size must be in [1, ", kMaxBlockSize,
                  "], got ", block_size);
#if defined(TORCH_EXT_WITH_CUDA)
  if (q.is_cuda()) {
    at::Tensor out, lse;
    if (moba_gather_forward(op, q, k, v, token_blocks, s, block_size, causal, scale, out, lse)) return {out, lse};
  }
#endif
  const auto [counts, indices] = moba_block_lists(token_blocks, ceil_div(s.seq_kv, block_size), kMobaQueryBlock);
  return block_sparse_attention(q, k, v, counts, indices, kMobaQueryBlock, block_size, causal, scale, token_blocks);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> moba_attention_backward(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& token_blocks, int64_t block_size, bool causal, double scale) {
  const char* op = "moba_attention_backward";
  const Shapes s = check_qkv(op, q, k, &v);
  TORCH_EXT_CHECK(block_size >= 1 && block_size <= kMaxBlockSize, op, "block_size must be in [1, ", kMaxBlockSize,
                  "], got ", block_size);
  check_backward_inputs(op, grad_out, out, lse, q);
#if defined(TORCH_EXT_WITH_CUDA)
  if (q.is_cuda()) {
    at::Tensor grad_q, grad_k, grad_v;
    if (moba_gather_backward(op, grad_out, q, k, v, out, lse, token_blocks, s, block_size, causal, scale, grad_q,
                             grad_k, grad_v))
      return {grad_q, grad_k, grad_v};
  }
#endif
  const auto [counts, indices] = moba_block_lists(token_blocks, ceil_div(s.seq_kv, block_size), kMobaQueryBlock);
  return block_sparse_attention_backward(grad_out, q, k, v, out, lse, counts, indices, kMobaQueryBlock, block_size,
                                         causal, scale, token_blocks);
}

std::tuple<at::Tensor, at::Tensor> moba_route(const at::Tensor& q, const at::Tensor& k, int64_t block_size,
                                              int64_t top_k, bool causal) {
  const at::Tensor selected = moba_select(q, k, block_size, top_k, causal);
  return moba_block_lists(selected, ceil_div(k.size(2), block_size), kMobaQueryBlock);
}

}  // namespace torch_ext
