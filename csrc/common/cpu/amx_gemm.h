// The blocked product the AMX kernels share (scaled_int8_mm, scaled_fp8_mm, and the bf16 pair
// product of attention and fused_moe: common/cpu/amx_pair_matmul.h), templated on the tile type
// and the dot product (common/cpu/amx_tiles.h).
//
// Tiles. A 32 x 32 block of results in tmm0-3 (2 x 2 tiles of 16 x 16 int32 or fp32), two A tiles
// (tmm4-5: rows 0-15 and 16-31) and two B tiles (tmm6-7: two blocks of 16 columns). Per step of
// 64 bytes of k (64 int8 or 32 bf16), 4 tile loads feed 4 dot products and every loaded tile is
// used twice: the largest blocking the eight tiles allow with two operands of each kind. Every
// tile is configured whole (16 rows x 64 bytes); the callers pad their operands to that.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "common/cpu/amx_tiles.h"
#include "common/cpu/parallel.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx {

constexpr int kBlockRows = 2 * kMaxRows;            // result rows per block
constexpr int kBlockColumns = 2 * kMaxRowBytes / 4;  // result columns per block (two 16-column tiles)
constexpr int kStepBytes = kMaxRowBytes;             // bytes of k per A tile row

// Configures every tile 16 rows x 64 bytes on this thread (the tile state is a thread's own) for
// the object's lifetime, and releases the tiles after.
template <typename Tiles>
class TileSession {
 public:
  TileSession() {
    TileConfig config;
    for (int t = 0; t < kTiles; ++t) config.set(t, kMaxRows, kMaxRowBytes);
    Tiles::configure(config);
  }
  ~TileSession() { Tiles::release(); }
  TileSession(const TileSession&) = delete;
  TileSession& operator=(const TileSession&) = delete;
};

// The operands of one pair of 16-column blocks.
struct TilePairOperands {
  // A: rows of a_stride bytes holding ceil(groups / 16) 64-byte steps of k, zero past the real
  // k, and zero rows up to a multiple of 32 past the last real one.
  const uint8_t* a;
  int64_t a_stride;
  // B of each column block: row g (4-byte group g of k, one group per column: 64 bytes) at
  // b[j] + g * b_stride, for g < groups. The second block may repeat the first: its products are
  // then skipped and its results are zeros, the caller's to ignore.
  const uint8_t* b[2];
  int64_t b_stride;
  int64_t groups;
  // Or B in segments of segment_groups rows (whole 16-row steps; groups a multiple of them),
  // segment t at b[j] + segment_shift[t] bytes (e.g. attention's V blocks of one group of key
  // blocks, packed apart). Null: one segment.
  const int64_t* segment_shift = nullptr;
  int64_t segment_groups = 0;

  // Where B's tile of step s (rows 16 s .. 16 s + 15) starts for column block j.
  const uint8_t* b_step(int j, int64_t s) const {
    if (segment_shift == nullptr) return b[j] + s * kMaxRows * b_stride;
    const int64_t steps = segment_groups / kMaxRows, t = s / steps;
    return b[j] + segment_shift[t] + (s - t * steps) * kMaxRows * b_stride;
  }
};

// The tiles of one 32 x 32 block of results: C (rows 0-15 / 16-31 x columns 0-15 / 16-31), the
// A tiles of rows 0-15 and 16-31, and the B tiles of the two column blocks.
enum BlockTile : int { kC00 = 0, kC01, kC10, kC11, kA0, kA1, kB0, kB1 };

// Moves the C tiles of a block to memory (kToMemory) or from it: row i, column n of the 32 x 32
// results at c + i * c_stride bytes + n values (4 bytes each); only the first column block's
// tiles where `columns` is 16.
template <typename Tiles, bool kToMemory, int kTile>
void move_tile(uint8_t* at, int64_t stride) {
  if constexpr (kToMemory) Tiles::template store<kTile>(at, stride);
  else Tiles::template load<kTile>(at, stride);
}
template <typename Tiles, bool kToMemory>
void move_block(uint8_t* c, int64_t c_stride, int columns) {
  constexpr int64_t kHalfBytes = kBlockColumns / 2 * 4;
  move_tile<Tiles, kToMemory, kC00>(c, c_stride);
  move_tile<Tiles, kToMemory, kC10>(c + kMaxRows * c_stride, c_stride);
  if (columns > kBlockColumns / 2) {
    move_tile<Tiles, kToMemory, kC01>(c + kHalfBytes, c_stride);
    move_tile<Tiles, kToMemory, kC11>(c + kMaxRows * c_stride + kHalfBytes, c_stride);
  }
}
// Stores the C tiles of a finished block.
template <typename Tiles>
void store_block(void* c, int64_t c_stride, int columns) {
  move_block<Tiles, true>(static_cast<uint8_t*>(c), c_stride, columns);
}
// Loads the C tiles of a block from where store_block would store them (to add the products to).
template <typename Tiles>
void load_block(const void* c, int64_t c_stride, int columns) {
  move_block<Tiles, false>(static_cast<uint8_t*>(const_cast<void*>(c)), c_stride, columns);
}

template <typename Tiles>
void zero_block() {
  Tiles::template zero<kC00>();
  Tiles::template zero<kC01>();
  Tiles::template zero<kC10>();
  Tiles::template zero<kC11>();
}

