// MoBA's key-block-major forward on CUDA (attention/moba_gather_cuda.h): why and the plan in
// attention/moba_gather_index.h. No torch headers. Kernels, in launch order per chunk of heads:
//   pair_count_kernel: rank of every valid (token, slot) pair in its key block's list (atomics);
//   plan_kernel: a CTA per lane scans its key blocks' counts into list offsets and run records;
//   pair_fill_kernel: the pair ids into the lists;
//   gather_attention_kernel<T, D, kKvSteps>: a CTA per run record (grid x: the lane's bound,
//     records past the lane's runs exit). K / V of the run's block load once (one list entry:
//     load_kv_step), then the run's 64-row tiles in turn, the next tile's Q rows gathered by
//     cp.async while one computes: per tile the mma.sync forward's step (make_step_mask,
//     online_softmax_step and the mma helpers of attention/block_sparse_attention_cuda_row.cuh)
//     on 64 rows that are not consecutive positions. Blocks of 16 / 32 keys fill one or two 16-key
//     slices of the 64-key step and the dead slices' mmas are skipped (StepMask::live); 128-key
//     blocks take 2 steps. Epilogue per tile: O / l as T and the lse of each pair into the
//     partials;
//   merge_kernel: D / 8 lanes per token combine its valid slots' partials in slot order (fp32)
//     into out and lse.
#include "attention/moba_gather_cuda.cuh"

namespace torch_ext::cuda {
namespace {

// =============================================================================================
// Attention of one tile: gathered query rows x one key block
// =============================================================================================

// CTAs an SM: 3 on sm_90 when the block is one K / V step (65 KB of shared memory at D = 128,
// <= 168 registers a thread: 166 without spills); 2 otherwise (sm_80 / 86 / 89 hold 163 / 99 KB).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
constexpr int kGatherCtasOneStep = 3;
#else
constexpr int kGatherCtasOneStep = 2;
#endif
template <typename T, int kD, int kKvSteps>
__global__ void __launch_bounds__(mg::kTileRows * 2, kKvSteps == 1 ? kGatherCtasOneStep : 2)
    gather_attention_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  using G = mg::GatherTraits<kD, kKvSteps>;
  static_assert(G::kThreads == mg::kTileRows * 2, "4 warps of 16 rows");
  extern __shared__ __align__(128) unsigned char smem[];
  const auto& f = p.forward;
  const RunPlace place = run_place(p, w);
  if (place.run.block < 0) return;  // past the lane's runs (CTA-uniform)
  const auto& [l, record, run, top_k, pairs, entries] = place;
  const int tid = threadIdx.x, warp = tid / 32, warp_row0 = warp * ix::kWarpRows;
  const T* const q = bhsd_ptr<T>(f.q, l.b, l.h);
  const RowCta<T> c = run_cta<T>(p, l, record);  // c.tiles: kKvSteps

  // Group 0: the block's K / V (every step) and, once the run's pair ids are in shared memory,
  // tile 0's rows.
#pragma unroll
  for (int t = 0; t < kKvSteps; ++t) load_kv_step<T, G>(smem, c, t, t, tid);
  int32_t* const run_pairs = reinterpret_cast<int32_t*>(smem + G::kRunOffset);
  load_run_pairs<G::kThreads>(run_pairs, entries, run, tid);
  __syncthreads();
  load_tile_rows<T, G>(smem, q, f.q.seq_stride, run_pairs, 0, top_k, tid);
  cp_async_commit();

