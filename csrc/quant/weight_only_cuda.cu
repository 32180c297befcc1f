// CUDA kernels of the weight-only quantized linear (quant/weight_only_cuda.h): y = x W^T + bias with
// W stored as 4- or 8-bit integers in the tile layout of docs/quant-layout.md, x and y fp16/bf16.
// Every index map, the register dequantization and the split rule are host+device functions in
// quant/weight_only_cuda_index.h, run thread by thread on the CPU by tests/cpp/weight_only_cuda_sim.cpp.
//
// linear_kernel<T, TileConfig<bits, block_m>>: a mixed-precision tensor-core GEMM, y^T = W x^T.
//   - A CTA (8 warps) owns 256 output features (16 tile rows) x block_m tokens (16 for M <= 16,
//     64 otherwise) x the k range of its split. Warp w owns tile rows 2w, 2w + 1 for all tokens,
//     so warps never reduce with each other.
//   - Each CTA streams its weight tiles once: a 3-4 stage cp.async pipeline (16-byte copies,
//     zero-fill past the tensors; 96 KB of shared memory at most) brings per stage 8 (decode
//     4-bit) or 4 k16 tiles of the 16 tile rows (each row's run is contiguous in memory), the
//     matching x tile (16-byte chunks clipped at K, swizzled for ldmatrix) and the scales / zero
//     points of the groups the stage touches ("slots"). The CTAs of one column block that differ
//     only in their tokens are launched next to each other (grid.x = token blocks), so the
//     weights come from HBM once and from L2 for the others.
//   - Per k16 step a warp loads its x fragments with ldmatrix (tokens are mma's n8 dimension),
//     reads each lane's word(s) of its two tiles (one 128-byte conflict-free wavefront per tile),
//     dequantizes them in registers (exponent trick: LOP3 / PRMT, then subtract and scale, see
//     the index header) straight into the mma A registers, and issues one mma.m16n8k16 with
//     fp32 accumulation per 8-token block: a dequantized tile feeds block_m / 8 mma.
//   - Small M cannot fill 132 SMs with column blocks alone (8192 features = 32 CTAs), so the
//     host splits K (ix::plan_linear): each split writes fp32 partial sums to the workspace
//     [splits][M][N] and split_reduce_kernel adds them in split order (deterministic), adds the
//     bias and rounds once. Without a split the GEMM's epilogue does the same directly. On sm_90
//     the reduction is a programmatic dependent launch (common/cuda/pdl.cuh): its CTAs wait
//     beside the GEMM's last ones instead of being launched after it.
//   - Hopper (opt-in, TORCH_EXT_WO_WGMMA=1, linear_kernel<..., kWgmma = true>): the batch config's
//     k16 steps as wgmma.m64n64k16 with the warps' dequantized fragments as A (registers) and
//     the x tile, already in wgmma's swizzled K-major layout, as B (ix::x_wgmma_desc): 4 warps'
//     tiles per instruction instead of 16 mma.sync and 4 ldmatrix per warp. Compiled for sm_90a,
//     simulated, not yet run.
//   - Row experts (fused_moe_quantized: experts picked on the device): a CTA's weights are those
//     of the expert id it reads first, row_experts[m0]. Decode (each (token, slot) pair its own
//     row): one row per CTA in the decode config. Grouped (the pairs' rows grouped by expert on
//     the device, each expert's padded to a multiple of block_m): the config's block_m rows per
//     CTA; the grid covers the most rows any routing needs, and a CTA past the grouped rows
//     (id -1) skips the k loop and writes zeros. Everything else as above.
//   - Tails: tile rows past N and k tiles past the split are zero-filled and never reach y; x is
//     read only for rows < M and columns < K (zero-filled chunk tails). x / its row stride not
//     16-byte aligned, or scales whose rows are not (N % 8 != 0), take synchronous element loads
//     into the same shared layout (correct, slower); y is stored element by element.
//
// dequantize_kernel<S, O, C>: out[n, k] = (q - zero) * scale in compute type C, one rounding to
// O; a CTA expands 16 tiles of one tile row through shared memory, each thread 8 consecutive
// values of a row per pass (one scale, one 16-byte store).
#include <cstdlib>
#include <type_traits>

#include "common/alignment.h"
#include "common/cuda/cp_async.cuh"
#include "common/cuda/hopper_switch.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/pdl.cuh"
#include "common/cuda/vec.cuh"
#include "common/cuda/wgmma.cuh"
#include "quant/weight_only_cuda.h"
#include "quant/weight_only_cuda_index.h"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::quant::wo_cuda;
using ::torch_ext::quant::symmetric_zero;
using ::torch_ext::quant::tile_offset_words;
using ::torch_ext::quant::tiles_for;
using ::torch_ext::quant::words_per_tile;

