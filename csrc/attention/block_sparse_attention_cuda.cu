// CUDA kernels of block-sparse attention and MoBA gating (attention/block_sparse_attention_cuda.h).
// Every index map, mask predicate, softmax recurrence and walk is a host+device function of
// attention/block_sparse_attention_cuda_index.h, run thread by thread on the CPU by
// tests/cpp/block_sparse_attention_cuda_sim.cpp. No torch headers.
//
// fwd_kernel<T, D, kBlockQ>: FlashAttention-2 forward. A CTA owns (query block, query head, batch);
//   warp w owns query rows 16 w .. 16 w + 15 (4 warps for block_q 64, 8 for 128: the 8 warps of a
//   128-row block share each K / V tile, halving its shared-memory and L2 traffic per query row
//   against two 64-row CTAs). The Q tile goes global -> shared (cp.async) -> registers (A
//   fragments, once). The CTA walks its listed key blocks in steps of 64 keys (ix::walk_tiles):
//   blocks of 16 / 32 keys are gathered 4 / 2 to a step, 128-key blocks take two steps, so every
//   step is 8 n8 tiles of S per warp whatever block_kv is. K and V of step t + 1 load (cp.async,
//   zero-filled past the list / Sk) while step t computes: S = Q K^T (mma.m16n8k16, fp32), mask
//   (listed segment, Sk tail, causal bottom-right, MoBA choices of the row from a shared table
//   sorted per row, looked up by binary search),
//   online softmax in the log2 domain (ix::softmax_rescale), P rounded to T straight from the
//   accumulators into A fragments, O += P V (V through ldmatrix.trans). Epilogue: O / l through
//   shared memory (the warp's own Q rows) into 16-byte stores, lse = m ln 2 + ln l (-inf, O = 0
//   for a row that saw no key).
// bwd_delta_kernel: delta = rowsum(dO * O) in fp32.
// bwd_dq_kernel<T, D, kBlockQ>: the forward's walk again; P recomputed from lse, dP = dO V^T,
//   dS = P (dP - delta), dQ += dS K (K through ldmatrix.trans), dQ * scale at the end.
// bwd_dkdv_kernel<T, D, kBlockKv>: a CTA owns key block kb of kv head hk; warps split as
//   block_kv / 16 along keys x (4 / that, at least 1) along the 64 query rows of a step; K and V
//   stay in shared memory; the CTA walks, for each query head of hk's group, each query block
//   listing kb (p.transposed) in 64-row sub-tiles, double-buffered (Q, dO, lse, delta and the
//   per-row MoBA flag). S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q; with MoBA a warp
//   skips a pass over query columns none of which chose the block. Warps that split the query
//   rows sum their partial dK / dV through shared memory in warp order: deterministic, no atomics.
// moba_pool_kernel / moba_select_kernel: mean-pooled key blocks (fp32 means split into two 16-bit
//   terms, workspace), then per 16 query tokens the scores of 32 blocks at a time on tensor cores
//   (mma.m16n8k16), handed one block per lane to a warp-wide sorted top-k list per token
//   (ix::moba_beats order), merged with ballots: no score matrix in memory.
// moba_block_lists_kernel: per query block the union of its rows' choices through a shared
//   bitmask, written in ascending order.
//
// Requirements of the attention kernels (else cudaErrorInvalidValue; the torch side falls back or
// copies): fp16 / bf16, head_dim 64 or 128, block_q 64 / 128, block_kv 16 / 32 / 64 / 128, every
// [B, H, S, D] tensor 16-byte aligned with strides that are multiples of 8 elements (cp.async and
// 16-byte stores; contiguous and [B, S, H, D]-transposed layouts qualify), sequence lengths below
// 2^31 - 256, MoBA top_k <= 64, heads and batch <= 65535 (grid y / z).
#include <type_traits>

#include "attention/block_sparse_attention_cuda.h"
#include "attention/block_sparse_attention_cuda_row.cuh"
#include "attention/block_sparse_attention_wgmma.h"
#include "common/cuda/block_scan.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/hopper_switch.h"

