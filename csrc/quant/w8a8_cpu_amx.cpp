// scaled_int8_mm's packed path on AMX-INT8 tiles. TDPBSSD multiplies a 16 x 64 int8 tile of A
// by a 64 x 16 tile of B into 16 x 16 int32 sums: 16K multiply-adds per instruction, against
// 64 per vpdpbusd. Compiled at the AVX-512 level plus -mamx-tile -mamx-int8, in its own ISA
// namespace (avx512_amx); used where cpu::amx_int8_kernel_mode() is not off, on the hardware
// tiles or on the emulated ones (common/cpu/amx_tiles.h), which run this same code.
//
// Operands. B is the packed layout the VNNI kernel reads (w8a8_cpu_packing.h): per block of 16
// columns, rows of 64 bytes holding 4 consecutive k of each column, which is TDPBSSD's B
// operand layout, so a block is read as tiles in place (its last, partial step is copied
// zero-padded by the shared driver). A is copied once per call, signed (TDPBSSD multiplies
// s8 x s8: no +128 bias, no column-sum correction), each row zero-padded to whole 64-byte steps
// and the rows to a multiple of 32. The tiles, their blocking and the task loop:
// common/cpu/amx_gemm.h.
#include <algorithm>
#include <cstring>
#include <memory>
#include <type_traits>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx_gemm.h"
#include "common/cpu/parallel.h"
#include "quant/w8a8_cpu_packing.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace w8a8;

// A as TDPBSSD's operand: signed int8 rows of `stride` bytes (K zero-padded to whole 64-byte
// steps), `rows` of them (a multiple of 32, the rows past m zero).
struct TileA {
  int64_t stride, rows;
  std::unique_ptr<int8_t[], CacheLineDelete> data;
  const uint8_t* bytes() const { return reinterpret_cast<const uint8_t*>(data.get()); }
};

TileA copy_a(const ScaledInt8MmParams& p) {
  const int64_t k4 = k4_of(p.k);
  TileA a{(k4 + amx::kMaxRows - 1) / amx::kMaxRows * amx::kStepBytes,
          (p.m + amx::kBlockRows - 1) / amx::kBlockRows * amx::kBlockRows, nullptr};
  a.data = uninitialized_line_aligned<int8_t>(size_t(a.rows * a.stride));
  parallel_for(0, a.rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      int8_t* const dst = a.data.get() + m * a.stride;
      const int64_t real = m < p.m ? p.k : 0;
      if (real > 0) std::memcpy(dst, p.a + m * p.a_row_stride, size_t(real));
      std::memset(dst + real, 0, size_t(a.stride - real));
    }
  });
  return a;
}

// The epilogue of one 32 x 32 block of sums: rows m0.., columns of blocks nb0 and nb0 + 1.
template <typename T>
void epilogue_block(const ScaledInt8MmParams& p, int64_t m0, int64_t nb0,
                    const int32_t (&acc)[amx::kBlockRows][amx::kBlockColumns]) {
  const int cols = int(std::min<int64_t>(amx::kBlockColumns, p.n - nb0 * kBlockN));
  for (int i = 0; i < amx::kBlockRows && m0 + i < p.m; ++i)
    epilogue_row<T>(p, acc[i], nullptr, m0 + i, nb0 * kBlockN, cols);
}

template <typename T, typename Tiles>
void gemm_amx(const ScaledInt8MmParams& p, const uint8_t* packed_b) {
  const int64_t k4 = k4_of(p.k), blocks = n_blocks_of(p.n);
  const TileA a = copy_a(p);
  amx::packed_b_tile_gemm<amx::TileDot::kS8S8, Tiles, int32_t>(
      a.bytes(), a.stride, a.rows, packed_b, k4 * kBlockN * 4, blocks, k4,
      [&](int64_t m0, int64_t nb0, const int32_t (&acc)[amx::kBlockRows][amx::kBlockColumns]) {
        epilogue_block<T>(p, m0, nb0, acc);
      });
}

// gemm_amx without a packed B: tasks are pairs of column blocks, each packed into the thread's
// buffer (pack_b_block, column sums unused) and multiplied with every row of A.
struct PackedPairTag;

template <typename T, typename Tiles>
void gemm_amx_packing_b(const ScaledInt8MmParams& p) {
  const int64_t k4 = k4_of(p.k), blocks = n_blocks_of(p.n), block_bytes = k4 * kBlockN * 4;
  const TileA a = copy_a(p);
  // Locals, not a's fields: the packing's int8 stores may alias anything the tasks read (with the
  // fields read in the loop, six 14336 x 4096 weights in turn ran about 10% slower).
  const uint8_t* const a_bytes = a.bytes();
  const int64_t a_stride = a.stride, rows = a.rows;
  parallel_for(0, (blocks + 1) / 2, 1, [&](int64_t begin, int64_t end) {
    const amx::TileSession<Tiles> tiles;
    std::unique_ptr<uint8_t[], CacheLineDelete> fallback;
    uint8_t* const pair_b = kept_scratch<uint8_t, PackedPairTag>(size_t(2 * block_bytes), fallback);
    int32_t colsum[kBlockN];  // the VNNI path's, not needed on the tiles
    for (int64_t pair = begin; pair < end; ++pair) {
      const int64_t nb0 = 2 * pair;
      const bool second = nb0 + 1 < blocks;
      for (int j = 0; j < (second ? 2 : 1); ++j)
        pack_b_block(p, nb0 + j, reinterpret_cast<int8_t*>(pair_b + j * block_bytes), colsum);
      const amx::TilePairOperands operands{
          a_bytes, a_stride, {pair_b, second ? pair_b + block_bytes : pair_b}, amx::kMaxRowBytes, k4};
      amx::tile_pair_gemm<amx::TileDot::kS8S8, Tiles, int32_t>(
          operands, 0, rows, [&](int64_t m0, const int32_t (&acc)[amx::kBlockRows][amx::kBlockColumns]) {
            epilogue_block<T>(p, m0, nb0, acc);
          });
    }
  });
}

}  // namespace

void scaled_int8_mm_amx(const ScaledInt8MmParams& p, const uint8_t* packed_b, bool emulate) {
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      const auto run = [&](auto tiles) {
        using Tiles = decltype(tiles);
        if (packed_b) gemm_amx<T, Tiles>(p, packed_b);
        else gemm_amx_packing_b<T, Tiles>(p);
      };
      if (emulate) {
        run(amx::EmulatedTiles{});
      } else {
        run(amx::HardwareTiles{});
      }
    }
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