// Dynamic shared memory above this needs cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr int kDefaultSharedBytes = 48 * 1024;
// Split-K reduction: one thread per output, grid-stride beyond kReduceMaxBlocks.
constexpr int kReduceThreads = 256;
constexpr int64_t kReduceMaxBlocks = 4096;
// Kernel index paths are 32-bit where the values are: tokens, features, k and k tiles.
constexpr int64_t kMaxTokens = (int64_t(1) << 31) - ix::kBatchBlockM;
constexpr int64_t kMaxK = int64_t(1) << 30;

// ---------------------------------------------------------------------------------------------
// GEMM
// ---------------------------------------------------------------------------------------------

template <typename T>
struct LinearArgs {
  const uint32_t* qweight;
  const T* scales;
  const T* zeros;  // nullptr: symmetric
  const T* x;
  const T* bias;  // nullptr: none
  T* y;
  float* partial;  // [splits][m][n] when splits > 1
  // Row experts (row_experts != nullptr; weight_only.h): a CTA's weight is that of expert
  // row_experts[m0], whose packed words, scales and zeros start expert_q_words and
  // expert_s_elems after expert 0's; row_per_block: one row per CTA, y row r = x row r /
  // x_row_divisor; otherwise blocks of block_m rows grouped by expert.
  const int32_t* row_experts;
  bool row_per_block;
  int64_t x_row_divisor;
  int64_t expert_q_words, expert_s_elems;
  int64_t x_row_stride;
  int64_t y_row_stride;
  int m, n, k;
  int n_tiles, k_tiles;
  int group_tiles;  // group_size / 16, at most k_tiles (one group)
  int k_iters, iters_per_split, splits;
  bool x_vector;      // x and its row stride 16-byte aligned: cp.async, else synchronous loads
  bool scale_vector;  // N % 8 == 0 and scales / zeros 16-byte aligned (whole chunks per row)
};

// `count` (0..8) values from src, zeros after, as one 16-byte shared store: the unaligned path.
template <typename T>
__device__ __forceinline__ void copy_chunk_sync(T* dst, const T* src, int count) {
  Pack16<T> pack;
#pragma unroll
  for (int e = 0; e < Pack16<T>::kSize; ++e) pack.v[e] = e < count ? src[e] : T{0};
  store_pack16(dst, pack);
}

// CTAs per SM the launch bounds promise (they cap registers at 64K / (256 x this)): the config's
// residency on sm_80 / sm_90; sm_86 / sm_89 have 100 KB of shared memory per SM, where one 56-96 KB
// CTA fits anyway and a promise of two would only cost spills.
template <class Cfg>
constexpr int kLaunchMinCtas =
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 860 || __CUDA_ARCH__ == 870 || __CUDA_ARCH__ == 890)
    1;
#else
    Cfg::kCtasPerSm;
#endif

