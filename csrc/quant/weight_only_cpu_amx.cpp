// weight_only_linear on AMX-BF16 tiles, for bf16 x and 4-bit weights: batches of rows (small
// prefill, batched decode) where the VNNI kernel's cost grows with every row while torch's bf16
// GEMM runs on AMX (measured on a Sapphire Rapids VM, docs/perf/quant.md).
//
// Compiled at the AVX-512 level plus -mamx-tile -mamx-int8 -mamx-bf16, in its own ISA namespace
// (avx512_amx), with the one function that permutes bytes compiled for AVX512_VBMI as well; run
// where cpu::amx_bf16_kernel_mode() is not off and the CPU has AVX512_VBMI (every AMX CPU has it),
// on the hardware tiles or on the emulated ones (common/cpu/amx_tiles.h).
//
// Why the weights need no scale on the way into the tiles: OR-ing a nibble q into the mantissa
// of bf16 128.0 (bits 0x4300) gives exactly 128 + q, and TDPBF16PS multiplies it by a bf16 x
// exactly into its fp32 sums. So one group's tile products are C = sum_k x_k (128 + q_k), and the
// group's end subtracts the zero and applies the scale in fp32:
//   y += s * (C - (128 + z) * X),   X = sum of x over the group,
// (for a one-hot x this is s * (q - z) rounded once, the dequantized weight bit for bit).
//
// The weight tiles of the packed layout (quant/weight_only_layout.h) become TDPBF16PS's B operand
// (row g: the pair of k = 2g, 2g + 1 for each of 16 output rows, as 16 bf16 pairs) with three
// instructions per B row: a byte permute (vpermt2b over the tile's 128 bytes) puts in each 16-bit
// lane the byte holding its nibble, a per-lane shift (vpsrlvw) moves the nibble down, and one
// ternary logic op masks it and ORs in 0x4300. A B tile is two weight tiles (32 k).
//
// Blocking. Tasks are pairs of 16-row tile rows of W (32 output columns: the C tiles' two column
// blocks); a pair walks K in blocks whose slice of x stays in the L2, and within a block x in
// chunks of 32 rows (the two A tiles): C00..C11 accumulate one group, whose end moves them into
// fp32 sums in memory. The first chunk dequantizes each B tile as it goes (into a buffer that
// later chunks of the block read again), so a batch of up to 32 rows reads each weight once and
// dequantizes it once.
#include <algorithm>
#include <cstring>
#include <immintrin.h>
#include <vector>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx_gemm.h"
#include "quant/weight_only_cpu_kernel.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using quant::kTileK;
using quant::kTileN;
using weight_only::load_group_params;
using weight_only::prefetch_tile_ahead;

constexpr int kBits = 4;
constexpr int kTileBytes = quant::words_per_tile(kBits) * 4;  // 128: one 16 x 16 weight tile
constexpr int kStepK = 2 * kTileK;                          // k per B tile (32 bf16 per A tile row)
constexpr int kChunkRows = amx::kBlockRows;                 // rows of x per pass: the two A tiles
constexpr int kPairColumns = amx::kBlockColumns;            // output columns per task: two tile rows
constexpr int kBTileElems = amx::kMaxRows * 2 * kTileN;     // bf16 of one B tile: 16 rows x 16 pairs
constexpr uint16_t kBf16OneTwentyEight = 0x4300;
// Bytes of x (bf16, rows padded to whole chunks) per K block: about half a Sapphire Rapids core's
// 2 MB L2, so a block's x stays there while the tasks' weights stream past it.
constexpr int64_t kXBlockBytes = int64_t(1) << 20;

