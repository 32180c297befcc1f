// MoBA's key-block-major backward on CUDA (attention/moba_gather_cuda.h; plan and layouts in
// attention/moba_gather_index.h). No torch headers. Per chunk of whole GQA groups, after the
// forward's plan (recomputed, no host sync; the lists sorted into pair-id order by a stable radix
// sort instead of filled at the atomics' ranks, so that dK / dV sum every block's rows in a fixed
// order) and with delta = rowsum(dO * O) given:
//   gather_dq_kernel<T, D>: a CTA per run record (blocks of <= 64 keys: one K / V step), the
//     run's 64-row tiles of gathered Q and dO rows double-buffered; per warp of 16 rows the dQ
//     kernel's step (S = Q K^T, P from the forward's lse, dP = dO V^T, dS = P (dP - delta),
//     dQ = dS K) on rows that are not consecutive positions, with the forward gather's masks
//     (smallest / largest row position) and skipped 16-key slices; each pair's partial dQ, times
//     the scale, in the input dtype into the workspace's part_o;
//   merge_dq_kernel<T, D>: per token the sum of its valid slots' partials in slot order (fp32);
//   gather_dkdv_kernel<T, D, kBlockKv>: a CTA per (kv head, key block) with the mma.sync dK / dV
//     kernel's warps and step (dkdv_mma_step, dkdv_mma_finish) over the block's lists of every
//     query head of the group, in 64-row tiles of gathered rows (mg::GroupCursor). dK and dV are
//     written once: no partials, no float atomics; deterministic with the sorted lists.
// The work is the chosen pairs' (the union backward computes every block some row of a 16-row
// warp chose); the extra traffic is the dQ partials, 2 D bytes per pair written and read once.
#include "attention/moba_gather_cuda.cuh"