template <typename T, class Cfg, bool kWgmma>
__global__ void __launch_bounds__(ix::kThreads, kLaunchMinCtas<Cfg>) linear_kernel(const LinearArgs<T> a) {
  constexpr int kBits = Cfg::kBits;
  constexpr int kStages = Cfg::kStages;
  constexpr int kTileWords = Cfg::kTileWords;
  using Params = ix::GroupParams<T, kBits>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // wgmma reads x through the 128-byte swizzle, which works on absolute address bits: its x
  // tiles start on 1024-byte atoms (the launcher adds one atom of slack).
  unsigned char* const smem = kWgmma ? align_shared_up(smem_raw, kWgmmaAtomBytes) : smem_raw;
  allow_dependent_launch();  // the split reduction (when there is one) waits for the whole grid

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const ix::BlockRows rows = ix::block_rows(int(blockIdx.x), Cfg::kBlockM, a.m, a.row_per_block, a.x_row_divisor);
  const int m0 = rows.m0, m_end = rows.m_end;
  const int32_t expert_id = a.row_experts != nullptr ? a.row_experts[m0] : 0;
  const bool idle = ix::block_is_idle(expert_id);  // the whole CTA
  const int64_t expert = idle ? 0 : expert_id;
  const uint32_t* const qweight = a.qweight + expert * a.expert_q_words;
  const T* const scales = a.scales + expert * a.expert_s_elems;
  const T* const zeros = a.zeros != nullptr ? a.zeros + expert * a.expert_s_elems : nullptr;
  const int tile_row0 = int(blockIdx.y) * ix::kBlockTiles;
  const int n0 = tile_row0 * ix::kTileRows;
  constexpr int kStageTiles = Cfg::kStageTiles;
  ix::SplitRange range = ix::split_range(int(blockIdx.z), a.iters_per_split, a.k_iters, a.k_tiles, kStageTiles);
  if (idle) range.iters = 0;  // the epilogue writes zero sums

  // This thread's copy sources, fixed for the whole k loop (a stage adds its first k tile). Its
  // i-th chunk of an operand is its first one kQRowsPerPass / kXRowsPerPass rows further down,
  // so one pointer per operand stays live (the batch kernel is at its register budget).
  const int q_row = ix::q_chunk_row<Cfg>(tid);
  const int q_tile = ix::q_chunk_tile<Cfg>(tid);
  const int64_t q_pass_words = int64_t(Cfg::kQRowsPerPass) * a.k_tiles * kTileWords;
  const uint32_t* const q_src =
      qweight + (tile_row0 + q_row < a.n_tiles
                     ? tile_offset_words(kBits, a.k_tiles, tile_row0 + q_row, 0) + ix::q_chunk_word<Cfg>(tid)
                     : 0);
  const int x_row = ix::x_chunk_row<Cfg>(tid);
  const int x_col = ix::x_chunk_col<Cfg>(tid);
  const int x_dst = ix::x_smem_offset<Cfg>(x_row, x_col);
  const int64_t x_pass_stride = int64_t(Cfg::kXRowsPerPass) * a.x_row_stride;
  const T* const x_src =
      a.x + (m0 + x_row < m_end ? (rows.x_row0 + x_row) * a.x_row_stride + x_col * ix::kChunkValues : 0);

  ix::StageWalker load_walker = ix::stage_walker(range.iter_begin, kStageTiles, a.group_tiles);
  const auto load_stage = [&](int stage, int iter) {
    unsigned char* const base = smem + stage * Cfg::kStageBytes;
    uint32_t* const sq = reinterpret_cast<uint32_t*>(base);
    T* const sx = reinterpret_cast<T*>(base + Cfg::kXOffset);
    const ix::StageSpan span = ix::next_stage(load_walker, iter, kStageTiles, range.kt_end, a.group_tiles);
    // Weights: 16 tile rows x kStageTiles tiles, each row's run contiguous.
#pragma unroll
    for (int i = 0; i < Cfg::kQChunksPerThread; ++i) {
      const int id = tid + i * ix::kThreads;
      const bool ok =
          ix::q_chunk_valid(tile_row0 + q_row + i * Cfg::kQRowsPerPass, a.n_tiles, span.kt0 + q_tile, span.kt_stop);
      const uint32_t* const src = q_src + i * q_pass_words + int64_t(span.kt0) * kTileWords;
      cp_async_16_zfill(sq + 4 * id, ok ? src : qweight, ok);
    }
    // x: rows < M only, columns clipped at K and at the split's last tile.
    const int k = span.kt0 * ix::kMmaK + x_col * ix::kChunkValues;
    const int bytes = ix::x_chunk_bytes(k, min(a.k, span.kt_stop * ix::kMmaK));
#pragma unroll
    for (int i = 0; i < Cfg::kXChunksPerThread; ++i) {
      const int row = x_row + i * Cfg::kXRowsPerPass;
      if (row >= Cfg::kBlockM || !ix::x_row_exists(m0, row, m_end)) continue;
      T* const dst = sx + x_dst + i * Cfg::kXRowsPerPass * Cfg::kBlockK;
      const T* const src = x_src + i * x_pass_stride + span.kt0 * ix::kMmaK;
      if (a.x_vector) {
        cp_async_16_partial(dst, bytes > 0 ? src : a.x, bytes);
      } else {
        copy_chunk_sync(dst, src, bytes / 2);
      }
    }
    // Scales (and zero points) of the stage's groups, one slot per group: usually 32 or 64
    // chunks, up to 2 per thread when small groups put several in a stage.
    const int scale_chunks = span.groups * Cfg::kSlotChunks * (zeros != nullptr ? 2 : 1);
    for (int id = tid; id < scale_chunks; id += ix::kThreads) {
      const ix::ScaleChunk c = ix::scale_chunk(id, span.groups);
      const T* const source = c.tensor == 0 ? scales : zeros;
      T* const dst = reinterpret_cast<T*>(base + (c.tensor == 0 ? Cfg::kScaleOffset : Cfg::kZeroOffset)) +
                     ix::scale_smem_index(c.slot, c.chunk * ix::kChunkValues);
      const int n = n0 + c.chunk * ix::kChunkValues;
      const T* const src = source + ix::scale_offset(span.first_group + c.slot, n, a.n);
      if (a.scale_vector) {
        cp_async_16_zfill(dst, n < a.n ? src : source, n < a.n);
      } else {
        copy_chunk_sync(dst, src, max(0, min(ix::kChunkValues, a.n - n)));
      }
    }
  };

  float acc[ix::kWarpTiles][Cfg::kTokenBlocks][4];
  zero_accumulators(acc);

  // Warp-uniform: 8-token blocks holding real tokens, and whether the warp's tiles exist.
  const int active_blocks = ix::active_token_blocks(m_end, m0, Cfg::kBlockM);
  const int active_pairs = (active_blocks + 1) / 2;
  const bool warp_active = tile_row0 + ix::warp_tile_row(warp, 0) < a.n_tiles;
  const uint16_t symmetric_zero_bits = ix::symmetric_zero_bits<T>(kBits);
  Params params[ix::kWarpTiles];
  int params_group = -1;  // the group `params` hold (the same values in every stage's slot)

  const auto load_params = [&](const unsigned char* base, int slot) {
    const T* const ss = reinterpret_cast<const T*>(base + Cfg::kScaleOffset);
    const T* const sz = reinterpret_cast<const T*>(base + Cfg::kZeroOffset);
#pragma unroll
    for (int i = 0; i < ix::kWarpTiles; ++i) {
      uint16_t scale[2], zero[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int nl = ix::warp_tile_row(warp, i) * ix::kTileRows + ix::lane_row(lane, h);
        const int index = ix::scale_smem_index(slot, nl);
        scale[h] = ss[index].bits;
        zero[h] = zeros != nullptr ? sz[index].bits : symmetric_zero_bits;
      }
      params[i] = ix::make_group_params<T, kBits>(scale, zero);
    }
  };

  // The warp's two tiles of k16 step t of the stage at `base`, dequantized into A fragments.
  const auto dequantize_step = [&](const unsigned char* base, int t, uint32_t(&frag)[ix::kWarpTiles][4]) {
    const uint32_t* const sq = reinterpret_cast<const uint32_t*>(base);
#pragma unroll
    for (int i = 0; i < ix::kWarpTiles; ++i) {
      uint32_t words[Cfg::kLaneWords];
#pragma unroll
      for (int h = 0; h < Cfg::kLaneWords; ++h)
        words[h] = sq[ix::q_smem_word<Cfg>(ix::warp_tile_row(warp, i), t, lane + 32 * h)];
      ix::dequantize_a<T, kBits>(words, params[i], frag[i]);
    }
  };
  // In a stage that crosses groups: the group of k tile kt (inside the split), its parameters
  // loaded from the stage's slot when they change.
  const auto params_for_tile = [&](const unsigned char* base, ix::GroupCursor& cursor, const ix::StageSpan& span,
                                   int kt) {
    ix::advance(cursor, kt, a.group_tiles);
    if (span.first_group + cursor.slot != params_group) {
      load_params(base, cursor.slot);
      params_group = span.first_group + cursor.slot;
    }
  };

  // One k16 step t of a stage: the warp's two tiles -> A registers, then per 16 tokens one
  // ldmatrix.x4 of x fragments feeding 2 tiles x 2 token blocks of mma. `blocks` (an
  // integral_constant) is the number of 8-token blocks holding tokens when known at compile time
  // (a full CTA, or one block: decode with M <= 8), so that the step has no branch and ptxas can
  // overlap consecutive steps; 0 reads active_blocks at run time (pair 0 always holds a token,
  // the other pairs and the odd block's mma are behind branches).
  const auto mma_step = [&](const unsigned char* base, int t, auto blocks) {
    constexpr int kKnownBlocks = decltype(blocks)::value;
    const T* const sx = reinterpret_cast<const T*>(base + Cfg::kXOffset);
    uint32_t frag[ix::kWarpTiles][4];
    dequantize_step(base, t, frag);
#pragma unroll
    for (int p = 0; p < Cfg::kTokenPairs; ++p) {
      if (kKnownBlocks > 0 ? 2 * p < kKnownBlocks : (p == 0 || p < active_pairs)) {
        uint32_t r[4];
        ldmatrix_x4(r, sx + ix::x_fragment_offset<Cfg>(p, t, lane));
        const uint32_t b_even[2] = {r[0], r[1]}, b_odd[2] = {r[2], r[3]};
#pragma unroll
        for (int i = 0; i < ix::kWarpTiles; ++i) {
          mma_m16n8k16<T>(acc[i][2 * p], frag[i], b_even);
          if (kKnownBlocks > 0 ? 2 * p + 1 < kKnownBlocks : 2 * p + 1 < active_blocks)
            mma_m16n8k16<T>(acc[i][2 * p + 1], frag[i], b_odd);
        }
      }
    }
  };
  using AllBlocks = std::integral_constant<int, Cfg::kTokenBlocks>;
  using OneBlock = std::integral_constant<int, 1>;
  using BlocksAtRunTime = std::integral_constant<int, 0>;

  // Hopper (kWgmma, batch config): a stage's k16 steps as wgmma.m64n64k16 per warp tile, A = the
  // warp's dequantized fragments, B = the x tile (ix::x_wgmma_desc). Every warp takes part (wgmma
  // is warpgroup-wide): tiles past N have zero scales, k16 steps past the split get zero A
  // fragments and meet zero-filled x, so no branch goes around a wgmma. Each step waits until
  // only its own batch is in flight (the previous step's fragments may then be overwritten), the
  // stage ends with nothing in flight (ptxas serializes wgmma batches that cross a loop back-edge).
  const auto wgmma_stage = [&](const unsigned char* base, const ix::StageSpan& span) {
    if constexpr (kWgmma) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
      static_assert(ix::wgmma_config_ok<Cfg>(), "the batch config");
      constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
      const uint32_t x_tile = shared_address(base + Cfg::kXOffset);
      ix::GroupCursor cursor = ix::group_cursor(span, a.group_tiles);
#pragma unroll
      for (int t = 0; t < kStageTiles; ++t) {
        const bool inside = span.kt0 + t < span.kt_stop;  // the same for the whole CTA
        if (inside) params_for_tile(base, cursor, span, span.kt0 + t);
        uint32_t frag[ix::kWarpTiles][4];
        dequantize_step(base, t, frag);
        if (!inside) zero_accumulators(frag);  // (0 - zero) * scale is not 0; x is, but keep it exact
        wgmma_fence();
#pragma unroll
        for (int i = 0; i < ix::kWarpTiles; ++i)
          wgmma_m64n64k16_rs<kBf16, false>(acc[i], frag[i], ix::x_wgmma_desc<Cfg>(x_tile, t));
        wgmma_commit();
        wgmma_wait<1>();
      }
      wgmma_wait<0>();
#pragma unroll
      for (int i = 0; i < ix::kWarpTiles; ++i) wgmma_fence_operands(acc[i]);
#else
      __trap();  // launched only on compute capability 9.0 from sm_90a code
#endif
    }
  };

  ix::StageWalker compute_walker = ix::stage_walker(range.iter_begin, kStageTiles, a.group_tiles);
  const auto compute_stage = [&](int stage, int iter) {
    const ix::StageSpan span = ix::next_stage(compute_walker, iter, kStageTiles, range.kt_end, a.group_tiles);
    if constexpr (kWgmma) {
      wgmma_stage(smem + stage * Cfg::kStageBytes, span);
      return;
    }
    if (!warp_active) return;
    const unsigned char* const base = smem + stage * Cfg::kStageBytes;
    if (ix::stage_is_uniform(span, kStageTiles)) {  // the common case (groups of a multiple of the stage)
      if (span.first_group != params_group) {
        load_params(base, 0);
        params_group = span.first_group;
      }
      if (active_blocks == Cfg::kTokenBlocks) {
#pragma unroll
        for (int t = 0; t < kStageTiles; ++t) mma_step(base, t, AllBlocks{});
      } else if (active_blocks == 1) {
#pragma unroll
        for (int t = 0; t < kStageTiles; ++t) mma_step(base, t, OneBlock{});
      } else {
#pragma unroll
        for (int t = 0; t < kStageTiles; ++t) mma_step(base, t, BlocksAtRunTime{});
      }
    } else {  // the stage crosses groups or ends K
      ix::GroupCursor cursor = ix::group_cursor(span, a.group_tiles);
#pragma unroll
      for (int t = 0; t < kStageTiles; ++t) {
        if (span.kt0 + t < span.kt_stop) {
          params_for_tile(base, cursor, span, span.kt0 + t);
          mma_step(base, t, BlocksAtRunTime{});
        }
      }
    }
  };

  cp_async_pipeline<kStages, kWgmma>(range.iter_begin, range.iters, load_stage, compute_stage);

  // Epilogue: accumulator (lane, e) of block (i, j) is feature n0 + 16 tile_row + acc_row and
  // token m0 + 8 j + acc_token. Split: fp32 partials; else bias in fp32 and one rounding.
  if (!warp_active) return;
