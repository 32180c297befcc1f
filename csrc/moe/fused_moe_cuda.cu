// CUDA kernels of fused_moe (moe/fused_moe_cuda.h). Every index map, the plan's steps, the tile
// rules and the epilogue arithmetic are host+device functions in moe/fused_moe_cuda_index.h, run
// thread by thread on the CPU by tests/cpp/fused_moe_cuda_sim.cpp.
//
// Launch sequence (one stream, no host synchronization: every grid is sized from the shapes with
// moe::max_grouped_rows, and CTAs whose tile lies past the device-computed plan exit at once):
//   1. plan 1 (key = expert): plan_count_kernel, plan_scan_kernel, plan_scatter_kernel build
//      counts / offsets (segments padded to kBM rows) / sorted_pairs equal to
//      moe::build_expert_plan_host, plus row_of_pair (inverse) and the list of active experts.
//   Decode (T k <= 64), the three plan kernels and these two chained as programmatic dependent
//   launches on sm_90 (no launch gaps; chained_kernel_start):
//   2. decode_gemm1_kernel: per (column block of I, active expert), warps compute gate and up
//      dots of the expert's pairs, act = act(g, u) rounded to the io dtype, act[pair, j].
//   3. decode_gemm2_kernel: per (column block of H, token), out[t, n] = sum over the token's
//      pairs in increasing expert id of w * (W2[e] act[pair])[n], rounded once.
//   Otherwise:
//   2. plan 2 (key = rank * E + expert, rank = position among the token's experts by id): the
//      same three kernels; the rows of rank L are contiguous, every token once.
//   3. grouped_gemm_kernel<T, true> (GEMM 1): tiles of 64 grouped rows x (64 gate + 64 up weight
//      rows); the gathered hidden rows and the weights stream through a 4-stage cp.async ring;
//      mma.m16n8k16 with fp32 accumulators; each thread holds g and u of the same elements, so
//      the epilogue stores act = act(g, u) in the io dtype: act [grouped rows, I] is the only
//      intermediate (no [T, k, 2I] tensor).
//   4. grouped_gemm_kernel<T, false> (GEMM 2), one launch per rank L = 0..k-1 over plan 2's
//      rank-L rows, A = act rows gathered through row_of_pair: s = w y (L = 0) or s + w y, kept
//      in an fp32 [T, H] accumulator and rounded into out by the last launch (no [T, k, H]
//      tensor). Each launch writes each (t, n) exactly once and launches are stream-ordered, so
//      there are no atomics and the result is bitwise reproducible.
// H or I not a multiple of 8 (or unaligned pointers): the same kernels with synchronous element
// loads into the same shared layout (slower, same results).
// With TORCH_EXT_MOE_WGMMA=1 on compute capability 9.0 (sm_90a builds, 16-byte rows), steps 3 and
// 4 run on the Hopper kernels of moe/fused_moe_wgmma.cu instead: 128 x 256 tiles, so both plans
// pad their segments to 128 rows (gemm_rows, decided once per call by plan_fused_moe);
// TORCH_EXT_MOE_WGMMA_TMA=1 besides: their variant with B by the copy engine, shared by 2-CTA
// clusters within an expert (moe/fused_moe_wgmma_tma.cu).
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/cuda/hopper_switch.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/pdl.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/vec.cuh"
#include "moe/fused_moe_cuda.h"
#include "moe/fused_moe_cuda_gemm.cuh"
#include "moe/fused_moe_cuda_index.h"
#include "moe/fused_moe_wgmma.h"
#include "moe/fused_moe_wgmma_index.h"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::moe::fused_moe_cuda;
namespace wx = ::torch_ext::moe::fused_moe_wgmma;
using moe::Activation;
using moe::FusedMoeParams;

constexpr uint32_t kFullMask = 0xffffffffu;

__device__ __forceinline__ int32_t warp_inclusive_sum(int32_t v, int lane) {
#pragma unroll
  for (int o = 1; o < 32; o *= 2) {
    const int32_t up = __shfl_up_sync(kFullMask, v, o);
    if (lane >= o) v += up;
  }
  return v;
}

// Sum over the warp by a xor butterfly: every lane gets the same, order-fixed result.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(kFullMask, v, o);
  return v;
}

// ---------------------------------------------------------------------------------------------
// The plan (ix section 1)
// ---------------------------------------------------------------------------------------------

struct PlanArgs {
  const int32_t* ids;
  int64_t pairs;
  int k;
  int32_t experts;
  bool by_rank;
  int32_t keys;
  int64_t chunks;
  int64_t block;
  int32_t* cells;        // [keys][chunks]
  int32_t* counts;       // [keys]
  int32_t* offsets;      // [keys + 1]
  int32_t* active;       // [experts + 1] or nullptr
  int32_t* sorted;       // [rows]
  int32_t* row_of_pair;  // [pairs] or nullptr
};