// For each 32-row block [m0, m0 + 32) of [m_begin, m_end) (both multiples of 32 from A's
// start): init(m0) sets the C tiles (zero_block, or load_block to add to results in memory),
// C tiles += A(rows) B(both column blocks), then store(m0) with the results in the C tiles
// (store_block, or the caller's own use of them). The tiles must be configured (TileSession).
template <TileDot kDot, typename Tiles, typename Init, typename Store>
void tile_pair_products(const TilePairOperands& o, int64_t m_begin, int64_t m_end, const Init& init,
                        const Store& store) {
  const int64_t whole = o.groups / kMaxRows, tail = o.groups - whole * kMaxRows, steps = whole + (tail > 0);
  // B's last, partial step copied zero-padded: the tile then reads no byte past the operand, and
  // A's zero k meets zeros (B's bytes past it could hold a NaN pattern: 0 x NaN is NaN).
  alignas(64) uint8_t b_tail[2][kMaxRows * kMaxRowBytes];
  if (tail > 0) {
    for (int j = 0; j < 2; ++j) {
      std::memset(b_tail[j], 0, sizeof(b_tail[j]));
      for (int64_t g = 0; g < tail; ++g)
        std::memcpy(b_tail[j] + g * kMaxRowBytes, o.b[j] + (whole * kMaxRows + g) * o.b_stride, kMaxRowBytes);
    }
  }
  // One column block (16 columns of results, e.g. a panel of 16 tokens): half the tile loads and
  // products.
  const bool two_blocks = o.b[1] != o.b[0];
  for (int64_t m0 = m_begin; m0 < m_end; m0 += kBlockRows) {
    init(m0);
    const uint8_t* const a_block = o.a + m0 * o.a_stride;
    for (int64_t s = 0; s < steps; ++s) {
      const bool is_whole = s < whole;
      const int64_t b_stride = is_whole ? o.b_stride : kMaxRowBytes;
      Tiles::template load<kA0>(a_block + s * kStepBytes, o.a_stride);
      Tiles::template load<kA1>(a_block + kMaxRows * o.a_stride + s * kStepBytes, o.a_stride);
      Tiles::template load<kB0>(is_whole ? o.b_step(0, s) : b_tail[0], b_stride);
      Tiles::template dot<kDot, kC00, kA0, kB0>();
      Tiles::template dot<kDot, kC10, kA1, kB0>();
      if (two_blocks) {
        Tiles::template load<kB1>(is_whole ? o.b_step(1, s) : b_tail[1], b_stride);
        Tiles::template dot<kDot, kC01, kA0, kB1>();
        Tiles::template dot<kDot, kC11, kA1, kB1>();
      }
    }
    store(m0);
  }
}

// tile_pair_products with each block's results stored to a local array, then epilogue(m0, acc);
// acc is int32 for kS8S8, float for kBf16, [32][32]. (A vector load of a tile store's bytes
// waits for the store to drain: callers that can take the results in place store them there,
// store_block.)
template <TileDot kDot, typename Tiles, typename Acc, typename Epilogue>
void tile_pair_gemm(const TilePairOperands& o, int64_t m_begin, int64_t m_end, const Epilogue& epilogue) {
  alignas(64) Acc acc[kBlockRows][kBlockColumns];
  tile_pair_products<kDot, Tiles>(o, m_begin, m_end, [](int64_t) { zero_block<Tiles>(); }, [&](int64_t m0) {
    store_block<Tiles>(&acc[0][0], sizeof(acc[0]), kBlockColumns);
    epilogue(m0, acc);
  });
}

// A whole GEMM over a B packed in blocks of 16 columns, block j at packed_b + j * block_bytes,
// each block a tile operand of `groups` rows of 64 bytes; A as TilePairOperands says, `rows` (a
// multiple of 32) rows. Tasks are (a panel of rows, a pair of column blocks), the pair fastest,
// so a thread's contiguous range of tasks shares one panel: a panel's A is sized to stay in L2
// (kPanelBytes) while the thread walks column pairs, and a pair's B stays in L2 while it walks
// the panel's 32-row blocks. epilogue(m0, nb0, acc) per block of results (nb0: the pair's first
// column block; without a second one, the first is read again and its columns are the caller's
// to drop).
constexpr int64_t kPanelBytes = int64_t(1) << 20;  // about half of a Sapphire Rapids core's 2 MB L2

template <TileDot kDot, typename Tiles, typename Acc, typename Epilogue>
void packed_b_tile_gemm(const uint8_t* a, int64_t a_stride, int64_t rows, const uint8_t* packed_b,
                        int64_t block_bytes, int64_t blocks, int64_t groups, const Epilogue& epilogue) {
  const int64_t panel_rows =
      std::clamp<int64_t>(kPanelBytes / std::max<int64_t>(a_stride, 1) / kBlockRows * kBlockRows, kBlockRows, rows);
  const int64_t panels = (rows + panel_rows - 1) / panel_rows, pairs = (blocks + 1) / 2;
  parallel_for(0, panels * pairs, 1, [&](int64_t begin, int64_t end) {
    const TileSession<Tiles> tiles;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / pairs, nb0 = 2 * (task % pairs);
      const TilePairOperands operands{
          a, a_stride, {packed_b + nb0 * block_bytes, packed_b + (nb0 + 1 < blocks ? nb0 + 1 : nb0) * block_bytes},
          kMaxRowBytes, groups};
      tile_pair_gemm<kDot, Tiles, Acc>(operands, panel * panel_rows, std::min(rows, (panel + 1) * panel_rows),
                                       [&](int64_t m0, const Acc (&acc)[kBlockRows][kBlockColumns]) {
                                         epilogue(m0, nb0, acc);
                                       });
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx
