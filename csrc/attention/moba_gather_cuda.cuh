// Device code shared by MoBA's key-block-major forward (attention/moba_gather_cuda.cu) and backward
// (attention/moba_gather_backward_cuda.cu): where a kernel of a chunk stands (its lane), the
// workspace's regions, the plan kernels (count, plan, fill: attention/moba_gather_index.h) and
// the gathered row loads of a run's tiles. No torch headers.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include "attention/block_sparse_attention_cuda_row.cuh"
#include "attention/moba_gather_cuda.h"
#include "attention/moba_gather_index.h"
#include "common/cuda/block_scan.cuh"
#include "common/cuda/grid_limits.h"

namespace torch_ext::cuda {
namespace {

namespace mg = ::torch_ext::attention::moba_gather;
using attention::MobaGatherParams;
using mg::RunRecord;


// Where a kernel of the chunk stands: the chunk's batch z and head y; lane = z * heads + y indexes
// the workspace.
struct Lane {
  int64_t b;
  int h;
  int64_t lane;
};
__device__ __forceinline__ Lane chunk_lane(const MobaGatherParams& p, unsigned z, unsigned y) {
  return Lane{p.batch_begin + z, int(p.head_begin + y), int64_t(z) * p.heads + y};
}
__device__ __forceinline__ Lane lane_of(const MobaGatherParams& p) { return chunk_lane(p, blockIdx.z, blockIdx.y); }

struct WorkspacePtrs {
  int32_t* counts;
  int32_t* offsets;
  int32_t* rank;
  int32_t* entries;
  RunRecord* runs;
  unsigned char* part_o;
  float* part_lse;
  int64_t lane_runs;
  // The backward's sort (mg::sort_key); null for the forward.
  uint32_t* sort_keys;
  uint32_t* sort_keys_out;
  int32_t* sort_values;
  void* sort_temp;
  int64_t sort_temp_bytes;
};
// temp_bytes: 0 for the forward's layout, the sort's temporary storage for the backward's.
inline WorkspacePtrs workspace_ptrs(const MobaGatherParams& p, int64_t temp_bytes = 0) {
  const auto& f = p.forward;
  const int64_t nk = ix::ceil_div(f.seq_kv, f.block_kv);
  const mg::Workspace w =
      mg::workspace_layout(p.batches * p.heads, f.seq_q, f.selection.top_k, nk, f.head_dim, temp_bytes);
  unsigned char* const base = static_cast<unsigned char*>(p.workspace);
  const bool sorted = temp_bytes > 0;
  return WorkspacePtrs{reinterpret_cast<int32_t*>(base + w.counts),
                       reinterpret_cast<int32_t*>(base + w.offsets),
                       reinterpret_cast<int32_t*>(base + w.rank),
                       reinterpret_cast<int32_t*>(base + w.entries),
                       reinterpret_cast<RunRecord*>(base + w.runs),
                       base + w.part_o,
                       reinterpret_cast<float*>(base + w.part_lse),
                       w.lane_runs,
                       sorted ? reinterpret_cast<uint32_t*>(base + w.sort_keys) : nullptr,
                       sorted ? reinterpret_cast<uint32_t*>(base + w.sort_keys_out) : nullptr,
                       sorted ? reinterpret_cast<int32_t*>(base + w.sort_values) : nullptr,
                       sorted ? base + w.sort_temp : nullptr,
                       temp_bytes};
}

__device__ __forceinline__ const int32_t* lane_choices(const MobaGatherParams& p, const Lane& l) {
  const auto& s = p.forward.selection;
  return s.blocks + l.b * s.batch_stride + int64_t(l.h) * s.head_stride;
}

// =============================================================================================
// Plan
// =============================================================================================

// The slot a thread of a pair kernel handles (grid (ceil(Sq * top_k / kPairThreads), heads,
// batches)): slot e (< pairs when valid) of its lane, and the lane's sizes.
struct PairSlot {
  Lane l;
  int top_k;
  int64_t pairs, nk, e;
  const int32_t* choices;  // the token's row of choices
};
__device__ __forceinline__ PairSlot pair_slot(const MobaGatherParams& p) {
  PairSlot s;
  s.l = lane_of(p);
  s.top_k = p.forward.selection.top_k;
  s.pairs = p.forward.seq_q * s.top_k;
  s.nk = ix::ceil_div(p.forward.seq_kv, p.forward.block_kv);
  s.e = int64_t(blockIdx.x) * mg::kPairThreads + threadIdx.x;
  const int64_t token = s.e < s.pairs ? s.e / s.top_k : 0;  // (threads past the pairs exit)
  s.choices = lane_choices(p, s.l) + token * p.forward.selection.seq_stride;
  return s;
}

// A pair (mg::slot_is_pair) draws its rank in its block's list; other slots get rank -1, which the
// fill, sort and merge kernels read as "no pair".
__global__ void __launch_bounds__(mg::kPairThreads) pair_count_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  const PairSlot s = pair_slot(p);
  if (s.e >= s.pairs) return;
  const int slot = int(s.e % s.top_k);
  w.rank[s.l.lane * s.pairs + s.e] =
      mg::slot_is_pair(s.choices, slot, s.nk) ? atomicAdd(w.counts + s.l.lane * s.nk + s.choices[slot], 1) : -1;
}

// Grid (heads, batches): one CTA per lane walks its key blocks kPlanThreads at a time.
__global__ void __launch_bounds__(mg::kPlanThreads) plan_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  __shared__ uint32_t scratch[block_scan_words<mg::kPlanThreads>()];
  const Lane l = chunk_lane(p, blockIdx.y, blockIdx.x);
  const int64_t nk = ix::ceil_div(p.forward.seq_kv, p.forward.block_kv);
  const int32_t* const counts = w.counts + l.lane * nk;
  int32_t* const offsets = w.offsets + l.lane * nk;
  RunRecord* const runs = w.runs + l.lane * w.lane_runs;
  uint32_t pair_base = 0, run_base = 0;
  for (int64_t j0 = 0; j0 < nk; j0 += mg::kPlanThreads) {
    const int64_t j = j0 + threadIdx.x;
    const int32_t count = j < nk ? counts[j] : 0;
    const int32_t nruns = mg::block_runs(count);
    uint32_t pair_total, run_total;
    const uint32_t pair_end = block_inclusive_scan<mg::kPlanThreads>(uint32_t(count), scratch, pair_total);
    const uint32_t run_end = block_inclusive_scan<mg::kPlanThreads>(uint32_t(nruns), scratch, run_total);
    if (j < nk) {
      const int32_t offset = int32_t(pair_base + pair_end - uint32_t(count));
      offsets[j] = offset;
      const uint32_t first_run = run_base + run_end - uint32_t(nruns);
      for (int32_t q = 0; q < nruns; ++q) runs[first_run + q] = mg::run_record(int32_t(j), offset, count, q);
    }
    pair_base += pair_total;
    run_base += run_total;
  }
  for (int64_t t = run_base + threadIdx.x; t < w.lane_runs; t += mg::kPlanThreads) runs[t] = RunRecord{-1, 0, 0, 0};
}

