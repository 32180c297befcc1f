// Hopper GEMM of scaled_int8_mm and scaled_fp8_mm on the copy engine (quant/w8a8_wgmma.h),
// sm_90a only, opt-in (TORCH_EXT_WGMMA_TMA=1) until it has run on a GPU. The same tiles, k blocks
// and epilogue as the cp.async kernel of quant/w8a8_wgmma.cu (quant/w8a8_wgmma_ops.cuh), so the
// same bits; what changes is how the operands reach shared memory (the reasoning and the barrier
// protocol: common/wgmma_cluster_pipeline.h, run on the CPU by
// tests/cpp/wgmma_cluster_pipeline_sim.cpp):
//   - CTAs in clusters of 2 along M (m blocks 2p, 2p + 1, one n block). Each CTA copies its A
//     tile and one half of the shared B tile with TMA (128 x 128-byte boxes, 128-byte swizzle:
//     the layout the wgmma descriptors read); the B half is multicast into both CTAs, so each
//     reads a third fewer bytes from L2 than the cp.async kernel (which measured 1008 TOPS int8
//     on H100, an operand stream of about 5.9 TB/s).
//   - Warpgroup 0 produces (one thread waits for a free stage, announces its bytes, issues the
//     copies); warpgroups 1 and 2 consume (wait for the stage's bytes, 4 wgmma k32 steps,
//     release the stage to both CTAs' producers once the batch that read it is done). The
//     producer's registers go to the consumers (setmaxnreg 40 / 232).
//   - Tails: boxes past M, N or K read zeros (the copy engine fills them), so partial tiles
//     multiply zeros; the epilogue stores only rows < M, columns < N.
#include <cuda.h>

#include "common/cuda/cluster_pipeline.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/tensor_map.h"
#include "common/cuda/tma.cuh"
#include "common/wgmma_cluster_pipeline.h"
#include "quant/w8a8_wgmma_ops.cuh"

