// fused_moe's grouped GEMMs on Hopper wgmma with B by the copy engine (moe/fused_moe_wgmma.h),
// sm_90a only, opt-in (TORCH_EXT_MOE_WGMMA_TMA=1 beside TORCH_EXT_MOE_WGMMA=1) until it has run on
// a GPU. The tiles, stage batches and epilogues are the cp.async kernel's (moe/fused_moe_wgmma.cu,
// moe/fused_moe_wgmma_ops.cuh), so it gives the same bits; the operands arrive as in the W8A8
// GEMM's copy-engine variant (common/wgmma_cluster_pipeline.h, run on the CPU by
// tests/cpp/wgmma_cluster_pipeline_sim.cpp):
//   - CTAs in clusters of 2 along the plan's rows (128-row blocks 2p, 2p + 1, one n block). When
//     both blocks lie in one expert (most blocks at prefill sizes: Mixtral T = 4096 has ~1000
//     rows per expert) they need the same B tile: each fetches one 128-row box and multicasts it
//     into both, a third fewer L2 bytes per MAC. Otherwise each fetches its own two boxes.
//   - B's boxes come from a 4-D tensor map over the weights (moe/fused_moe_wgmma_index.h,
//     section 2): rows past I or H and K past its end read zeros.
//   - A rows are gathered (each pair's token row, or act row), which a tensor copy cannot do: the
//     producer warpgroup's 128 threads cp.async them and publish each stage kGatherLag stages
//     later (wait, fence into the async proxy, arrive on the stage's full barrier).
//   - Warpgroups 1 and 2 consume: wait for the stage, one wgmma batch, release it to the CTAs
//     that wrote it once the batch after it was issued and waited down to one in flight.
#include <cuda.h>

#include "common/cuda/cluster_pipeline.cuh"
#include "common/cuda/cp_async.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/tensor_map.h"
#include "common/cuda/tma.cuh"
#include "common/wgmma_cluster_pipeline.h"
#include "moe/fused_moe_wgmma.h"
#include "moe/fused_moe_wgmma_ops.cuh"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::moe::fused_moe_cuda;
namespace cl = ::torch_ext::wgmma_cluster;
using namespace fused_moe_sm90;
using Pipe = cl::Pipeline<Tile, true>;