#pragma unroll
  for (int i = 0; i < ix::kWarpTiles; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int n = n0 + ix::warp_tile_row(warp, i) * ix::kTileRows + ix::acc_row(lane, 2 * half);
      if (n >= a.n) continue;
      const float bias = a.splits == 1 && a.bias != nullptr ? to_compute(a.bias[n]) : 0.f;
#pragma unroll
      for (int j = 0; j < Cfg::kTokenBlocks; ++j)
#pragma unroll
        for (int e = 2 * half; e < 2 * half + 2; ++e) {
          const int m = m0 + j * ix::kMmaTokens + ix::acc_token(lane, e);
          if (!ix::output_in_bounds(m, n, m_end, a.n)) continue;
          if (a.splits > 1) {
            a.partial[ix::partial_offset(blockIdx.z, m, n, a.m, a.n)] = acc[i][j][e];
          } else {
            a.y[m * a.y_row_stride + n] = from_compute<T>(acc[i][j][e] + bias);
          }
        }
    }
}

// Split-K reduction: one thread per output (m, n): partial sums in split order, then the bias
// (as the unsplit epilogue: sum + bias), one rounding. Only small problems split (at most
// 2 * num_sms CTA tiles of 64 x 256), so this is a few microseconds at most. The loads of
// kReduceBatch splits are issued before their sums so that their latencies overlap (the sums
// keep split order).
constexpr int kReduceBatch = 8;