namespace torch_ext::cuda {
namespace {

// Key / query positions are int32 inside the kernels, with room for a 128-key block past the end.
constexpr int64_t kMaxSeq = (int64_t(1) << 31) - 256;

// =============================================================================================
// Forward
// =============================================================================================

template <typename T, int kD, int kBlockQ>
__global__ void __launch_bounds__(RowTraits<kD, kBlockQ, false>::kThreads, 1)
    fwd_kernel(const BlockSparseForwardParams p) {
  using Tr = RowTraits<kD, kBlockQ, false>;
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [tid, lane, warp, qb, h, b, q0, warp_row0, causal, selection, top_k, scale_log2] =
      row_place<kBlockQ>(p);

  const RowCta<T> c = row_cta_setup<T, Tr>(p, qb, b, h);
  // Group 0: Q; group 1: step 0.
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies>(smem + Tr::kQOffset, bhsd_ptr<T>(p.q, b, h), p.q.seq_stride, q0,
                                                 c.seq_q, tid);
  cp_async_commit();
  if (c.tiles > 0) load_kv_step<T, Tr>(smem, c, 0, 0, tid);
  cp_async_commit();
  load_selection_table<Tr>(p, smem, qb, b, h, tid);
  cp_async_wait<1>();
  __syncthreads();
  uint32_t qf[Tr::kK16][4];
#pragma unroll
  for (int k16 = 0; k16 < Tr::kK16; ++k16)
    ldmatrix_x4(qf[k16], smem + Tr::kQOffset +
                             ix::smem_offset(warp_row0 + ix::ldsm_a_row(lane), ix::ldsm_a_chunk(k16, lane), kD));

  float o[Tr::kON][4];
  zero_accumulators(o);
  ix::RowState rs[2] = {ix::row_state_init(), ix::row_state_init()};
  const int q_pos[2] = {q0 + warp_row0 + ix::acc_row(lane, 0), q0 + warp_row0 + ix::acc_row(lane, 2)};

  for (int t = 0; t < c.tiles; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    __syncthreads();  // step t landed for every thread; step t - 1's slot is free
    if (t + 1 < c.tiles) load_kv_step<T, Tr>(smem, c, t + 1, (t + 1) % ix::kStages, tid);
    cp_async_commit();

    const unsigned char* const ks = smem + Tr::kStageOffset + st * Tr::kStageBytes;
    const unsigned char* const vs = ks + Tr::kKvBytes;
    const StepMask m = make_step_mask<Tr>(smem, c, st, q0 + warp_row0, warp_row0, lane, causal, top_k, selection);
    if (m.hidden) continue;  // adds nothing to this warp's rows (MoBA: most steps at long S)
    float s[Tr::kSN][4];
    zero_accumulators(s);
#pragma unroll
    for (int k16 = 0; k16 < Tr::kK16; ++k16) mma_rows_x_tile<T, kD>(s, qf[k16], ks, k16, lane, m.live);
    online_softmax_step<Tr>(s, o, rs, m, c, q_pos, causal, scale_log2, lane);
    mma_p_x_tile<T, kD>(o, s, vs, lane, m.live);
  }
  cp_async_wait_all();  // only an empty group remains

  store_forward_rows<T, kD>(p, o, rs, smem + Tr::kQOffset, c, b, h, q0, warp_row0, q_pos, lane);
}

// =============================================================================================
// Backward: delta, dQ, dK / dV
// =============================================================================================

// delta[b, h, i] = sum_d dO * O (fp32): D / 8 threads per row, 16 bytes each.
template <typename T, int kD>
__global__ void __launch_bounds__(256) bwd_delta_kernel(const BlockSparseBackwardParams p) {
  constexpr int kPer = kD / ix::kChunkElems;
  const int64_t rows = p.forward.batch * p.forward.heads_q * p.forward.seq_q;
  const int64_t row = int64_t(blockIdx.x) * (256 / kPer) + threadIdx.x / kPer;
  const int c = threadIdx.x % kPer;
  const bool ok = row < rows;  // no early return: the whole warp shuffles below
  float sum = 0.f;
  if (ok) {
    const int64_t i = row % p.forward.seq_q, bh = row / p.forward.seq_q;
    const int64_t h = bh % p.forward.heads_q, b = bh / p.forward.heads_q;
    const Pack16<T> o = load_pack16(bhsd_ptr<T>(p.forward.out, b, h) + i * p.forward.out.seq_stride + c * 8);
    const Pack16<T> d = load_pack16(bhsd_ptr<T>(p.grad_out, b, h) + i * p.grad_out.seq_stride + c * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) sum = fmaf(to_compute(o.v[e]), to_compute(d.v[e]), sum);
  }
#pragma unroll
  for (int off = kPer / 2; off > 0; off /= 2) sum += __shfl_xor_sync(kFullMask, sum, off);
  if (ok && c == 0) p.delta[row] = sum;
}

template <typename T, int kD, int kBlockQ>
__global__ void __launch_bounds__(RowTraits<kD, kBlockQ, true>::kThreads, 1)
    bwd_dq_kernel(const BlockSparseBackwardParams bp) {
  using Tr = RowTraits<kD, kBlockQ, true>;
  const BlockSparseForwardParams& p = bp.forward;
  extern __shared__ __align__(128) unsigned char smem[];
  const auto [tid, lane, warp, qb, h, b, q0, warp_row0, causal, selection, top_k, scale_log2] =
      row_place<kBlockQ>(p);

  const RowCta<T> c = row_cta_setup<T, Tr>(p, qb, b, h);
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies>(smem + Tr::kQOffset, bhsd_ptr<T>(p.q, b, h), p.q.seq_stride, q0,
                                                 c.seq_q, tid);
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies>(smem + (Tr::kQOffset + Tr::kRowBytes), bhsd_ptr<T>(bp.grad_out, b, h),
                                                 bp.grad_out.seq_stride, q0, c.seq_q, tid);
  if (c.tiles > 0) load_kv_step<T, Tr>(smem, c, 0, 0, tid);
  cp_async_commit();
  load_selection_table<Tr>(p, smem, qb, b, h, tid);

  const int q_pos[2] = {q0 + warp_row0 + ix::acc_row(lane, 0), q0 + warp_row0 + ix::acc_row(lane, 2)};
  float lse2[2], delta[2];
  load_row_stats(bp, b, h, q_pos, lse2, delta);
  float dq[Tr::kON][4];
  zero_accumulators(dq);

  for (int t = 0; t < c.tiles; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < c.tiles) load_kv_step<T, Tr>(smem, c, t + 1, (t + 1) % ix::kStages, tid);
    cp_async_commit();

    const unsigned char* const ks = smem + Tr::kStageOffset + st * Tr::kStageBytes;
    const unsigned char* const vs = ks + Tr::kKvBytes;
    const StepMask m = make_step_mask<Tr>(smem, c, st, q0 + warp_row0, warp_row0, lane, causal, top_k, selection);
    if (m.hidden) continue;  // dS is 0 on every element of this warp's rows
    dq_mma_step<T, Tr>(dq, smem + Tr::kQOffset, smem + (Tr::kQOffset + Tr::kRowBytes), ks, vs, m, c, q_pos, lse2,
                       delta, causal, scale_log2, warp_row0, lane);
  }
  cp_async_wait_all();
  __syncthreads();  // the dO rows are not read any more; Q rows are reused per warp below
  const float row_scale[2] = {p.scale, p.scale};
  store_warp_rows<T, kD>(dq, row_scale, smem + Tr::kQOffset, warp_row0, bhsd_ptr<T>(bp.grad_q, b, h),
                         bp.grad_q.seq_stride, q0, c.seq_q, lane);
}

template <typename T, int kD, int kBlockKv>
__global__ void __launch_bounds__(DkdvTraits<kD, kBlockKv>::kThreads, 1)
    bwd_dkdv_kernel(const BlockSparseBackwardParams bp) {
  using Tr = DkdvTraits<kD, kBlockKv>;
  const BlockSparseForwardParams& p = bp.forward;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wk = warp % Tr::kWarpsKey, wq = warp / Tr::kWarpsKey;
  const DkdvCta c = dkdv_cta_setup<kBlockKv>(bp);

  load_block_kv<T, kD, Tr>(smem, p, c, tid);
  ix::TransposedCursor loader = ix::cursor_begin(c.lists);
  if (c.steps > 0) load_dkdv_step<T, Tr, LdsmLayout<kD>>(bp, c, loader, smem + Tr::kStageOffset, tid);
  cp_async_commit();

  float dk[Tr::kON][4], dv[Tr::kON][4];
  zero_accumulators(dk);
  zero_accumulators(dv);
  const int key_row0 = wk * ix::kWarpRows;
  const int k_pos[2] = {c.k0 + key_row0 + ix::acc_row(lane, 0), c.k0 + key_row0 + ix::acc_row(lane, 2)};

  for (int t = 0; t < c.steps; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < c.steps) {
      ix::cursor_advance(loader, c.lists, c.subs);
      load_dkdv_step<T, Tr, LdsmLayout<kD>>(bp, c, loader, smem + Tr::kStageOffset + (t + 1) % ix::kStages * Tr::kStageBytes,
                                            tid);
    }
    cp_async_commit();

    dkdv_mma_step<T, Tr>(dk, dv, smem, smem + Tr::kStageOffset + st * Tr::kStageBytes, c, wq, key_row0, k_pos,
                         lane);
  }
  cp_async_wait_all();
  dkdv_mma_finish<T, Tr>(bp, c, dk, dv, smem, wq, wk, k_pos, lane);
}