// Pair e into its block's list at the rank it drew (rank -1: no pair, as the count kernel found).
__global__ void __launch_bounds__(mg::kPairThreads) pair_fill_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  const PairSlot s = pair_slot(p);
  if (s.e >= s.pairs) return;
  const int32_t rank = w.rank[s.l.lane * s.pairs + s.e];
  if (rank < 0) return;
  const int32_t block = __ldg(s.choices + s.e % s.top_k);
  w.entries[s.l.lane * s.pairs + w.offsets[s.l.lane * s.nk + block] + rank] = int32_t(s.e);
}

// The gathered rows of tile `tile` of a run (positions from the run's pair ids in shared memory;
// rows past the run zero-filled) of a [S, D] tensor `src` into the 64-row tile at `dst`.
template <typename T, class G>
__device__ __forceinline__ void load_tile_rows(unsigned char* dst, const T* src, int64_t seq_stride,
                                               const int32_t* run_pairs, int tile, int top_k, int tid) {
  constexpr int kD = G::kChunks * ix::kChunkElems;
#pragma unroll
  for (int i = 0; i < G::kRowCopies; ++i) {
    const int r = ix::copy_row(tid, i, G::kThreads, kD), ch = ix::copy_chunk(tid, i, G::kThreads, kD);
    const int32_t e = run_pairs[tile * mg::kTileRows + r];
    const bool ok = e >= 0;
    const int64_t pos = ok ? mg::pair_token(e, top_k) : 0;
    cp_async_16_zfill(dst + ix::smem_offset(r, ch, kD), ok ? src + pos * seq_stride + ch * ix::kChunkElems : src, ok);
  }
}