// Plan 1's arguments (key = expert: fused_moe's GEMM 1 and decode, fused_moe_quantized's grouped
// rows), its buffers left to the caller.
PlanArgs expert_plan_args(const int32_t* ids, int64_t pairs, int k, int32_t experts, int64_t chunks, int64_t block) {
  PlanArgs a{};
  a.ids = ids;
  a.pairs = pairs;
  a.k = k;
  a.experts = experts;
  a.by_rank = false;
  a.keys = experts;
  a.chunks = chunks;
  a.block = block;
  return a;
}

// The warp's walk of its chunk in groups of 32 pairs: fn(p, key, peers) for every lane (key -1
// past the chunk), with a __syncwarp after each group.
template <typename Fn>
__device__ __forceinline__ void walk_chunk(const PlanArgs& a, int64_t b, int lane, Fn&& fn) {
  const int64_t begin = ix::chunk_begin(b, a.pairs, a.chunks), end = ix::chunk_begin(b + 1, a.pairs, a.chunks);
  for (int64_t base = begin; base < end; base += 32) {
    const int64_t p = base + lane;
    const int32_t key = p < end ? ix::plan_key(a.ids, p, a.k, a.experts, a.by_rank) : -1;
    const uint32_t peers = __match_any_sync(kFullMask, key);
    fn(p, key, peers);
    __syncwarp();
  }
}

// The plan kernels and the decode GEMMs run as one chain of programmatic dependent launches
// (common/cuda/pdl.cuh): each waits for the kernel before it first thing (the workspace it
// writes may still be read by an earlier kernel) and lets the next one launch right away, so
// that a decode step (five kernels) pays no launch gaps on sm_90.
__device__ __forceinline__ void chained_kernel_start() {
  wait_for_prior_grid();
  allow_dependent_launch();
}

__global__ void __launch_bounds__(32 * ix::kPlanWarps) plan_count_kernel(const PlanArgs a) {
  chained_kernel_start();
  const int lane = threadIdx.x % 32;
  const int64_t b = int64_t(blockIdx.x) * ix::kPlanWarps + threadIdx.x / 32;
  if (b >= a.chunks) return;  // whole warps; no CTA barrier
  for (int64_t key = lane; key < a.keys; key += 32) a.cells[key * a.chunks + b] = 0;
  __syncwarp();
  walk_chunk(a, b, lane, [&](int64_t, int32_t key, uint32_t peers) {
    if (key >= 0 && ix::group_leader(peers, lane)) a.cells[int64_t(key) * a.chunks + b] += __popc(peers);
  });
}

__global__ void __launch_bounds__(32 * ix::kPlanWarps) plan_scatter_kernel(const PlanArgs a) {
  chained_kernel_start();
  const int lane = threadIdx.x % 32;
  const int64_t b = int64_t(blockIdx.x) * ix::kPlanWarps + threadIdx.x / 32;
  if (b >= a.chunks) return;
  walk_chunk(a, b, lane, [&](int64_t p, int32_t key, uint32_t peers) {
    int32_t* const cursor = key >= 0 ? a.cells + int64_t(key) * a.chunks + b : nullptr;
    if (key >= 0) {
      const int32_t row = a.offsets[key] + *cursor + ix::group_rank(peers, lane);
      a.sorted[row] = int32_t(p);
      if (a.row_of_pair != nullptr) a.row_of_pair[p] = row;
    }
    __syncwarp();  // every lane read the cursor before its leader moves it
    if (key >= 0 && ix::group_leader(peers, lane)) *cursor += __popc(peers);
  });
}

// (a) per key: chunk cells -> exclusive prefixes, counts.
__device__ __forceinline__ void scan_cells(const PlanArgs& a, int warp, int lane) {
  const int64_t span = ix::scan_span(a.chunks);
  const int64_t lo = ix::min64(a.chunks, lane * span), hi = ix::min64(a.chunks, lo + span);
  for (int64_t key = warp; key < a.keys; key += ix::kScanThreads / 32) {
    int32_t* const cells = a.cells + key * a.chunks;
    int32_t sum = 0;
    for (int64_t c = lo; c < hi; ++c) sum += cells[c];
    const int32_t inclusive = warp_inclusive_sum(sum, lane);
    int32_t running = inclusive - sum;
    for (int64_t c = lo; c < hi; ++c) {
      const int32_t v = cells[c];
      cells[c] = running;
      running += v;
    }
    if (lane == 31) a.counts[key] = inclusive;
  }
}

