// Hopper forward of block-sparse attention (attention/block_sparse_attention_wgmma.h), sm_90a
// only: the mma.sync forward's CTA, key walk, masks, MoBA choices and online softmax
// (attention/block_sparse_attention_cuda_row.cuh), with both products on wgmma. The layouts and
// descriptors are host+device functions in attention/block_sparse_attention_cuda_index.h
// section 10, checked on the CPU by tests/cpp/block_sparse_attention_cuda_sim.cpp against a
// model of wgmma's addressing written from the PTX ISA.
//
// fwd_wgmma_kernel<T, D, kBlockQ>: warpgroup g owns query rows 64 g .. 64 g + 63 of the block
// (1 or 2 warpgroups: block_q 64 / 128); the threads are the mma.sync kernel's (4 warps per 64
// rows), so every per-lane map (rows, masks, softmax state, epilogue) is that kernel's.
//   - Q stays in shared memory (wgmma reads its A operand there): no Q fragments in registers, and
//     the tensor cores, not ldmatrix, move the K and V operands (the mma.sync forward spends one
//     ldmatrix.x4 on every two mmas: ncu had it at 40-44% SM throughput on the H100).
//   - Per 64-key step t (FlashAttention-3's intra-warpgroup overlap): S_t = Q K_t^T is complete
//     on entry, P_{t-1} V_{t-1} may still run. Mask and online softmax on S's 32 accumulators per
//     thread exactly as the mma.sync kernel (P and the rescale factors; O untouched); wait for
//     P_{t-1} V_{t-1}; O rescaled; P to A fragments (acc_to_a); then S_{t+1} = Q K_{t+1}^T as
//     D / 16 wgmma.m64n64k16 (K-major A and B) and O += P_t V_t as 4 wgmma.m64n<D>k16 (V read
//     transposed), two groups; waiting for all but the newest completes S_{t+1} and leaves P_t V_t
//     running under step t + 1's softmax. The last step is peeled (no S_{t+1}): a wgmma under a
//     run-time condition in the loop made ptxas serialize them all (C7514). Other warpgroups on
//     the SM overlap too (block_q 64 at D = 128: 2 CTAs of one warpgroup per SM; block_q 128: one
//     CTA of two).
//   - K runs two steps ahead, V one, in the same two stages: after step t's barrier K_{t+2} loads
//     into K_t's slot (S_t done) and V_{t+1} into V_{t-1}'s (P_{t-1} V_{t-1} waited by every
//     warpgroup before the barrier); cp.async, zero-filled past the list / Sk; copies land, are
//     fenced into the async proxy, then a CTA barrier, as in the W8A8 kernel. The segment table
//     of a step travels with its K (make_step_mask reads step t's before the barrier).
//   - Epilogue: a CTA barrier (the other warpgroup may still read its Q rows, whose bytes the
//     staging below overwrites), then the mma.sync kernel's store_warp_rows and lse.
#include "attention/block_sparse_attention_wgmma.cuh"
#include "attention/block_sparse_attention_wgmma.h"