// Where the nibble of (row n, column k) of a 16 x 16 weight tile lives: the byte of the tile and
// the nibble's shift in it. Derived from the layout's own maps by search, so the tables below
// follow quant/weight_only_layout.h by construction.
struct NibbleSource {
  int byte, shift;
};
constexpr NibbleSource nibble_source(int n, int k) {
  for (int word = 0; word < quant::words_per_tile(kBits); ++word)
    for (int slot = 0; slot < quant::values_per_word(kBits); ++slot)
      if (quant::tile_row(kBits, word, slot) == n && quant::tile_col(kBits, word, slot) == k)
        return {4 * word + slot / 2, 4 * (slot % 2)};
  return {-1, -1};
}

// Per B row g of one weight tile (k = 2g, 2g + 1), per 16-bit lane l = 2n + e (row n, k = 2g + e):
// the vpermt2b index of the byte holding the nibble (in the lane's low byte; the high byte's copy
// is masked off) and the lane's shift.
struct BRowTables {
  alignas(64) uint8_t index[kTileK / 2][64];
  alignas(64) uint16_t shift[kTileK / 2][32];
  constexpr BRowTables() : index{}, shift{} {
    for (int g = 0; g < kTileK / 2; ++g)
      for (int lane = 0; lane < 32; ++lane) {
        const NibbleSource s = nibble_source(lane / 2, 2 * g + lane % 2);
        index[g][2 * lane] = index[g][2 * lane + 1] = uint8_t(s.byte);
        shift[g][lane] = uint16_t(s.shift);
      }
  }
};
constexpr BRowTables kBRowTables{};

// The 8 B rows of weight tile `tile` (128 bytes) as bf16 128 + q, at out (rows of 32 bf16). The
// only code here that needs AVX512_VBMI: a call per 256 weights, not inlined into callers compiled
// without it.
__attribute__((target("avx512vbmi"), noinline)) void b_rows_of_weight_tile(const uint8_t* tile, uint16_t* out) {
  const __m512i low = _mm512_loadu_si512(tile), high = _mm512_loadu_si512(tile + 64);
  const __m512i nibble = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(int16_t(kBf16OneTwentyEight));
#pragma GCC unroll 8
  for (int g = 0; g < kTileK / 2; ++g) {
    const __m512i bytes = _mm512_permutex2var_epi8(low, _mm512_load_si512(kBRowTables.index[g]), high);
    const __m512i shifted = _mm512_srlv_epi16(bytes, _mm512_load_si512(kBRowTables.shift[g]));
    // (shifted & nibble) | bias
    _mm512_store_si512(out + g * 32, _mm512_ternarylogic_epi32(shifted, nibble, bias, 0xEA));
  }
}

// One B tile: rows 0-7 from weight tile kt of tile row nt, rows 8-15 from kt + 1, or 128.0 where
// kt + 1 is past K (A is zero there).
inline void dequantize_b_tile(const QuantizedWeightView& w, int64_t k_tiles, int64_t nt, int64_t kt, uint16_t* out) {
  const int32_t* first = w.qweight + quant::tile_offset_words(kBits, k_tiles, nt, kt);
  prefetch_tile_ahead<kBits>(first);
  b_rows_of_weight_tile(reinterpret_cast<const uint8_t*>(first), out);
  if (kt + 1 < k_tiles) {
    b_rows_of_weight_tile(reinterpret_cast<const uint8_t*>(first + quant::words_per_tile(kBits)), out + kBTileElems / 2);
  } else {
    std::fill(out + kBTileElems / 2, out + kBTileElems, kBf16OneTwentyEight);
  }
}

// x as the A operand, each A tile's 16 rows x 32 k contiguous (1 KB: a tile load reads 16
// consecutive lines, not 16 rows a whole row of x apart), tiles in the order [row block][step];
// K zero-padded to whole steps, the rows past m zero up to a whole chunk. And X, the sum of each
// row over each group, in fp32.
struct PreparedX {
  int64_t rows, steps, groups;
  std::unique_ptr<uint16_t[], CacheLineDelete> tiles;
  std::unique_ptr<float[], CacheLineDelete> group_sums;  // [rows][groups]

