// weight_only_linear on AMX-BF16 tiles, for bf16 x and 4- or 8-bit weights: batches of rows
// (batched decode, prefill), where torch's bf16 GEMM runs on AMX too (measured on a Sapphire
// Rapids VM, docs/perf/quant.md). B tiles come from the packed weights as
// quant/weight_only_amx_b_tiles.h says, exact (4 bits: bf16 128 + q) or scaled (the dequantized
// weight in bf16).
//
// Compiled at the AVX-512 level plus -mamx-tile -mamx-int8 -mamx-bf16, in its own ISA namespace
// (avx512_amx); the B rows' function is compiled for AVX512_VBMI and AVX512_BF16 as well. Run where
// cpu::amx_bf16_kernel_mode() is not off and the CPU has both extensions (every AMX CPU does), on
// the hardware tiles or on the emulated ones (common/cpu/amx_tiles.h).
//
// Blocking. Tasks are pairs of 16-row tile rows of W (32 output columns: the C tiles' two column
// blocks), a thread's pairs taken in blocks whose fp32 sums fit in the L2 beside one K block's
// slice of x: for each K block, every pair of the block walks x in chunks of 32 rows (the two A
// tiles, 2 x 2 C tiles), so x crosses from the L3 once per block of pairs, not once per pair
// (5x slower at 512 rows before). The first chunk dequantizes each B tile two steps ahead of its
// products (a tile load of bytes vector stores just wrote waits for them to reach the L1) into a
// buffer that the later chunks read again: every weight is read and dequantized once per call.
//
// Two ways with the groups' scales, chosen by the caller per row count:
//   exact B (4 bits, few rows: dequantizing is the larger cost, three instructions a row here)
//     one group's tile products are C = sum_k x_k (128 + q_k), exact in fp32; the group's end
//     moves the C tiles to memory and adds s * (C - (128 + z) X) to the rows' fp32 sums, X the
//     sum of x over the group (for a one-hot x: s * (q - z) rounded once, the dequantized weight
//     bit for bit);
//   scaled B (many rows: each group's end would cost a tile store per chunk, more than the
//     dequantization spread over the chunks) the C tiles run through the whole K block and meet
//     the sums in memory once per block: the products of torch's GEMM on the bf16 weight
//     dequantize_weight gives, without writing it.
#include <algorithm>
#include <cstring>
#include <vector>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx_gemm.h"
#include "quant/weight_only_cpu_kernel.h"
#include "quant/weight_only_amx_b_tiles.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace weight_only_amx;
using weight_only::load_group_params;
using weight_only::prefetch_tile_ahead;

constexpr int kStepK = 2 * kTileK;               // k per B tile (32 bf16 per A tile row)
constexpr int kChunkRows = amx::kBlockRows;      // rows of x per pass: the two A tiles
constexpr int64_t kATileElems = amx::kMaxRows * kStepK;
constexpr int kPairColumns = amx::kBlockColumns;  // output columns per task: two tile rows
// Bytes of x (bf16, rows padded to whole chunks) per K block, and of the fp32 sums of the pairs
// that walk it before the next block: together about half a Sapphire Rapids core's 2 MB L2, so
// both stay there while the weights stream past them.
constexpr int64_t kXBlockBytes = int64_t(1) << 19;
constexpr int64_t kSumsBlockBytes = int64_t(1) << 19;
// Outputs from this size on are written with streaming stores: a task writes 64 bytes (its 32
// columns in bf16, one cache line) of every row, rows a whole y row apart, and ordinary stores
// fetched each line first. Measured on a Sapphire Rapids VM (4-bit, K = N = 4096, three rounds
// alternating builds): M = 1024 19.1-20.8 -> 16.9-17.6 ms, M = 512 8.3-8.5 -> 7.8-7.9 ms, M =
// 256 within the noise. Smaller outputs keep ordinary stores: whoever reads y next finds it in
// the cache.
constexpr int64_t kStreamOutputBytes = int64_t(4) << 20;

// x as the A operand, each A tile's 16 rows x 32 k contiguous (1 KB: a tile load reads 16
// consecutive lines, not 16 rows a whole row of x apart), tiles in the order [K block][row
// block][step]: a K block's slice of x is contiguous, and a row block's tiles in it are read in
// order. K zero-padded to whole steps, the rows past m zero up to a whole chunk. And X, the sum
// of each row over each group, in fp32.
struct PreparedX {
  int64_t rows, steps, block_steps, groups;
  uint16_t* tiles;
  float* group_sums;  // [rows][groups]
  std::unique_ptr<uint16_t[], CacheLineDelete> tiles_fallback;
  std::unique_ptr<float[], CacheLineDelete> sums_fallback;

