// AMX tile operations for the CPU kernels, two ways with one interface:
//   HardwareTiles  the tile instructions (compiled with -mamx-tile -mamx-int8 -mamx-bf16);
//   EmulatedTiles  the same operations in scalar code on a per-thread copy of the tile state,
//                  following the instruction set reference's pseudo-code, and raising an error
//                  where the hardware would fault (an unconfigured tile, shapes that do not
//                  chain). Kernels are templates on the tile type, so the tests run the very
//                  code the hardware runs, on any CPU (common/cpu/amx.h, mode "emulate").
// Tile numbers are template arguments because the instructions encode them as immediates.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "common/cpu/amx.h"

#ifndef TORCH_EXT_CPU_ISA
#error "amx_tiles.h is for CPU kernel files compiled per ISA level (see CMakeLists.txt)"
#endif

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx {

// The dot-product instructions the kernels use. C is M x 4N bytes (N int32 or fp32 per row),
// A is M x 4K bytes and B is K x 4N bytes: each 4-byte group of B's row k holds, for column n,
// the values that pair with the 4-byte group k of A's row (4 int8, or 2 bf16).
enum class TileDot {
  kS8S8,  // TDPBSSD: C[m][n] += sum_k sum_{i < 4} A[m][4k + i] * B[k][4n + i], int8 -> int32
  kBf16,  // TDPBF16PS: C[m][n] += A[m][2k] * B[k][2n], then += A[m][2k + 1] * B[k][2n + 1], bf16 -> fp32
};

constexpr int kTiles = 8;          // tmm0 .. tmm7
constexpr int kMaxRows = 16;       // rows per tile
constexpr int kMaxRowBytes = 64;   // bytes per tile row

// LDTILECFG's 64-byte memory operand, palette 1: per tile its rows and bytes per row; a tile
// left at 0 x 0 is unused.
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t row_bytes[16] = {};
  uint8_t rows[16] = {};

  void set(int tile, int tile_rows, int bytes_per_row) {
    rows[tile] = uint8_t(tile_rows);
    row_bytes[tile] = uint16_t(bytes_per_row);
  }
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
// The tile instructions as inline assembly rather than the compiler's _tile_* macros: those
// paste their tile argument into the instruction text (a template parameter would arrive as
// its name), and their loads do not tell the compiler that they read memory, so a buffer
// written only to be loaded into a tile could be dropped as a dead store. Here the tile number
// is an immediate operand printed bare (%c) and loads and stores clobber memory. (The
// compiler's _tile_loadconfig likewise declares 8 of LDTILECFG's 64 bytes as its input.)
struct HardwareTiles {
  static void configure(const TileConfig& config) { __asm__ volatile("ldtilecfg %0" ::"m"(config)); }
  static void release() { __asm__ volatile("tilerelease" ::); }
  template <int kTile>
  static void zero() {
    __asm__ volatile("tilezero %%tmm%c0" ::"n"(kTile));
  }
  template <int kTile>
  static void load(const void* base, int64_t stride) {
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "n"(kTile) : "memory");
  }
  template <int kTile>
  static void store(void* base, int64_t stride) {
    __asm__ volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "n"(kTile) : "memory");
  }
  // AT&T operand order: B, A, C.
  template <TileDot kDot, int kC, int kA, int kB>
  static void dot() {
    if constexpr (kDot == TileDot::kS8S8) {
      __asm__ volatile("tdpbssd %%tmm%c0, %%tmm%c1, %%tmm%c2" ::"n"(kB), "n"(kA), "n"(kC));
    } else {
      __asm__ volatile("tdpbf16ps %%tmm%c0, %%tmm%c1, %%tmm%c2" ::"n"(kB), "n"(kA), "n"(kC));
    }
  }
};
#endif

class EmulatedTiles {
 public:
  static void configure(const TileConfig& config) {
    if (config.palette_id != 1) fail("palette " + std::to_string(config.palette_id) + " (only 1 exists)");
    for (int t = 0; t < kTiles; ++t) {
      const bool unused = config.rows[t] == 0, no_bytes = config.row_bytes[t] == 0;
      if (config.rows[t] > kMaxRows || config.row_bytes[t] > kMaxRowBytes || unused != no_bytes)
        fail("tile " + std::to_string(t) + " configured as " + std::to_string(config.rows[t]) + " rows x " +
             std::to_string(config.row_bytes[t]) + " bytes");
    }
    State& s = state();
    s.config = config;
    s.configured = true;
    std::memset(s.data, 0, sizeof(s.data));  // LDTILECFG zeroes every tile
  }
  static void release() { state().configured = false; }

