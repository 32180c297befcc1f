// The bookkeeping of the Hopper GEMMs' TMA pipeline (quant/w8a8_wgmma_tma.cu,
// moe/fused_moe_wgmma_tma.cu), host+device so that tests/cpp/wgmma_cluster_pipeline_sim.cpp runs
// the protocol on the CPU with a model of the mbarrier and of the multicast copies: which CTA of
// a cluster computes which tile, where each copy lands, the bytes and arrivals each barrier
// phase waits for, and the phase parities.
//
// Why a cluster: the cp.async ring of common/cuda/wgmma_ring.cuh feeds a 128 x 256 tile (1/256 +
// 1/128) bytes from L2 per MAC; the W8A8 int8 GEMM stopped at 1008 TOPS on H100 (2026-11-26), an
// operand stream of ~5.9 TB/s, about what H100's L2 is credited with. Two CTAs that own
// vertically adjacent tiles (m blocks 2p and 2p + 1, the same n block) need the same B tile: each
// fetches one half of it and the copy engine multicasts the half into both CTAs' shared memory,
// so a CTA reads (1/256 + 1/256) bytes per MAC from L2, a third less (CUTLASS's 2 x 1 cluster).
//
// Roles (warp specialization, as CUTLASS's TMA GEMMs): warpgroup 0 is the producer (one thread
// issues the copies; the warpgroup gives its registers away with setmaxnreg), warpgroups 1 and 2
// the consumers (wgmma on 64 rows each, the layout of common/wgmma_gemm_tile.h). Per stage s:
//   full[s]:  1 arrival (the producer's arrive.expect_tx) + the stage's bytes (A, both B halves);
//             the peer's multicast may land before the local expect_tx: the transaction count
//             goes negative for a while, which the mbarrier allows;
//   empty[s]: one arrival per consumer warp of BOTH CTAs (the peer's producer writes into this
//             CTA's stage too, so both CTAs' readers must have released it before either
//             producer refills it).
// A consumer releases iteration i's stage only once the wgmma batch that read it completed, and
// only if some iteration i + kStages will refill it (an arrival on the peer after the peer's last
// wait could reach a CTA that has exited).
//
// Gathered A (fused_moe's grouped GEMMs, moe/fused_moe_wgmma_tma.cu): A rows are tokens picked
// by the expert plan, which a tensor copy cannot gather, so every producer thread cp.asyncs its
// chunks of A (rows gather_chunk_row) and publishes them kGatherLag stages later: wait for that
// group, fence it into the async proxy (wgmma reads through it), arrive. full[s] then counts 128
// such arrivals + the arrive.expect_tx of the thread issuing B's copies (B's bytes only). The
// lag must stay below kStages - 1: a producer waiting for a release that needs data it has not
// yet published would wait forever (the static_assert in Pipeline). And B is shared only when
// both CTAs' 128-row blocks lie in one expert; otherwise each CTA fetches its whole B and
// releases only its own stages (the same bytes per stage, kConsumerWarps arrivals per release).
#pragma once

#include <cstdint>

#include "common/index_math.h"
#include "common/macros.h"
#include "common/wgmma_gemm_tile.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace wgmma_cluster {

using wgmma_gemm::kBK;
using wgmma_gemm::kBM;

constexpr int kClusterCtas = 2;  // along M
constexpr int kWarpgroupThreads = wgmma_gemm::kWarpgroupThreads;
constexpr int kConsumerWarpgroups = wgmma_gemm::kWarpgroups;  // 64 rows each
constexpr int kThreads = (1 + kConsumerWarpgroups) * kWarpgroupThreads;  // 384
// Registers per thread at entry under __launch_bounds__(kThreads, 1): the SM's 64K over 384
// threads, in steps of 8. The launchers check the compiled kernels have exactly this.
constexpr int kEntryRegisters = 65536 / kThreads / 8 * 8;  // 168
// setmaxnreg budgets: multiples of 8 summing to the 3 x 168 the warpgroups have at entry (a claim
// beyond what the producer gave back waits forever). CUTLASS's 40 / 232: the producer keeps its
// addresses (the gathered-A producer's 8 row pointers spilled at 24), the consumers hold 128
// accumulators (int8, fused_moe) or 64 + 2 x 64 (fp8); no spills in any of the kernels (CUDA 13.0).
constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;
static_assert(kProducerRegisters + kConsumerWarpgroups * kConsumerRegisters == 3 * kEntryRegisters,
              "the entry allocation");