  // The first tile of row block `row_block` in the K block [s0, s1).
  const uint16_t* block_tiles(int64_t s0, int64_t s1, int64_t row_block) const {
    return tiles + (s0 * (rows / amx::kMaxRows) + row_block * (s1 - s0)) * kATileElems;
  }
};

struct XTilesTag;
struct XGroupSumsTag;
struct BTilesTag;
struct PairSumsTag;

void prepare_x(const WeightOnlyLinearParams& p, PreparedX& px) {
  px.tiles = kept_scratch<uint16_t, XTilesTag>(size_t(px.rows * px.steps * kStepK), px.tiles_fallback);
  px.group_sums = kept_scratch<float, XGroupSumsTag>(size_t(px.rows * px.groups), px.sums_fallback);
  const int64_t group = p.w.group_size, steps = px.steps, groups = px.groups, padded_k = steps * kStepK;
  parallel_for(0, px.rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> row(static_cast<size_t>(padded_k));
    for (int64_t m = begin; m < end; ++m) {
      const int64_t real = m < p.m ? p.w.k : 0;
      if (real > 0) std::memcpy(row.data(), static_cast<const uint16_t*>(p.x) + m * p.x_row_stride, size_t(real) * 2);
      std::fill(row.begin() + real, row.end(), uint16_t(0));
      for (int64_t s = 0; s < steps; ++s) {
        const int64_t s0 = s / px.block_steps * px.block_steps, s1 = std::min(steps, s0 + px.block_steps);
        std::memcpy(const_cast<uint16_t*>(px.block_tiles(s0, s1, m / amx::kMaxRows)) + (s - s0) * kATileElems +
                        (m % amx::kMaxRows) * kStepK,
                    row.data() + s * kStepK, kStepK * 2);
      }
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k_end = std::min(padded_k, (g + 1) * group);
        VecF sum = broadcast(0.0f);
        for (int64_t k = g * group; k < k_end; k += VecF::kWidth)
          sum = sum + load(reinterpret_cast<const BFloat16*>(row.data()) + k);
        px.group_sums[size_t(m * groups + g)] = reduce_add(sum);
      }
    }
  });
}

template <typename Tiles, int kBits, bool kScaled>
class PairTask {
 public:
  PairTask(const WeightOnlyLinearParams& p, const PreparedX& px, int64_t block_pairs)
      : p_(p), w_(p.w), px_(px), k_tiles_(quant::tiles_for(p.w.k)), group_tiles_(p.w.group_size / kTileK),
        chunks_(px.rows / kChunkRows), b_slots_(chunks_ > 1 ? px.block_steps : kRingSlots),
        b_tiles_(kept_scratch<uint16_t, BTilesTag>(size_t(2 * b_slots_ * kBTileElems), b_tiles_fallback_)),
        sums_(kept_scratch<float, PairSumsTag>(size_t(block_pairs * px.rows * kPairColumns), sums_fallback_)) {}

  // y rows [0, m) x columns [32 pair_begin, 32 pair_end): K block by K block, each block's x slice
  // read from the L2 for every pair (pairs' sums kept in memory between blocks).
  void run(int64_t pair_begin, int64_t pair_end) {
    if constexpr (!kScaled) std::fill(sums_, sums_ + (pair_end - pair_begin) * px_.rows * kPairColumns, 0.0f);
    for (int64_t s0 = 0; s0 < px_.steps; s0 += px_.block_steps) {
      const int64_t s1 = std::min(px_.steps, s0 + px_.block_steps);
      for (int64_t pair = pair_begin; pair < pair_end; ++pair) run_block(pair, pair_sums(pair - pair_begin), s0, s1);
    }
    for (int64_t pair = pair_begin; pair < pair_end; ++pair) store_rows(2 * pair, pair_sums(pair - pair_begin));
  }

 private:
  // Steps a B tile is dequantized before its products: a tile load of bytes just written by
  // vector stores waits for them to reach the L1.
  static constexpr int64_t kDequantizeAhead = 2;
  static constexpr int64_t kRingSlots = 4;  // B tile pairs in the ring of a one-chunk call: > kDequantizeAhead