// =============================================================================================
// moba_select
// =============================================================================================

// pooled[b, hk, part, blk, d] = the hi / lo split (ix::moba_split) of the fp32 mean of k over the
// block's keys (key order), zero for head_dim <= d < the padded dim.
template <typename T>
__global__ void __launch_bounds__(ix::kPoolThreads) moba_pool_kernel(const MobaSelectParams p, ix::MobaMma<T>* pooled) {
  const int blk = blockIdx.x, hk = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int blocks = ix::moba_blocks(p.seq_kv, p.block_size);
  const int64_t first = int64_t(blk) * p.block_size;
  const int n = int(min(int64_t(p.block_size), p.seq_kv - first));
  const T* const k = bhsd_ptr<T>(p.k, b, hk) + first * p.k.seq_stride;
  ix::MobaMma<T>* const hi = pooled + ix::moba_pooled_row(b, hk, 0, blk, p.heads_kv, blocks, p.head_dim);
  ix::MobaMma<T>* const lo = pooled + ix::moba_pooled_row(b, hk, 1, blk, p.heads_kv, blocks, p.head_dim);
  for (int d = threadIdx.x; d < ix::moba_dim_padded(p.head_dim); d += ix::kPoolThreads) {
    float mean = 0.f;
    if (d < p.head_dim) {
      for (int j = 0; j < n; ++j) mean += to_compute(k[int64_t(j) * p.k.seq_stride + d]);
      mean /= float(n);
    }
    const auto split = ix::moba_split<ix::MobaMma<T>>(mean);
    hi[d] = split.hi;
    lo[d] = split.lo;
  }
}

// One compare-exchange of moba_select's bitonic merge (ix::moba_keep_better): this lane's entry
// (s, i) against lane ^ stride's.
__device__ __forceinline__ void moba_exchange(float& s, int32_t& i, int lane, int size, int stride) {
  const float ps = __shfl_xor_sync(kFullMask, s, stride);
  const int32_t pi = __shfl_xor_sync(kFullMask, i, stride);
  if (ix::moba_beats(ps, pi, s, i) == ix::moba_keep_better(lane, size, stride)) {
    s = ps;
    i = pi;
  }
}