template <typename T, bool kGateUp>
__device__ __forceinline__ void tma_gemm_cta(const GemmArgs<T>& p, const CUtensorMap* b_map) {
  extern __shared__ unsigned char smem_raw[];
  __shared__ uint64_t full[Pipe::kStages], empty[Pipe::kStages];
  // Swizzle atoms must be 1024-byte aligned (kSmemBytes has the slack); the offset is the same in
  // both CTAs of a cluster, as the multicast copies need.
  const uint32_t smem_base = aligned_shared_address(smem_raw, wx::kSwizzleAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, wx::kSwizzleAtomBytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int role = warp / 4;  // 0 producer, 1 and 2 consumers
  const uint32_t rank = cluster_cta_rank();
  // This CTA's block and its peer's (the same n block): B is shared when both lie in one expert.
  const auto block_of = [&](uint32_t r) {
    return cl::cluster_tile(blockIdx.x / cl::kClusterCtas, int(r), p.m_blocks, p.n_blocks,
                            ix::kGroupM / cl::kClusterCtas);
  };
  const auto rows_of = [&](const ix::TileCoord& t) {
    return t.mb < p.m_blocks ? grouped_tile(p, t.mb, wx::kBM) : GroupedTile{0, -1};
  };
  const ix::TileCoord tile = block_of(rank);
  const GroupedTile own = rows_of(tile), peer = rows_of(block_of(rank ^ 1u));
  const bool share_b = own.expert >= 0 && own.expert == peer.expert;
  const int64_t n0 = tile.nb * (kGateUp ? wx::kGateCols : Tile::kBN);
  const int k_iters = own.expert >= 0 ? int(p.k_iters) : 0;  // a block past the plan: no work

  init_stage_barriers(full, empty, Pipe::kFullArrivals, cl::empty_arrivals(share_b));

  if (role == 0) {
    warpgroup_release_registers<cl::kProducerRegisters>();
    if (tid == 0) tma_prefetch_descriptor(b_map);
    // This thread's A chunks: chunk `col` of rows gather_chunk_row(tid, i) (nullptr: a padding
    // row, zero-filled).
    const int col = wx::chunk_col(tid);
    const T* a_src[cl::kGatherChunksPerThread];
#pragma unroll
    for (int i = 0; i < cl::kGatherChunksPerThread; ++i)
      a_src[i] = k_iters > 0 ? a_row_source<T, kGateUp>(p, own.row0 + cl::gather_chunk_row(tid, i)) : nullptr;
    for (int iter = 0; iter < k_iters; ++iter) {
      const int stage = Tile::stage_of(iter);
      if (Pipe::producer_waits(iter)) mbarrier_wait_parity(&empty[stage], Pipe::empty_parity(iter));
      const int k = iter * wx::kBKElems;
      if (tid == 0) {
        mbarrier_arrive_expect_tx(&full[stage], Pipe::kStageTxBytes);
#pragma unroll
        for (int h = 0; h < cl::kClusterCtas; ++h) {
          if (share_b && h != int(rank)) continue;  // the peer multicasts that box
          const wx::BoxRow box = wx::b_box_row(kGateUp, h, n0);
          void* const dst = smem + Pipe::b_half_offset(stage, h);
          if (share_b) {
            tma_load_4d_multicast(dst, b_map, k, int(box.row), int(box.half), own.expert, &full[stage], cl::kClusterMask);
          } else {
            tma_load_4d(dst, b_map, k, int(box.row), int(box.half), own.expert, &full[stage]);
          }
        }
      }
      unsigned char* const a_tile = smem + Tile::a_tile_offset(stage);
      const int64_t k_chunk = k + col * ix::kChunkElems;
#pragma unroll
      for (int i = 0; i < cl::kGatherChunksPerThread; ++i) {
        const int elems = ix::chunk_elems(k_chunk, p.k_total, a_src[i] != nullptr);
        cp_async_16_partial(a_tile + wx::swizzled_offset(cl::gather_chunk_row(tid, i), col),
                            elems > 0 ? a_src[i] + k_chunk : p.w, elems * wx::kElemBytes);
      }
      cp_async_commit();
      // Publish the copies of kGatherLag stages back: landed, fenced for wgmma, arrived.
      if (Pipe::published_after(iter) >= 0) {
        cp_async_wait<cl::kGatherLag>();
        fence_proxy_async_shared();
        mbarrier_arrive(&full[Tile::stage_of(Pipe::published_after(iter))]);
      }
    }
    cp_async_wait<0>();
    fence_proxy_async_shared();
    for (int iter = k_iters - cl::kGatherLag > 0 ? k_iters - cl::kGatherLag : 0; iter < k_iters; ++iter)
      mbarrier_arrive(&full[Tile::stage_of(iter)]);
    cluster_sync();  // no CTA leaves while its peer may still signal it
  } else {
    warpgroup_claim_registers<cl::kConsumerRegisters>();
    const int warpgroup = role - 1, warp_in_group = warp % 4;
    // Iteration iter's stage back to the producers that write it, once per consumer warp.
    const auto release = [&](int iter) {
      if (lane != 0 || !Pipe::consumer_releases(iter, k_iters)) return;
      mbarrier_arrive_cluster(&empty[Tile::stage_of(iter)], rank);
      if (share_b) mbarrier_arrive_cluster(&empty[Tile::stage_of(iter)], rank ^ 1u);
    };
    float acc[Tile::kAccRegs];
    zero_accumulators(acc);
    static_assert(Tile::kBatchesInFlight == 1, "release(iter - 1) below");
    for (int iter = 0; iter < k_iters; ++iter) {
      const int stage = Tile::stage_of(iter);
      mbarrier_wait_parity(&full[stage], Pipe::full_parity(iter));
      issue_stage<T>(acc, wx::make_smem_desc(smem_base + Tile::a_warpgroup_offset(stage, warpgroup)),
                     wx::make_smem_desc(smem_base + Tile::b_tile_offset(stage)));
      wgmma_wait<Tile::kBatchesInFlight>();  // this batch stays in flight while the next stage is waited for
      if (iter > 0) release(iter - 1);
    }
    wgmma_wait<0>();
    if (k_iters > 0) {
      release(k_iters - 1);
      wgmma_fence_operands(acc);
      store_tile<T, kGateUp>(p, acc, own.row0, n0, warpgroup, warp_in_group, lane);
    }
    cluster_sync();
  }
}

// One CTA per SM (193 KB of shared memory); 384 threads at entry get 168 registers each, then
// setmaxnreg moves them from the producer to the consumers.
template <typename T, bool kGateUp>
__global__ void __launch_bounds__(cl::kThreads, 1)
    grouped_tma_kernel(const GemmArgs<T> p, const __grid_constant__ CUtensorMap b_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  tma_gemm_cta<T, kGateUp>(p, &b_map);
#else
  __trap();  // only compiled for sm_90a; the launcher runs it on compute capability 9.0 only
#endif
}

}  // namespace

template <typename T, bool kGateUp>
cudaError_t grouped_gemm_sm90_tma(const GemmArgs<T>& p, cudaStream_t stream) {
  const int64_t ctas = cl::kClusterCtas * cl::cluster_count(p.m_blocks, p.n_blocks);
  if (ctas > kMaxGridX || !p.vector) return cudaErrorInvalidValue;
  if (ctas == 0) return cudaSuccess;
  // The weights as {K, n_total, halves, E} (moe/fused_moe_wgmma_index.h, section 2).
  const uint64_t row_bytes = uint64_t(p.k_total) * sizeof(T);
  const TensorMapShape shape{
      {uint64_t(p.k_total), uint64_t(p.n_total), uint64_t(wx::b_map_halves(kGateUp)), uint64_t(p.experts)},
      {row_bytes, row_bytes * uint64_t(p.n_total), uint64_t(p.w_expert_stride) * sizeof(T)}};
  CUtensorMap b_map;
  cudaError_t status = make_swizzled_tensor_map(&b_map, p.w, shape, sizeof(T), wx::kGateCols);
  if (status != cudaSuccess) return status;
  return launch_on_clusters<grouped_tma_kernel<T, kGateUp>>(ctas, cl::kClusterCtas, cl::kThreads, Tile::kSmemBytes,
                                                             cl::kEntryRegisters, stream, p, b_map);
}

template cudaError_t grouped_gemm_sm90_tma<Half, true>(const GemmArgs<Half>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90_tma<Half, false>(const GemmArgs<Half>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90_tma<BFloat16, true>(const GemmArgs<BFloat16>&, cudaStream_t);
template cudaError_t grouped_gemm_sm90_tma<BFloat16, false>(const GemmArgs<BFloat16>&, cudaStream_t);

}  // namespace torch_ext::cuda