constexpr int kConsumerWarps = kConsumerWarpgroups * kWarpgroupThreads / 32;
constexpr int kEmptyArrivals = kConsumerWarps * kClusterCtas;  // 16
constexpr uint16_t kClusterMask = (1u << kClusterCtas) - 1;     // multicast to every CTA
// Gathered A: the producer warpgroup's cp.async map (thread t: 16-byte chunk t % 8 of rows
// t / 8 + 16 i) and how many stages its copies stay unpublished.
constexpr int kGatherRowsPerPass = kWarpgroupThreads / wgmma_gemm::kChunksPerRow;  // 16
constexpr int kGatherChunksPerThread = kBM / kGatherRowsPerPass;                   // 8
constexpr int kGatherLag = 2;
TORCH_EXT_HOST_DEVICE int gather_chunk_row(int tid, int i) {
  return tid / wgmma_gemm::kChunksPerRow + kGatherRowsPerPass * i;
}
// Releases a stage's empty barrier waits for: every consumer warp of the CTAs sharing B.
TORCH_EXT_HOST_DEVICE int empty_arrivals(bool share_b) { return share_b ? kEmptyArrivals : kConsumerWarps; }

template <class Tile, bool kGatherA = false>
struct Pipeline {
  static constexpr int kStages = Tile::kStages;
  static constexpr int kBHalfRows = Tile::kBN / kClusterCtas;  // the rows of B one CTA fetches
  static constexpr uint32_t kATxBytes = uint32_t(wgmma_gemm::kATileBytes);
  static constexpr uint32_t kBHalfTxBytes = uint32_t(kBHalfRows * kBK);
  // Bytes the copy engine brings per stage (gathered A: cp.async's, counted by arrivals instead),
  // and the arrivals a stage's full barrier waits for.
  static constexpr uint32_t kStageTxBytes = (kGatherA ? 0u : kATxBytes) + kClusterCtas * kBHalfTxBytes;
  static constexpr int kFullArrivals = kGatherA ? kWarpgroupThreads + 1 : 1;
  static_assert(kATxBytes + kClusterCtas * kBHalfTxBytes == uint32_t(Tile::kStageBytes), "a stage is A and B");
  // A producer at iteration i waits for the release of i - kStages, which the consumers give once
  // they issued i - kStages + 1, published at the latest by the end of iteration i - 1: so
  // i - kStages + 1 <= i - 1 - kGatherLag (the simulator deadlocks at kStages - 1).
  static_assert(!kGatherA || kGatherLag <= kStages - 2, "publish before waiting for a release");
  static_assert(kBHalfTxBytes % wgmma_gemm::kSwizzleAtomBytes == 0, "each half starts on a swizzle atom");
  static_assert(kBHalfRows <= 256 && kBM <= 256, "a TMA box has at most 256 rows");

  // Where CTA `rank`'s half of B lands in stage s (in every CTA of the cluster).
  static TORCH_EXT_HOST_DEVICE int b_half_offset(int stage, int rank) {
    return Tile::b_tile_offset(stage) + rank * int(kBHalfTxBytes);
  }
  // The phase of full[stage_of(iter)] that iteration iter's data completes (parity bit).
  static TORCH_EXT_HOST_DEVICE uint32_t full_parity(int iter) { return uint32_t(iter / kStages) & 1u; }
  // Before loading iteration iter, the producer waits for the release of iteration
  // iter - kStages (the stage's previous use), if there was one.
  static TORCH_EXT_HOST_DEVICE bool producer_waits(int iter) { return iter >= kStages; }
  static TORCH_EXT_HOST_DEVICE uint32_t empty_parity(int iter) { return uint32_t(iter / kStages - 1) & 1u; }
  // Whether the consumers release iteration iter's stage (some later iteration refills it).
  static TORCH_EXT_HOST_DEVICE bool consumer_releases(int iter, int k_iters) { return iter + kStages < k_iters; }
  // Gathered A: the iteration whose copies a producer thread publishes at the end of iteration
  // iter (-1: none yet); after its last iteration it publishes every one still unpublished.
  static TORCH_EXT_HOST_DEVICE int published_after(int iter) { return iter - kGatherLag; }
};

// The tile of CTA `rank` in cluster `cluster`: clusters walk (m block pairs) x (n blocks) in the
// grouped order of index_math::grouped_tile (group_m pairs of m blocks share their B strips in
// L2); rank r takes m block 2 p + r. With an odd number of m blocks the last pair's second CTA
// lies past M: it fetches zeros (TMA fills outside the tensor), multicasts its half of B and
// stores nothing.
TORCH_EXT_HOST_DEVICE index_math::TileCoord cluster_tile(int64_t cluster, int rank, int64_t m_blocks, int64_t n_blocks,
                                                         int64_t group_m) {
  const int64_t pairs = (m_blocks + kClusterCtas - 1) / kClusterCtas;
  const index_math::TileCoord pair = index_math::grouped_tile(cluster, pairs, n_blocks, group_m);
  return index_math::TileCoord{pair.mb * kClusterCtas + rank, pair.nb};
}
TORCH_EXT_HOST_DEVICE int64_t cluster_count(int64_t m_blocks, int64_t n_blocks) {
  return (m_blocks + kClusterCtas - 1) / kClusterCtas * n_blocks;
}

}  // namespace wgmma_cluster
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