// Where a CTA of a run record stands (grid x: the lane's records; records past the lane's runs
// hold block -1 and their CTAs exit): its lane, record and the lane's pair list.
struct RunPlace {
  Lane l;
  const mg::RunRecord* record;
  mg::RunRecord run;
  int top_k;
  int64_t pairs;           // Sq * top_k: pair ids of the lane
  const int32_t* entries;  // the lane's lists
};
__device__ __forceinline__ RunPlace run_place(const MobaGatherParams& p, const WorkspacePtrs& w) {
  RunPlace r;
  r.l = lane_of(p);
  r.record = w.runs + r.l.lane * w.lane_runs + blockIdx.x;
  r.run = *r.record;
  r.top_k = p.forward.selection.top_k;
  r.pairs = p.forward.seq_q * r.top_k;
  r.entries = w.entries + r.l.lane * r.pairs;
  return r;
}

// The attention CTA of a run record (the forward's and the backward's dQ): K / V of the record's
// block as a one-entry list (the record's own block field), its 64-key steps.
template <typename T>
__device__ __forceinline__ RowCta<T> run_cta(const MobaGatherParams& p, const Lane& l, const mg::RunRecord* record) {
  const auto& f = p.forward;
  const int hk = l.h / int(f.heads_q / f.heads_kv);
  RowCta<T> c;
  c.k = bhsd_ptr<T>(f.k, l.b, hk);
  c.v = bhsd_ptr<T>(f.v, l.b, hk);
  c.k_stride = f.k.seq_stride;
  c.v_stride = f.v.seq_stride;
  c.list = &record->block;
  c.count = 1;
  c.block_kv = f.block_kv;
  c.seq_q = int(f.seq_q);
  c.seq_kv = int(f.seq_kv);
  c.tiles = ix::walk_tiles(1, c.block_kv);
  return c;
}

// The run's pair ids into shared memory (-1 past its rows), read from global memory once so that a
// tile's loads do not wait on them.
template <int kThreads>
__device__ __forceinline__ void load_run_pairs(int32_t* run_pairs, const int32_t* entries, const mg::RunRecord& run,
                                               int tid) {
  for (int r = tid; r < mg::kRunRows; r += kThreads) run_pairs[r] = r < run.rows ? __ldg(entries + run.first + r) : -1;
}

// The lane id through an opaque copy (once per tile): the shared-memory addresses of the fragments
// depend only on it, and hoisted out of the tile loop (~64 of them) they spilled at D = 128
// (ptxas -v: recheck when the toolkit changes). Unsigned, so lane % 16 and lane / 4 stay shifts.
__device__ __forceinline__ int opaque_lane() {
  unsigned tid = threadIdx.x;
  asm volatile("" : "+r"(tid));
  return int(tid % 32u);
}

// A warp's 16 gathered rows of a tile (row_pair: the tile's pair ids): the lane's two rows'
// positions, and the smallest and largest position of the warp. The positions are not
// consecutive: make_step_mask's test for a step without masked elements (causal: the step's last
// key visible to every row) takes the smallest, the test for a step no row sees (causal: its first
// key past the largest row's horizon) the largest.
struct GatheredRows {
  int first_q, last_q;
  int q_pos[2];
};
__device__ __forceinline__ GatheredRows gathered_rows(const int32_t* row_pair, int warp_row0, int lane, int top_k,
                                                      int seq_q) {
  const auto row_pos = [&](int row) { return mg::row_position(row_pair[row], top_k, seq_q); };
  const int lane_row_pos = row_pos(warp_row0 + lane % ix::kWarpRows);
  return GatheredRows{__reduce_min_sync(kFullMask, lane_row_pos), __reduce_max_sync(kFullMask, lane_row_pos),
                      {row_pos(warp_row0 + ix::acc_row(lane, 0)), row_pos(warp_row0 + ix::acc_row(lane, 2))}};
}

