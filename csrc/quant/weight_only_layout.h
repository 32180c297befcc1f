// The packed layout of weight-only quantized weights (docs/quant-layout.md), as host+device
// functions: the Python packer, the CPU kernel, the CUDA kernel and the CPU simulation of the
// CUDA fragments all use these maps, so there is one definition of where a value lives.
//
// The weight W [N, K] (nn.Linear's [out, in]) is cut into tiles of 16 output rows x 16 input
// columns. A tile is exactly the A operand of one mma.sync.m16n8k16 (rows = n, columns = k):
// y^T = W x^T puts the weight, not the activations, in the 16-row operand, so one token (decode)
// does not waste 15/16 of the tensor core. Within a tile, 32-bit word `lane` (4-bit) or
// `lane + 32 * h` (8-bit) holds exactly the values that mma lane `lane` needs in its A
// registers, ordered so that the classic register dequantization (a mask and an OR with a
// floating-point exponent, "lop3") yields the register pairs directly:
//   4-bit: byte j of the word holds two values of the same k in its nibbles: low = row r,
//          high = row r + 8; nibble pairs (i, i + 4) are therefore the same row at k, k + 1.
//   8-bit: bytes (0, 2) are row r at k, k + 1 and bytes (1, 3) row r + 8 at k, k + 1.
// with r = lane / 4 and the A-fragment column pair 2 * (lane % 4).
//
// On the CPU the same words are 16-lane int32 vectors; a fixed mask/shift gives 16 values of
// one nibble slot, whose (n, k) positions follow from tile_row / tile_col below.
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace torch_ext::quant {
// ISA-local symbols for the per-ISA CPU kernels (common/macros.h).
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

// Tile edge along N (output features) and K (input features): the mma m16n8k16 A operand.
constexpr int kTileN = 16;
constexpr int kTileK = 16;

// 32-bit words per 16 x 16 tile: 256 values x bits / 32.
TORCH_EXT_HOST_DEVICE constexpr int words_per_tile(int bits) { return 8 * bits; }
// Values per 32-bit word: 8 nibbles or 4 bytes.
TORCH_EXT_HOST_DEVICE constexpr int values_per_word(int bits) { return 32 / bits; }

// Row (n within the tile, 0..15) of value `slot` of word `word` (slot 0 = lowest bits).
TORCH_EXT_HOST_DEVICE constexpr int tile_row(int bits, int word, int slot) {
  const int r = (word % 32) / 4;
  // 4-bit: slot = 2 * byte + nibble, the high nibble is row r + 8.
  // 8-bit: slot = byte, odd bytes are row r + 8.
  return r + 8 * (slot % 2);
}

// Column (k within the tile, 0..15) of value `slot` of word `word`.
TORCH_EXT_HOST_DEVICE constexpr int tile_col(int bits, int word, int slot) {
  const int q = word % 4;
  if (bits == 4) {
    const int byte = slot / 2;  // bytes 0, 2: k = 2q, 2q + 1; bytes 1, 3: the same + 8
    return 2 * q + 8 * (byte % 2) + byte / 2;
  }
  const int h = word / 32;  // 8-bit: the second word of a lane holds the columns + 8
  return 2 * q + 8 * h + slot / 2;
}

// Number of 16-wide tiles covering `extent` (N or K).
TORCH_EXT_HOST_DEVICE constexpr int64_t tiles_for(int64_t extent) { return (extent + 15) / 16; }

// qweight is int32 [tiles_for(N), tiles_for(K), words_per_tile(bits)], tiles of one row of
// tiles contiguous along K (a kernel streams them in order). Word offset of tile (nt, kt):
TORCH_EXT_HOST_DEVICE constexpr int64_t tile_offset_words(int bits, int64_t k_tiles, int64_t nt, int64_t kt) {
  return (nt * k_tiles + kt) * words_per_tile(bits);
}

// Stored values are unsigned: q in [0, 2^bits). The weight is (q - zero) * scale with the
// zero point of (group, n) from the zeros tensor, or this one when there is none (symmetric).
TORCH_EXT_HOST_DEVICE constexpr int symmetric_zero(int bits) { return 1 << (bits - 1); }

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::quant