  const uint16_t* a_tile(int64_t row_block, int64_t step) const {
    return tiles.get() + (row_block * steps + step) * amx::kMaxRows * kStepK;
  }
};

PreparedX prepare_x(const WeightOnlyLinearParams& p, int64_t steps, int64_t groups) {
  PreparedX px{(p.m + kChunkRows - 1) / kChunkRows * kChunkRows, steps, groups, nullptr, nullptr};
  px.tiles = uninitialized_line_aligned<uint16_t>(size_t(px.rows * steps * kStepK));
  px.group_sums = uninitialized_line_aligned<float>(size_t(px.rows * groups));
  const int64_t group = p.w.group_size, padded_k = steps * kStepK;
  parallel_for(0, px.rows, 8, [&](int64_t begin, int64_t end) {
    std::vector<uint16_t> row(static_cast<size_t>(padded_k));
    for (int64_t m = begin; m < end; ++m) {
      const int64_t real = m < p.m ? p.w.k : 0;
      if (real > 0) std::memcpy(row.data(), static_cast<const uint16_t*>(p.x) + m * p.x_row_stride, size_t(real) * 2);
      std::fill(row.begin() + real, row.end(), uint16_t(0));
      for (int64_t s = 0; s < steps; ++s)
        std::memcpy(const_cast<uint16_t*>(px.a_tile(m / amx::kMaxRows, s)) + (m % amx::kMaxRows) * kStepK,
                    row.data() + s * kStepK, kStepK * 2);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t k_end = std::min(padded_k, (g + 1) * group);
        VecF sum = broadcast(0.0f);
        for (int64_t k = g * group; k < k_end; k += VecF::kWidth)
          sum = sum + load(reinterpret_cast<const BFloat16*>(row.data()) + k);
        px.group_sums[size_t(m * groups + g)] = reduce_add(sum);
      }
    }
  });
  return px;
}

template <typename Tiles>
class PairTask {
 public:
  PairTask(const WeightOnlyLinearParams& p, const PreparedX& px, int64_t block_steps)
      : p_(p), w_(p.w), px_(px), k_tiles_(quant::tiles_for(p.w.k)), group_tiles_(p.w.group_size / kTileK),
        steps_((k_tiles_ + 1) / 2), chunks_(px.rows / kChunkRows), block_steps_(block_steps),
        b_slots_(chunks_ > 1 ? block_steps : kDequantizeAhead + 1),
        b_tiles_(uninitialized_line_aligned<uint16_t>(size_t(2 * b_slots_ * kBTileElems))),
        sums_(uninitialized_line_aligned<float>(size_t(px.rows * kPairColumns))) {}

  // y rows [0, m) x columns [32 pair, +32).
  void run(int64_t pair) {
    const int64_t nt0 = 2 * pair;
    const bool two_tile_rows = nt0 + 1 < quant::tiles_for(w_.n);
    std::fill(sums_.get(), sums_.get() + px_.rows * kPairColumns, 0.0f);
    for (int64_t s0 = 0; s0 < steps_; s0 += block_steps_) {
      const int64_t s1 = std::min(steps_, s0 + block_steps_);
      for (int64_t chunk = 0; chunk < chunks_; ++chunk) {
        // The first chunk dequantizes kDequantizeAhead steps ahead of its tile products.
        const bool dequantize = chunk == 0;
        if (dequantize)
          for (int64_t s = s0; s < std::min(s1, s0 + kDequantizeAhead); ++s) dequantize_step(nt0, two_tile_rows, s, s - s0);
        const bool two_row_blocks = chunk * kChunkRows + amx::kMaxRows < p_.m;
        // The groups meeting [s0, s1): each starts at a whole step (group_tiles is even, or one
        // group covers K).
        for (int64_t s = s0; s < s1;) {
          const int64_t g = 2 * s / group_tiles_;
          const int64_t group_end = group_tiles_ % 2 == 0 ? std::min(s1, (g + 1) * group_tiles_ / 2) : s1;
          amx::zero_block<Tiles>();
          for (; s < group_end; ++s) {
            if (dequantize && s + kDequantizeAhead < s1)
              dequantize_step(nt0, two_tile_rows, s + kDequantizeAhead, s + kDequantizeAhead - s0);
            if (two_row_blocks) {
              products_of_two_row_blocks(two_tile_rows, chunk, s, s - s0);
            } else if (s % 2 == 0) {
              products_of_one_row_block<amx::kA0, amx::kC00, amx::kC01>(two_tile_rows, chunk, s, s - s0);
            } else {
              products_of_one_row_block<amx::kA1, amx::kC10, amx::kC11>(two_tile_rows, chunk, s, s - s0);
            }
          }
          end_group(nt0, two_tile_rows, chunk, g);
        }
      }
    }
    store_rows(nt0);
  }

