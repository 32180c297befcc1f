// Device code shared by the kernels of block-sparse attention on mma.sync
// (attention/block_sparse_attention_cuda.cu) and on wgmma (attention/block_sparse_attention_wgmma.cu,
// the forward; attention/block_sparse_attention_wgmma_bwd.cu, dQ and dK / dV): kernel traits, tile
// loads (in the layout their reader wants: ldmatrix's swizzle or wgmma's), mma helpers, the
// query-block walk of the forward / dQ kernels with its masks and MoBA table, the key-block walk
// of the dK / dV kernels, the epilogue stores. Index math lives in
// attention/block_sparse_attention_cuda_index.h. No torch headers.
#pragma once

#include <type_traits>

#include "attention/block_sparse_attention_cuda.h"
#include "attention/block_sparse_attention_cuda_index.h"
#include "common/cuda/cp_async.cuh"
#include "common/cuda/mma.cuh"
#include "common/cuda/vec.cuh"

namespace torch_ext::cuda {
namespace {


namespace ix = ::torch_ext::attention::bsa_cuda;
using attention::BlockSparseBackwardParams;
using attention::BlockSparseForwardParams;
using attention::MobaSelectParams;

constexpr unsigned kFullMask = 0xffffffffu;

// =============================================================================================
// Kernel traits
// =============================================================================================

// RowTraits (forward, dQ) and DkdvTraits (dK / dV): attention/block_sparse_attention_cuda_index.h
// section 9, shared with the simulator.
using ix::DkdvTraits;
using ix::RowTraits;

// =============================================================================================
// Small device helpers
// =============================================================================================

// Host: lets `kernel` take `bytes` of dynamic shared memory (above the 48 KB every launch gets, it
// has to opt in).
template <typename Kernel>
inline cudaError_t allow_dynamic_smem(Kernel kernel, int bytes) {
  constexpr int kDefaultSharedBytes = 48 * 1024;
  if (bytes <= kDefaultSharedBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
}

// Host: whether a [B, H, S, D] tensor takes the kernels' 16-byte cp.async loads and stores
// (ix::bhsd_vectorizable).
template <class Tensor>
inline bool bhsd_ok(const Tensor& t) {
  return ix::bhsd_vectorizable(reinterpret_cast<uintptr_t>(t.data), t.batch_stride, t.head_stride, t.seq_stride);
}

template <typename T>
__device__ __forceinline__ const T* bhsd_ptr(const attention::Bhsd& t, int64_t b, int64_t h) {
  return static_cast<const T*>(t.data) + b * t.batch_stride + h * t.head_stride;
}
template <typename T>
__device__ __forceinline__ T* bhsd_ptr(const attention::MutableBhsd& t, int64_t b, int64_t h) {
  return static_cast<T*>(t.data) + b * t.batch_stride + h * t.head_stride;
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(kFullMask, x, 1));
  return fmaxf(x, __shfl_xor_sync(kFullMask, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(kFullMask, x, 1);
  return x + __shfl_xor_sync(kFullMask, x, 2);
}

// Where chunk c of tile row r goes in shared memory: ldmatrix's layout (the mma.sync kernels) or
// wgmma's for a tile of kRows rows (the Hopper forward; ix section 10).
template <int kD>
struct LdsmLayout {
  static __device__ __forceinline__ int offset(int r, int c) { return ix::smem_offset(r, c, kD); }
};
template <int kRows>
struct WgmmaLayout {
  static __device__ __forceinline__ int offset(int r, int c) { return ix::wgmma_tile_offset<kRows>(r, c); }
};

// Copies rows [0, rows) of a [rows][D] tile starting at sequence position pos0 (zero rows at or
// past seq) into shared memory (swizzled): copy i of thread tid (ix::copy_row / copy_chunk).
template <typename T, int kD, int kThreads, int kCopies, class Layout = LdsmLayout<kD>>
__device__ __forceinline__ void load_rows(unsigned char* dst, const T* src, int64_t seq_stride, int pos0, int seq,
                                          int tid) {
#pragma unroll
  for (int i = 0; i < kCopies; ++i) {
    const int r = ix::copy_row(tid, i, kThreads, kD), c = ix::copy_chunk(tid, i, kThreads, kD);
    const int pos = pos0 + r;
    const bool ok = pos < seq;
    cp_async_16_zfill(dst + Layout::offset(r, c), ok ? src + int64_t(pos) * seq_stride + c * ix::kChunkElems : src, ok);
  }
}

// d0, d1 += a x the B fragments of two adjacent n8 tiles, one ldmatrix.x4 at smem_row: rows n of an
// [n][k] shared tile or, kTrans, rows k of a [k][n] tile (ldmatrix_x4_b_pair).
template <typename T, bool kTrans>
__device__ __forceinline__ void mma_n16(float (&d0)[4], float (&d1)[4], const uint32_t (&a)[4],
                                        const unsigned char* smem_row) {
  uint32_t lo[2], hi[2];
  ldmatrix_x4_b_pair<kTrans>(lo, hi, smem_row);
  mma_m16n8k16<T>(d0, a, lo);
  mma_m16n8k16<T>(d1, a, hi);
}

// The A fragment of k16 step kk of a 16 x (8 kN) product held in accumulators (P, dS, their
// transposes), rounded to T: the accumulator -> A reuse map ix::c2a_*.
template <typename T, int kN>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[4], const float (&acc)[kN][4], int kk) {
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int j = ix::c2a_tile(kk, r);
    a[r] = pack_pair<T>(acc[j][ix::c2a_elem(r, 0)], acc[j][ix::c2a_elem(r, 1)]);
  }
}

// S += A (16 x D from registers or shared) x B^T where B is a [64][D] shared tile (K or V): the
// 8 n8 tiles of a 64-key step.
template <typename T, int kD>
__device__ __forceinline__ void mma_rows_x_tile(float (&s)[8][4], const uint32_t (&a)[4], const unsigned char* tile,
                                                int k16, int lane, unsigned live) {
#pragma unroll
  for (int nj = 0; nj < 4; ++nj)
    if ((live >> nj) & 1u)  // warp-uniform (StepMask::live)
      mma_n16<T, false>(s[2 * nj], s[2 * nj + 1], a,
                        tile + ix::smem_offset(16 * nj + ix::ldsm_b_row(lane), ix::ldsm_b_chunk(k16, lane), kD));
}

// acc (16 x D) += P (16 x 64, the accumulators of S rounded to T) x tile, tile a [64][D] shared
// tile read transposed (V in P V, K in dS K).
template <typename T, int kD>
__device__ __forceinline__ void mma_p_x_tile(float (&acc)[kD / 8][4], const float (&p)[8][4], const unsigned char* tile,
                                             int lane, unsigned live) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    if (!((live >> kk) & 1u)) continue;  // P is 0 on this slice (warp-uniform)
    uint32_t a[4];
    acc_to_a<T>(a, p, kk);
#pragma unroll
    for (int nj = 0; nj < kD / 16; ++nj)
      mma_n16<T, true>(acc[2 * nj], acc[2 * nj + 1], a,
                       tile + ix::smem_offset(16 * kk + ix::ldsm_bt_row(lane), ix::ldsm_bt_chunk(nj, lane), kD));
  }
}

