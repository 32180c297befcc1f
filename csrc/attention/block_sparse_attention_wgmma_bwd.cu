// Hopper backward of block-sparse attention (attention/block_sparse_attention_wgmma.h), sm_90a
// only: the mma.sync backward's CTAs, walks, masks and MoBA flags
// (attention/block_sparse_attention_cuda_row.cuh) with every product on wgmma. Layouts,
// descriptors and traits: attention/block_sparse_attention_cuda_index.h sections 10 and 11,
// checked on the CPU by tests/cpp/block_sparse_attention_cuda_sim.cpp.
//
// dq_wgmma_kernel<T, D, kBlockQ>: the dQ kernel's CTA (query block, query head, batch), warpgroup
//   g on query rows 64 g .. 64 g + 63; Q and dO resident in shared memory, K / V of step t + 1
//   loading while step t computes. Per 64-key step: S = Q K^T and dP = dO V^T as two batches of
//   D / 16 wgmma.m64n64k16 from shared memory; P = 2^(S scale log2 e - lse) (masked) while the dP
//   batch runs; dS = P (dP - delta); dQ += dS K as 4 wgmma.m64n<D>k16 with dS from registers
//   (acc_to_a) and K read transposed. A step is skipped per warpgroup (none of its 64 rows sees a
//   key of it), not per warp as on mma.sync (a warpgroup issues its wgmmas together); masked
//   elements give P = 0.
// dkdv_wgmma_kernel<T, D, kBlockKv>: block_kv 64 / 128, a CTA of block_kv / 64 warpgroups per key
//   block (kv head, batch), warpgroup g on keys 64 g .. 64 g + 63; K and V resident; the walk
//   over the group's query heads and listed query blocks in 64-row sub-tiles, double-buffered.
//   Per step: S^T = K Q^T, then dP^T = V dO^T (m64n64k16, shared memory), P^T while dP^T runs,
//   dS^T = P^T (dP^T - delta), then dV += P^T dO and dK += dS^T Q (m64n<D>k16, P^T / dS^T from
//   registers, dO / Q read transposed). A step none of whose rows can see the block (causal) or
//   chose it (MoBA) is skipped by the whole CTA. dK and dV stay in registers (2 D / 8 x 4 per
//   thread: 128 at D = 128) and are stored once: deterministic, no atomics.
// Every wgmma batch is waited before the loop's back-edge (ptxas serializes wgmma that stays in
// flight across it, see quant/w8a8_wgmma.cu); overlap comes from the other warpgroups on the SM.
#include "attention/block_sparse_attention_wgmma.cuh"
#include "attention/block_sparse_attention_wgmma.h"