// A CTA: 16 kWarps query tokens of one (b, h); warp w owns tokens 16 w .. 16 w + 15 as one m16 tile. The
// query rows sit in shared memory as 16-bit operands (hi, and lo for fp32 inputs); chunks of 32
// pooled blocks (hi and lo rows) stream through kMobaStages stages. Per chunk a warp with an
// eligible block left computes its 16 x 32 scores with ldmatrix + mma.m16n8k16 (q hi x p hi, q hi x
// p lo, and q lo x p hi when split, all into the same fp32 accumulators), parks them in its shared
// score tile, and merges row by row: lane j offers block c0 + j to the row's top-k list with
// ballots (ix::moba_beats order). The merge is the CUDA-core part; the scoring, ~35 ms on FMA
// units at 32K / block 16 on the H100, is the part the tensor cores take.
template <typename T, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) moba_select_kernel(const MobaSelectParams p, const ix::MobaMma<T>* pooled) {
  using M = ix::MobaMma<T>;
  constexpr bool kSplitQ = ix::kMobaSplitQ<T>;
  constexpr int kThreads = kWarps * 32, kRowsPerCta = kWarps * ix::kMobaRowsPerWarp;
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int D = p.head_dim, Dp = ix::moba_dim_padded(D), top_k = p.top_k;
  const int hk = h / int(p.heads_q / p.heads_kv);
  const int blocks = ix::moba_blocks(p.seq_kv, p.block_size);
  const int64_t i0 = int64_t(blockIdx.x) * kRowsPerCta;
  const ix::MobaSmemLayout L = ix::moba_smem_layout(D, kSplitQ, kWarps);
  const int row_bytes = ix::moba_row_bytes(D);

  const T* const q = bhsd_ptr<T>(p.q, b, h);
  for (int idx = tid; idx < kRowsPerCta * Dp; idx += kThreads) {
    const int r = idx / Dp, d = idx % Dp;
    const float x = i0 + r < p.seq_q && d < D ? to_compute(q[(i0 + r) * p.q.seq_stride + d]) : 0.f;
    const auto split = ix::moba_split<M>(x);
    *reinterpret_cast<M*>(smem + L.q_hi + r * row_bytes + 2 * d) = split.hi;
    if constexpr (kSplitQ) *reinterpret_cast<M*>(smem + L.q_lo + r * row_bytes + 2 * d) = split.lo;
  }

  // The warp's rows: lane j < 16 sets up row j's range; every lane empties its list entries.
  float* const list_s = reinterpret_cast<float*>(smem + L.list_scores);
  int32_t* const list_i = reinterpret_cast<int32_t*>(smem + L.list_ids);
  int* const ranges = reinterpret_cast<int*>(smem + L.ranges);
  const int row0 = warp * ix::kMobaRowsPerWarp;
  int my_limit = 0;
  if (lane < ix::kMobaRowsPerWarp) {
    const int64_t i = i0 + row0 + lane;
    const ix::MobaRange range =
        i < p.seq_q ? ix::moba_range(i, p.seq_q, p.seq_kv, p.block_size, top_k, p.causal) : ix::MobaRange{0, -1, 0};
    ranges[ix::moba_range_index(row0 + lane, 0)] = range.limit;
    ranges[ix::moba_range_index(row0 + lane, 1)] = range.k;
    my_limit = range.k > 0 ? range.limit : 0;
  }
  // blocks [0, warp_limit) hold a candidate of some row of the warp
  const int warp_limit = int(__reduce_max_sync(kFullMask, unsigned(my_limit)));
  for (int j = 0; j < ix::kMobaRowsPerWarp; ++j) {
    list_s[ix::moba_list_index(row0 + j, lane)] = ix::neg_inf();
    list_i[ix::moba_list_index(row0 + j, lane)] = ix::kMobaEmptyId;
  }
  __syncwarp();
  // The CTA's last token has the widest range (monotone in i).
  const int64_t last = min(i0 + kRowsPerCta, p.seq_q) - 1;
  const int cta_limit = ix::moba_range(last, p.seq_q, p.seq_kv, p.block_size, top_k, p.causal).limit;
  const M* const pooled_bh = pooled + ix::moba_pooled_row(b, hk, 0, 0, p.heads_kv, blocks, D);
  const int64_t part_stride = int64_t(blocks) * Dp;  // hi rows -> lo rows
  float* const tile = reinterpret_cast<float*>(smem + L.scores) + warp * ix::kMobaRowsPerWarp * ix::kMobaScoreStride;

  const auto load_stage = [&](int slot, int chunk) {
    const int c0 = chunk * ix::kMobaChunk;
    unsigned char* const stage = smem + L.stages + slot * L.stage_bytes;
    for (int id = tid; id < ix::moba_stage_copies(D); id += kThreads) {
      const ix::MobaCopy c = ix::moba_copy(id, D);
      const bool ok = c0 + c.row < blocks;
      const M* const src = ok ? pooled_bh + c.part * part_stride + int64_t(c0 + c.row) * Dp + 8 * c.chunk : pooled;
      cp_async_16_zfill(stage + ix::moba_smem_offset(c.part * ix::kMobaChunk + c.row, c.chunk, D), src, ok);
    }
  };
  const auto merge_chunk = [&](int slot, int chunk) {
    const int c0 = chunk * ix::kMobaChunk;
    if (c0 >= warp_limit) return;  // warp-uniform: no row of the warp has a candidate left
    const unsigned char* const stage = smem + L.stages + slot * L.stage_bytes;
    float acc[ix::kMobaChunk / 8][4];
    zero_accumulators(acc);
    const int a_row = warp * ix::kMobaRowsPerWarp + ix::ldsm_a_row(lane);
    for (int ks = 0; ks < Dp / 16; ++ks) {
      uint32_t a[4], b_hi[ix::kMobaChunk / 8][2], b_lo[ix::kMobaChunk / 8][2];
      ldmatrix_x4(a, smem + L.q_hi + ix::moba_smem_offset(a_row, ix::ldsm_a_chunk(ks, lane), D));
#pragma unroll
      for (int nj = 0; nj < ix::kMobaChunk / 16; ++nj) {
        const int b_row = 16 * nj + ix::ldsm_b_row(lane), b_chunk = ix::ldsm_b_chunk(ks, lane);
        ldmatrix_x4_b_pair(b_hi[2 * nj], b_hi[2 * nj + 1], stage + ix::moba_smem_offset(b_row, b_chunk, D));
        ldmatrix_x4_b_pair(b_lo[2 * nj], b_lo[2 * nj + 1],
                           stage + ix::moba_smem_offset(ix::kMobaChunk + b_row, b_chunk, D));
      }
#pragma unroll
      for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt) {
        mma_m16n8k16<M>(acc[nt], a, b_hi[nt]);
        mma_m16n8k16<M>(acc[nt], a, b_lo[nt]);
      }
      if constexpr (kSplitQ) {
        ldmatrix_x4(a, smem + L.q_lo + ix::moba_smem_offset(a_row, ix::ldsm_a_chunk(ks, lane), D));
#pragma unroll
        for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt) mma_m16n8k16<M>(acc[nt], a, b_hi[nt]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt)
#pragma unroll
      for (int e = 0; e < 4; e += 2)
        *reinterpret_cast<float2*>(tile + ix::moba_score_index(ix::acc_row(lane, e), 8 * nt + ix::acc_col(lane, e))) =
            make_float2(acc[nt][e], acc[nt][e + 1]);
    __syncwarp();
#pragma unroll 1  // one copy of the merge (the instruction cache), the row's list from shared memory
    for (int j = 0; j < ix::kMobaRowsPerWarp; ++j) {
      const int limit = ranges[ix::moba_range_index(row0 + j, 0)], K = ranges[ix::moba_range_index(row0 + j, 1)];
      if (K == 0 || c0 >= limit) continue;  // warp-uniform
      const int blk = c0 + lane;
      const bool eligible = blk < limit;
      const float score = eligible ? tile[ix::moba_score_index(j, lane)] : ix::neg_inf();
      float es = list_s[ix::moba_list_index(row0 + j, lane)];
      int32_t ei = list_i[ix::moba_list_index(row0 + j, lane)];
      const float kth_s = __shfl_sync(kFullMask, es, K - 1);
      const int32_t kth_i = __shfl_sync(kFullMask, ei, K - 1);
      unsigned cand = __ballot_sync(kFullMask, eligible && ix::moba_beats(score, blk, kth_s, kth_i));
      if (cand == 0u) continue;  // warp-uniform: the list stands
      if (__popc(cand) > ix::kMobaBatchMerge) {  // warp-uniform
        const bool mine = (cand >> lane) & 1u;
        float cs = mine ? score : ix::neg_inf();
        int32_t ci = mine ? blk : ix::kMobaEmptyId;
#pragma unroll
        for (int size = 2; size <= 32; size *= 2)
#pragma unroll
          for (int stride = size / 2; stride > 0; stride /= 2) moba_exchange(cs, ci, lane, size, stride);
        const float rs = __shfl_sync(kFullMask, cs, 31 - lane);
        const int32_t ri = __shfl_sync(kFullMask, ci, 31 - lane);
        if (ix::moba_beats(rs, ri, es, ei)) {
          es = rs;
          ei = ri;
        }
#pragma unroll
        for (int stride = 16; stride > 0; stride /= 2) moba_exchange(es, ei, lane, 32, stride);
        cand = 0;
      }
      while (cand != 0) {
        const int src = __ffs(cand) - 1;
        cand &= cand - 1;
        const float cs = __shfl_sync(kFullMask, score, src);
        const int32_t ci = __shfl_sync(kFullMask, blk, src);
        const int pos = __popc(__ballot_sync(kFullMask, lane < K && ix::moba_beats(es, ei, cs, ci)));
        const float up_s = __shfl_up_sync(kFullMask, es, 1);
        const int32_t up_i = __shfl_up_sync(kFullMask, ei, 1);
        if (pos < K && lane < K) {
          const int how = ix::moba_insert_source(lane, pos);
          if (how == 1) {
            es = cs;
            ei = ci;
          } else if (how == 2) {
            es = up_s;
            ei = up_i;
          }
        }
      }
      list_s[ix::moba_list_index(row0 + j, lane)] = es;
      list_i[ix::moba_list_index(row0 + j, lane)] = ei;
    }
    __syncwarp();  // the tile is read before the next chunk overwrites it
  };
  __syncthreads();  // the query rows are staged (the pipeline's first barrier comes after its loads)
  cp_async_pipeline<ix::kMobaStages>(0, int(ix::ceil_div(cta_limit, ix::kMobaChunk)), load_stage, merge_chunk);

  // Output: selected ids in increasing order, the forced block after them, -1 padding.
#pragma unroll 1
  for (int j = 0; j < ix::kMobaRowsPerWarp; ++j) {
    const int64_t i = i0 + row0 + j;
    if (i >= p.seq_q) continue;  // warp-uniform
    const int forced = ix::moba_range(i, p.seq_q, p.seq_kv, p.block_size, top_k, p.causal).forced;
    const int K = ranges[ix::moba_range_index(row0 + j, 1)];
    const int32_t id = lane < K ? list_i[ix::moba_list_index(row0 + j, lane)] : ix::kMobaEmptyId;
    const bool valid = id != ix::kMobaEmptyId;
    int rank = 0;
    for (int l = 0; l < 32; ++l) rank += __shfl_sync(kFullMask, id, l) < id ? 1 : 0;
    const int n_sel = __popc(__ballot_sync(kFullMask, valid));
    int32_t* const out = p.selected + ((b * p.heads_q + h) * p.seq_q + i) * top_k;
    if (valid) out[ix::moba_output_slot(rank)] = id;
    const int n_total = n_sel + (forced >= 0 ? 1 : 0);
    if (lane == 0 && forced >= 0) out[n_sel] = forced;
    for (int slot = n_total + lane; slot < top_k; slot += 32) out[slot] = -1;
  }
}