// The warp's 16 x D accumulators, times row_scale[e / 2], rounded to T into its own 16 rows of the
// shared tile at `stage` (free once the warp stopped reading them), then 16-byte stores of each
// row r (< 16) to row_dst(r) (nullptr: not stored). No CTA barrier: only this warp touches these
// rows.
template <typename T, int kD, class RowDst>
__device__ __forceinline__ void store_warp_rows_to(const float (&acc)[kD / 8][4], const float (&row_scale)[2],
                                                   unsigned char* stage, int warp_row0, int lane, RowDst&& row_dst) {
  __syncwarp();
#pragma unroll
  for (int j = 0; j < kD / 8; ++j)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row0 + ix::acc_row(lane, 2 * half), col = 8 * j + ix::acc_col(lane, 0);
      *reinterpret_cast<uint32_t*>(stage + ix::smem_elem_offset(row, col, kD)) =
          pack_pair<T>(acc[j][2 * half] * row_scale[half], acc[j][2 * half + 1] * row_scale[half]);
    }
  __syncwarp();
  constexpr int kChunks = kD / ix::kChunkElems;
#pragma unroll
  for (int i = 0; i < ix::kWarpRows * kChunks / 32; ++i) {
    const int r = ix::copy_row(lane, i, 32, kD), c = ix::copy_chunk(lane, i, 32, kD);
    T* const dst = row_dst(r);
    if (dst != nullptr) {
      const uint4 v = *reinterpret_cast<const uint4*>(stage + ix::smem_offset(warp_row0 + r, c, kD));
      *reinterpret_cast<uint4*>(dst + c * ix::kChunkElems) = v;
    }
  }
}
// The same into rows pos0 + warp_row0 + r (below `seq`) of a [seq][D] tensor.
template <typename T, int kD>
__device__ __forceinline__ void store_warp_rows(const float (&acc)[kD / 8][4], const float (&row_scale)[2],
                                                unsigned char* stage, int warp_row0, T* dst, int64_t seq_stride,
                                                int pos0, int seq, int lane) {
  store_warp_rows_to<T, kD>(acc, row_scale, stage, warp_row0, lane, [&](int r) -> T* {
    const int pos = pos0 + warp_row0 + r;
    return pos < seq ? dst + int64_t(pos) * seq_stride : nullptr;
  });
}

// =============================================================================================
// The query-block walk shared by the forward and dQ kernels
// =============================================================================================

// Where a CTA of the forward / dQ kernels stands: its lists and the K / V it reads.
template <typename T>
struct RowCta {
  const T* k;
  const T* v;
  int64_t k_stride, v_stride;
  const int32_t* list;  // the query block's listed key blocks
  int count;
  int tiles;
  int block_kv, seq_q, seq_kv;
};

// Step t's K and V (64 rows, segment by segment) into stage `st`, plus the segment table (with K).
// kK / kV: load only one of them (the Hopper forward runs K two steps ahead, V one).
template <typename T, class Tr, class Layout = LdsmLayout<Tr::kChunks * ix::kChunkElems>, bool kK = true, bool kV = true>
__device__ __forceinline__ void load_kv_step(unsigned char* smem, const RowCta<T>& c, int t, int st, int tid) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  unsigned char* const ks = smem + Tr::kStageOffset + st * Tr::kStageBytes;
  unsigned char* const vs = ks + Tr::kKvBytes;