  T* const part_o = reinterpret_cast<T*>(w.part_o) + l.lane * pairs * kD;
  float* const part_lse = w.part_lse + l.lane * pairs;
  const float scale_log2 = f.scale * ix::kLog2e;
  const int tiles = mg::run_tiles(run.rows);
#pragma unroll 1
  for (int tile = 0; tile < tiles; ++tile) {
    const int qs = tile % G::kQStages;
    cp_async_wait<0>();
    // Tile `tile` landed (and K / V); stage qs ^ 1 is free: its tile's epilogue is done.
    __syncthreads();
    if (tile + 1 < tiles)
      load_tile_rows<T, G>(smem + (qs ^ 1) * G::kRowBytes, q, f.q.seq_stride, run_pairs, tile + 1, top_k, tid);
    cp_async_commit();
    if (warp_row0 >= mg::tile_rows(run.rows, tile)) continue;  // no real row in this warp
    const int lane = opaque_lane();
    unsigned char* const q_tile = smem + qs * G::kRowBytes;
    const int32_t* const row_pair = run_pairs + tile * mg::kTileRows;
    const GatheredRows rows = gathered_rows(row_pair, warp_row0, lane, top_k, c.seq_q);
    float o[G::kON][4];
    zero_accumulators(o);
    ix::RowState rs[2] = {ix::row_state_init(), ix::row_state_init()};
#pragma unroll
    for (int t = 0; t < kKvSteps; ++t) {
      const unsigned char* const ks = smem + G::kStageOffset + t * G::kStageBytes;
      const unsigned char* const vs = ks + G::kKvBytes;
      const StepMask m = gathered_step_mask<G>(smem, c, t, rows, warp_row0, lane, f.causal);
      if (m.hidden) continue;
      float s[G::kSN][4];
      zero_accumulators(s);
      // Q fragments straight from shared memory per k16 (a tile has 1 or 2 steps, so they are
      // read once or twice; holding all D / 16 of them for the tile spilled at D = 128).
#pragma unroll
      for (int k16 = 0; k16 < G::kK16; ++k16) {
        uint32_t qa[4];
        ldmatrix_x4(qa, q_tile + ix::smem_offset(warp_row0 + ix::ldsm_a_row(lane), ix::ldsm_a_chunk(k16, lane), kD));
        mma_rows_x_tile<T, kD>(s, qa, ks, k16, lane, m.live);
      }
      online_softmax_step<G>(s, o, rs, m, c, rows.q_pos, f.causal, scale_log2, lane);
      mma_p_x_tile<T, kD>(o, s, vs, lane, m.live);
    }

    // Partials: O / l (T) and lse per pair, staged through the warp's own rows of this Q tile (no
    // other warp reads them, this one is done with them; the stage reloads after the next barrier).
    float inv[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float sum = quad_sum(rs[half].l);
      inv[half] = ix::softmax_out_scale(sum);
      const int32_t e = row_pair[warp_row0 + ix::acc_row(lane, 2 * half)];
      if (lane % 4 == 0 && e >= 0) part_lse[e] = ix::softmax_lse(rs[half].m, sum);
    }
    store_warp_rows_to<T, kD>(o, inv, q_tile, warp_row0, lane, [&](int r) -> T* {
      const int32_t e = row_pair[warp_row0 + r];
      return e >= 0 ? part_o + int64_t(e) * kD : nullptr;
    });
  }
  cp_async_wait_all();  // only an empty group remains
}

// =============================================================================================
// Merge
// =============================================================================================

// D / 8 lanes per token, 8 columns (one 16-byte load per partial row) each: grid
// (ceil(Sq / kTokens), heads, batch).
template <int kD>
struct MergeShape {
  static constexpr int kLanes = kD / 8;
  static constexpr int kTokens = mg::kMergeThreads / kLanes;
};
template <typename T, int kD>
__global__ void __launch_bounds__(mg::kMergeThreads) merge_kernel(const MobaGatherParams p, WorkspacePtrs w) {
  using Shape = MergeShape<kD>;
  static_assert(Pack16<T>::kSize == 8, "8 columns a lane");
  const auto& f = p.forward;
  const Lane l = lane_of(p);
  const int part = threadIdx.x % Shape::kLanes;
  const int64_t token = int64_t(blockIdx.x) * Shape::kTokens + threadIdx.x / Shape::kLanes;
  if (token >= f.seq_q) return;
  const int top_k = f.selection.top_k;
  const int64_t pairs = f.seq_q * top_k;
  // The count kernel's verdict per slot: rank -1 is no pair (mg::slot_is_pair).
  const int32_t* const rank = w.rank + l.lane * pairs + token * top_k;
  const float* const part_lse = w.part_lse + l.lane * pairs + token * top_k;
  const T* const part_o = reinterpret_cast<const T*>(w.part_o) + (l.lane * pairs + token * top_k) * kD + 8 * part;

  float lse_max = ix::neg_inf();
  for (int s = 0; s < top_k; ++s)
    if (rank[s] >= 0) lse_max = ix::fmax_f(lse_max, part_lse[s]);
  float acc[8] = {};
  float weight_sum = 0.0f;
  for (int s = 0; s < top_k; ++s) {
    if (rank[s] < 0) continue;
    const float weight = mg::merge_weight(part_lse[s], lse_max);
    weight_sum += weight;
    const Pack16<T> row = load_pack16(part_o + int64_t(s) * kD);
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += weight * to_compute(row.v[i]);
  }
  const float inv = mg::merge_out_scale(weight_sum);
  Pack16<T> out;
#pragma unroll
  for (int i = 0; i < 8; ++i) out.v[i] = from_compute<T>(acc[i] * inv);
  store_pack16(bhsd_ptr<T>(f.out, l.b, l.h) + token * f.out.seq_stride + 8 * part, out);
  if (part == 0) f.lse[(l.b * f.heads_q + l.h) * f.seq_q + token] = mg::merge_lse(lse_max, weight_sum);
}

// =============================================================================================
// Launch
// =============================================================================================

template <typename T, int kD, int kKvSteps>
cudaError_t launch_attention(const MobaGatherParams& p, const WorkspacePtrs& w, cudaStream_t stream) {
  using G = mg::GatherTraits<kD, kKvSteps>;
  const auto kernel = gather_attention_kernel<T, kD, kKvSteps>;
  cudaError_t status = allow_dynamic_smem(kernel, G::kSmemBytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(w.lane_runs), unsigned(p.heads), unsigned(p.batches));
  kernel<<<grid, G::kThreads, G::kSmemBytes, stream>>>(p, w);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_typed(const MobaGatherParams& p, const WorkspacePtrs& w, cudaStream_t stream) {
  const cudaError_t status = p.forward.block_kv <= ix::kTileKv ? launch_attention<T, kD, 1>(p, w, stream)
                                                               : launch_attention<T, kD, 2>(p, w, stream);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.forward.seq_q, MergeShape<kD>::kTokens)), unsigned(p.heads),
                  unsigned(p.batches));
  merge_kernel<T, kD><<<grid, mg::kMergeThreads, 0, stream>>>(p, w);
  return cudaGetLastError();
}

}  // namespace