// =============================================================================================
// moba_block_lists
// =============================================================================================

// A CTA per (query block, head, batch): its rows' choices into a bitmask over key blocks, then the
// set bits in ascending order (ix::list_* : each thread's run of words, a scan of their counts).
__global__ void __launch_bounds__(ix::kListThreads) moba_block_lists_kernel(const attention::MobaBlockListsParams p) {
  extern __shared__ uint32_t words[];  // [list_mask_words], then the scan's words
  const int nwords = ix::list_mask_words(p.num_kv_blocks);
  uint32_t* const scan = words + nwords;
  const int tid = threadIdx.x;
  const int64_t nq = ix::ceil_div(p.seq_q, p.block_q);
  const int64_t list = (int64_t(blockIdx.z) * p.heads + blockIdx.y) * nq + blockIdx.x;
  for (int w = tid; w < nwords; w += ix::kListThreads) words[w] = 0u;
  __syncthreads();
  const int64_t row0 = int64_t(blockIdx.x) * p.block_q;
  const int64_t entries = min(int64_t(p.block_q), p.seq_q - row0) * p.top_k;
  const int32_t* const choices = p.token_blocks + ((int64_t(blockIdx.z) * p.heads + blockIdx.y) * p.seq_q + row0) * p.top_k;
  for (int64_t i = tid; i < entries; i += ix::kListThreads) {
    const int32_t id = __ldg(choices + i);
    if (id >= 0 && id < p.num_kv_blocks) atomicOr(&words[id / 32], 1u << (id % 32));
  }
  __syncthreads();
  const int per = ix::list_words_per_thread(p.num_kv_blocks);
  const int w0 = min(tid * per, nwords), w1 = min(w0 + per, nwords);
  int32_t* const dst = p.indices + list * p.max_blocks;
  // The chosen ids (set bits) first, then the others (clear bits below num_kv_blocks), each in
  // ascending order, as the CPU kernel and the tensor ops leave them; slots past max_blocks are
  // not written.
  uint32_t ones = 0, zeros = 0;
  for (int w = w0; w < w1; ++w) {
    ones += __popc(words[w]);
    zeros += __popc(~words[w] & ix::list_word_valid_bits(w, p.num_kv_blocks));
  }
  uint32_t total = 0, zeros_total = 0;
  const uint32_t ones_through = block_inclusive_scan<ix::kListThreads>(ones, scan, total);
  const uint32_t zeros_through = block_inclusive_scan<ix::kListThreads>(zeros, scan, zeros_total);
  int64_t slot = ones_through - ones;
  for (int w = w0; w < w1; ++w)
    for (uint32_t bits = words[w]; bits != 0u; bits &= bits - 1u, ++slot)
      if (slot < p.max_blocks) dst[slot] = 32 * w + __ffs(int(bits)) - 1;
  slot = int64_t(total) + zeros_through - zeros;
  for (int w = w0; w < w1 && slot < p.max_blocks; ++w)
    for (uint32_t bits = ~words[w] & ix::list_word_valid_bits(w, p.num_kv_blocks); bits != 0u; bits &= bits - 1u, ++slot)
      if (slot < p.max_blocks) dst[slot] = 32 * w + __ffs(int(bits)) - 1;
  if (tid == 0) p.counts[list] = int32_t(min(int64_t(total), int64_t(p.max_blocks)));
}