#pragma unroll
  for (int i = 0; i < Tr::kKvCopies; ++i) {
    const int r = ix::copy_row(tid, i, Tr::kThreads, kD), ch = ix::copy_chunk(tid, i, Tr::kThreads, kD);
    const ix::Segment sg = ix::tile_segment(t, ix::row_segment(r, c.block_kv), c.block_kv);
    const int block = sg.slot < c.count ? __ldg(c.list + sg.slot) : -1;
    const int64_t base = ix::segment_base(block, sg.offset, c.block_kv, c.seq_kv);
    const int64_t pos = base + ix::row_in_segment(r, c.block_kv);
    const bool ok = base >= 0 && pos < c.seq_kv;
    const int off = Layout::offset(r, ch);
    if constexpr (kK) cp_async_16_zfill(ks + off, ok ? c.k + pos * c.k_stride + ch * ix::kChunkElems : c.k, ok);
    if constexpr (kV) cp_async_16_zfill(vs + off, ok ? c.v + pos * c.v_stride + ch * ix::kChunkElems : c.v, ok);
  }
  if constexpr (!kK) return;
  if (tid < ix::segments_per_tile(c.block_kv)) {
    const ix::Segment sg = ix::tile_segment(t, tid, c.block_kv);
    const int block = sg.slot < c.count ? __ldg(c.list + sg.slot) : -1;
    int* const seg = reinterpret_cast<int*>(smem + Tr::kSegOffset) + st * 2 * ix::kMaxSegments;
    seg[tid] = int(ix::segment_base(block, sg.offset, c.block_kv, c.seq_kv));
    seg[ix::kMaxSegments + tid] = block;
  }
}

// The smallest listed segment base of stage st's step (-1: none listed), from its segment table.
template <class Tr, typename T>
__device__ __forceinline__ int64_t step_first_key(const unsigned char* smem, const RowCta<T>& c, int st) {
  const int* const seg = reinterpret_cast<const int*>(smem + Tr::kSegOffset) + st * 2 * ix::kMaxSegments;
  int64_t first_key = -1;
  for (int s = 0; s < ix::segments_per_tile(c.block_kv); ++s)
    if (seg[s] >= 0 && (first_key < 0 || seg[s] < first_key)) first_key = seg[s];
  return first_key;
}

// Per-lane mask state of one step: whether any element needs the predicate, and for the lane's two
// rows the segments their MoBA choices allow.
struct StepMask {
  bool full;
  bool hidden;    // no row of the warp sees any key of the step (warp-uniform): the warp skips it
  unsigned live;  // warp-uniform: the 16-key slices with a key some row of the warp may see
  ix::StepSegments seg;
  unsigned allowed[2];  // bit s: segment s is among the row's choices (all bits without selection)
};
template <class Tr, typename T>
__device__ __forceinline__ StepMask make_step_mask(const unsigned char* smem, const RowCta<T>& c, int st,
                                                   int first_q, int warp_row0, int lane, bool causal, int top_k,
                                                   bool selection) {
  StepMask m;
  const int* const seg = reinterpret_cast<const int*>(smem + Tr::kSegOffset) + st * 2 * ix::kMaxSegments;
  const int nseg = ix::segments_per_tile(c.block_kv), seg_len = ix::segment_len(c.block_kv);
  bool all_full = true;
  int64_t last_key = -1, first_key = -1;
  unsigned live_segments = 0;
#pragma unroll
  for (int s = 0; s < ix::kMaxSegments; ++s) {
    m.seg.base[s] = s < nseg ? seg[s] : -1;
    if (s < nseg && m.seg.base[s] >= 0) live_segments |= 1u << s;
    if (s < nseg) {
      all_full = all_full && m.seg.base[s] >= 0 && m.seg.base[s] + seg_len <= c.seq_kv;
      last_key = max(last_key, int64_t(m.seg.base[s]) + seg_len - 1);
      if (m.seg.base[s] >= 0 && (first_key < 0 || m.seg.base[s] < first_key)) first_key = m.seg.base[s];
    }
  }
  m.full = ix::tile_fully_visible(first_q, last_key, all_full, selection, c.seq_q, c.seq_kv, causal);
  m.hidden = ix::step_hidden_from_rows(first_key, first_q, c.seq_q, c.seq_kv, causal);
  m.allowed[0] = m.allowed[1] = 0xfu;
  if (selection) {
    const int32_t* const table = reinterpret_cast<const int32_t*>(smem + Tr::kSelOffset);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = warp_row0 + ix::acc_row(lane, 2 * half);
      unsigned bits = 0;
#pragma unroll 1  // a rolled loop: the binary searches unrolled 8 times cost the dQ kernel spills
      for (int s = 0; s < nseg; ++s)
        if (ix::sorted_choices_hold(table + row * ix::selection_row_stride(top_k), top_k, seg[ix::kMaxSegments + s]))
          bits |= 1u << s;
      m.allowed[half] = bits;
    }
    live_segments &= __reduce_or_sync(kFullMask, m.allowed[0] | m.allowed[1]);
  }
  m.live = ix::live_slices(live_segments, c.block_kv);
  m.hidden = m.hidden || m.live == 0u;
  return m;
}

// f(std::false_type) for a step without masked elements, else f(std::true_type): two unrolled
// copies, so that the common case has no per-element branch.
template <typename F>
__device__ __forceinline__ void with_step_masking(const StepMask& m, F&& f) {
  if (m.full) {
    f(std::false_type{});
  } else {
    f(std::true_type{});
  }
}

// Whether element e of n8 tile j of the step is visible to the lane's row.
template <typename T>
__device__ __forceinline__ bool element_visible(const StepMask& m, const RowCta<T>& c, int j, int e, int q_pos,
                                                bool causal, int lane) {
  return ix::step_element_visible(m.seg, m.allowed[e / 2], 8 * j + ix::acc_col(lane, e), c.block_kv, q_pos, c.seq_q,
                                  c.seq_kv, causal);
}