namespace torch_ext::cuda {
namespace {

template <typename T, int kD, int kBlockQ>
__device__ __forceinline__ void fwd_wgmma_cta(const BlockSparseForwardParams& p) {
  using Tr = RowTraits<kD, kBlockQ, false>;
  constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // The swizzle works on absolute address bits: tiles start on 1024-byte atoms (the launcher
  // asks for one atom more).
  const uint32_t base = aligned_shared_address(smem_raw, kWgmmaAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, kWgmmaAtomBytes);

  const auto [tid, lane, warp, qb, h, b, q0, warp_row0, causal, selection, top_k, scale_log2] =
      row_place<kBlockQ>(p);
  const int warpgroup = warp / 4;

  const RowCta<T> c = row_cta_setup<T, Tr>(p, qb, b, h);
  using KvLayout = WgmmaLayout<ix::kTileKv>;
  // Prologue (one group): Q, K and V of step 0, K of step 1.
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies, WgmmaLayout<kBlockQ>>(smem + Tr::kQOffset, bhsd_ptr<T>(p.q, b, h),
                                                                       p.q.seq_stride, q0, c.seq_q, tid);
  if (c.tiles > 0) load_kv_step<T, Tr, KvLayout>(smem, c, 0, 0, tid);
  if (c.tiles > 1) load_kv_step<T, Tr, KvLayout, true, false>(smem, c, 1, 1, tid);
  cp_async_commit();
  load_selection_table<Tr>(p, smem, qb, b, h, tid);
  // This warpgroup's 64 Q rows: rows 64 g.. of each column block.
  const uint32_t q_tile = base + Tr::kQOffset + warpgroup * ix::kWgmmaRows * kWgmmaSwizzleRowBytes;
  const auto k_tile = [&](int st) { return base + Tr::kStageOffset + st * Tr::kStageBytes; };

  float o[Tr::kON][4];
  zero_accumulators(o);
  ix::RowState rs[2] = {ix::row_state_init(), ix::row_state_init()};
  const int q_pos[2] = {q0 + warp_row0 + ix::acc_row(lane, 0), q0 + warp_row0 + ix::acc_row(lane, 2)};
  float s[Tr::kSN][4];
  cp_async_wait<0>();
  fence_proxy_async_shared();
  __syncthreads();
  if (c.tiles > 0) {
    wgmma_fence();
    wgmma_rows_x_rows<kBf16, kD, kBlockQ>(s, q_tile, k_tile(0));
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(s);
  }

  // Step t enters with S_t complete in s and P_{t-1} V_{t-1} possibly still running. The last
  // step is peeled (kLast): with S_{t+1} issued under a run-time condition instead, ptxas
  // serialized every wgmma of the kernel (C7514).
  const auto step = [&](int t, auto last_tag) {
    constexpr bool kLast = decltype(last_tag)::value;
    const int st = t % ix::kStages;
    const StepMask m = make_step_mask<Tr>(smem, c, st, q0 + warp_row0, warp_row0, lane, causal, top_k, selection);
    float alpha[2];
    softmax_probs_step<Tr>(s, alpha, rs, m, c, q_pos, causal, scale_log2, lane);

    // P_{t-1} V_{t-1} done: O complete, its A registers and V_{t-1}'s slot free in this warpgroup.
    wgmma_wait<0>();
    wgmma_fence_operands(o);
    rescale_rows(o, alpha);
    uint32_t pa[4][4];
    acc_to_a_all<T>(pa, s);
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // K_{t+1}, V_t landed; every warpgroup is past S_t and P_{t-1} V_{t-1}
    if constexpr (!kLast) {
      // K_{t+2} into K_t's slot, V_{t+1} into V_{t-1}'s (the segment table travels with K).
      if (t + 2 < c.tiles) load_kv_step<T, Tr, KvLayout, true, false>(smem, c, t + 2, st, tid);
      load_kv_step<T, Tr, KvLayout, false, true>(smem, c, t + 1, (t + 1) % ix::kStages, tid);
      cp_async_commit();
    }

    // O was rescaled and P written by ordinary instructions: pin both (acc_to_a_all pinned P), then
    // the wgmma fence (CUTLASS's order), so the compiler cannot sink those writes past the fence.
    wgmma_fence_operands(o);
    wgmma_fence();
    // S_{t+1} first, then P_t V_t: waiting for all but the newest group completes S_{t+1} and
    // leaves P_t V_t running under the next step's softmax (FlashAttention-3's intra-warpgroup
    // overlap).
    if constexpr (!kLast) {
      wgmma_rows_x_rows<kBf16, kD, kBlockQ>(s, q_tile, k_tile((t + 1) % ix::kStages));
      wgmma_commit();
    }
    wgmma_acc_x_tile<kBf16, kD>(o, pa, k_tile(st) + Tr::kKvBytes);
    wgmma_commit();
    if constexpr (!kLast) {
      wgmma_wait<1>();
      wgmma_fence_operands(s);
    }
  };
  for (int t = 0; t + 1 < c.tiles; ++t) step(t, std::false_type{});
  if (c.tiles > 0) step(c.tiles - 1, std::true_type{});
  wgmma_wait<0>();
  wgmma_fence_operands(o);
  __syncthreads();  // every warpgroup's wgmma read its Q rows: the staging may overwrite them

  store_forward_rows<T, kD>(p, o, rs, smem + Tr::kQOffset, c, b, h, q0, warp_row0, q_pos, lane);
}

template <typename T, int kD, int kBlockQ>
__global__ void __launch_bounds__(RowTraits<kD, kBlockQ, false>::kThreads, 1)
    fwd_wgmma_kernel(const BlockSparseForwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  fwd_wgmma_cta<T, kD, kBlockQ>(p);
#else
  __trap();  // only compiled for sm_90a; the launcher runs it on compute capability 9.0 only
#endif
}

template <typename T, int kD, int kBlockQ>
cudaError_t launch(const BlockSparseForwardParams& p, cudaStream_t stream) {
  const int smem = ix::wgmma_forward_smem_bytes<kD, kBlockQ>(p.selection.blocks != nullptr ? p.selection.top_k : 0);
  const auto kernel = fwd_wgmma_kernel<T, kD, kBlockQ>;
  const cudaError_t status = allow_dynamic_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.seq_q, kBlockQ)), unsigned(p.heads_q), unsigned(p.batch));
  kernel<<<grid, RowTraits<kD, kBlockQ, false>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_block_q(const BlockSparseForwardParams& p, cudaStream_t stream) {
  return p.block_q == 64 ? launch<T, kD, 64>(p, stream) : launch<T, kD, 128>(p, stream);
}

}  // namespace

cudaError_t block_sparse_attention_forward_sm90(const attention::BlockSparseForwardParams& p, cudaStream_t stream) {
  if (p.dtype == ScalarKind::kFloat16) {
    return p.head_dim == 64 ? launch_block_q<Half, 64>(p, stream) : launch_block_q<Half, 128>(p, stream);
  }
  return p.head_dim == 64 ? launch_block_q<BFloat16, 64>(p, stream) : launch_block_q<BFloat16, 128>(p, stream);
}

}  // namespace torch_ext::cuda