template <typename T>
__global__ void __launch_bounds__(kReduceThreads)
    split_reduce_kernel(const float* partial, const T* bias, T* y, int64_t y_row_stride, int64_t m, int64_t n,
                        int splits) {
  wait_for_prior_grid();  // the GEMM's partial sums
  const int64_t total = m * n;
  for (int64_t idx = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kReduceThreads) {
    const int64_t row = idx / n, col = idx - row * n;
    float sum = 0.f;
    int s = 0;
    for (; s + kReduceBatch <= splits; s += kReduceBatch) {
      float values[kReduceBatch];
#pragma unroll
      for (int j = 0; j < kReduceBatch; ++j) values[j] = partial[ix::partial_offset(s + j, row, col, m, n)];
#pragma unroll
      for (int j = 0; j < kReduceBatch; ++j) sum += values[j];
    }
    for (; s < splits; ++s) sum += partial[ix::partial_offset(s, row, col, m, n)];
    const float b = bias != nullptr ? to_compute(bias[col]) : 0.f;
    y[row * y_row_stride + col] = from_compute<T>(sum + b);
  }
}

template <typename T, class Cfg, bool kWgmma = false>
cudaError_t launch_linear(const LinearArgs<T>& a, const ix::LinearPlan& plan, cudaStream_t stream) {
  const auto kernel = linear_kernel<T, Cfg, kWgmma>;
  constexpr int kSmemBytes = Cfg::kSmemBytes + (kWgmma ? kWgmmaAtomBytes : 0);
  if constexpr (kSmemBytes > kDefaultSharedBytes) {
    const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
    if (status != cudaSuccess) return status;
  }
  const dim3 grid(unsigned(plan.m_blocks), unsigned(plan.n_blocks), unsigned(plan.splits));
  kernel<<<grid, ix::kThreads, kSmemBytes, stream>>>(a);
  cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess || plan.splits == 1) return status;
  const int64_t total = int64_t(a.m) * a.n;
  const int64_t blocks = ix::min64(ix::ceil_div(total, kReduceThreads), kReduceMaxBlocks);
  return launch_dependent(split_reduce_kernel<T>, dim3(unsigned(blocks)), dim3(kReduceThreads), 0, stream, a.partial,
                          a.bias, a.y, a.y_row_stride, int64_t(a.m), int64_t(a.n), a.splits);
}