 private:
  // Steps a B tile is dequantized before its products: a tile load of bytes just written by
  // vector stores waits for them to reach the L1.
  static constexpr int64_t kDequantizeAhead = 2;

  uint16_t* b_tile(int64_t block_step, int j) { return b_tiles_.get() + ((block_step % b_slots_) * 2 + j) * kBTileElems; }

  void dequantize_step(int64_t nt0, bool two_tile_rows, int64_t s, int64_t block_step) {
    dequantize_b_tile(w_, k_tiles_, nt0, 2 * s, b_tile(block_step, 0));
    if (two_tile_rows) dequantize_b_tile(w_, k_tiles_, nt0 + 1, 2 * s, b_tile(block_step, 1));
  }

  // A chunk of at most 16 rows: even steps add A B to C00 (and C01), odd steps to the idle C10
  // (and C11), which the group's end adds up: consecutive products into one C tile wait for each
  // other's sums. The A tile alternates too: a load waits for the products still reading it.
  template <int kA, int kC0, int kC1>
  void products_of_one_row_block(bool two_tile_rows, int64_t chunk, int64_t s, int64_t block_step) {
    using namespace amx;
    Tiles::template load<kA>(px_.a_tile(2 * chunk, s), kMaxRowBytes);
    Tiles::template load<kB0>(b_tile(block_step, 0), kMaxRowBytes);
    Tiles::template dot<TileDot::kBf16, kC0, kA, kB0>();
    if (two_tile_rows) {
      Tiles::template load<kB1>(b_tile(block_step, 1), kMaxRowBytes);
      Tiles::template dot<TileDot::kBf16, kC1, kA, kB1>();
    }
  }

  // A chunk of 17-32 rows: the 2 x 2 block, each loaded tile used twice.
  void products_of_two_row_blocks(bool two_tile_rows, int64_t chunk, int64_t s, int64_t block_step) {
    using namespace amx;
    Tiles::template load<kA0>(px_.a_tile(2 * chunk, s), kMaxRowBytes);
    Tiles::template load<kA1>(px_.a_tile(2 * chunk + 1, s), kMaxRowBytes);
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
  void end_group(int64_t nt0, bool two_tile_rows, int64_t chunk, int64_t g) {
    alignas(64) float c[kChunkRows][kPairColumns];
    amx::store_block<Tiles>(&c[0][0], sizeof(c[0]), two_tile_rows ? kPairColumns : kTileN);
    VecF scale[2], biased_zero[2];
    for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
      alignas(64) float s[kTileN], z[kTileN];
      load_group_params(w_, g, (nt0 + j) * kTileN, s, z);
      scale[j] = load(s);
      biased_zero[j] = load(z) + broadcast(128.0f);
    }
    const int64_t m0 = chunk * kChunkRows, rows = std::min<int64_t>(kChunkRows, p_.m - m0);
    if (rows <= amx::kMaxRows) {  // one row block: the odd steps' sums are in rows 16-31
      for (int64_t r = 0; r < rows; ++r)
        for (int j = 0; j < kPairColumns; j += VecF::kWidth) store(c[r] + j, load(c[r] + j) + load(c[r + amx::kMaxRows] + j));
    }
    for (int64_t r = 0; r < rows; ++r) {
      const VecF x_sum = broadcast(px_.group_sums[size_t((m0 + r) * px_.groups + g)]);
      float* const sums = sums_.get() + (m0 + r) * kPairColumns;
      for (int j = 0; j < (two_tile_rows ? 2 : 1); ++j) {
        const VecF zero_removed = fmadd(biased_zero[j] * broadcast(-1.0f), x_sum, load(c[r] + j * kTileN));
        store(sums + j * kTileN, fmadd(scale[j], zero_removed, load(sums + j * kTileN)));
      }
    }
  }