// One step of the forward's online softmax on the lane's S accumulators (any producer with the
// mma.m16n8 C layout per warp: mma.sync or wgmma): scale to the log2 domain, mask, row max over
// the quad, rescale of the running state, then P = 2^(x - m) in place and its row sums. Returns
// the factors alpha[half] that O's rows take (rescale_rows), which the caller may apply later
// (the Hopper forward, once the previous step's P V has completed).
template <class Tr, typename T>
__device__ __forceinline__ void softmax_probs_step(float (&s)[Tr::kSN][4], float (&alpha)[2], ix::RowState (&rs)[2],
                                                   const StepMask& m, const RowCta<T>& c, const int (&q_pos)[2],
                                                   bool causal, float scale_log2, int lane) {
  float tile_max[2] = {ix::neg_inf(), ix::neg_inf()};
  with_step_masking(m, [&](auto masked) {
#pragma unroll
    for (int j = 0; j < Tr::kSN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[j][e] * scale_log2;
        if constexpr (decltype(masked)::value) {
          if (!element_visible(m, c, j, e, q_pos[e / 2], causal, lane)) x = ix::neg_inf();
        }
        s[j][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
  });
#pragma unroll
  for (int half = 0; half < 2; ++half) alpha[half] = ix::softmax_rescale(rs[half], quad_max(tile_max[half]));
#pragma unroll
  for (int j = 0; j < Tr::kSN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] = ix::softmax_prob(s[j][e], rs[e / 2]);
      rs[e / 2].l += s[j][e];
    }
}
template <int kN>
__device__ __forceinline__ void rescale_rows(float (&o)[kN][4], const float (&alpha)[2]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e / 2];
}
// softmax_probs_step with O rescaled at once.
template <class Tr, typename T>
__device__ __forceinline__ void online_softmax_step(float (&s)[Tr::kSN][4], float (&o)[Tr::kON][4],
                                                    ix::RowState (&rs)[2], const StepMask& m, const RowCta<T>& c,
                                                    const int (&q_pos)[2], bool causal, float scale_log2, int lane) {
  float alpha[2];
  softmax_probs_step<Tr>(s, alpha, rs, m, c, q_pos, causal, scale_log2, lane);
  rescale_rows(o, alpha);
}

// The forward's epilogue: each row's lse (natural log; -inf for a row that saw no key) and O / l
// through the warp's own rows of `stage` (store_warp_rows).
template <typename T, int kD>
__device__ __forceinline__ void store_forward_rows(const BlockSparseForwardParams& p, const float (&o)[kD / 8][4],
                                                   const ix::RowState (&rs)[2], unsigned char* stage,
                                                   const RowCta<T>& c, int64_t b, int h, int q0, int warp_row0,
                                                   const int (&q_pos)[2], int lane) {
  float inv[2];
  float* const lse = p.lse + (b * p.heads_q + h) * p.seq_q;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float l = quad_sum(rs[half].l);
    inv[half] = ix::softmax_out_scale(l);
    if (lane % 4 == 0 && q_pos[half] < c.seq_q) lse[q_pos[half]] = ix::softmax_lse(rs[half].m, l);
  }
  store_warp_rows<T, kD>(o, inv, stage, warp_row0, bhsd_ptr<T>(p.out, b, h), p.out.seq_stride, q0, c.seq_q, lane);
}

// Common prologue of the forward / dQ CTAs: their coordinates and lists.
template <typename T, class Tr>
__device__ __forceinline__ RowCta<T> row_cta_setup(const BlockSparseForwardParams& p, int qb, int64_t b, int h) {
  const int hk = h / int(p.heads_q / p.heads_kv);
  RowCta<T> c;
  c.k = bhsd_ptr<T>(p.k, b, hk);
  c.v = bhsd_ptr<T>(p.v, b, hk);
  c.k_stride = p.k.seq_stride;
  c.v_stride = p.v.seq_stride;
  c.list = p.blocks.indices + b * p.blocks.indices_batch_stride + h * p.blocks.indices_head_stride +
           int64_t(qb) * p.blocks.max_blocks;
  const int32_t* const counts = p.blocks.counts + b * p.blocks.counts_batch_stride + h * p.blocks.counts_head_stride;
  c.count = ix::list_count(__ldg(counts + qb), p.blocks.max_blocks);
  c.block_kv = p.block_kv;
  c.seq_q = int(p.seq_q);
  c.seq_kv = int(p.seq_kv);
  c.tiles = c.seq_kv > 0 ? ix::walk_tiles(c.count, c.block_kv) : 0;
  return c;
}

// The MoBA table of the CTA's rows (when the call has token choices), called once the first
// tiles' copies are in flight: thread r fills and sorts row r (ix::sort_choices: one pass over
// moba_select's sorted lists), rows selection_row_stride words apart; the kernels' first
// barrier comes before any lookup.
template <class Tr>
__device__ __forceinline__ void load_selection_table(const BlockSparseForwardParams& p, unsigned char* smem, int qb,
                                                     int64_t b, int h, int tid) {
  if (p.selection.blocks == nullptr) return;
  const int top_k = p.selection.top_k;
  const int32_t* const sel = p.selection.blocks + b * p.selection.batch_stride + h * p.selection.head_stride;
  const int q0 = qb * (Tr::kWarps * ix::kWarpRows);
  static_assert(Tr::kWarps * ix::kWarpRows <= Tr::kThreads, "a thread per row");
  if (tid < Tr::kWarps * ix::kWarpRows) {
    int32_t* const row = reinterpret_cast<int32_t*>(smem + Tr::kSelOffset) + tid * ix::selection_row_stride(top_k);
    const bool ok = q0 + tid < p.seq_q;
    for (int k = 0; k < top_k; ++k) row[k] = ok ? __ldg(sel + int64_t(q0 + tid) * p.selection.seq_stride + k) : -1;
    ix::sort_choices(row, top_k);
  }
}

