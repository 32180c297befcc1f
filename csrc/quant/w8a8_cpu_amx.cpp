// scaled_int8_mm's packed path on AMX-INT8 tiles. TDPBSSD multiplies a 16 x 64 int8 tile of A
// by a 64 x 16 tile of B into 16 x 16 int32 sums: 16K multiply-adds per instruction, against
// 64 per vpdpbusd. Compiled at the AVX-512 level plus -mamx-tile -mamx-int8, in its own ISA
// namespace (avx512_amx); used where cpu::amx_int8_kernel_mode() is not off, on the hardware
// tiles or on the emulated ones (common/cpu/amx_tiles.h), which run this same code.
//
// Operands. B is the packed layout the VNNI kernel reads (w8a8_cpu_packing.h): per block of 16
// columns, rows of 64 bytes holding 4 consecutive k of each column. That is TDPBSSD's B
// operand layout, so one B tile is 16 consecutive rows (64 k) of a block, loaded with a 64-byte
// stride; the block's last, partial slice when K is not a multiple of 64 is copied zero-padded
// once per column task (the packed layout ends after k4 rows). A is copied once per call,
// signed (TDPBSSD multiplies s8 x s8: no +128 bias, no column-sum correction), each row
// zero-padded to a multiple of 64 k and the rows to a multiple of 32, so every A tile is whole.
//
// Tiles. A 32 x 32 block of the output in tmm0-3 (2 x 2 tiles of 16 x 16 int32), two A tiles
// (tmm4-5: rows 0-15 and 16-31) and two B tiles (tmm6-7: column blocks 0 and 1). Per 64 k, 4
// tile loads feed 4 dot products, each loaded tile used twice: the largest blocking the eight
// tiles allow with two operands of each kind.
//
// Blocking. Tasks are (a panel of rows, a pair of column blocks), the pair fastest, so a
// thread's contiguous range of tasks shares one panel. A panel's A copy is sized to stay in L2
// (kPanelBytes) while its thread walks column pairs; a pair's B slices (32 columns x K) stay in
// L2 while it walks the panel's 32-row blocks.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/cpu/amx_tiles.h"
#include "common/cpu/parallel.h"
#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace w8a8;

constexpr int kTileRows = amx::kMaxRows;        // 16 rows of A or of C, 16 rows (of 4 k) of B
constexpr int kTileK = 4 * kTileRows;           // 64 k per dot product
constexpr int kRowBytes = amx::kMaxRowBytes;    // 64: 64 int8 of A, 16 int32 of C, 16 x 4 int8 of B
constexpr int kBlockRows = 2 * kTileRows;       // output rows per block
constexpr int kBlockCols = 2 * kBlockN;         // output columns per block
constexpr int64_t kPanelBytes = int64_t(1) << 20;  // about half of a Sapphire Rapids core's 2 MB L2

enum Tile : int { kC00 = 0, kC01, kC10, kC11, kA0, kA1, kB0, kB1 };

amx::TileConfig tile_config() {
  amx::TileConfig config;
  for (int t = 0; t < amx::kTiles; ++t) config.set(t, kTileRows, kRowBytes);
  return config;
}

// A as signed int8 rows of `stride` bytes (K zero-padded to whole tiles), `rows` rows (the
// rows past m zero).
std::unique_ptr<int8_t[]> copy_a(const ScaledInt8MmParams& p, int64_t rows, int64_t stride) {
  std::unique_ptr<int8_t[]> a(new int8_t[size_t(rows * stride)]);
  parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* const dst = a.get() + m * stride;
      const int64_t real = m < p.m ? p.k : 0;
      if (real > 0) std::memcpy(dst, p.a + m * p.a_row_stride, size_t(real));
      std::memset(dst + real, 0, size_t(stride - real));
    }
  });
  return a;
}