// make_step_mask for step t of a run's one block and a warp's gathered rows. Its `hidden` assumes
// 16 consecutive rows; here the step's keys start at segment 0 (a one-block list): hidden past Sk
// or past every row's horizon (a 128-key block's second half for rows in its first half).
template <class G, typename T>
__device__ __forceinline__ StepMask gathered_step_mask(const unsigned char* smem, const RowCta<T>& c, int t,
                                                       const GatheredRows& rows, int warp_row0, int lane,
                                                       bool causal) {
  StepMask m = make_step_mask<G>(smem, c, t, rows.first_q, warp_row0, lane, causal, 0, false);
  const int first_key = m.seg.base[0];
  m.hidden = m.live == 0u || first_key >= c.seq_kv ||
             (causal && int64_t(first_key) > int64_t(rows.last_q) + c.seq_kv - c.seq_q);
  return m;
}

// The backward's sort input: pair e of the lane gets key mg::sort_key (its block, or past the
// lane's blocks when the count kernel found it is no pair) and value e.
__global__ void __launch_bounds__(mg::kPairThreads) sort_keys_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  const PairSlot s = pair_slot(p);
  if (s.e >= s.pairs) return;
  const int64_t at = s.l.lane * s.pairs + s.e;
  const bool pair = w.rank[at] >= 0;
  w.sort_keys[at] = uint32_t(mg::sort_key(s.l.lane, s.nk, pair, pair ? __ldg(s.choices + s.e % s.top_k) : 0));
  w.sort_values[at] = int32_t(s.e);
}

// Temporary storage of the backward's sort of `items` (key, pair id) entries with keys below
// 2^key_bits (cub::DeviceRadixSort, stable: the order of a block's pairs is their id order), on the
// current device (its architecture sets the size: query it under the same device guard as the
// launch); -1 when the query fails.
inline int64_t sort_temp_bytes(int64_t items, int key_bits) {
  size_t bytes = 0;
  const cudaError_t status = cub::DeviceRadixSort::SortPairs(
      nullptr, bytes, static_cast<const uint32_t*>(nullptr), static_cast<uint32_t*>(nullptr),
      static_cast<const int32_t*>(nullptr), static_cast<int32_t*>(nullptr), items, 0, key_bits);
  return status == cudaSuccess ? int64_t(bytes) : -1;
}

// The plan of a chunk, no host sync: the counts and ranks, the offsets and run records, then the
// lists: filled at the atomics' ranks (the forward: its per-row results do not depend on the
// order), or, with the sort's storage in w (the backward: dK / dV sum a block's rows in list
// order), sorted into pair-id order.
inline cudaError_t launch_plan(const MobaGatherParams& p, const WorkspacePtrs& w, cudaStream_t stream) {
  const auto& f = p.forward;
  const int64_t nk = ix::ceil_div(f.seq_kv, f.block_kv), lanes = p.batches * p.heads;
  cudaError_t status = cudaMemsetAsync(w.counts, 0, size_t(lanes * nk) * sizeof(int32_t), stream);
  if (status != cudaSuccess) return status;
  const dim3 pair_grid(unsigned(ix::ceil_div(f.seq_q * f.selection.top_k, mg::kPairThreads)), unsigned(p.heads),
                       unsigned(p.batches));
  pair_count_kernel<<<pair_grid, mg::kPairThreads, 0, stream>>>(p, w);
  plan_kernel<<<dim3(unsigned(p.heads), unsigned(p.batches)), mg::kPlanThreads, 0, stream>>>(p, w);
  if (w.sort_temp == nullptr) {
    pair_fill_kernel<<<pair_grid, mg::kPairThreads, 0, stream>>>(p, w);
    return cudaGetLastError();
  }
  sort_keys_kernel<<<pair_grid, mg::kPairThreads, 0, stream>>>(p, w);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;
  size_t temp_bytes = size_t(w.sort_temp_bytes);
  const int64_t items = lanes * f.seq_q * f.selection.top_k;
  return cub::DeviceRadixSort::SortPairs(w.sort_temp, temp_bytes, static_cast<const uint32_t*>(w.sort_keys),
                                         w.sort_keys_out, static_cast<const int32_t*>(w.sort_values), w.entries, items,
                                         0, mg::sort_key_bits(lanes, nk), stream);
}

}  // namespace
}  // namespace torch_ext::cuda