// Where a CTA that walks a query block's key list (forward, dQ) works, and the call's flags:
// the grid's last query blocks run first (under causal masking they are the heaviest).
struct RowPlace {
  int tid, lane, warp;
  int qb, h;
  int64_t b;
  int q0, warp_row0;
  bool causal, selection;
  int top_k;
  float scale_log2;
};
template <int kBlockQ>
__device__ __forceinline__ RowPlace row_place(const BlockSparseForwardParams& p) {
  const int tid = threadIdx.x, warp = tid / 32, qb = int(gridDim.x - 1 - blockIdx.x);
  return RowPlace{tid, tid % 32, warp, qb, int(blockIdx.y), int64_t(blockIdx.z), qb * kBlockQ, warp * ix::kWarpRows,
                  p.causal, p.selection.blocks != nullptr, p.selection.top_k, p.scale * ix::kLog2e};
}

// The dQ kernels' P of a step in place of its scores: 2^(S scale log2 e - lse) where the lane's row
// sees the key, else 0 (lse2 = +inf for a row past Sq gives 0 too).
template <class Tr, typename T>
__device__ __forceinline__ void masked_probs(float (&s)[Tr::kSN][4], const StepMask& m, const RowCta<T>& c,
                                             const int (&q_pos)[2], const float (&lse2)[2], bool causal,
                                             float scale_log2, int lane) {
  with_step_masking(m, [&](auto masked) {
#pragma unroll
    for (int j = 0; j < Tr::kSN; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = ix::exp2_approx(s[j][e] * scale_log2 - lse2[e / 2]);
        if constexpr (decltype(masked)::value) {
          if (!element_visible(m, c, j, e, q_pos[e / 2], causal, lane)) prob = 0.f;
        }
        s[j][e] = prob;
      }
  });
}
// dS = P (dP - delta) in place of P.
template <class Tr>
__device__ __forceinline__ void ds_in_place(float (&p)[Tr::kSN][4], const float (&dp)[Tr::kSN][4],
                                            const float (&delta)[2]) {
#pragma unroll
  for (int j = 0; j < Tr::kSN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) p[j][e] *= dp[j][e] - delta[e / 2];
}

// One step of the mma.sync dQ kernels (bwd_dq_kernel; MoBA's gather_dq_kernel on gathered rows) for
// the warp's 16 rows (Q and dO rows warp_row0.. of ldmatrix-layout tiles) against a 64-key step
// (K at ks, V at vs): S = Q K^T, dP = dO V^T on the step's live slices, dS = P (dP - delta) with
// P = 2^(S scale log2 e - lse) masked, dQ += dS K (K read transposed).
template <typename T, class Tr>
__device__ __forceinline__ void dq_mma_step(float (&dq)[Tr::kON][4], const unsigned char* q_rows,
                                            const unsigned char* do_rows, const unsigned char* ks,
                                            const unsigned char* vs, const StepMask& m, const RowCta<T>& c,
                                            const int (&q_pos)[2], const float (&lse2)[2], const float (&delta)[2],
                                            bool causal, float scale_log2, int warp_row0, int lane) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  float s[Tr::kSN][4], dp[Tr::kSN][4];
  zero_accumulators(s);
  zero_accumulators(dp);
#pragma unroll
  for (int k16 = 0; k16 < Tr::kK16; ++k16) {
    uint32_t a[4];
    const int row = warp_row0 + ix::ldsm_a_row(lane), chunk = ix::ldsm_a_chunk(k16, lane);
    ldmatrix_x4(a, q_rows + ix::smem_offset(row, chunk, kD));
    mma_rows_x_tile<T, kD>(s, a, ks, k16, lane, m.live);
    ldmatrix_x4(a, do_rows + ix::smem_offset(row, chunk, kD));
    mma_rows_x_tile<T, kD>(dp, a, vs, k16, lane, m.live);
  }
  masked_probs<Tr>(s, m, c, q_pos, lse2, causal, scale_log2, lane);
  ds_in_place<Tr>(s, dp, delta);
  mma_p_x_tile<T, kD>(dq, s, ks, lane, m.live);
}

// The dQ kernels' per-row inputs of the lane's two rows q_pos: lse in the log2 domain (+inf past
// Sq, so P is 0 there) and delta = rowsum(dO * O).
__device__ __forceinline__ void load_row_stats(const BlockSparseBackwardParams& bp, int64_t b, int h,
                                               const int (&q_pos)[2], float (&lse2)[2], float (&delta)[2]) {
  const BlockSparseForwardParams& p = bp.forward;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int64_t at = (b * p.heads_q + h) * p.seq_q + q_pos[half];
    const bool ok = q_pos[half] < p.seq_q;
    lse2[half] = ok ? ix::lse_log2(__ldg(p.lse + at)) : INFINITY;
    delta[half] = ok ? __ldg(bp.delta + at) : 0.f;
  }
}