// Sizes, dtypes and limits the GEMM supports (weight_only_cuda.h).
bool linear_params_valid(const WeightOnlyLinearParams& p) {
  const QuantizedWeightView& w = p.w;
  const bool dtype_ok = (p.x_dtype == ScalarKind::kFloat16 || p.x_dtype == ScalarKind::kBFloat16) &&
                        w.scale_dtype == p.x_dtype;
  const bool rows_ok = p.row_experts == nullptr ||
                       (ix::expert_rows_valid(p.expert_rows) &&
                        (p.expert_rows == ix::kRowPerBlock ? p.x_row_divisor >= 1 : p.x_row_divisor == 1) &&
                        p.expert_qweight_words >= 0 && p.expert_scale_elems >= 0);
  return dtype_ok && rows_ok && (w.bits == 4 || w.bits == 8) && w.group_size > 0 && w.group_size % 16 == 0 &&
         p.m >= 0 && p.m <= kMaxTokens && w.n >= 0 && ix::ceil_div(w.n, ix::kBlockN) <= ix::kMaxGridYZ && w.k >= 0 &&
         w.k < kMaxK;
}

template <typename T>
LinearArgs<T> make_linear_args(const WeightOnlyLinearParams& p, const ix::LinearPlan& plan, void* workspace) {
  const QuantizedWeightView& w = p.w;
  LinearArgs<T> a{};
  a.qweight = reinterpret_cast<const uint32_t*>(w.qweight);
  a.scales = static_cast<const T*>(w.scales);
  a.zeros = static_cast<const T*>(w.zeros);
  a.x = static_cast<const T*>(p.x);
  a.bias = static_cast<const T*>(p.bias);
  a.y = static_cast<T*>(p.y);
  a.partial = static_cast<float*>(workspace);
  a.row_experts = p.row_experts;
  a.row_per_block = p.row_experts != nullptr && p.expert_rows == ix::kRowPerBlock;
  a.x_row_divisor = p.x_row_divisor;
  a.expert_q_words = p.expert_qweight_words;
  a.expert_s_elems = p.expert_scale_elems;
  a.x_row_stride = p.x_row_stride;
  a.y_row_stride = p.y_row_stride;
  a.m = int(p.m);
  a.n = int(w.n);
  a.k = int(w.k);
  a.n_tiles = int(tiles_for(w.n));
  a.k_tiles = int(plan.k_tiles);
  a.group_tiles = ix::group_tiles_for(w.group_size, plan.k_tiles);
  a.k_iters = int(plan.k_iters);
  a.iters_per_split = int(plan.iters_per_split);
  a.splits = int(plan.splits);
  a.x_vector = ix::x_vectorizable(reinterpret_cast<uintptr_t>(p.x), p.x_row_stride, sizeof(T));
  a.scale_vector =
      ix::scales_vectorizable(w.n, reinterpret_cast<uintptr_t>(w.scales), reinterpret_cast<uintptr_t>(w.zeros));
  return a;
}