// =============================================================================================
// Launchers
// =============================================================================================


// Shape and layout rules of the attention kernels (see the file comment).
cudaError_t check_forward(const BlockSparseForwardParams& p) {
  if (p.dtype != ScalarKind::kFloat16 && p.dtype != ScalarKind::kBFloat16) return cudaErrorInvalidValue;
  if (p.head_dim != 64 && p.head_dim != 128) return cudaErrorInvalidValue;
  if (p.block_q != 64 && p.block_q != 128) return cudaErrorInvalidValue;
  if (p.block_kv != 16 && p.block_kv != 32 && p.block_kv != 64 && p.block_kv != 128) return cudaErrorInvalidValue;
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0) return cudaErrorInvalidValue;
  if (p.seq_q < 0 || p.seq_kv < 0 || p.seq_q > kMaxSeq || p.seq_kv > kMaxSeq) return cudaErrorInvalidValue;
  if (p.batch > kMaxGridYZ || p.heads_q > kMaxGridYZ) return cudaErrorInvalidValue;
  if (p.blocks.max_blocks < 0) return cudaErrorInvalidValue;
  if (p.selection.blocks != nullptr && (p.selection.top_k < 0 || p.selection.top_k > ix::kMaxSelectionTopK))
    return cudaErrorInvalidValue;
  if (!bhsd_ok(p.q) || !bhsd_ok(p.k) || !bhsd_ok(p.v) || !bhsd_ok(p.out)) return cudaErrorInvalidValue;
  return cudaSuccess;
}