// (b) block scan over keys: offsets (padded segments) and the active experts.
__device__ __forceinline__ void scan_offsets(const PlanArgs& a, int tid, int warp, int lane) {
  __shared__ int32_t warp_rows[32], warp_active[32];
  int32_t carry_rows = 0, carry_active = 0;  // identical in every thread
  for (int64_t base = 0; base < a.keys; base += ix::kScanThreads) {
    const int64_t key = base + tid;
    const int32_t count = key < a.keys ? a.counts[key] : 0;
    const int32_t rows = int32_t(moe::padded_rows(count, a.block));
    const int32_t is_active = count > 0 ? 1 : 0;
    const int32_t rows_incl = warp_inclusive_sum(rows, lane), active_incl = warp_inclusive_sum(is_active, lane);
    if (lane == 31) {
      warp_rows[warp] = rows_incl;
      warp_active[warp] = active_incl;
    }
    __syncthreads();
    int32_t rows_before = carry_rows, active_before = carry_active, rows_total = 0, active_total = 0;
    for (int w = 0; w < ix::kScanThreads / 32; ++w) {
      if (w < warp) {
        rows_before += warp_rows[w];
        active_before += warp_active[w];
      }
      rows_total += warp_rows[w];
      active_total += warp_active[w];
    }
    if (key < a.keys) {
      a.offsets[key] = rows_before + rows_incl - rows;
      if (a.active != nullptr && is_active) a.active[active_before + active_incl - 1] = int32_t(key);
    }
    carry_rows += rows_total;
    carry_active += active_total;
    __syncthreads();  // warp_rows is rewritten next round
  }
  if (tid == 0) {
    a.offsets[a.keys] = carry_rows;
    if (a.active != nullptr) a.active[a.experts] = carry_active;
  }
}

__global__ void __launch_bounds__(ix::kScanThreads) plan_scan_kernel(const PlanArgs a) {
  chained_kernel_start();
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  scan_cells(a, warp, lane);
  __syncthreads();
  scan_offsets(a, tid, warp, lane);
  __syncthreads();
  // (c) padding rows
  if (a.block > 1) {
    for (int64_t i = tid; i < int64_t(a.keys) * (a.block - 1); i += ix::kScanThreads) {
      const int64_t r = ix::padding_row(a.counts, a.offsets, i, a.block);
      if (r >= 0) a.sorted[r] = -1;
    }
  }
}

cudaError_t build_plan(const PlanArgs& a, cudaStream_t stream) {
  const int64_t blocks = ix::ceil_div(a.chunks, ix::kPlanWarps);
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  const dim3 grid{unsigned(blocks)}, warps{32 * ix::kPlanWarps};
  cudaError_t status = launch_dependent(plan_count_kernel, grid, warps, 0, stream, a);
  if (status == cudaSuccess) status = launch_dependent(plan_scan_kernel, dim3(1), dim3(ix::kScanThreads), 0, stream, a);
  if (status == cudaSuccess) status = launch_dependent(plan_scatter_kernel, grid, warps, 0, stream, a);
  return status;
}

// fused_moe_quantized's grouped rows (cuda::expert_row_plan), chained after the plan kernels.
constexpr int kRowThreads = 256;
constexpr int64_t kRowMaxBlocks = 1024;

__global__ void __launch_bounds__(kRowThreads)
    plan_rows_kernel(const PlanArgs a, int64_t rows, int32_t* row_expert, int32_t* row_token) {
  chained_kernel_start();
  for (int64_t r = int64_t(blockIdx.x) * kRowThreads + threadIdx.x; r < rows; r += int64_t(gridDim.x) * kRowThreads) {
    const ix::GroupedRow g = ix::grouped_row(a.offsets, a.sorted, a.experts, a.k, r);
    row_expert[r] = g.expert;
    row_token[r] = g.token;
  }
}

// ---------------------------------------------------------------------------------------------
// Grouped GEMMs (ix sections 3, 4)
// ---------------------------------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ void store_chunk_sync(unsigned char* dst, const T* src, int elems) {
  store_pack16(reinterpret_cast<T*>(dst), load_pack16_partial(src, elems, false));
}

template <typename T, bool kGateUp>
__device__ __forceinline__ void gemm_cta(const GemmArgs<T>& p) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = ix::warp_m_of(warp), warp_n = ix::warp_n_of(warp);
  const ix::TileCoord tile = ix::tile_of(blockIdx.x, p.m_blocks, p.n_blocks);
  const auto [row0, expert] = grouped_tile(p, tile.mb, ix::kBM);
  if (expert < 0) return;  // past the plan's rows (uniform over the CTA, before any barrier)
  const int64_t n0 = tile.nb * (kGateUp ? ix::kGateCols : ix::kBN);

  // Source rows of this thread's chunks (nullptr: zero-filled row).
  const int crow = ix::chunk_row(tid), ccol = ix::chunk_col(tid);
  const T* a_src[ix::kAChunksPerThread];
  const T* b_src[ix::kBChunksPerThread];