// =============================================================================================
// The key-block walk shared by the dK / dV kernels
// =============================================================================================

// Where a dK / dV CTA stands (grid: key block, kv head, batch): its key block, the lists of its
// group's query heads (p.transposed) and the number of 64-row steps of its walk.
struct DkdvCta {
  int kb, hk;
  int64_t b;
  int group, seq_q, seq_kv, k0;
  int subs, nq;  // 64-row sub-tiles per query block; query blocks
  bool causal, selection;
  int top_k;
  float scale_log2;
  ix::TransposedLists lists;
  int steps;
};
// The CTA's key block of K and V into shared memory, resident for its whole walk: the first
// loads of both dK / dV kernels (the union lists' and MoBA's key-block-major one).
template <typename T, int kD, typename Tr>
__device__ __forceinline__ void load_block_kv(unsigned char* smem, const BlockSparseForwardParams& f, const DkdvCta& c,
                                              int tid) {
  load_rows<T, kD, Tr::kThreads, Tr::kKvCopies>(smem + Tr::kKOffset, bhsd_ptr<T>(f.k, c.b, c.hk), f.k.seq_stride,
                                                c.k0, c.seq_kv, tid);
  load_rows<T, kD, Tr::kThreads, Tr::kKvCopies>(smem + Tr::kVOffset, bhsd_ptr<T>(f.v, c.b, c.hk), f.v.seq_stride,
                                                c.k0, c.seq_kv, tid);
}
template <int kBlockKv>
__device__ __forceinline__ DkdvCta dkdv_cta_setup(const BlockSparseBackwardParams& bp) {
  const BlockSparseForwardParams& p = bp.forward;
  DkdvCta c;
  c.kb = int(blockIdx.x);
  c.hk = int(blockIdx.y);
  c.b = blockIdx.z;
  c.group = int(p.heads_q / p.heads_kv);
  c.seq_q = int(p.seq_q);
  c.seq_kv = int(p.seq_kv);
  c.k0 = c.kb * kBlockKv;
  c.subs = p.block_q / ix::kBwdQTile;
  c.nq = int(ix::ceil_div(p.seq_q, p.block_q));
  c.causal = p.causal;
  c.selection = p.selection.blocks != nullptr;
  c.top_k = p.selection.top_k;
  c.scale_log2 = p.scale * ix::kLog2e;
  const attention::BlockList& tl = bp.transposed;
  const int32_t* const counts =
      tl.counts + c.b * tl.counts_batch_stride + int64_t(c.hk) * c.group * tl.counts_head_stride;
  c.lists = ix::TransposedLists{counts + c.kb, tl.counts_head_stride, c.group, tl.max_blocks};
  c.steps = c.seq_q > 0 ? ix::walk_steps(c.lists, c.subs) : 0;
  return c;
}

// Step `cur` of the walk into `stage` (Tr's stage layout): the sub-tile's Q and dO rows (in
// Layout), each row's lse, delta and query position (-1 unless the row exists and, with MoBA, chose
// the block),
// and the sub-tile's first query position (Sq for a list entry out of range: every row empty).
template <typename T, class Tr, class Layout>
__device__ __forceinline__ void load_dkdv_step(const BlockSparseBackwardParams& bp, const DkdvCta& c,
                                               const ix::TransposedCursor& cur, unsigned char* stage, int tid) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  const BlockSparseForwardParams& p = bp.forward;
  const attention::BlockList& tl = bp.transposed;
  const int h = c.hk * c.group + cur.g;
  const int qb = __ldg(tl.indices + c.b * tl.indices_batch_stride + h * tl.indices_head_stride +
                       int64_t(c.kb) * tl.max_blocks + cur.slot);
  const bool block_ok = qb >= 0 && qb < c.nq;
  const int qbase = block_ok ? qb * p.block_q + cur.sub * ix::kBwdQTile : c.seq_q;
  load_rows<T, kD, Tr::kThreads, Tr::kTileCopies, Layout>(stage, bhsd_ptr<T>(p.q, c.b, h), p.q.seq_stride, qbase,
                                                          c.seq_q, tid);
  load_rows<T, kD, Tr::kThreads, Tr::kTileCopies, Layout>(stage + Tr::kTileBytes, bhsd_ptr<T>(bp.grad_out, c.b, h),
                                                          bp.grad_out.seq_stride, qbase, c.seq_q, tid);
  const int64_t row0 = (c.b * p.heads_q + h) * p.seq_q;
  for (int r = tid; r < ix::kBwdQTile; r += Tr::kThreads) {
    const int pos = qbase + r;
    const bool ok = pos < c.seq_q;
    cp_async_4_zfill(stage + Tr::kLseOffset + 4 * r, ok ? p.lse + row0 + pos : p.lse, ok);
    cp_async_4_zfill(stage + Tr::kDeltaOffset + 4 * r, ok ? bp.delta + row0 + pos : bp.delta, ok);
    bool allowed = ok;
    if (ok && c.selection) {
      const int32_t* const choices = p.selection.blocks + c.b * p.selection.batch_stride +
                                     h * p.selection.head_stride + int64_t(pos) * p.selection.seq_stride;
      allowed = ix::block_selected(choices, c.top_k, c.kb);
    }
    reinterpret_cast<int*>(stage + Tr::kPosOffset)[r] = allowed ? pos : -1;
  }
  if (tid == 0) *reinterpret_cast<int*>(stage + Tr::kQBaseOffset) = qbase;
}