template <typename T, int kD, int kBlockQ>
cudaError_t launch_forward(const BlockSparseForwardParams& p, cudaStream_t stream) {
  using Tr = RowTraits<kD, kBlockQ, false>;
  const int smem = Tr::smem_bytes(p.selection.blocks != nullptr ? p.selection.top_k : 0);
  const auto kernel = fwd_kernel<T, kD, kBlockQ>;
  const cudaError_t status = allow_dynamic_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.seq_q, kBlockQ)), unsigned(p.heads_q), unsigned(p.batch));
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD, int kBlockQ>
cudaError_t launch_dq(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  using Tr = RowTraits<kD, kBlockQ, true>;
  const int smem = Tr::smem_bytes(p.forward.selection.blocks != nullptr ? p.forward.selection.top_k : 0);
  const auto kernel = bwd_dq_kernel<T, kD, kBlockQ>;
  const cudaError_t status = allow_dynamic_smem(kernel, smem);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.forward.seq_q, kBlockQ)), unsigned(p.forward.heads_q),
                  unsigned(p.forward.batch));
  kernel<<<grid, Tr::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD, int kBlockKv>
cudaError_t launch_dkdv(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  using Tr = DkdvTraits<kD, kBlockKv>;
  const auto kernel = bwd_dkdv_kernel<T, kD, kBlockKv>;
  const cudaError_t status = allow_dynamic_smem(kernel, Tr::kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.forward.seq_kv, kBlockKv)), unsigned(p.forward.heads_kv),
                  unsigned(p.forward.batch));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_delta(const BlockSparseBackwardParams& p, cudaStream_t stream) {
  const int64_t rows = p.forward.batch * p.forward.heads_q * p.forward.seq_q;
  const int64_t per_cta = 256 / (kD / ix::kChunkElems);
  if (rows == 0) return cudaSuccess;
  if (ix::ceil_div(rows, per_cta) > kMaxGridX) return cudaErrorInvalidValue;
  bwd_delta_kernel<T, kD><<<unsigned(ix::ceil_div(rows, per_cta)), 256, 0, stream>>>(p);
  return cudaGetLastError();
}

// Calls fn.template operator()<T, D>() for the (validated) dtype and head dim.
template <typename Fn>
cudaError_t dispatch_type_dim(ScalarKind dtype, int head_dim, Fn&& fn) {
  if (dtype == ScalarKind::kFloat16) {
    return head_dim == 64 ? fn.template operator()<Half, 64>() : fn.template operator()<Half, 128>();
  }
  return head_dim == 64 ? fn.template operator()<BFloat16, 64>() : fn.template operator()<BFloat16, 128>();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

cudaError_t block_sparse_attention_forward(const attention::BlockSparseForwardParams& p, cudaStream_t stream) {
  cudaError_t status = check_forward(p);
  if (status != cudaSuccess) return status;
  if (p.batch == 0 || p.heads_q == 0 || p.seq_q == 0) return cudaSuccess;
  if (ix::ceil_div(p.seq_q, p.block_q) > kMaxGridX) return cudaErrorInvalidValue;
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  // The Hopper forward (attention/block_sparse_attention_wgmma.cu): opt-in until it has run on a
  // GPU (written and simulated without one).
  if (hopper_kernel_enabled("TORCH_EXT_ATTENTION_WGMMA", false)) return block_sparse_attention_forward_sm90(p, stream);
#endif
  return dispatch_type_dim(p.dtype, p.head_dim, [&]<typename T, int kD>() {
    return p.block_q == 64 ? launch_forward<T, kD, 64>(p, stream) : launch_forward<T, kD, 128>(p, stream);
  });
}

cudaError_t block_sparse_attention_backward(const attention::BlockSparseBackwardParams& p, cudaStream_t stream) {
  const BlockSparseForwardParams& f = p.forward;
  cudaError_t status = check_forward(f);
  if (status != cudaSuccess) return status;
  if (!bhsd_ok(p.grad_out) || !bhsd_ok(p.grad_q) || !bhsd_ok(p.grad_k) || !bhsd_ok(p.grad_v))
    return cudaErrorInvalidValue;
  if (f.heads_kv > kMaxGridYZ || p.transposed.max_blocks < 0) return cudaErrorInvalidValue;
  if (f.batch == 0 || f.heads_q == 0) return cudaSuccess;
  // The Hopper backward (attention/block_sparse_attention_wgmma_bwd.cu): opt-in until it has run on
  // a GPU (written and simulated without one).
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  const bool hopper = hopper_kernel_enabled("TORCH_EXT_ATTENTION_WGMMA_BWD", false);
#endif
  return dispatch_type_dim(f.dtype, f.head_dim, [&]<typename T, int kD>() -> cudaError_t {
    cudaError_t s = cudaSuccess;
    if (f.seq_q > 0) {
      s = launch_delta<T, kD>(p, stream);
      if (s != cudaSuccess) return s;
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
      if (hopper) {
        s = block_sparse_attention_dq_sm90(p, stream);
      } else
#endif
      {
        s = f.block_q == 64 ? launch_dq<T, kD, 64>(p, stream) : launch_dq<T, kD, 128>(p, stream);
      }
      if (s != cudaSuccess) return s;
    }
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
    if (f.seq_kv > 0 && hopper && block_sparse_attention_dkdv_sm90_supports(f.block_kv))
      return block_sparse_attention_dkdv_sm90(p, stream);
#endif
    if (f.seq_kv > 0) {
      switch (f.block_kv) {
        case 16: s = launch_dkdv<T, kD, 16>(p, stream); break;
        case 32: s = launch_dkdv<T, kD, 32>(p, stream); break;
        case 64: s = launch_dkdv<T, kD, 64>(p, stream); break;
        default: s = launch_dkdv<T, kD, 128>(p, stream); break;
      }
    }
    return s;
  });
}

cudaError_t block_sparse_attention_delta(const attention::BlockSparseBackwardParams& p, cudaStream_t stream) {
  const cudaError_t status = check_forward(p.forward);
  if (status != cudaSuccess) return status;
  if (!bhsd_ok(p.grad_out) || p.delta == nullptr) return cudaErrorInvalidValue;
  return dispatch_type_dim(p.forward.dtype, p.forward.head_dim,
                           [&]<typename T, int kD>() { return launch_delta<T, kD>(p, stream); });
}

cudaError_t moba_block_lists(const attention::MobaBlockListsParams& p, cudaStream_t stream) {
  if (p.batch < 0 || p.heads < 0 || p.seq_q < 0 || p.top_k < 0 || p.num_kv_blocks < 0 || p.block_q <= 0 ||
      p.max_blocks < 0 || p.batch > kMaxGridYZ || p.heads > kMaxGridYZ ||
      ix::ceil_div(p.seq_q, p.block_q) > kMaxGridX || ix::list_smem_bytes(p.num_kv_blocks) > ix::kMaxListSmemBytes) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.heads == 0 || p.seq_q == 0) return cudaSuccess;
  const dim3 grid(unsigned(ix::ceil_div(p.seq_q, p.block_q)), unsigned(p.heads), unsigned(p.batch));
  moba_block_lists_kernel<<<grid, ix::kListThreads, size_t(ix::list_smem_bytes(p.num_kv_blocks)), stream>>>(p);
  return cudaGetLastError();
}