  float* pair_sums(int64_t j) { return sums_ + j * px_.rows * kPairColumns; }

  // Steps [s0, s1) of one pair: every chunk of x, adding to its sums.
  void run_block(int64_t pair, float* sums, int64_t s0, int64_t s1) {
    const int64_t nt0 = 2 * pair;
    const bool two_tile_rows = nt0 + 1 < quant::tiles_for(w_.n);
    const int columns = two_tile_rows ? kPairColumns : kTileN;
    scales_group_ = -1;
    for (int64_t chunk = 0; chunk < chunks_; ++chunk) {
      const bool dequantize = chunk == 0;
      if (dequantize)
        for (int64_t s = s0; s < std::min(s1, s0 + kDequantizeAhead); ++s) dequantize_step(nt0, two_tile_rows, s, s - s0);
      float* const chunk_sums = sums + chunk * kChunkRows * kPairColumns;
      constexpr int64_t kSumsStride = kPairColumns * sizeof(float);
      if constexpr (kScaled) {
        if (s0 == 0) amx::zero_block<Tiles>();
        else amx::load_block<Tiles>(chunk_sums, kSumsStride, columns);
      }
      const bool two_row_blocks = kScaled || chunk * kChunkRows + amx::kMaxRows < p_.m;
      const uint16_t* const a0 = px_.block_tiles(s0, s1, 2 * chunk);
      const uint16_t* const a1 = px_.block_tiles(s0, s1, 2 * chunk + 1);
      // Exact B: the groups meeting [s0, s1), each starting at a whole step (group_tiles is
      // even, or one group covers K). Scaled B: the whole block at once.
      for (int64_t s = s0; s < s1;) {
        const int64_t g = 2 * s / group_tiles_;
        const int64_t group_end = !kScaled && group_tiles_ % 2 == 0 ? std::min(s1, (g + 1) * group_tiles_ / 2) : s1;
        if constexpr (!kScaled) amx::zero_block<Tiles>();
        for (; s < group_end; ++s) {
          if (dequantize && s + kDequantizeAhead < s1)
            dequantize_step(nt0, two_tile_rows, s + kDequantizeAhead, s + kDequantizeAhead - s0);
          const int64_t i = s - s0;
          if (two_row_blocks) {
            products_of_two_row_blocks(two_tile_rows, a0 + i * kATileElems, a1 + i * kATileElems, i);
          } else if (s % 2 == 0) {
            products_of_one_row_block<amx::kA0, amx::kC00, amx::kC01>(two_tile_rows, a0 + i * kATileElems, i);
          } else {
            products_of_one_row_block<amx::kA1, amx::kC10, amx::kC11>(two_tile_rows, a0 + i * kATileElems, i);
          }
        }
        if constexpr (!kScaled) end_group(nt0, two_tile_rows, chunk, g, sums);
      }
      if constexpr (kScaled) amx::store_block<Tiles>(chunk_sums, kSumsStride, columns);
    }
  }

  uint16_t* b_tile(int64_t block_step, int j) {
    const int64_t slot = chunks_ > 1 ? block_step : block_step % kRingSlots;  // a power of two: no division
    return b_tiles_ + (slot * 2 + j) * kBTileElems;
  }