// A stage's per-row data, as load_dkdv_step wrote it.
struct DkdvStage {
  const float* lse;
  const float* delta;
  const int* pos;
  int qbase;
};
template <class Tr>
__device__ __forceinline__ DkdvStage dkdv_stage(const unsigned char* stage) {
  return DkdvStage{reinterpret_cast<const float*>(stage + Tr::kLseOffset),
                   reinterpret_cast<const float*>(stage + Tr::kDeltaOffset),
                   reinterpret_cast<const int*>(stage + Tr::kPosOffset),
                   *reinterpret_cast<const int*>(stage + Tr::kQBaseOffset)};
}
// P^T at key k_pos and query column col of the stage from the score s = K.Q (before scaling): 0
// where the row does not exist, did not choose the block (MoBA) or cannot see the key (causal).
__device__ __forceinline__ bool dkdv_visible(const DkdvStage& st, const DkdvCta& c, int col, int k_pos) {
  return st.pos[col] >= 0 && ix::key_visible(st.pos[col], k_pos, c.seq_q, c.seq_kv, c.causal);
}
__device__ __forceinline__ float dkdv_prob(const DkdvStage& st, const DkdvCta& c, float s, int col, int k_pos) {
  return dkdv_visible(st, c, col, k_pos) ? ix::exp2_approx(s * c.scale_log2 - ix::lse_log2(st.lse[col])) : 0.f;
}

// P^T and dS^T in place over a warp's 16 key rows x 64 query columns held as 8 n8 accumulator
// tiles (s: K.Q, dp: V.dO): the wgmma dK / dV kernel's. Each lane's columns come in adjacent pairs
// (8 j + 2 (lane % 4), + 1), so lse and delta load as float2 once per pair; a warp whose keys all
// rows see (ix::dkdv_tile_full, no MoBA) takes the copy without a per-element predicate.
// P^T is finished before dp is read (dp may still be in flight when the caller starts).
template <class Wait>
__device__ __forceinline__ void dkdv_probs(float (&s)[8][4], float (&dp)[8][4], const DkdvStage& st,
                                           const DkdvCta& c, int key_row0, const int (&k_pos)[2], int lane,
                                           Wait&& wait_dp) {
  const bool full = !c.selection && ix::dkdv_tile_full(st.qbase, c.k0 + key_row0 + ix::kWarpRows - 1, c.seq_q,
                                                       c.seq_kv, c.causal);
  const auto probs = [&](auto masked) {
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int col = 8 * j + ix::acc_col(lane, 0);
      const float2 lse = *reinterpret_cast<const float2*>(st.lse + col);
      const float lse2[2] = {ix::lse_log2(lse.x), ix::lse_log2(lse.y)};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float prob = ix::exp2_approx(s[j][e] * c.scale_log2 - lse2[e % 2]);
        if constexpr (decltype(masked)::value) {
          if (!dkdv_visible(st, c, col + e % 2, k_pos[e / 2])) prob = 0.f;
        }
        s[j][e] = prob;
      }
    }
  };
  if (full) {
    probs(std::false_type{});
  } else {
    probs(std::true_type{});
  }
  wait_dp();
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const float2 delta = *reinterpret_cast<const float2*>(st.delta + 8 * j + ix::acc_col(lane, 0));
#pragma unroll
    for (int e = 0; e < 4; ++e) dp[j][e] = s[j][e] * (dp[j][e] - (e % 2 == 0 ? delta.x : delta.y));
  }
}

// dK (times the softmax scale) and dV of the lane's accumulators: key rows k_pos[half] (below Sk),
// columns 8 j + acc_col, as 4-byte pairs.
template <typename T, int kD>
__device__ __forceinline__ void store_dkdv(const BlockSparseBackwardParams& bp, const DkdvCta& c,
                                           const float (&dk)[kD / 8][4], const float (&dv)[kD / 8][4],
                                           const int (&k_pos)[2], int lane) {
  T* const dkp = bhsd_ptr<T>(bp.grad_k, c.b, c.hk);
  T* const dvp = bhsd_ptr<T>(bp.grad_v, c.b, c.hk);
  const float scale = bp.forward.scale;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int pos = k_pos[half];
    if (pos >= c.seq_kv) continue;
#pragma unroll
    for (int j = 0; j < kD / 8; ++j) {
      const int col = 8 * j + ix::acc_col(lane, 0);
      *reinterpret_cast<uint32_t*>(dkp + int64_t(pos) * bp.grad_k.seq_stride + col) =
          pack_pair<T>(dk[j][2 * half] * scale, dk[j][2 * half + 1] * scale);
      *reinterpret_cast<uint32_t*>(dvp + int64_t(pos) * bp.grad_v.seq_stride + col) =
          pack_pair<T>(dv[j][2 * half], dv[j][2 * half + 1]);
    }
  }
}

// One step of the mma.sync dK / dV kernels (bwd_dkdv_kernel: union lists; MoBA's
// gather_dkdv_kernel: gathered rows): the warp's 16 key rows (K, V resident at kKOffset /
// kVOffset) against its kQCols query columns of the stage, kQInner at a time. S^T = K Q^T,
// dP^T = V dO^T, then dV += P^T dO, dK += dS^T Q (dO, Q read transposed: k = query row). A pass
// none of whose columns holds a row (pos -1: past Sq, or MoBA rows that did not choose the block)
// is skipped when c.selection says such rows occur.
template <typename T, class Tr>
__device__ __forceinline__ void dkdv_mma_step(float (&dk)[Tr::kON][4], float (&dv)[Tr::kON][4],
                                              const unsigned char* smem, const unsigned char* stage, const DkdvCta& c,
                                              int wq, int key_row0, const int (&k_pos)[2], int lane) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  const unsigned char* const ksm = smem + Tr::kKOffset;
  const unsigned char* const vsm = smem + Tr::kVOffset;
  const unsigned char* const qs = stage;
  const unsigned char* const dos = stage + Tr::kTileBytes;
  const DkdvStage rows = dkdv_stage<Tr>(stage);