  void store_rows(int64_t nt0) {
    const int64_t n0 = nt0 * kTileN;
    const int columns = int(std::min<int64_t>(kPairColumns, w_.n - n0));
    for (int64_t m = 0; m < p_.m; ++m) {
      BFloat16* const y = static_cast<BFloat16*>(p_.y) + m * p_.y_row_stride + n0;
      for (int c = 0; c < columns; c += VecF::kWidth) {
        const int count = std::min(VecF::kWidth, columns - c);
        VecF value = load(sums_.get() + m * kPairColumns + c);
        if (p_.bias) value = value + load_partial(static_cast<const BFloat16*>(p_.bias) + n0 + c, count);
        store_partial(y + c, value, count);
      }
    }
  }

  const WeightOnlyLinearParams& p_;
  const QuantizedWeightView& w_;
  const PreparedX& px_;
  const int64_t k_tiles_, group_tiles_, steps_, chunks_, block_steps_;
  // Two B tiles per step: every step of a K block where later chunks read them again, else a ring.
  const int64_t b_slots_;
  std::unique_ptr<uint16_t[], CacheLineDelete> b_tiles_;
  std::unique_ptr<float[], CacheLineDelete> sums_;        // [rows][32]
};

template <typename Tiles>
void linear_on_tiles(const WeightOnlyLinearParams& p) {
  const int64_t k_tiles = quant::tiles_for(p.w.k), group_tiles = p.w.group_size / kTileK;
  const int64_t steps = (k_tiles + 1) / 2, groups = (k_tiles + group_tiles - 1) / group_tiles;
  const PreparedX px = prepare_x(p, steps, groups);
  // Steps per K block: x's slice within kXBlockBytes, whole groups (a group's tile products end
  // in one block), at least one group.
  const int64_t group_steps = group_tiles % 2 == 0 ? group_tiles / 2 : steps;
  const int64_t fit = kXBlockBytes / (px.rows * kStepK * 2);
  const int64_t block_steps = std::min(steps, std::max<int64_t>(1, fit / group_steps) * group_steps);
  const int64_t pairs = (quant::tiles_for(p.w.n) + 1) / 2;
  parallel_for(0, pairs, 1, [&](int64_t begin, int64_t end) {
    const amx::TileSession<Tiles> tiles;
    PairTask<Tiles> task(p, px, block_steps);
    for (int64_t pair = begin; pair < end; ++pair) task.run(pair);
  });
}

}  // namespace

// Whether linear_on_tiles takes this weight: 4 bits, and groups of whole B tiles (an even number
// of 16-column tiles) or one group over K.
bool weight_only_amx_supports(const QuantizedWeightView& w) {
  const int64_t group_tiles = w.group_size / kTileK;
  return w.bits == kBits && (group_tiles % 2 == 0 || group_tiles >= quant::tiles_for(w.k));
}

void weight_only_linear_amx(const WeightOnlyLinearParams& p, bool emulate) {
  if (emulate) {
    linear_on_tiles<amx::EmulatedTiles>(p);
  } else {
    linear_on_tiles<amx::HardwareTiles>(p);
  }
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