// ---------------------------------------------------------------------------------------------
// dequantize_weight
// ---------------------------------------------------------------------------------------------

template <typename S, typename O>
struct DequantArgs {
  const uint32_t* qweight;
  const S* scales;
  const S* zeros;  // nullptr: symmetric
  O* out;
  int bits;
  int64_t n, k, group_size;
  int64_t n_tiles, k_tiles;
  bool vector_stores;  // out 16-byte aligned and K % 8 == 0: whole chunks as 16-byte stores
};

template <typename T>
constexpr ScalarKind kind_of() {
  if constexpr (std::is_same_v<T, float>) {
    return ScalarKind::kFloat32;
  } else if constexpr (std::is_same_v<T, Half>) {
    return ScalarKind::kFloat16;
  } else {
    return ScalarKind::kBFloat16;
  }
}

template <typename O>
__device__ __forceinline__ O from_double(double v);
template <>
__device__ __forceinline__ Half from_double<Half>(double v) {
  return Half{__half_as_ushort(__double2half(v))};
}
template <>
__device__ __forceinline__ BFloat16 from_double<BFloat16>(double v) {
  return BFloat16{__bfloat16_as_ushort(__double2bfloat16(v))};
}

// C: float, or double when fp32 scales meet a 16-bit output (ix::dequant_needs_fp64).
template <typename S, typename O, typename C>
__global__ void __launch_bounds__(ix::kDqThreads, ix::kDqMinCtas) dequantize_kernel(const DequantArgs<S, O> a) {
  __shared__ __align__(16) uint32_t tiles[ix::kDqTiles * words_per_tile(8)];
  const int tid = threadIdx.x;
  const int words = words_per_tile(a.bits);
  const int64_t kt0 = int64_t(blockIdx.x) * ix::kDqTiles;
  const int tiles_here = int(ix::min64(ix::kDqTiles, a.k_tiles - kt0));
  for (int64_t nt = blockIdx.y; nt < a.n_tiles; nt += gridDim.y) {
    const uint4* const src = reinterpret_cast<const uint4*>(a.qweight + tile_offset_words(a.bits, a.k_tiles, nt, kt0));
    for (int c = tid; c < tiles_here * words / 4; c += ix::kDqThreads) reinterpret_cast<uint4*>(tiles)[c] = src[c];
    __syncthreads();
#pragma unroll 1
    for (int pass = 0; pass < ix::kDqPasses; ++pass) {
      const int i = ix::dq_chunk_row(tid, pass), col = ix::dq_chunk_col(tid, pass);
      const int64_t n = nt * ix::kTileRows + i, k = kt0 * ix::kMmaK + col;
      if (n >= a.n || k >= a.k) continue;
      const int64_t offset = ix::scale_offset(k / a.group_size, n, a.n);
      const C zero = a.zeros != nullptr ? C(to_compute(a.zeros[offset])) : C(symmetric_zero(a.bits));
      const C scale = C(to_compute(a.scales[offset]));
      const uint32_t* const tile = tiles + (col / ix::kMmaK) * words;
      alignas(16) O values[ix::kDqChunkValues];
#pragma unroll
      for (int e = 0; e < ix::kDqChunkValues; ++e) {
        const C value = (C(ix::tile_value(tile, a.bits, i, col % ix::kMmaK + e)) - zero) * scale;
        if constexpr (std::is_same_v<C, double>) {
          values[e] = from_double<O>(value);
        } else {
          values[e] = from_compute<O>(value);
        }
      }
      O* const dst = a.out + n * a.k + k;
      if (a.vector_stores && k + ix::kDqChunkValues <= a.k) {
#pragma unroll
        for (int v = 0; v < int(sizeof(values) / 16); ++v)
          reinterpret_cast<uint4*>(dst)[v] = reinterpret_cast<const uint4*>(values)[v];
      } else {
        for (int e = 0; e < ix::kDqChunkValues && k + e < a.k; ++e) dst[e] = values[e];
      }
    }
    __syncthreads();  // the tiles are overwritten for the next tile row
  }
}