#pragma unroll 1
  for (int inner = 0; inner < Tr::kQCols / Tr::kQInner; ++inner) {
    const int qc0 = wq * Tr::kQCols + inner * Tr::kQInner;
    // MoBA: no row of these kQInner (<= 32) columns chose this key block (or, gathered, exists),
    // so their P and dS are 0 and the pass would add exact zeros (with union lists at long
    // sequences, most passes: a row chose a given block with probability top_k / blocks, 1/32 at
    // 32K for block 64 / top-8).
    const bool chosen = lane < Tr::kQInner && rows.pos[qc0 + lane % Tr::kQInner] >= 0;
    if (c.selection && !__any_sync(kFullMask, chosen)) continue;
    float s[Tr::kNI][4], dp[Tr::kNI][4];
    zero_accumulators(s);
    zero_accumulators(dp);
#pragma unroll
    for (int k16 = 0; k16 < Tr::kK16; ++k16) {
      uint32_t ka[4], va[4];
      const int arow = key_row0 + ix::ldsm_a_row(lane), achunk = ix::ldsm_a_chunk(k16, lane);
      ldmatrix_x4(ka, ksm + ix::smem_offset(arow, achunk, kD));
      ldmatrix_x4(va, vsm + ix::smem_offset(arow, achunk, kD));
#pragma unroll
      for (int nj = 0; nj < Tr::kNI / 2; ++nj) {
        const int brow = qc0 + 16 * nj + ix::ldsm_b_row(lane), bchunk = ix::ldsm_b_chunk(k16, lane);
        mma_n16<T, false>(s[2 * nj], s[2 * nj + 1], ka, qs + ix::smem_offset(brow, bchunk, kD));
        mma_n16<T, false>(dp[2 * nj], dp[2 * nj + 1], va, dos + ix::smem_offset(brow, bchunk, kD));
      }
    }
    // P^T and dS^T (s keeps P^T, dp becomes dS^T).
#pragma unroll
    for (int j = 0; j < Tr::kNI; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = qc0 + 8 * j + ix::acc_col(lane, e);
        const float prob = dkdv_prob(rows, c, s[j][e], col, k_pos[e / 2]);
        s[j][e] = prob;
        dp[j][e] = prob * (dp[j][e] - rows.delta[col]);
      }
    // dV += P^T dO, dK += dS^T Q (dO, Q read transposed: k = query row).
#pragma unroll
    for (int kk = 0; kk < Tr::kQInner / 16; ++kk) {
      uint32_t pa[4], da[4];
      acc_to_a<T>(pa, s, kk);
      acc_to_a<T>(da, dp, kk);
#pragma unroll
      for (int nj = 0; nj < kD / 16; ++nj) {
        const int trow = qc0 + 16 * kk + ix::ldsm_bt_row(lane), tchunk = ix::ldsm_bt_chunk(nj, lane);
        mma_n16<T, true>(dv[2 * nj], dv[2 * nj + 1], pa, dos + ix::smem_offset(trow, tchunk, kD));
        mma_n16<T, true>(dk[2 * nj], dk[2 * nj + 1], da, qs + ix::smem_offset(trow, tchunk, kD));
      }
    }
  }
}

// The end of the mma.sync dK / dV kernels: query warps 1.. hand their partial sums to query warp
// 0 of their key rows through the stage area (fixed order: deterministic), which stores dK, dV.
template <typename T, class Tr>
__device__ __forceinline__ void dkdv_mma_finish(const BlockSparseBackwardParams& bp, const DkdvCta& c,
                                                float (&dk)[Tr::kON][4], float (&dv)[Tr::kON][4], unsigned char* smem,
                                                int wq, int wk, const int (&k_pos)[2], int lane) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  if constexpr (Tr::kWarpsQ > 1) {
    __syncthreads();  // every warp is done with the stages
    float* const partial = reinterpret_cast<float*>(smem + Tr::kStageOffset);
    const auto slot = [&](int q_warp) { return partial + ((q_warp - 1) * Tr::kWarpsKey + wk) * 2 * 16 * kD; };
    if (wq > 0) {
      float* const dst = slot(wq);
#pragma unroll
      for (int j = 0; j < Tr::kON; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dst[(j * 4 + e) * 32 + lane] = dk[j][e];
          dst[16 * kD + (j * 4 + e) * 32 + lane] = dv[j][e];
        }
    }
    __syncthreads();
    if (wq > 0) return;
    for (int q_warp = 1; q_warp < Tr::kWarpsQ; ++q_warp) {
      const float* const src = slot(q_warp);
#pragma unroll
      for (int j = 0; j < Tr::kON; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          dk[j][e] += src[(j * 4 + e) * 32 + lane];
          dv[j][e] += src[16 * kD + (j * 4 + e) * 32 + lane];
        }
    }
  }
  store_dkdv<T, kD>(bp, c, dk, dv, k_pos, lane);
}


}  // namespace
}  // namespace torch_ext::cuda