#pragma unroll
  for (int i = 0; i < ix::kAChunksPerThread; ++i)
    a_src[i] = a_row_source<T, kGateUp>(p, row0 + crow + i * ix::kRowsPerPass);
  const T* const w_expert = p.w + int64_t(expert) * p.w_expert_stride;
#pragma unroll
  for (int i = 0; i < ix::kBChunksPerThread; ++i) {
    const int b = crow + i * ix::kRowsPerPass;
    const int64_t w_row = kGateUp ? ix::gemm1_weight_row(b, n0, p.n_total) : (n0 + b < p.n_total ? n0 + b : -1);
    b_src[i] = w_row >= 0 ? w_expert + w_row * p.k_total : nullptr;
  }

  const auto load_operand = [&]<int kChunks>(const T* const (&rows)[kChunks], unsigned char* tile_smem, int iter) {
    const int64_t k = int64_t(iter) * ix::kBK + ccol * ix::kChunkElems;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int elems = ix::chunk_elems(k, p.k_total, rows[i] != nullptr);
      unsigned char* const dst = tile_smem + ix::smem_offset(crow + i * ix::kRowsPerPass, ccol);
      const T* const src = elems > 0 ? rows[i] + k : p.w;
      if (p.vector) {
        cp_async_16_partial(dst, src, elems * ix::kElemBytes);
      } else {
        store_chunk_sync(dst, src, elems);
      }
    }
  };
  const auto load_stage = [&](int stage, int iter) {
    unsigned char* const sa = smem + stage * ix::kStageBytes;
    load_operand(a_src, sa, iter);
    load_operand(b_src, sa + ix::kABytes, iter);
  };

  float acc[ix::kMI][ix::kNI][4];
  zero_accumulators(acc);

  const auto compute_stage = [&](int stage, int) {
    const unsigned char* const sa = smem + stage * ix::kStageBytes;
    const unsigned char* const sb = sa + ix::kABytes;
#pragma unroll
    for (int ks = 0; ks < ix::kKSteps; ++ks) {
      uint32_t af[ix::kMI][4], bf[ix::kNI][2];
#pragma unroll
      for (int i = 0; i < ix::kMI; ++i)
        ldmatrix_x4(af[i], sa + ix::smem_offset(ix::a_ldsm_row(warp_m, i, lane), ix::a_ldsm_chunk(ks, lane)));
#pragma unroll
      for (int j = 0; j < ix::kNI / 2; ++j)
        ldmatrix_x4_b_pair(bf[2 * j], bf[2 * j + 1],
                           sb + ix::smem_offset(ix::b_ldsm_row(kGateUp, warp_n, j, lane), ix::b_ldsm_chunk(ks, lane)));
#pragma unroll
      for (int i = 0; i < ix::kMI; ++i)
#pragma unroll
        for (int j = 0; j < ix::kNI; ++j) mma_m16n8k16<T>(acc[i][j], af[i], bf[j]);
    }
  };

  cp_async_pipeline<ix::kStages>(0, int(p.k_iters), load_stage, compute_stage);

#pragma unroll
  for (int i = 0; i < ix::kMI; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t r = row0 + ix::acc_row(warp_m, i, lane, 2 * half);
      const int32_t pair = p.sorted[r];
      if (pair < 0) continue;  // padding row
      if constexpr (kGateUp) {
#pragma unroll
        for (int j = 0; j < ix::kNI / 2; ++j) {
          const float(&g)[4] = acc[i][j];
          const float(&u)[4] = acc[i][j + ix::kNI / 2];
          store_act_pair(p, r, ix::gate_col(n0, warp_n, j, lane, 0), g[2 * half], u[2 * half], g[2 * half + 1],
                         u[2 * half + 1]);
        }
      } else {
        const CombineRow<T> row(p, pair);
#pragma unroll
        for (int j = 0; j < ix::kNI; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) row.add(p, ix::out_col(n0, warp_n, j, lane, e), acc[i][j][2 * half + e]);
      }
    }
}

template <typename T, bool kGateUp>
__global__ void __launch_bounds__(ix::kThreads, ix::kMinCtas) grouped_gemm_kernel(const GemmArgs<T> p) {
  gemm_cta<T, kGateUp>(p);
}