template <typename S, typename O>
cudaError_t launch_dequantize(const DequantizeWeightParams& p, cudaStream_t stream) {
  const QuantizedWeightView& w = p.w;
  DequantArgs<S, O> a{};
  a.qweight = reinterpret_cast<const uint32_t*>(w.qweight);
  a.scales = static_cast<const S*>(w.scales);
  a.zeros = static_cast<const S*>(w.zeros);
  a.out = static_cast<O*>(p.out);
  a.bits = w.bits;
  a.n = w.n;
  a.k = w.k;
  a.group_size = w.group_size;
  a.n_tiles = tiles_for(w.n);
  a.k_tiles = tiles_for(w.k);
  a.vector_stores = reinterpret_cast<uintptr_t>(p.out) % 16 == 0 && w.k % ix::kDqChunkValues == 0;
  const dim3 grid(unsigned(ix::ceil_div(a.k_tiles, ix::kDqTiles)), unsigned(ix::min64(a.n_tiles, ix::kMaxGridYZ)));
  if constexpr (ix::dequant_needs_fp64(kind_of<S>(), kind_of<O>())) {
    dequantize_kernel<S, O, double><<<grid, ix::kDqThreads, 0, stream>>>(a);
  } else {
    dequantize_kernel<S, O, float><<<grid, ix::kDqThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

bool is_float_kind(ScalarKind kind) {
  return kind == ScalarKind::kFloat32 || kind == ScalarKind::kFloat16 || kind == ScalarKind::kBFloat16;
}

// TORCH_EXT_WO_SPLITS=<count> forces the split-K count of every weight-only GEMM (clamped to what
// the shape allows; read at every call): a tuning knob for benchmarks (scripts/gpu_perf.sh sweeps
// it at M = 1 and 64), not a setting for production.
int64_t forced_splits() {
  const char* const env = std::getenv("TORCH_EXT_WO_SPLITS");
  return env != nullptr ? std::strtoll(env, nullptr, 10) : 0;
}

// The batch GEMM on wgmma (linear_kernel<..., true>): opt-in (TORCH_EXT_WO_WGMMA=1) until it has
// run on a GPU (written and simulated without one).
bool runs_wgmma_batch() {
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  return hopper_kernel_enabled("TORCH_EXT_WO_WGMMA", false);
#else
  return false;
#endif
}

ix::LinearPlan plan_for(const WeightOnlyLinearParams& p, int num_sms, bool allow_split) {
  return ix::plan_linear(p.m, p.w.n, p.w.k, p.w.bits, num_sms, allow_split, forced_splits(),
                         p.row_experts != nullptr ? p.expert_rows : ix::kNoExperts);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

int64_t weight_only_linear_workspace_bytes(const WeightOnlyLinearParams& p, int num_sms) {
  if (!linear_params_valid(p) || p.m == 0 || p.w.n == 0) return 0;
  const ix::LinearPlan plan = plan_for(p, num_sms, true);
  return ix::partial_bytes(plan, p.m, p.w.n);
}

int64_t weight_only_expert_block_rows(int64_t pairs, int64_t experts) {
  const int64_t used = ix::min64(pairs, experts);
  return used > 0 && ix::ceil_div(pairs, used) > ix::kDecodeBlockM ? ix::kBatchBlockM : ix::kDecodeBlockM;
}

cudaError_t weight_only_linear(const WeightOnlyLinearParams& p, void* workspace, int num_sms, cudaStream_t stream) {
  if (!linear_params_valid(p)) return cudaErrorInvalidValue;
  if (p.m == 0 || p.w.n == 0) return cudaSuccess;
  // Without a usable workspace the GEMM runs unsplit (correct, fewer CTAs).
  const bool allow_split = workspace != nullptr && is_aligned(workspace, 16);
  const ix::LinearPlan plan = plan_for(p, num_sms, allow_split);
  cudaError_t status = cudaSuccess;
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>) {
      const LinearArgs<T> a = make_linear_args<T>(p, plan, workspace);
      const bool batch = plan.block_m == ix::kBatchBlockM;
      if (batch && runs_wgmma_batch()) {
        status = p.w.bits == 4 ? launch_linear<T, ix::TileConfig<4, ix::kBatchBlockM>, true>(a, plan, stream)
                               : launch_linear<T, ix::TileConfig<8, ix::kBatchBlockM>, true>(a, plan, stream);
      } else if (p.w.bits == 4) {
        status = batch ? launch_linear<T, ix::TileConfig<4, ix::kBatchBlockM>>(a, plan, stream)
                       : launch_linear<T, ix::TileConfig<4, ix::kDecodeBlockM>>(a, plan, stream);
      } else {
        status = batch ? launch_linear<T, ix::TileConfig<8, ix::kBatchBlockM>>(a, plan, stream)
                       : launch_linear<T, ix::TileConfig<8, ix::kDecodeBlockM>>(a, plan, stream);
      }
    }
  });
  return status;
}

cudaError_t dequantize_weight(const DequantizeWeightParams& p, cudaStream_t stream) {
  const QuantizedWeightView& w = p.w;
  if ((w.bits != 4 && w.bits != 8) || w.group_size <= 0 || w.group_size % 16 != 0 || w.n < 0 || w.k < 0 ||
      !is_float_kind(w.scale_dtype) || !is_float_kind(p.out_dtype) ||
      ix::ceil_div(tiles_for(w.k), ix::kDqTiles) > 2147483647) {
    return cudaErrorInvalidValue;
  }
  if (w.n == 0 || w.k == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  visit_storage_type(w.scale_dtype, [&](auto scale_tag) {
    using S = decltype(scale_tag);
    visit_storage_type(p.out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      if constexpr (!std::is_same_v<S, double> && !std::is_same_v<O, double>) {
        status = launch_dequantize<S, O>(p, stream);
      }
    });
  });
  return status;
}

}  // namespace torch_ext::cuda