  void dequantize_step(int64_t nt0, bool two_tile_rows, int64_t s, int64_t block_step) {
    if constexpr (kScaled) {
      // Both weight tiles of a step lie in one group (whole B tiles per group, or one group).
      if (const int64_t g = 2 * s / group_tiles_; g != scales_group_) {
        for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
          alignas(64) float scale[kTileN], zero[kTileN];
          load_group_params(w_, g, (nt0 + j) * kTileN, scale, zero);
          scales_[j].set(scale, zero, kValueOffset<kBits>);
        }
        scales_group_ = g;
      }
    }
    for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
      const int32_t* first = w_.qweight + quant::tile_offset_words(kBits, k_tiles_, nt0 + j, 2 * s);
      prefetch_tile_ahead<kBits>(first);
      b_tile_of_weight_tiles<kBits, kScaled>(first, 2 * s + 1 < k_tiles_, b_tile(block_step, j), &scales_[j]);
    }
  }

  // A chunk of at most 16 rows (exact B): even steps add A B to C00 (and C01), odd steps to the
  // idle C10 (and C11), which the group's end adds up, and the A tile alternates too: a tile load
  // waits for the products still reading the tile, a product for the one before it into its C.
  template <int kA, int kC0, int kC1>
  void products_of_one_row_block(bool two_tile_rows, const uint16_t* a, int64_t block_step) {
    using namespace amx;
    Tiles::template load<kA>(a, kMaxRowBytes);
    Tiles::template load<kB0>(b_tile(block_step, 0), kMaxRowBytes);
    Tiles::template dot<TileDot::kBf16, kC0, kA, kB0>();
    if (two_tile_rows) {
      Tiles::template load<kB1>(b_tile(block_step, 1), kMaxRowBytes);
      Tiles::template dot<TileDot::kBf16, kC1, kA, kB1>();
    }
  }

  // The 2 x 2 block, each loaded tile used twice.
  void products_of_two_row_blocks(bool two_tile_rows, const uint16_t* a0, const uint16_t* a1, int64_t block_step) {
    using namespace amx;
    Tiles::template load<kA0>(a0, kMaxRowBytes);
    Tiles::template load<kA1>(a1, kMaxRowBytes);
    Tiles::template load<kB0>(b_tile(block_step, 0), kMaxRowBytes);
    Tiles::template dot<TileDot::kBf16, kC00, kA0, kB0>();
    Tiles::template dot<TileDot::kBf16, kC10, kA1, kB0>();
    if (two_tile_rows) {
      Tiles::template load<kB1>(b_tile(block_step, 1), kMaxRowBytes);
      Tiles::template dot<TileDot::kBf16, kC01, kA0, kB1>();
      Tiles::template dot<TileDot::kBf16, kC11, kA1, kB1>();
    }
  }

  // sums += s * (C - (128 + z) * X) for the chunk's rows, group g.
  void end_group(int64_t nt0, bool two_tile_rows, int64_t chunk, int64_t g, float* pair_sums) {
    alignas(64) float c[kChunkRows][kPairColumns];
    amx::store_block<Tiles>(&c[0][0], sizeof(c[0]), two_tile_rows ? kPairColumns : kTileN);
    VecF scale[2], biased_zero[2];
    for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
      alignas(64) float s[kTileN], z[kTileN];
      load_group_params(w_, g, (nt0 + j) * kTileN, s, z);
      scale[j] = load(s);
      biased_zero[j] = load(z) + broadcast(kValueOffset<kBits>);
    }
    const int64_t m0 = chunk * kChunkRows, rows = std::min<int64_t>(kChunkRows, p_.m - m0);
    if (rows <= amx::kMaxRows) {  // one row block: the odd steps' sums are in rows 16-31
      for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < kPairColumns; j += VecF::kWidth) store(c[r] + j, load(c[r] + j) + load(c[r + amx::kMaxRows] + j));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const VecF x_sum = broadcast(px_.group_sums[size_t((m0 + r) * px_.groups + g)]);
      float* const sums = pair_sums + (m0 + r) * kPairColumns;
      for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
        const VecF zero_removed = fmadd(biased_zero[j] * broadcast(-1.0f), x_sum, load(c[r] + j * kTileN));
        store(sums + j * kTileN, fmadd(scale[j], zero_removed, load(sums + j * kTileN)));
      }
    }
  }

  void store_rows(int64_t nt0, const float* sums) {
    const int64_t n0 = nt0 * kTileN;
    const int columns = int(std::min<int64_t>(kPairColumns, w_.n - n0));
    if (columns == kPairColumns) return store_whole_rows(n0, sums);
    for (int64_t m = 0; m < p_.m; ++m) {
      BFloat16* const y = static_cast<BFloat16*>(p_.y) + m * p_.y_row_stride + n0;
      for (int c = 0; c < columns; c += VecF::kWidth) {
        const int count = std::min(VecF::kWidth, columns - c);
        VecF value = load(sums + m * kPairColumns + c);
        if (p_.bias) value = value + load_partial(static_cast<const BFloat16*>(p_.bias) + n0 + c, count);
        store_partial(y + c, value, count);
      }
    }
  }

  // store_rows for a whole pair (32 columns: one 64-byte line of each bf16 row).
  void store_whole_rows(int64_t n0, const float* sums) {
    const BFloat16* bias = p_.bias ? static_cast<const BFloat16*>(p_.bias) + n0 : nullptr;
    const VecF bias_lo = bias ? load(bias) : broadcast(0.0f), bias_hi = bias ? load(bias + VecF::kWidth) : broadcast(0.0f);
    for (int64_t m = 0; m < p_.m; ++m) {
      BFloat16* const y = static_cast<BFloat16*>(p_.y) + m * p_.y_row_stride + n0;
      const VecF lo = load(sums + m * kPairColumns) + bias_lo, hi = load(sums + m * kPairColumns + VecF::kWidth) + bias_hi;
      const __m512i line = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_bits(lo)), to_bf16_bits(hi), 1);
      if (stream_output_) _mm512_stream_si512(reinterpret_cast<__m512i*>(y), line);
      else _mm512_storeu_si512(y, line);
    }
    if (stream_output_) _mm_sfence();  // streaming stores are weakly ordered: done before the task ends
  }

  const WeightOnlyLinearParams& p_;
  const QuantizedWeightView& w_;
  const PreparedX& px_;
  const int64_t k_tiles_, group_tiles_, chunks_;
  RowScales scales_[2];        // scaled B: the tile rows' parameters of group scales_group_
  int64_t scales_group_ = -1;
  // y written with streaming stores: large (kStreamOutputBytes) and its pair lines 64-byte aligned.
  const bool stream_output_ = p_.m * p_.w.n * 2 >= kStreamOutputBytes && reinterpret_cast<uintptr_t>(p_.y) % 64 == 0 &&
                              p_.y_row_stride % 32 == 0;
  // Two B tiles per step: every step of a K block where later chunks read them again, else a ring.
  const int64_t b_slots_;
  std::unique_ptr<uint16_t[], CacheLineDelete> b_tiles_fallback_;
  std::unique_ptr<float[], CacheLineDelete> sums_fallback_;
  uint16_t* const b_tiles_;
  float* const sums_;  // per pair of a block: [rows][32]
};