template <typename T, bool kGateUp>
cudaError_t launch_gemm(const GemmArgs<T>& p, cudaStream_t stream) {
  const int64_t blocks = p.m_blocks * p.n_blocks;
  if (blocks > kMaxGridX) return cudaErrorInvalidValue;
  if (blocks == 0) return cudaSuccess;
  static_assert(ix::kSmemBytes <= 48 * 1024, "no opt-in for more dynamic shared memory");
  grouped_gemm_kernel<T, kGateUp><<<unsigned(blocks), ix::kThreads, ix::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Decode (ix section 5)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct DecodeArgs {
  const T* hidden;
  const T* w13;
  const T* w2;
  const float* topk_weights;
  const int32_t* ids;
  const int32_t* counts;
  const int32_t* offsets;
  const int32_t* active;  // [experts] then their number
  const int32_t* sorted;
  T* act;                 // [pairs, act_stride]
  T* out;
  int64_t hidden_size, inter, act_stride;
  int32_t experts;
  int top_k;
  Activation activation;
  bool vector1, vector2;  // hidden / w13 rows, w2 rows 16-byte loadable
};

// fma of the 8 products of two chunks into acc.
template <typename T>
__device__ __forceinline__ float dot_chunk(const Pack16<T>& w, const Pack16<T>& x, float acc) {
#pragma unroll
  for (int e = 0; e < Pack16<T>::kSize; ++e) acc = fmaf(to_compute(w.v[e]), to_compute(x.v[e]), acc);
  return acc;
}

// The two 16-byte chunks of a decode step: gate and up weights, or a W2 row and an act row.
template <typename T>
struct ChunkPair {
  Pack16<T> first, second;
};

// A lane's walk over the chunks of a row of row_elems elements (ix::decode_unrolled_iters):
// load(k0, len) returns a chunk's operands and use(operands, k0, len) consumes them, in chunk
// order; the unrolled iterations issue kDecodeUnroll loads before their uses.
template <class Load, class Use>
__device__ __forceinline__ void walk_row_chunks(int lane, int64_t row_elems, const Load& load, const Use& use) {
  const int64_t chunks = ix::ceil_div(row_elems, ix::kChunkElems), unrolled = ix::decode_unrolled_iters(row_elems);
  for (int64_t i = 0; i < unrolled; i += ix::kDecodeUnroll) {
    decltype(load(int64_t(0), 0)) operands[ix::kDecodeUnroll];
#pragma unroll
    for (int v = 0; v < ix::kDecodeUnroll; ++v)
      operands[v] = load(ix::decode_chunk(lane, i + v) * ix::kChunkElems, ix::kChunkElems);
#pragma unroll
    for (int v = 0; v < ix::kDecodeUnroll; ++v)
      use(operands[v], ix::decode_chunk(lane, i + v) * ix::kChunkElems, ix::kChunkElems);
  }
  for (int64_t i = unrolled;; ++i) {
    const int64_t c = ix::decode_chunk(lane, i);
    if (c >= chunks) break;
    const int64_t k0 = c * ix::kChunkElems;
    const int len = ix::chunk_elems(k0, row_elems, true);
    use(load(k0, len), k0, len);
  }
}

template <typename T>
__global__ void __launch_bounds__(ix::kDecodeThreads) decode_gemm1_kernel(const DecodeArgs<T> p) {
  chained_kernel_start();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (int32_t(blockIdx.y) >= p.active[p.experts]) return;  // no barriers in this kernel
  const int32_t e = p.active[blockIdx.y];
  const int64_t j = int64_t(blockIdx.x) * ix::kDecodeWarps + warp;
  if (j >= p.inter) return;
  const int64_t H = p.hidden_size;
  const T* const gate = p.w13 + (int64_t(e) * 2 * p.inter + j) * H;
  const T* const up = gate + p.inter * H;
  const int32_t begin = p.offsets[e], count = p.counts[e];
  for (int32_t b0 = 0; b0 < count; b0 += ix::kDecodeBatch) {
    int32_t pair[ix::kDecodeBatch];
    const T* x[ix::kDecodeBatch];
#pragma unroll
    for (int q = 0; q < ix::kDecodeBatch; ++q) {
      pair[q] = b0 + q < count ? p.sorted[begin + b0 + q] : -1;
      x[q] = pair[q] >= 0 ? p.hidden + int64_t(pair[q] / p.top_k) * H : nullptr;
    }
    float g[ix::kDecodeBatch] = {}, u[ix::kDecodeBatch] = {};
    walk_row_chunks(
        lane, H,
        [&](int64_t k0, int len) {
          return ChunkPair<T>{load_pack16_partial(gate + k0, len, p.vector1),
                              load_pack16_partial(up + k0, len, p.vector1)};
        },
        [&](const ChunkPair<T>& w, int64_t k0, int len) {  // against the batch's hidden rows (L1-resident)
#pragma unroll
          for (int q = 0; q < ix::kDecodeBatch; ++q) {
            if (x[q] == nullptr) continue;
            const Pack16<T> xv = load_pack16_partial(x[q] + k0, len, p.vector1);
            g[q] = dot_chunk(w.first, xv, g[q]);
            u[q] = dot_chunk(w.second, xv, u[q]);
          }
        });
#pragma unroll
    for (int q = 0; q < ix::kDecodeBatch; ++q) {
      const float gs = warp_sum(g[q]), us = warp_sum(u[q]);
      if (lane == q && pair[q] >= 0)
        p.act[int64_t(pair[q]) * p.act_stride + j] = from_compute<T>(ix::act_value(p.activation, gs, us));
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(ix::kDecodeThreads) decode_gemm2_kernel(const DecodeArgs<T> p) {
  chained_kernel_start();
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t t = blockIdx.y;
  const int64_t n = int64_t(blockIdx.x) * ix::kDecodeWarps + warp;
  if (n >= p.hidden_size) return;
  const int32_t* const ids_row = p.ids + t * p.top_k;
  float s = 0.f;
  for (int32_t rank = 0; rank < p.top_k; ++rank) {
    const int j = ix::slot_of_rank(ids_row, p.top_k, rank);
    const int64_t pair = t * p.top_k + j;
    const T* const w_row = p.w2 + (int64_t(ids_row[j]) * p.hidden_size + n) * p.inter;
    const T* const a_row = p.act + pair * p.act_stride;
    float y = 0.f;
    walk_row_chunks(
        lane, p.inter,
        [&](int64_t k0, int len) {  // act rows are 16-byte aligned (act_stride)
          return ChunkPair<T>{load_pack16_partial(w_row + k0, len, p.vector2), load_pack16_partial(a_row + k0, len, true)};
        },
        [&](const ChunkPair<T>& c, int64_t, int) { y = dot_chunk(c.first, c.second, y); });
    s = ix::combine_value(rank == 0, s, __ldg(p.topk_weights + pair), warp_sum(y));
  }
  if (lane == 0) p.out[t * p.hidden_size + n] = from_compute<T>(s);
}

// ---------------------------------------------------------------------------------------------
// Launch sequence
// ---------------------------------------------------------------------------------------------

template <typename U>
U* region(void* workspace, int64_t offset) {
  return reinterpret_cast<U*>(static_cast<unsigned char*>(workspace) + offset);
}

// GEMM 1 and every rank of GEMM 2 on the Hopper kernels (plan padded to their 128-row tiles; with
// tma, the variant with B by the copy engine, or the cp.async one where the driver lacks tensor
// maps) or on mma.sync.
template <typename T, bool kGateUp>
cudaError_t launch_grouped(const GemmArgs<T>& g, bool wgmma, bool tma, cudaStream_t stream) {
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  if (wgmma && tma) {
    const cudaError_t status = grouped_gemm_sm90_tma<T, kGateUp>(g, stream);
    if (status != cudaErrorNotSupported) return status;
  }
  if (wgmma) return grouped_gemm_sm90<T, kGateUp>(g, stream);
#endif
  return launch_gemm<T, kGateUp>(g, stream);
}

template <typename T>
cudaError_t run(const FusedMoeParams& p, const ix::Layout& l, int64_t block, void* ws, cudaStream_t stream) {
  const bool wgmma = block == wx::kBM;
  // (Read once per call, like the row tile: TORCH_EXT_MOE_WGMMA_TMA=1, opt-in until it has run.)
  const bool tma = wgmma && kernel_switch_on("TORCH_EXT_MOE_WGMMA_TMA", false);
  const int64_t T_ = p.tokens, H = p.hidden_size, I = p.intermediate_size, E = p.experts;
  const int k = p.top_k;
  const T* const hidden = static_cast<const T*>(p.hidden);
  const T* const w13 = static_cast<const T*>(p.w13);
  const T* const w2 = static_cast<const T*>(p.w2);
  T* const out = static_cast<T*>(p.out);
  T* const act = region<T>(ws, l.act);
  const int64_t act_stride = ix::act_stride(I);

  PlanArgs plan = expert_plan_args(p.topk_ids, l.pairs, k, p.experts, l.chunks1, block);
  plan.cells = region<int32_t>(ws, l.cells1);
  plan.counts = region<int32_t>(ws, l.counts1);
  plan.offsets = region<int32_t>(ws, l.offsets1);
  plan.active = region<int32_t>(ws, l.active1);
  plan.sorted = region<int32_t>(ws, l.sorted1);
  plan.row_of_pair = region<int32_t>(ws, l.row_of_pair);
  cudaError_t status = build_plan(plan, stream);
  if (status != cudaSuccess) return status;

  if (ix::use_decode(l.pairs)) {
    DecodeArgs<T> d{};
    d.hidden = hidden;
    d.w13 = w13;
    d.w2 = w2;
    d.topk_weights = p.topk_weights;
    d.ids = p.topk_ids;
    d.counts = plan.counts;
    d.offsets = plan.offsets;
    d.active = plan.active;
    d.sorted = plan.sorted;
    d.act = act;
    d.out = out;
    d.hidden_size = H;
    d.inter = I;
    d.act_stride = act_stride;
    d.experts = p.experts;
    d.top_k = k;
    d.activation = p.activation;
    d.vector1 = ix::rows_vectorizable(reinterpret_cast<uintptr_t>(hidden), H) &&
                ix::rows_vectorizable(reinterpret_cast<uintptr_t>(w13), H);
    d.vector2 = ix::rows_vectorizable(reinterpret_cast<uintptr_t>(w2), I);
    const int64_t grid1_x = ix::ceil_div(I, ix::kDecodeWarps), grid2_x = ix::ceil_div(H, ix::kDecodeWarps);
    const int64_t active_slots = ix::min64(E, l.pairs);
    if (grid1_x > kMaxGridX || grid2_x > kMaxGridX) return cudaErrorInvalidValue;
    status = launch_dependent(decode_gemm1_kernel<T>, dim3(unsigned(grid1_x), unsigned(active_slots)),
                              dim3(ix::kDecodeThreads), 0, stream, d);
    if (status != cudaSuccess) return status;
    return launch_dependent(decode_gemm2_kernel<T>, dim3(unsigned(grid2_x), unsigned(T_)), dim3(ix::kDecodeThreads),
                            0, stream, d);
  }

  PlanArgs plan2 = plan;
  plan2.by_rank = true;
  plan2.keys = int32_t(l.keys2);
  plan2.chunks = l.chunks2;
  plan2.cells = region<int32_t>(ws, l.cells2);
  plan2.counts = region<int32_t>(ws, l.counts2);
  plan2.offsets = region<int32_t>(ws, l.offsets2);
  plan2.active = nullptr;
  plan2.sorted = region<int32_t>(ws, l.sorted2);
  plan2.row_of_pair = nullptr;
  status = build_plan(plan2, stream);
  if (status != cudaSuccess) return status;

  GemmArgs<T> g1{};
  g1.a = hidden;
  g1.a_stride = H;
  g1.w = w13;
  g1.w_expert_stride = 2 * I * H;
  g1.k_total = H;
  g1.n_total = I;
  g1.sorted = plan.sorted;
  g1.offsets = plan.offsets;
  g1.first_key = 0;
  g1.keys = p.experts;
  g1.experts = p.experts;
  g1.top_k = k;
  g1.m_blocks = l.rows1 / block;
  g1.n_blocks = wgmma ? wx::gemm1_n_blocks(I) : ix::gemm1_n_blocks(I);
  g1.k_iters = wgmma ? wx::k_iters(H) : ix::ceil_div(H, ix::kBK);
  g1.vector = ix::rows_vectorizable(reinterpret_cast<uintptr_t>(hidden), H) &&
              ix::rows_vectorizable(reinterpret_cast<uintptr_t>(w13), H);
  g1.act = act;
  g1.act_stride = act_stride;
  g1.activation = p.activation;
  status = launch_grouped<T, true>(g1, wgmma, tma, stream);
  if (status != cudaSuccess) return status;

  GemmArgs<T> g2{};
  g2.a = act;
  g2.a_stride = act_stride;
  g2.w = w2;
  g2.w_expert_stride = H * I;
  g2.k_total = I;
  g2.n_total = H;
  g2.sorted = plan2.sorted;
  g2.offsets = plan2.offsets;
  g2.keys = p.experts;
  g2.experts = p.experts;
  g2.row_of_pair = plan.row_of_pair;
  g2.top_k = k;
  g2.m_blocks = moe::max_grouped_rows(T_, E, block) / block;  // rank L holds T pairs
  g2.n_blocks = wgmma ? wx::gemm2_n_blocks(H) : ix::gemm2_n_blocks(H);
  g2.k_iters = wgmma ? wx::k_iters(I) : ix::ceil_div(I, ix::kBK);
  g2.vector = ix::rows_vectorizable(reinterpret_cast<uintptr_t>(w2), I);
  g2.topk_weights = p.topk_weights;
  g2.acc32 = k > 1 ? region<float>(ws, l.acc32) : nullptr;
  g2.out = out;
  for (int rank = 0; rank < k; ++rank) {
    g2.first_key = rank * p.experts;
    g2.first = rank == 0;
    g2.last = rank == k - 1;
    status = launch_grouped<T, false>(g2, wgmma, tma, stream);
    if (status != cudaSuccess) return status;
  }
  return cudaSuccess;
}

bool supported_dtype(ScalarKind kind) { return kind == ScalarKind::kFloat16 || kind == ScalarKind::kBFloat16; }

bool valid_shapes(const FusedMoeParams& p) {
  return p.tokens >= 0 && p.hidden_size >= 1 && p.intermediate_size >= 1 && p.experts >= 1 && p.top_k >= 0 &&
         p.top_k <= p.experts && p.tokens * int64_t(p.top_k) <= ix::kMaxPairs &&
         p.hidden_size <= ix::kMaxPairs && p.intermediate_size <= ix::kMaxPairs;
}

// The plans' segment padding, which also picks the GEMM kernels: the Hopper ones' 128-row tiles
// where they are switched on (16-byte rows, outside the decode path), else mma.sync's 64.
int64_t gemm_rows(const FusedMoeParams& p) {
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  const bool rows = ix::rows_vectorizable(reinterpret_cast<uintptr_t>(p.hidden), p.hidden_size) &&
                    ix::rows_vectorizable(reinterpret_cast<uintptr_t>(p.w13), p.hidden_size) &&
                    ix::rows_vectorizable(reinterpret_cast<uintptr_t>(p.w2), p.intermediate_size);
  if (wx::usable(p.tokens * p.top_k, rows) && hopper_kernel_enabled("TORCH_EXT_MOE_WGMMA", false)) return wx::kBM;
#endif
  return ix::kBM;
}

}  // namespace

FusedMoeLaunch plan_fused_moe(const moe::FusedMoeParams& p, int num_sms) {
  if (!valid_shapes(p) || p.tokens == 0 || p.top_k == 0) return {ix::kBM, 0};
  const int64_t rows = gemm_rows(p);
  return {rows, ix::make_layout(p, num_sms, rows, ix::kElemBytes).bytes};
}

int64_t expert_row_plan_workspace_bytes(int64_t pairs, int32_t experts, int64_t block, int num_sms) {
  return ix::make_row_plan_layout(pairs, experts, block, num_sms).bytes;
}

cudaError_t expert_row_plan(const ExpertRowPlan& p, void* workspace, int num_sms, cudaStream_t stream) {
  if (p.pairs < 0 || p.pairs > ix::kMaxPairs || p.top_k < 1 || p.experts < 1 || p.block < 1) {
    return cudaErrorInvalidValue;
  }
  if (p.pairs == 0) return cudaSuccess;
  const ix::RowPlanLayout l = ix::make_row_plan_layout(p.pairs, p.experts, p.block, num_sms);
  if (l.rows > ix::kMaxPairs * 2 - 1) return cudaErrorInvalidValue;  // int32 rows
  PlanArgs plan = expert_plan_args(p.ids, p.pairs, p.top_k, p.experts, l.chunks, p.block);
  plan.cells = region<int32_t>(workspace, l.cells);
  plan.counts = region<int32_t>(workspace, l.counts);
  plan.offsets = region<int32_t>(workspace, l.offsets);
  plan.active = nullptr;
  plan.sorted = region<int32_t>(workspace, l.sorted);
  plan.row_of_pair = p.row_of_pair;
  const cudaError_t status = build_plan(plan, stream);
  if (status != cudaSuccess) return status;
  const int64_t blocks = ix::min64(ix::ceil_div(l.rows, kRowThreads), kRowMaxBlocks);
  return launch_dependent(plan_rows_kernel, dim3(unsigned(blocks)), dim3(kRowThreads), 0, stream, plan, l.rows,
                          p.row_expert, p.row_token);
}

cudaError_t fused_moe(const moe::FusedMoeParams& p, const FusedMoeLaunch& launch, void* workspace, int num_sms,
                      cudaStream_t stream) {
  if (!supported_dtype(p.dtype) || !valid_shapes(p)) return cudaErrorInvalidValue;
  if (p.tokens == 0) return cudaSuccess;
  if (p.out == nullptr) return cudaErrorInvalidValue;
  if (p.top_k == 0) {  // empty sum
    return cudaMemsetAsync(p.out, 0, size_t(p.tokens * p.hidden_size) * ix::kElemBytes, stream);
  }
  if (workspace == nullptr || p.hidden == nullptr || p.w13 == nullptr || p.w2 == nullptr ||
      p.topk_weights == nullptr || p.topk_ids == nullptr) {
    return cudaErrorInvalidValue;
  }
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  const bool known_rows = launch.gemm_rows == ix::kBM || launch.gemm_rows == wx::kBM;
#else
  const bool known_rows = launch.gemm_rows == ix::kBM;
#endif
  const ix::Layout l = ix::make_layout(p, num_sms, launch.gemm_rows, ix::kElemBytes);
  if (!known_rows || l.bytes > launch.workspace_bytes) return cudaErrorInvalidValue;
  if (l.rows1 > ix::kMaxPairs * 2 - 1 || l.rows2 > ix::kMaxPairs * 2 - 1) return cudaErrorInvalidValue;
  if (p.dtype == ScalarKind::kFloat16) return run<Half>(p, l, launch.gemm_rows, workspace, stream);
  return run<BFloat16>(p, l, launch.gemm_rows, workspace, stream);
}

}  // namespace torch_ext::cuda