namespace torch_ext::cuda {
namespace {

using namespace w8a8_sm90;
namespace cl = ::torch_ext::wgmma_cluster;

template <typename O, class Op>
__device__ __forceinline__ void tma_mm_cta(const WgmmaArgs<O, Op>& p, const CUtensorMap* a_map,
                                           const CUtensorMap* b_map) {
  using Tile = typename Op::Tile;
  using Pipe = cl::Pipeline<Tile>;
  extern __shared__ unsigned char smem_raw[];
  __shared__ uint64_t full[Pipe::kStages], empty[Pipe::kStages];
  // Swizzle atoms must be 1024-byte aligned (kSmemBytes has the slack); the offset is the same in
  // both CTAs of a cluster, as the multicast copies need.
  const uint32_t smem_base = aligned_shared_address(smem_raw, ix::kSwizzleAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, ix::kSwizzleAtomBytes);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int role = warp / 4;  // 0 producer, 1 and 2 consumers
  const uint32_t rank = cluster_cta_rank();
  const mm_ix::TileCoord tile = cl::cluster_tile(blockIdx.x / cl::kClusterCtas, int(rank), p.m_blocks, p.n_blocks,
                                                 mm_ix::kGroupM / cl::kClusterCtas);
  const int m0 = int(tile.mb) * ix::kBM, n0 = int(tile.nb) * Tile::kBN;

  init_stage_barriers(full, empty, Pipe::kFullArrivals, cl::kEmptyArrivals);

  if (role == 0) {
    warpgroup_release_registers<cl::kProducerRegisters>();
    if (tid == 0) {
      tma_prefetch_descriptor(a_map);
      tma_prefetch_descriptor(b_map);
      const int b_row = n0 + int(rank) * Pipe::kBHalfRows;
      for (int iter = 0; iter < p.k_iters; ++iter) {
        const int stage = Tile::stage_of(iter);
        if (Pipe::producer_waits(iter)) mbarrier_wait_parity(&empty[stage], Pipe::empty_parity(iter));
        mbarrier_arrive_expect_tx(&full[stage], Pipe::kStageTxBytes);
        const int k = iter * ix::kBK;
        tma_load_4d(smem + Tile::a_tile_offset(stage), a_map, k, m0, 0, 0, &full[stage]);
        tma_load_4d_multicast(smem + Pipe::b_half_offset(stage, int(rank)), b_map, k, b_row, 0, 0, &full[stage],
                              cl::kClusterMask);
      }
    }
    cluster_sync();  // no CTA leaves while its peer may still signal it (releases go to both)
  } else {
    warpgroup_claim_registers<cl::kConsumerRegisters>();
    const int warpgroup = role - 1, warp_in_group = warp % 4;
    // Iteration iter's stage back to both CTAs' producers, once per consumer warp.
    const auto release = [&](int iter) {
      if (lane == 0 && Pipe::consumer_releases(iter, p.k_iters)) {
#pragma unroll
        for (int cta = 0; cta < cl::kClusterCtas; ++cta) mbarrier_arrive_cluster(&empty[Tile::stage_of(iter)], cta);
      }
    };
    using Acc = typename Op::Acc;
    Acc acc[Tile::kAccRegs];
    zero_accumulators(acc);
    // Issue iteration iter into the accumulators `into` once its bytes have landed.
    const auto issue = [&](int iter, auto& into) {
      const int stage = Tile::stage_of(iter);
      mbarrier_wait_parity(&full[stage], Pipe::full_parity(iter));
      issue_stage<Op>(into, smem_base, stage, warpgroup);
    };
    k_loop<Op>(p.k_iters, acc, issue, release);
    wgmma_fence_operands(acc);
    store_tile(p, acc, m0, n0, warpgroup, warp_in_group, lane);
    cluster_sync();
  }
}

// One CTA per SM (192 KB of stages); 384 threads at entry get 168 registers each, then
// setmaxnreg moves them from the producer to the consumers.
template <typename O, class Op>
__global__ void __launch_bounds__(cl::kThreads, 1)
    tma_mm_kernel(const WgmmaArgs<O, Op> p, const __grid_constant__ CUtensorMap a_map,
                  const __grid_constant__ CUtensorMap b_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  tma_mm_cta<O, Op>(p, &a_map, &b_map);
#else
  __trap();  // only compiled for sm_90a; the launchers run it on compute capability 9.0 only
#endif
}

template <typename O, class Op>
struct ClusterLaunch {
  static cudaError_t run(const typename Op::Params& p, cudaStream_t stream) {
    const WgmmaArgs<O, Op> args = make_wgmma_args<O, Op>(p);
    const int64_t ctas = cl::kClusterCtas * cl::cluster_count(args.m_blocks, args.n_blocks);
    if (ctas > kMaxGridX) return cudaErrorInvalidValue;
    // A's boxes are its 128-row tiles, B's the halves of its kBN-row tiles.
    CUtensorMap a_map, b_map;
    const auto matrix = [&](int64_t rows, int64_t row_stride) {
      const uint64_t bytes = uint64_t(rows) * uint64_t(row_stride);  // (unused outer dimensions: size 1)
      return TensorMapShape{{uint64_t(p.k), uint64_t(rows), 1, 1}, {uint64_t(row_stride), bytes, bytes}};
    };
    cudaError_t status = make_swizzled_tensor_map(&a_map, p.a, matrix(p.m, p.a_row_stride), 1, ix::kBM);
    if (status == cudaSuccess) {
      status = make_swizzled_tensor_map(&b_map, p.b, matrix(p.n, p.b_row_stride), 1,
                                        cl::Pipeline<typename Op::Tile>::kBHalfRows);
    }
    if (status != cudaSuccess) return status;
    return launch_on_clusters<tma_mm_kernel<O, Op>>(ctas, cl::kClusterCtas, cl::kThreads, Op::Tile::kSmemBytes,
                                                    cl::kEntryRegisters, stream, args, a_map, b_map);
  }
};

}  // namespace

cudaError_t scaled_int8_mm_sm90_tma(const ScaledInt8MmParams& p, cudaStream_t stream) {
  return launch_for_out_type<Int8Wgmma, ClusterLaunch>(p, stream);
}
cudaError_t scaled_fp8_mm_sm90_tma(const ScaledFp8MmParams& p, cudaStream_t stream) {
  return launch_for_out_type<Fp8Wgmma, ClusterLaunch>(p, stream);
}

}  // namespace torch_ext::cuda