namespace torch_ext::cuda {
namespace {

// CTAs an SM: two where an SM has 228 KB (sm_90: 98 KB of shared memory each at D = 128), one on
// sm_80 / sm_86 / sm_89.
template <typename T, int kD>
__global__ void __launch_bounds__(mg::kTileRows * 2, 2)
    gather_dq_kernel(const MobaGatherParams p, const BlockSparseBackwardParams bp, WorkspacePtrs w) {
  using G = mg::GatherBackwardTraits<kD>;
  static_assert(G::kThreads == mg::kTileRows * 2, "4 warps of 16 rows");
  extern __shared__ __align__(128) unsigned char smem[];
  const auto& f = p.forward;
  const RunPlace place = run_place(p, w);
  if (place.run.block < 0) return;  // past the lane's runs (CTA-uniform)
  const auto& [l, record, run, top_k, pairs, entries] = place;
  const int tid = threadIdx.x, warp = tid / 32, warp_row0 = warp * ix::kWarpRows;
  const T* const q = bhsd_ptr<T>(f.q, l.b, l.h);
  const T* const dout = bhsd_ptr<T>(bp.grad_out, l.b, l.h);
  const int64_t row0 = (l.b * f.heads_q + l.h) * f.seq_q;

  const RowCta<T> c = run_cta<T>(p, l, record);  // one 64-key step (blocks of <= 64 keys)

  // Group 0: the block's K / V and, once the run's pair ids are in shared memory, tile 0's rows.
  load_kv_step<T, G>(smem, c, 0, 0, tid);
  int32_t* const run_pairs = reinterpret_cast<int32_t*>(smem + G::kRunOffset);
  load_run_pairs<G::kThreads>(run_pairs, entries, run, tid);
  __syncthreads();
  load_tile_rows<T, G>(smem, q, f.q.seq_stride, run_pairs, 0, top_k, tid);
  load_tile_rows<T, G>(smem + G::kRowBytes, dout, bp.grad_out.seq_stride, run_pairs, 0, top_k, tid);
  cp_async_commit();

  T* const part = reinterpret_cast<T*>(w.part_o) + l.lane * pairs * kD;
  const float scale_log2 = f.scale * ix::kLog2e;
  const float row_scale[2] = {f.scale, f.scale};
  const unsigned char* const ks = smem + G::kStageOffset;
  const unsigned char* const vs = ks + G::kKvBytes;
  const int tiles = mg::run_tiles(run.rows);
#pragma unroll 1
  for (int tile = 0; tile < tiles; ++tile) {
    const int qs = tile % G::kQStages;
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` landed (and K / V); stage qs ^ 1 is free: its epilogue is done
    if (tile + 1 < tiles) {
      unsigned char* const next = smem + (qs ^ 1) * G::kTileStageBytes;
      load_tile_rows<T, G>(next, q, f.q.seq_stride, run_pairs, tile + 1, top_k, tid);
      load_tile_rows<T, G>(next + G::kRowBytes, dout, bp.grad_out.seq_stride, run_pairs, tile + 1, top_k, tid);
    }
    cp_async_commit();
    if (warp_row0 >= mg::tile_rows(run.rows, tile)) continue;  // no real row in this warp
    const int lane = opaque_lane();
    unsigned char* const q_tile = smem + qs * G::kTileStageBytes;
    const unsigned char* const do_tile = q_tile + G::kRowBytes;
    const int32_t* const row_pair = run_pairs + tile * mg::kTileRows;
    const GatheredRows rows = gathered_rows(row_pair, warp_row0, lane, top_k, c.seq_q);
    float lse2[2], delta[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const bool real = row_pair[warp_row0 + ix::acc_row(lane, 2 * half)] >= 0;  // padding rows: P = 0
      lse2[half] = real ? ix::lse_log2(__ldg(f.lse + row0 + rows.q_pos[half])) : INFINITY;
      delta[half] = real ? __ldg(bp.delta + row0 + rows.q_pos[half]) : 0.f;
    }
    float dq[G::kON][4];
    zero_accumulators(dq);
    const StepMask m = gathered_step_mask<G>(smem, c, 0, rows, warp_row0, lane, f.causal);
    if (!m.hidden)
      dq_mma_step<T, G>(dq, q_tile, do_tile, ks, vs, m, c, rows.q_pos, lse2, delta, f.causal, scale_log2, warp_row0,
                        lane);
    // Every pair's partial is written (0 for a hidden step): the merge sums all valid slots.
    store_warp_rows_to<T, kD>(dq, row_scale, q_tile, warp_row0, lane, [&](int r) -> T* {
      const int32_t e = row_pair[warp_row0 + r];
      return e >= 0 ? part + int64_t(e) * kD : nullptr;
    });
  }
  cp_async_wait_all();  // only an empty group remains
}

// D / 8 lanes per token (one 16-byte load per partial row each): grid (ceil(Sq / kTokens), heads,
// batch). A token without a pair gets dQ = 0.
template <typename T, int kD>
__global__ void __launch_bounds__(mg::kMergeThreads)
    merge_dq_kernel(const MobaGatherParams p, const BlockSparseBackwardParams bp, WorkspacePtrs w) {
  constexpr int kLanes = kD / 8, kTokens = mg::kMergeThreads / kLanes;
  const auto& f = p.forward;
  const Lane l = lane_of(p);
  const int part = threadIdx.x % kLanes;
  const int64_t token = int64_t(blockIdx.x) * kTokens + threadIdx.x / kLanes;
  if (token >= f.seq_q) return;
  const int top_k = f.selection.top_k;
  const int64_t pairs = f.seq_q * top_k;
  const int32_t* const rank = w.rank + l.lane * pairs + token * top_k;  // -1: no pair
  const T* const rows = reinterpret_cast<const T*>(w.part_o) + (l.lane * pairs + token * top_k) * kD + 8 * part;
  float acc[8] = {};
  for (int s = 0; s < top_k; ++s) {
    if (rank[s] < 0) continue;
    const Pack16<T> row = load_pack16(rows + int64_t(s) * kD);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += to_compute(row.v[i]);
  }
  Pack16<T> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = from_compute<T>(acc[i]);
  store_pack16(bhsd_ptr<T>(bp.grad_q, l.b, l.h) + token * bp.grad_q.seq_stride + 8 * part, out);
}

// Tile cur of the group walk into `stage` (DkdvTraits' stage): query head h = hk * group + cur.g
// (chunk lane lane0 + cur.g), rows cur.tile * 64 .. of its list of key block c.kb: the rows' Q and
// dO, lse, delta and position (-1 past the list).
template <typename T, class Tr>
__device__ __forceinline__ void load_group_tile(const MobaGatherParams& p, const BlockSparseBackwardParams& bp,
                                                const WorkspacePtrs& w, const DkdvCta& c, int64_t lane0,
                                                const mg::GroupCursor& cur, unsigned char* stage, int tid) {
  constexpr int kD = Tr::kChunks * ix::kChunkElems;
  const auto& f = p.forward;
  const int top_k = f.selection.top_k;
  const int64_t nk = ix::ceil_div(f.seq_kv, f.block_kv), pairs = f.seq_q * top_k;
  const int64_t lane = lane0 + cur.g;
  const int h = c.hk * c.group + cur.g;
  const int32_t count = w.counts[lane * nk + c.kb];
  const int32_t* const list = w.entries + lane * pairs + w.offsets[lane * nk + c.kb];
  const int first = cur.tile * mg::kTileRows;
  const auto position = [&](int r) {
    return first + r < count ? mg::pair_token(__ldg(list + first + r), top_k) : -1;
  };
  const T* const q = bhsd_ptr<T>(f.q, c.b, h);
  const T* const dout = bhsd_ptr<T>(bp.grad_out, c.b, h);
#pragma unroll
  for (int i = 0; i < Tr::kTileCopies; ++i) {
    const int r = ix::copy_row(tid, i, Tr::kThreads, kD), ch = ix::copy_chunk(tid, i, Tr::kThreads, kD);
    const int pos = position(r);
    const bool ok = pos >= 0;
    const int off = ix::smem_offset(r, ch, kD);
    cp_async_16_zfill(stage + off, ok ? q + int64_t(pos) * f.q.seq_stride + ch * ix::kChunkElems : q, ok);
    cp_async_16_zfill(stage + Tr::kTileBytes + off,
                      ok ? dout + int64_t(pos) * bp.grad_out.seq_stride + ch * ix::kChunkElems : dout, ok);
  }
  const int64_t row0 = (c.b * f.heads_q + h) * f.seq_q;
  for (int r = tid; r < ix::kBwdQTile; r += Tr::kThreads) {
    const int pos = position(r);
    const bool ok = pos >= 0;
    cp_async_4_zfill(stage + Tr::kLseOffset + 4 * r, ok ? f.lse + row0 + pos : f.lse, ok);
    cp_async_4_zfill(stage + Tr::kDeltaOffset + 4 * r, ok ? bp.delta + row0 + pos : bp.delta, ok);
    reinterpret_cast<int*>(stage + Tr::kPosOffset)[r] = pos;
  }
  if (tid == 0) *reinterpret_cast<int*>(stage + Tr::kQBaseOffset) = 0;  // rows are not consecutive
}

// Grid (key blocks, kv heads of the chunk, batches of the chunk).
template <typename T, int kD, int kBlockKv>
__global__ void __launch_bounds__(DkdvTraits<kD, kBlockKv>::kThreads, 1)
    gather_dkdv_kernel(const MobaGatherParams p, const BlockSparseBackwardParams bp, WorkspacePtrs w) {
  using Tr = DkdvTraits<kD, kBlockKv>;
  extern __shared__ __align__(128) unsigned char smem[];
  const auto& f = p.forward;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wk = warp % Tr::kWarpsKey, wq = warp / Tr::kWarpsKey;
  const int group = int(f.heads_q / f.heads_kv);
  DkdvCta c{};
  c.kb = int(blockIdx.x);
  c.hk = int(p.head_begin / group) + int(blockIdx.y);
  c.b = p.batch_begin + blockIdx.z;
  c.group = group;
  c.seq_q = int(f.seq_q);
  c.seq_kv = int(f.seq_kv);
  c.k0 = c.kb * kBlockKv;
  c.causal = f.causal;
  c.selection = true;  // rows past a list's end (pos -1): passes without a row are skipped
  c.top_k = f.selection.top_k;
  c.scale_log2 = f.scale * ix::kLog2e;
  const int64_t nk = ix::ceil_div(f.seq_kv, f.block_kv);
  const int64_t lane0 = int64_t(blockIdx.z) * p.heads + int64_t(blockIdx.y) * group;
  const int32_t* const counts = w.counts + lane0 * nk + c.kb;  // group head g's at g * nk
  const int steps = mg::group_walk_steps(counts, nk, group);

  load_block_kv<T, kD, Tr>(smem, f, c, tid);
  mg::GroupCursor cursor = mg::group_cursor_begin(counts, nk, group);
  if (steps > 0) load_group_tile<T, Tr>(p, bp, w, c, lane0, cursor, smem + Tr::kStageOffset, tid);
  cp_async_commit();

  float dk[Tr::kON][4], dv[Tr::kON][4];
  zero_accumulators(dk);
  zero_accumulators(dv);
  const int key_row0 = wk * ix::kWarpRows;
  const int k_pos[2] = {c.k0 + key_row0 + ix::acc_row(lane, 0), c.k0 + key_row0 + ix::acc_row(lane, 2)};
  for (int t = 0; t < steps; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    __syncthreads();
    if (t + 1 < steps) {
      mg::group_cursor_advance(cursor, counts, nk, group);
      load_group_tile<T, Tr>(p, bp, w, c, lane0, cursor, smem + Tr::kStageOffset + (t + 1) % ix::kStages * Tr::kStageBytes,
                             tid);
    }
    cp_async_commit();
    dkdv_mma_step<T, Tr>(dk, dv, smem, smem + Tr::kStageOffset + st * Tr::kStageBytes, c, wq, key_row0, k_pos, lane);
  }
  cp_async_wait_all();
  dkdv_mma_finish<T, Tr>(bp, c, dk, dv, smem, wq, wk, k_pos, lane);
}

template <typename T, int kD, int kBlockKv>
cudaError_t launch_dkdv(const MobaGatherParams& p, const BlockSparseBackwardParams& bp, const WorkspacePtrs& w,
                        cudaStream_t stream) {
  using Tr = DkdvTraits<kD, kBlockKv>;
  const auto kernel = gather_dkdv_kernel<T, kD, kBlockKv>;
  const cudaError_t status = allow_dynamic_smem(kernel, Tr::kSmemBytes);
  if (status != cudaSuccess) return status;
  const int64_t group = p.forward.heads_q / p.forward.heads_kv;
  const dim3 grid(unsigned(ix::ceil_div(p.forward.seq_kv, kBlockKv)), unsigned(p.heads / group), unsigned(p.batches));
  kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p, bp, w);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_typed(const MobaGatherParams& p, const BlockSparseBackwardParams& bp, const WorkspacePtrs& w,
                         cudaStream_t stream) {
  using G = mg::GatherBackwardTraits<kD>;
  if (p.forward.seq_q > 0) {
    const auto dq = gather_dq_kernel<T, kD>;
    cudaError_t status = allow_dynamic_smem(dq, G::kSmemBytes);
    if (status != cudaSuccess) return status;
    dq<<<dim3(unsigned(w.lane_runs), unsigned(p.heads), unsigned(p.batches)), G::kThreads, G::kSmemBytes, stream>>>(
        p, bp, w);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    constexpr int kTokens = mg::kMergeThreads / (kD / 8);
    merge_dq_kernel<T, kD><<<dim3(unsigned(ix::ceil_div(p.forward.seq_q, kTokens)), unsigned(p.heads),
                               unsigned(p.batches)),
                             mg::kMergeThreads, 0, stream>>>(p, bp, w);
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
  }
  if (p.forward.seq_kv == 0) return cudaSuccess;
  switch (p.forward.block_kv) {
    case 16: return launch_dkdv<T, kD, 16>(p, bp, w, stream);
    case 32: return launch_dkdv<T, kD, 32>(p, bp, w, stream);
    default: return launch_dkdv<T, kD, 64>(p, bp, w, stream);
  }
}

}  // namespace

bool moba_gather_backward_supported(const attention::BlockSparseForwardParams& p) {
  return moba_gather_supported(p) && p.block_kv <= ix::kTileKv;
}

int64_t moba_gather_backward_workspace_bytes(int64_t lanes, int64_t seq_q, int top_k, int64_t num_kv_blocks,
                                             int head_dim) {
  const int64_t items = lanes * seq_q * top_k;
  if (items >= (int64_t(1) << 31) || mg::sort_key_bits(lanes, num_kv_blocks) > 32) return -1;
  const int64_t temp = sort_temp_bytes(items, mg::sort_key_bits(lanes, num_kv_blocks));
  if (temp < 0) return -1;
  return mg::workspace_layout(lanes, seq_q, top_k, num_kv_blocks, head_dim, temp > 0 ? temp : 1).bytes;
}

cudaError_t moba_gather_backward(const attention::MobaGatherParams& p, const attention::BlockSparseBackwardParams& bp,
                                 cudaStream_t stream) {
  const auto& f = p.forward;
  const int64_t group = f.heads_kv > 0 ? f.heads_q / f.heads_kv : 0;
  if (!moba_gather_backward_supported(f) || group < 1 || p.heads < 0 || p.heads > kMaxGridYZ || p.head_begin < 0 ||
      p.head_begin % group != 0 || p.heads % group != 0 || p.head_begin + p.heads > f.heads_q || p.batches < 0 ||
      p.batches > kMaxGridYZ || p.batch_begin < 0 || p.batch_begin + p.batches > f.batch ||
      ix::ceil_div(f.seq_kv, f.block_kv) > kMaxGridX || bp.delta == nullptr || !bhsd_ok(bp.grad_out) ||
      !bhsd_ok(bp.grad_q) || !bhsd_ok(bp.grad_k) || !bhsd_ok(bp.grad_v))
    return cudaErrorInvalidValue;
  if (p.batches == 0 || p.heads == 0) return cudaSuccess;
  const int64_t lanes = p.batches * p.heads, nk = ix::ceil_div(f.seq_kv, f.block_kv);
  const int64_t items = lanes * f.seq_q * f.selection.top_k;
  if (items >= (int64_t(1) << 31) || mg::sort_key_bits(lanes, nk) > 32) return cudaErrorInvalidValue;
  const int64_t temp = sort_temp_bytes(items, mg::sort_key_bits(lanes, nk));
  if (temp < 0) return cudaErrorInvalidValue;
  const WorkspacePtrs w = workspace_ptrs(p, temp > 0 ? temp : 1);  // the layout the caller allocated
  if (f.seq_q > 0) {
    const cudaError_t status = launch_plan(p, w, stream);
    if (status != cudaSuccess) return status;
  } else {
    // No query rows: no pairs; dK / dV are zero (the dK / dV kernel walks empty lists).
    const cudaError_t status = cudaMemsetAsync(w.counts, 0, size_t(lanes * nk) * sizeof(int32_t), stream);
    if (status != cudaSuccess) return status;
  }
  if (f.dtype == ScalarKind::kFloat16) {
    return f.head_dim == 64 ? launch_typed<Half, 64>(p, bp, w, stream) : launch_typed<Half, 128>(p, bp, w, stream);
  }
  return f.head_dim == 64 ? launch_typed<BFloat16, 64>(p, bp, w, stream)
                          : launch_typed<BFloat16, 128>(p, bp, w, stream);
}

}  // namespace torch_ext::cuda