  template <int kTile>
  static void zero() {
    std::memset(tile<kTile>(), 0, kMaxRows * kMaxRowBytes);
  }
  template <int kTile>
  static void load(const void* base, int64_t stride) {
    uint8_t* data = tile<kTile>();
    std::memset(data, 0, kMaxRows * kMaxRowBytes);  // bytes past the configured shape read as 0
    const TileConfig& c = state().config;
    for (int r = 0; r < c.rows[kTile]; ++r)
      std::memcpy(data + r * kMaxRowBytes, static_cast<const uint8_t*>(base) + r * stride, c.row_bytes[kTile]);
  }
  template <int kTile>
  static void store(void* base, int64_t stride) {
    const uint8_t* data = tile<kTile>();
    const TileConfig& c = state().config;
    for (int r = 0; r < c.rows[kTile]; ++r)
      std::memcpy(static_cast<uint8_t*>(base) + r * stride, data + r * kMaxRowBytes, c.row_bytes[kTile]);
  }
  template <TileDot kDot, int kC, int kA, int kB>
  static void dot() {
    static_assert(kC != kA && kC != kB && kA != kB, "the dot products need three distinct tiles");
    uint8_t* const acc = tile<kC>();
    const uint8_t* const a = tile<kA>();
    const uint8_t* const b = tile<kB>();
    check_dot_shapes(kC, kA, kB);
    count_amx_emulated_dot_product();
    const TileConfig& c = state().config;
    for (int m = 0; m < c.rows[kC]; ++m) {
      for (int n = 0; n < c.row_bytes[kC] / 4; ++n) {
        uint8_t* const out = acc + m * kMaxRowBytes + 4 * n;
        const auto a_at = [&](int k, int i) { return a + m * kMaxRowBytes + 4 * k + i; };
        const auto b_at = [&](int k, int i) { return b + k * kMaxRowBytes + 4 * n + i; };
        if constexpr (kDot == TileDot::kS8S8) {
          int32_t sum;
          std::memcpy(&sum, out, 4);
          uint32_t wrapped = uint32_t(sum);  // the hardware's int32 sums wrap
          for (int k = 0; k < c.row_bytes[kA] / 4; ++k)
            for (int i = 0; i < 4; ++i)
              wrapped += uint32_t(int32_t(int8_t(*a_at(k, i))) * int32_t(int8_t(*b_at(k, i))));
          sum = int32_t(wrapped);
          std::memcpy(out, &sum, 4);
        } else {
          float sum;
          std::memcpy(&sum, out, 4);
          for (int k = 0; k < c.row_bytes[kA] / 4; ++k)
            for (int i = 0; i < 4; i += 2) sum += bf16_at(a_at(k, i)) * bf16_at(b_at(k, i));
          std::memcpy(out, &sum, 4);
        }
      }
    }
  }

 private:
  struct State {
    TileConfig config;
    bool configured = false;
    alignas(64) uint8_t data[kTiles][kMaxRows * kMaxRowBytes];
  };
  static State& state() {
    thread_local State s;
    return s;
  }
  static float bf16_at(const uint8_t* p) {
    uint16_t bits;
    std::memcpy(&bits, p, 2);
    const uint32_t wide = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &wide, 4);
    return f;
  }
  [[noreturn]] static void fail(const std::string& what) {
    throw std::logic_error("emulated AMX tiles: " + what + " (the hardware would fault)");
  }
  template <int kTile>
  static uint8_t* tile() {
    static_assert(kTile >= 0 && kTile < kTiles, "tiles are tmm0 .. tmm7");
    State& s = state();
    if (!s.configured) fail("tile instruction before LDTILECFG");
    if (s.config.rows[kTile] == 0) fail("tmm" + std::to_string(kTile) + " is not configured");
    return s.data[kTile];
  }
  static std::string shape(int t) {
    const TileConfig& c = state().config;
    return "tmm" + std::to_string(t) + " (" + std::to_string(c.rows[t]) + " x " + std::to_string(c.row_bytes[t]) + " B)";
  }
  // The shape rules of the dot-product instructions: C is M x 4N bytes, A is M x 4K, B is K x 4N.
  static void check_dot_shapes(int c, int a, int b) {
    const TileConfig& t = state().config;
    if (t.rows[a] != t.rows[c] || t.row_bytes[b] != t.row_bytes[c] || t.row_bytes[a] != 4 * t.rows[b] ||
        t.row_bytes[a] % 4 != 0 || t.row_bytes[c] % 4 != 0)
      fail("dot product of " + shape(a) + " and " + shape(b) + " into " + shape(c));
  }
};

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::amx