template <typename Tiles, int kBits, bool kScaled>
void linear_on_tiles(const WeightOnlyLinearParams& p) {
  const int64_t k_tiles = quant::tiles_for(p.w.k), group_tiles = p.w.group_size / kTileK;
  const int64_t steps = (k_tiles + 1) / 2, groups = (k_tiles + group_tiles - 1) / group_tiles;
  const int64_t rows = (p.m + kChunkRows - 1) / kChunkRows * kChunkRows;
  // Steps per K block: x's slice within kXBlockBytes, whole groups (a group's tile products end
  // in one block), at least one group.
  const int64_t group_steps = group_tiles % 2 == 0 ? group_tiles / 2 : steps;
  const int64_t fit = kXBlockBytes / (rows * kStepK * 2);
  const int64_t block_steps = std::min(steps, std::max<int64_t>(1, fit / group_steps) * group_steps);
  PreparedX px{rows, steps, block_steps, kScaled ? 0 : groups};  // scaled B needs no group sums
  prepare_x(p, px);
  // Pairs per block: their fp32 sums within kSumsBlockBytes.
  const int64_t block_pairs = std::max<int64_t>(1, kSumsBlockBytes / (px.rows * kPairColumns * int64_t(sizeof(float))));
  const int64_t pairs = (quant::tiles_for(p.w.n) + 1) / 2;
  parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    const amx::TileSession<Tiles> tiles;
    PairTask<Tiles, kBits, kScaled> task(p, px, std::min(block_pairs, end - begin));
    for (int64_t b = begin; b < end; b += block_pairs) task.run(b, std::min(end, b + block_pairs));
  });
}

}  // namespace

// Whether linear_on_tiles takes this weight: groups of whole B tiles (an even number of
// 16-column tiles) or one group over K.
bool weight_only_amx_supports(const QuantizedWeightView& w) {
  const int64_t group_tiles = w.group_size / kTileK;
  return group_tiles % 2 == 0 || group_tiles >= quant::tiles_for(w.k);
}

// scaled_weights: scaled B (8-bit weights always take it).
void weight_only_linear_amx(const WeightOnlyLinearParams& p, bool emulate, bool scaled_weights) {
  const auto run = [&](auto tiles) {
    using Tiles = decltype(tiles);
    if (p.w.bits == 8) linear_on_tiles<Tiles, 8, true>(p);
    else if (scaled_weights) linear_on_tiles<Tiles, 4, true>(p);
    else linear_on_tiles<Tiles, 4, false>(p);
  };
  if (emulate) {
    run(amx::EmulatedTiles{});
  } else {
    run(amx::HardwareTiles{});
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