bool moba_gather_supported(const attention::BlockSparseForwardParams& p) {
  const int64_t nk = p.block_kv > 0 ? ix::ceil_div(p.seq_kv, p.block_kv) : 0;
  return (p.dtype == ScalarKind::kFloat16 || p.dtype == ScalarKind::kBFloat16) &&
         (p.head_dim == 64 || p.head_dim == 128) &&
         (p.block_kv == 16 || p.block_kv == 32 || p.block_kv == 64 || p.block_kv == 128) &&
         p.selection.blocks != nullptr && p.selection.top_k >= 1 &&
         p.selection.top_k <= ix::kMaxSelectionTopK &&  // the union backward's limit
         p.heads_kv >= 1 &&
         p.heads_q % p.heads_kv == 0 && p.seq_q * p.selection.top_k < (int64_t(1) << 31) &&
         p.seq_kv < (int64_t(1) << 31) - 256 &&
         mg::max_lane_runs(p.seq_q, p.selection.top_k, nk) <= kMaxGridX &&
         bhsd_ok(p.q) && bhsd_ok(p.k) && bhsd_ok(p.v);
}

cudaError_t moba_gather_forward(const MobaGatherParams& p, cudaStream_t stream) {
  const auto& f = p.forward;
  if (!moba_gather_supported(f) || p.heads < 0 || p.heads > kMaxGridYZ || p.head_begin < 0 ||
      p.head_begin + p.heads > f.heads_q || p.batches < 0 || p.batches > kMaxGridYZ || p.batch_begin < 0 ||
      p.batch_begin + p.batches > f.batch || !bhsd_ok(f.out))
    return cudaErrorInvalidValue;
  if (p.batches == 0 || p.heads == 0 || f.seq_q == 0) return cudaSuccess;
  const WorkspacePtrs w = workspace_ptrs(p);
  const cudaError_t status = launch_plan(p, w, stream);
  if (status != cudaSuccess) return status;
  if (f.dtype == ScalarKind::kFloat16) {
    return f.head_dim == 64 ? launch_typed<Half, 64>(p, w, stream) : launch_typed<Half, 128>(p, w, stream);
  }
  return f.head_dim == 64 ? launch_typed<BFloat16, 64>(p, w, stream) : launch_typed<BFloat16, 128>(p, w, stream);
}

}  // namespace torch_ext::cuda