int64_t moba_select_workspace_bytes(const attention::MobaSelectParams& p) {
  if (p.block_size <= 0 || p.seq_kv <= 0) return 0;
  // hi and lo rows of 16-bit elements (ix::moba_pooled_row)
  return p.batch * p.heads_kv * 2 * int64_t(ix::moba_blocks(p.seq_kv, p.block_size)) *
         ix::moba_dim_padded(p.head_dim) * 2;
}

cudaError_t moba_select(const attention::MobaSelectParams& p, void* workspace, cudaStream_t stream) {
  if (p.batch < 0 || p.heads_q < 0 || p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.seq_q < 0 ||
      p.seq_kv < 0 || p.seq_q > kMaxSeq || p.seq_kv > kMaxSeq || p.block_size <= 0 || p.top_k < 0 ||
      p.top_k > ix::kMaxMobaTopK || p.head_dim <= 0 || p.head_dim > 256 || p.batch > kMaxGridYZ ||
      p.heads_q > kMaxGridYZ || ix::ceil_div(p.seq_kv, p.block_size) > kMaxGridX) {
    return cudaErrorInvalidValue;
  }
  if (p.batch == 0 || p.heads_q == 0 || p.seq_q == 0 || p.top_k == 0) return cudaSuccess;
  const int blocks = ix::moba_blocks(p.seq_kv, p.block_size);
  if (blocks > 0 && workspace == nullptr) return cudaErrorInvalidValue;
  int device = 0, max_shared_per_block = 0;
  cudaError_t status = cudaGetDevice(&device);
  if (status == cudaSuccess)
    status = cudaDeviceGetAttribute(&max_shared_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (status != cudaSuccess) return status;
  status = cudaErrorInvalidValue;
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      auto* const pooled = static_cast<ix::MobaMma<T>*>(workspace);
      if (blocks > 0) {
        moba_pool_kernel<T><<<dim3(unsigned(blocks), unsigned(p.heads_kv), unsigned(p.batch)), ix::kPoolThreads, 0,
                              stream>>>(p, pooled);
        status = cudaGetLastError();
        if (status != cudaSuccess) return;
      }
      const auto launch = [&](auto warps_tag) {
        constexpr int kWarps = decltype(warps_tag)::value;
        const auto kernel = moba_select_kernel<T, kWarps>;
        const int smem = ix::moba_smem_layout(p.head_dim, ix::kMobaSplitQ<T>, kWarps).total;
        status = allow_dynamic_smem(kernel, smem);
        if (status != cudaSuccess) return;
        const dim3 grid(unsigned(ix::ceil_div(p.seq_q, kWarps * ix::kMobaRowsPerWarp)), unsigned(p.heads_q),
                        unsigned(p.batch));
        kernel<<<grid, kWarps * 32, smem, stream>>>(p, pooled);
        status = cudaGetLastError();
      };
      const int warps = ix::moba_warps_for(p.head_dim, ix::kMobaSplitQ<T>, max_shared_per_block);
      if (warps == 4) {
        launch(std::integral_constant<int, 4>{});
      } else if (warps == 2) {
        launch(std::integral_constant<int, 2>{});
      } else if (warps == 1) {
        launch(std::integral_constant<int, 1>{});
      } else {
        status = cudaErrorNotSupported;
      }
    }
  });
  return status;
}

}  // namespace torch_ext::cuda