template <typename T, typename Tiles>
void gemm_amx(const ScaledInt8MmParams& p, const uint8_t* packed_b) {
  const int64_t k4 = k4_of(p.k), blocks = n_blocks_of(p.n);
  const int64_t steps = (p.k + kTileK - 1) / kTileK;
  const int64_t whole_steps = k4 / kTileRows;  // steps whose B slice lies whole in the packed layout
  const int64_t tail_rows = k4 - whole_steps * kTileRows;
  const int64_t a_stride = steps * kTileK;
  const int64_t rows = (p.m + kBlockRows - 1) / kBlockRows * kBlockRows;
  const int64_t panel_rows = std::clamp<int64_t>(kPanelBytes / a_stride / kBlockRows * kBlockRows, kBlockRows, rows);
  const int64_t panels = (rows + panel_rows - 1) / panel_rows, pairs = (blocks + 1) / 2;
  const std::unique_ptr<int8_t[]> a = copy_a(p, rows, a_stride);
  const int64_t block_bytes = k4 * kRowBytes;
  const amx::TileConfig config = tile_config();

  parallel_for(0, panels * pairs, 1, [&](int64_t begin, int64_t end) {
    Tiles::configure(config);  // per thread: the tile state is a thread's own
    alignas(64) int8_t b_tail[2][kTileRows * kRowBytes];
    alignas(64) int32_t c[kBlockRows][kBlockCols];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t panel = task / pairs, nb0 = 2 * (task % pairs);
      // Without a second block (an odd count), block 0 is read again; those columns are not stored.
      const int8_t* const b_block[2] = {
          reinterpret_cast<const int8_t*>(packed_b) + nb0 * block_bytes,
          reinterpret_cast<const int8_t*>(packed_b) + (nb0 + 1 < blocks ? nb0 + 1 : nb0) * block_bytes};
      if (tail_rows > 0) {
        for (int j = 0; j < 2; ++j) {
          std::memset(b_tail[j], 0, sizeof(b_tail[j]));
          std::memcpy(b_tail[j], b_block[j] + whole_steps * kTileRows * kRowBytes, size_t(tail_rows * kRowBytes));
        }
      }
      const int cols = int(std::min<int64_t>(kBlockCols, p.n - nb0 * kBlockN));
      const int64_t m_end = std::min(rows, (panel + 1) * panel_rows);
      for (int64_t m0 = panel * panel_rows; m0 < m_end; m0 += kBlockRows) {
        Tiles::template zero<kC00>();
        Tiles::template zero<kC01>();
        Tiles::template zero<kC10>();
        Tiles::template zero<kC11>();
        const int8_t* const a_block = a.get() + m0 * a_stride;
        for (int64_t s = 0; s < steps; ++s) {
          const bool whole = s < whole_steps;
          Tiles::template load<kA0>(a_block + s * kTileK, a_stride);
          Tiles::template load<kA1>(a_block + kTileRows * a_stride + s * kTileK, a_stride);
          Tiles::template load<kB0>(whole ? b_block[0] + s * kTileRows * kRowBytes : b_tail[0], kRowBytes);
          Tiles::template load<kB1>(whole ? b_block[1] + s * kTileRows * kRowBytes : b_tail[1], kRowBytes);
          Tiles::template dot_s8s8<kC00, kA0, kB0>();
          Tiles::template dot_s8s8<kC01, kA0, kB1>();
          Tiles::template dot_s8s8<kC10, kA1, kB0>();
          Tiles::template dot_s8s8<kC11, kA1, kB1>();
        }
        constexpr int64_t kCStride = sizeof(c[0]);
        Tiles::template store<kC00>(&c[0][0], kCStride);
        Tiles::template store<kC01>(&c[0][kBlockN], kCStride);
        Tiles::template store<kC10>(&c[kTileRows][0], kCStride);
        Tiles::template store<kC11>(&c[kTileRows][kBlockN], kCStride);
        for (int i = 0; i < kBlockRows && m0 + i < p.m; ++i)
          epilogue_row<T>(p, c[i], nullptr, m0 + i, nb0 * kBlockN, cols);
      }
    }
    Tiles::release();
  });
}

}  // namespace

void scaled_int8_mm_amx(const ScaledInt8MmParams& p, const uint8_t* packed_b, bool emulate) {
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      if (emulate) {
        gemm_amx<T, amx::EmulatedTiles>(p, packed_b);
      } else {
        gemm_amx<T, amx::HardwareTiles>(p, packed_b);
      }
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