namespace torch_ext::cuda {
namespace {

template <typename T, int kD, int kBlockQ>
__device__ __forceinline__ void dq_wgmma_cta(const BlockSparseBackwardParams& bp) {
  using Tr = RowTraits<kD, kBlockQ, true>;
  constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
  const BlockSparseForwardParams& p = bp.forward;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t base = aligned_shared_address(smem_raw, kWgmmaAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, kWgmmaAtomBytes);
  const auto [tid, lane, warp, qb, h, b, q0, warp_row0, causal, selection, top_k, scale_log2] =
      row_place<kBlockQ>(p);
  const int warpgroup = warp / 4;

  const RowCta<T> c = row_cta_setup<T, Tr>(p, qb, b, h);
  using RowLayout = WgmmaLayout<kBlockQ>;
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies, RowLayout>(smem + Tr::kQOffset, bhsd_ptr<T>(p.q, b, h),
                                                            p.q.seq_stride, q0, c.seq_q, tid);
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies, RowLayout>(smem + (Tr::kQOffset + Tr::kRowBytes),
                                                            bhsd_ptr<T>(bp.grad_out, b, h), bp.grad_out.seq_stride,
                                                            q0, c.seq_q, tid);
  if (c.tiles > 0) load_kv_step<T, Tr, WgmmaLayout<ix::kTileKv>>(smem, c, 0, 0, tid);
  cp_async_commit();
  load_selection_table<Tr>(p, smem, qb, b, h, tid);
  const uint32_t wg_rows = uint32_t(warpgroup * ix::kWgmmaRows * kWgmmaSwizzleRowBytes);
  const uint32_t q_rows = base + Tr::kQOffset + wg_rows;
  const uint32_t do_rows = base + Tr::kQOffset + Tr::kRowBytes + wg_rows;

  const int q_pos[2] = {q0 + warp_row0 + ix::acc_row(lane, 0), q0 + warp_row0 + ix::acc_row(lane, 2)};
  float lse2[2], delta[2];
  load_row_stats(bp, b, h, q_pos, lse2, delta);
  float dq[Tr::kON][4];
  zero_accumulators(dq);

  for (int t = 0; t < c.tiles; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // step t landed for every thread; step t - 1's slot is free (its wgmma waited)
    if (t + 1 < c.tiles) load_kv_step<T, Tr, WgmmaLayout<ix::kTileKv>>(smem, c, t + 1, (t + 1) % ix::kStages, tid);
    cp_async_commit();

    // Warpgroup-uniform: no key of the step is visible to any of its 64 rows (causal diagonal
    // steps of a 128-row block, Sq tails); MoBA's choices aside (per warp only on mma.sync).
    if (ix::step_hidden_from_rows(step_first_key<Tr>(smem, c, st), q0 + warpgroup * ix::kWgmmaRows, c.seq_q,
                                  c.seq_kv, causal, ix::kWgmmaRows))
      continue;
    const uint32_t k_tile = base + Tr::kStageOffset + st * Tr::kStageBytes;
    const uint32_t v_tile = k_tile + Tr::kKvBytes;
    float s[Tr::kSN][4], dp[Tr::kSN][4];
    wgmma_fence();
    wgmma_rows_x_rows<kBf16, kD, kBlockQ>(s, q_rows, k_tile);
    wgmma_commit();
    wgmma_rows_x_rows<kBf16, kD, kBlockQ>(dp, do_rows, v_tile);
    wgmma_commit();

    const StepMask m = make_step_mask<Tr>(smem, c, st, q0 + warp_row0, warp_row0, lane, causal, top_k, selection);
    wgmma_wait<1>();
    wgmma_fence_operands(s);
    masked_probs<Tr>(s, m, c, q_pos, lse2, causal, scale_log2, lane);
    wgmma_wait<0>();
    wgmma_fence_operands(dp);
    ds_in_place<Tr>(s, dp, delta);

    uint32_t ds[4][4];
    acc_to_a_all<T>(ds, s);
    wgmma_fence_operands(dq);
    wgmma_fence();
    wgmma_acc_x_tile<kBf16, kD>(dq, ds, k_tile);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(dq);
  }
  cp_async_wait_all();  // only an empty group remains
  __syncthreads();      // every warpgroup's wgmma read its Q / dO rows: the staging may overwrite them

  const float row_scale[2] = {p.scale, p.scale};
  store_warp_rows<T, kD>(dq, row_scale, smem + Tr::kQOffset, warp_row0, bhsd_ptr<T>(bp.grad_q, b, h),
                         bp.grad_q.seq_stride, q0, c.seq_q, lane);
}

template <typename T, int kD, int kBlockKv>
__device__ __forceinline__ void dkdv_wgmma_cta(const BlockSparseBackwardParams& bp) {
  using Tr = ix::WgmmaDkdvTraits<kD, kBlockKv>;
  using TileLayout = WgmmaLayout<ix::kBwdQTile>;
  constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
  const BlockSparseForwardParams& p = bp.forward;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  const uint32_t base = aligned_shared_address(smem_raw, kWgmmaAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, kWgmmaAtomBytes);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warpgroup = warp / 4;
  const DkdvCta c = dkdv_cta_setup<kBlockKv>(bp);

  load_rows<T, kD, Tr::kThreads, Tr::kKvCopies, WgmmaLayout<kBlockKv>>(
      smem + Tr::kKOffset, bhsd_ptr<T>(p.k, c.b, c.hk), p.k.seq_stride, c.k0, c.seq_kv, tid);
  load_rows<T, kD, Tr::kThreads, Tr::kKvCopies, WgmmaLayout<kBlockKv>>(
      smem + Tr::kVOffset, bhsd_ptr<T>(p.v, c.b, c.hk), p.v.seq_stride, c.k0, c.seq_kv, tid);
  ix::TransposedCursor loader = ix::cursor_begin(c.lists);
  if (c.steps > 0) load_dkdv_step<T, Tr, TileLayout>(bp, c, loader, smem + Tr::kStageOffset, tid);
  cp_async_commit();

  // This warpgroup's 64 key rows of K and V (A operands).
  const uint32_t wg_rows = uint32_t(warpgroup * ix::kWgmmaRows * kWgmmaSwizzleRowBytes);
  const uint32_t k_rows = base + Tr::kKOffset + wg_rows;
  const uint32_t v_rows = base + Tr::kVOffset + wg_rows;
  const int key_row0 = warp * ix::kWarpRows;  // warp w of the CTA: key rows 16 w.., as on mma.sync
  const int k_pos[2] = {c.k0 + key_row0 + ix::acc_row(lane, 0), c.k0 + key_row0 + ix::acc_row(lane, 2)};
  float dk[Tr::kON][4], dv[Tr::kON][4];
  zero_accumulators(dk);
  zero_accumulators(dv);

  for (int t = 0; t < c.steps; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // step t (and K / V) landed; step t - 1's stage is free (its wgmma waited)
    if (t + 1 < c.steps) {
      ix::cursor_advance(loader, c.lists, c.subs);
      load_dkdv_step<T, Tr, TileLayout>(bp, c, loader, smem + Tr::kStageOffset + (t + 1) % ix::kStages * Tr::kStageBytes,
                                        tid);
    }
    cp_async_commit();

    const unsigned char* const stage = smem + Tr::kStageOffset + st * Tr::kStageBytes;
    const DkdvStage rows = dkdv_stage<Tr>(stage);
    // CTA-uniform: every thread reads the same stage words.
    if (ix::dkdv_step_hidden(rows.qbase, c.k0, c.seq_q, c.seq_kv, c.causal)) continue;
    if (c.selection && !__any_sync(kFullMask, rows.pos[lane] >= 0 || rows.pos[lane + 32] >= 0)) continue;

    const uint32_t q_tile = base + Tr::kStageOffset + st * Tr::kStageBytes;
    const uint32_t do_tile = q_tile + Tr::kTileBytes;
    float s[8][4], dp[8][4];
    wgmma_fence();
    wgmma_rows_x_rows<kBf16, kD, kBlockKv>(s, k_rows, q_tile);
    wgmma_commit();
    wgmma_rows_x_rows<kBf16, kD, kBlockKv>(dp, v_rows, do_tile);
    wgmma_commit();
    wgmma_wait<1>();
    wgmma_fence_operands(s);
    dkdv_probs(s, dp, rows, c, key_row0, k_pos, lane, [&] {
      wgmma_wait<0>();
      wgmma_fence_operands(dp);
    });

    uint32_t pa[4][4], da[4][4];
    acc_to_a_all<T>(pa, s);
    acc_to_a_all<T>(da, dp);
    wgmma_fence_operands(dv);
    wgmma_fence_operands(dk);
    wgmma_fence();
    wgmma_acc_x_tile<kBf16, kD>(dv, pa, do_tile);
    wgmma_acc_x_tile<kBf16, kD>(dk, da, q_tile);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(dv);
    wgmma_fence_operands(dk);
  }
  cp_async_wait_all();
  store_dkdv<T, kD>(bp, c, dk, dv, k_pos, lane);
}

template <typename T, int kD, int kBlockQ>
__global__ void __launch_bounds__(RowTraits<kD, kBlockQ, true>::kThreads, 1)
    dq_wgmma_kernel(const BlockSparseBackwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  dq_wgmma_cta<T, kD, kBlockQ>(p);
#else
  __trap();  // only compiled for sm_90a; the launcher runs it on compute capability 9.0 only
#endif
}

// One warpgroup (block_kv 64): two CTAs per SM fit (registers and, at D = 128, 101 KB of shared
// memory each), so one CTA's softmax overlaps the other's wgmma.
template <typename T, int kD, int kBlockKv>
__global__ void __launch_bounds__(ix::WgmmaDkdvTraits<kD, kBlockKv>::kThreads, 1)
    dkdv_wgmma_kernel(const BlockSparseBackwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  dkdv_wgmma_cta<T, kD, kBlockKv>(p);
#else
  __trap();
#endif
}

template <typename T, int kD, int kBlockQ>
cudaError_t launch_dq(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  const BlockSparseForwardParams& f = p.forward;
  const int smem = ix::wgmma_dq_smem_bytes<kD, kBlockQ>(f.selection.blocks != nullptr ? f.selection.top_k : 0);
  const auto kernel = dq_wgmma_kernel<T, kD, kBlockQ>;
  const cudaError_t status = allow_dynamic_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(f.seq_q, kBlockQ)), unsigned(f.heads_q), unsigned(f.batch));
  kernel<<<grid, RowTraits<kD, kBlockQ, true>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD, int kBlockKv>
cudaError_t launch_dkdv(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  using Tr = ix::WgmmaDkdvTraits<kD, kBlockKv>;
  const auto kernel = dkdv_wgmma_kernel<T, kD, kBlockKv>;
  const cudaError_t status = allow_dynamic_smem(kernel, Tr::kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.forward.seq_kv, kBlockKv)), unsigned(p.forward.heads_kv),
                  unsigned(p.forward.batch));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_dq_block_q(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  return p.forward.block_q == 64 ? launch_dq<T, kD, 64>(p, stream) : launch_dq<T, kD, 128>(p, stream);
}
template <typename T, int kD>
cudaError_t launch_dkdv_block_kv(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  return p.forward.block_kv == 64 ? launch_dkdv<T, kD, 64>(p, stream) : launch_dkdv<T, kD, 128>(p, stream);
}

}  // namespace

cudaError_t block_sparse_attention_dq_sm90(const attention::BlockSparseBackwardParams& p, cudaStream_t stream) {
  const BlockSparseForwardParams& f = p.forward;
  if (f.dtype == ScalarKind::kFloat16) {
    return f.head_dim == 64 ? launch_dq_block_q<Half, 64>(p, stream) : launch_dq_block_q<Half, 128>(p, stream);
  }
  return f.head_dim == 64 ? launch_dq_block_q<BFloat16, 64>(p, stream) : launch_dq_block_q<BFloat16, 128>(p, stream);
}

bool block_sparse_attention_dkdv_sm90_supports(int block_kv) { return block_kv == 64 || block_kv == 128; }

cudaError_t block_sparse_attention_dkdv_sm90(const attention::BlockSparseBackwardParams& p, cudaStream_t stream) {
  const BlockSparseForwardParams& f = p.forward;
  if (!block_sparse_attention_dkdv_sm90_supports(f.block_kv)) return cudaErrorInvalidValue;
  if (f.dtype == ScalarKind::kFloat16) {
    return f.head_dim == 64 ? launch_dkdv_block_kv<Half, 64>(p, stream) : launch_dkdv_block_kv<Half, 128>(p, stream);
  }
  return f.head_dim == 64 ? launch_dkdv_block_kv<BFloat16, 64>(p, stream)
                          : launch_dkdv_block_kv<BFloat16, 128>(p, stream);
}

}  // namespace torch_ext::cuda
