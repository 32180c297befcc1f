// Index math and register dequantization of the CUDA weight-only linear (quant/weight_only_cuda.cu),
// host+device so that tests/cpp/weight_only_cuda_sim.cpp runs on the CPU exactly what the GPU runs:
// the bit tricks that turn packed words into mma A registers, the tile shapes, which k range a split
// and a pipeline stage own, every global <-> shared map (with the swizzle of the x tile), the mma
// fragment maps, the tail predicates and the split rule. Plain C++ apart from a few device
// intrinsics behind __CUDA_ARCH__, each with a host twin of the same IEEE semantics.
//
// The GEMM (docs/quant-layout.md): y^T = W x^T. The weight tile (16 n x 16 k) is the A operand of
// mma.m16n8k16, tokens are the n8 dimension of B, so a decode step (one token) uses the 16-row
// operand fully. Per k16 step a warp dequantizes its A tiles once and reuses each for every 8-token
// block of the CTA.
#pragma once

#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/float_bits.h"
#include "common/exact_float.h"
#include "common/index_math.h"
#include "common/macros.h"
#include "common/wgmma_desc.h"
#include "quant/weight_only_layout.h"

namespace torch_ext::quant {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace wo_cuda {

using index_math::ceil_div;
using index_math::min64;

// =============================================================================================
// 1. Register arithmetic on 16-bit float pairs (low half = first element), fp32 and bytes.
//    Device: the PTX instructions; host: the same IEEE round-to-nearest-even operation through
//    fp32 (exact for fp16 and bf16 +, -, x: 24 >= 2 * 11 + 2 significand bits, so the second
//    rounding is innocuous) and float_bits.h's exact conversions.
// =============================================================================================

template <typename T>
TORCH_EXT_HOST_DEVICE float half_of(uint32_t pair, int high) {
  const uint16_t bits = uint16_t(high ? pair >> 16 : pair);
  if constexpr (std::is_same_v<T, Half>) {
    return to_float(Half{bits});
  } else {
    return to_float(BFloat16{bits});
  }
}

template <typename T>
TORCH_EXT_HOST_DEVICE uint32_t bits16_of(float f) {
  if constexpr (std::is_same_v<T, Half>) {
    return to_half(f).bits;
  } else {
    return to_bfloat16(f).bits;
  }
}

template <typename T>
TORCH_EXT_HOST_DEVICE uint32_t pack_pair(float lo, float hi) {
  return bits16_of<T>(lo) | (bits16_of<T>(hi) << 16);
}

// a - b, a * b and a + b per half, rounded to nearest even. bf16 on sm_80 has only the fma form
// (what cuda_bf16.h's __hsub2_rn / __hmul2_rn emit there): a*1 + b, b*(-1) + a, a*b + (-0).
template <typename T>
TORCH_EXT_HOST_DEVICE uint32_t pair_sub(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (std::is_same_v<T, Half>) {
    asm("sub.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(b), "r"(0xBF80BF80u), "r"(a));
  }
  return d;
#else
  return pack_pair<T>(half_of<T>(a, 0) - half_of<T>(b, 0), half_of<T>(a, 1) - half_of<T>(b, 1));
#endif
}

template <typename T>
TORCH_EXT_HOST_DEVICE uint32_t pair_mul(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (std::is_same_v<T, Half>) {
    asm("mul.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
  }
  return d;
#else
  return pack_pair<T>(half_of<T>(a, 0) * half_of<T>(b, 0), half_of<T>(a, 1) * half_of<T>(b, 1));
#endif
}

template <typename T>
TORCH_EXT_HOST_DEVICE uint32_t pair_add(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  if constexpr (std::is_same_v<T, Half>) {
    asm("add.rn.f16x2 %0, %1, %2;\n" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(0x3F803F80u), "r"(b));
  }
  return d;
#else
  return pack_pair<T>(half_of<T>(a, 0) + half_of<T>(b, 0), half_of<T>(a, 1) + half_of<T>(b, 1));
#endif
}

// f32_sub / f32_mul / f32_add (one rounding each): common/exact_float.h.

// Two fp32 -> one bf16 pair (lo in the low half), round to nearest even (cvt.rn.bf16x2.f32, sm_80+).
TORCH_EXT_HOST_DEVICE uint32_t pack_bf16_pair(float lo, float hi) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(d) : "f"(hi), "f"(lo));
  return d;
#else
  return pack_pair<BFloat16>(lo, hi);
#endif
}

// PRMT (__byte_perm): byte i of the result is byte sel[4i+2 : 4i] of the 8-byte value {b, a}
// (a = bytes 0-3, b = bytes 4-7).
TORCH_EXT_HOST_DEVICE uint32_t byte_perm(uint32_t a, uint32_t b, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(a, b, sel);
#else
  const uint64_t bytes = (uint64_t(b) << 32) | a;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= uint32_t((bytes >> (8 * ((sel >> (4 * i)) & 7u))) & 0xFFu) << (8 * i);
  return r;
#endif
}

// (a & mask) | bits as one LOP3 (lut 0xEA = (0xF0 & 0xCC) | 0xAA). Written in C++, nvcc emits two
// LOP3s because a SASS LOP3 takes a single immediate; with register operands ptxas keeps the two
// constants in registers once per kernel.
TORCH_EXT_HOST_DEVICE uint32_t and_or(uint32_t a, uint32_t mask, uint32_t bits) {
#if defined(__CUDA_ARCH__)
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "r"(mask), "r"(bits));
  return d;
#else
  return (a & mask) | bits;
#endif
}

TORCH_EXT_HOST_DEVICE float bits_to_f32(uint32_t u) { return bits_as_float(u); }

// =============================================================================================
// 2. Register dequantization: packed words -> the four A registers of mma.m16n8k16.
//
// OR-ing an unsigned integer q into the low mantissa bits of a float whose exponent makes the
// mantissa's last bit worth 1 gives exactly base + q:
//   fp16 0x6400 = 1024 (10 mantissa bits: q < 1024), bf16 0x4300 = 128 (7 bits: q < 128, 4-bit
//   only), fp32 0x4B000000 = 2^23.
// Subtracting (base + zero) the same way is exact (two small integers), and one multiply by the
// scale rounds once: every weight is exactly (q - zero) * scale rounded to T, as the CPU kernel
// and dequantize_weight compute it. (Marlin fuses the subtraction into an fma, which rounds the
// zero term separately; we keep the two instructions for bitwise agreement.)
// bf16 8-bit cannot use 128 + q (not exact for q >= 128: 8 significant bits), so it takes fp32:
// (2^23 + q) - (2^23 + zero) and the product are exact in fp32 ((q - zero) has <= 9 significant
// bits, the bf16 scale 8), and cvt.rn.bf16x2 rounds once.
// =============================================================================================

template <typename T>
TORCH_EXT_HOST_DEVICE constexpr uint32_t magic_bits() {
  return std::is_same_v<T, Half> ? 0x6400u : 0x4300u;
}
TORCH_EXT_HOST_DEVICE constexpr uint32_t pair_of(uint32_t bits16) { return bits16 | (bits16 << 16); }
constexpr uint32_t kF32Magic = 0x4B000000u;

template <typename T, int kBits>
inline constexpr bool kDequantViaF32 = std::is_same_v<T, BFloat16> && kBits == 8;

// 16-bit encoding (T) of the symmetric zero point 2^(bits-1): 8 or 128, exact in fp16 and bf16.
template <typename T>
TORCH_EXT_HOST_DEVICE uint16_t symmetric_zero_bits(int bits) {
  return uint16_t(bits16_of<T>(float(symmetric_zero(bits))));
}

// What a lane needs to dequantize its values of one tile in one group, for its rows r (h = 0)
// and r + 8 (h = 1): 16-bit pairs (scale, scale) and (base + zero, base + zero), or fp32 values.
template <typename T, int kBits, bool kF32 = kDequantViaF32<T, kBits>>
struct GroupParams {
  uint32_t scale[2];
  uint32_t zero[2];
};
template <typename T, int kBits>
struct GroupParams<T, kBits, true> {
  float scale[2];
  float zero[2];
};

// From the raw T bits of the scale and the zero point of rows r and r + 8.
template <typename T, int kBits>
TORCH_EXT_HOST_DEVICE GroupParams<T, kBits> make_group_params(const uint16_t (&scale)[2], const uint16_t (&zero)[2]) {
  GroupParams<T, kBits> g;
  for (int h = 0; h < 2; ++h) {
    if constexpr (kDequantViaF32<T, kBits>) {
      g.scale[h] = bits_to_f32(uint32_t(scale[h]) << 16);  // bf16 -> fp32 is a shift
      g.zero[h] = f32_add(bits_to_f32(kF32Magic), bits_to_f32(uint32_t(zero[h]) << 16));
    } else {
      g.scale[h] = pair_of(scale[h]);
      g.zero[h] = pair_add<T>(pair_of(zero[h]), pair_of(magic_bits<T>()));
    }
  }
  return g;
}

// PRMT selectors for 8-bit words. A word holds bytes (row r, k), (row r+8, k), (row r, k+1),
// (row r+8, k+1); the register pair of row half h is bytes h and h + 2.
//   16-bit: [byte h, exponent, byte h + 2, exponent] with b = 0xEEEEEEEE (E = the magic's high
//   byte) -> selector nibbles (h, 4, h + 2, 4).
//   fp32: [byte s, 0, 0x00, 0x4B] from b = 0x00004B00 -> nibbles (s, 4, 4, 5).
TORCH_EXT_HOST_DEVICE constexpr uint32_t prmt_pair_selector(int h) {
  return 0x4040u | uint32_t(h) | (uint32_t(h + 2) << 8);
}
TORCH_EXT_HOST_DEVICE constexpr uint32_t prmt_f32_selector(int byte) { return 0x5440u | uint32_t(byte); }

// The A registers of one tile for one lane: words[h] is word lane + 32 h of the tile (one word
// for 4-bit, two for 8-bit). a[j] holds rows r + 8 (j % 2), columns c + 8 (j / 2) + {0, 1}
// (c = 2 (lane % 4)): registers a0..a3 of mma.m16n8k16 (docs/quant-layout.md).
template <typename T, int kBits>
TORCH_EXT_HOST_DEVICE void dequantize_a(const uint32_t (&words)[kBits / 4], const GroupParams<T, kBits>& g,
                                        uint32_t (&a)[4]) {
  if constexpr (kBits == 4) {
    // Nibbles j and j + 4 of the word are (row r + 8 (j % 2), column c + 8 (j / 2)) and the next
    // column: a shift and the mask 0x000F000F put them in the two halves (one LOP3 with the OR).
    const uint32_t magic = pair_of(magic_bits<T>());
    for (int j = 0; j < 4; ++j) {
      const uint32_t biased = and_or(words[0] >> (4 * j), 0x000F000Fu, magic);
      a[j] = pair_mul<T>(pair_sub<T>(biased, g.zero[j % 2]), g.scale[j % 2]);
    }
  } else if constexpr (!kDequantViaF32<T, kBits>) {
    const uint32_t exponent = magic_bits<T>() >> 8;
    const uint32_t fill = exponent * 0x01010101u;
    for (int j = 0; j < 4; ++j) {
      const uint32_t biased = byte_perm(words[j / 2], fill, prmt_pair_selector(j % 2));
      a[j] = pair_mul<T>(pair_sub<T>(biased, g.zero[j % 2]), g.scale[j % 2]);
    }
  } else {
    for (int j = 0; j < 4; ++j) {
      const int h = j % 2;
      float v[2];
      for (int col = 0; col < 2; ++col) {
        const float biased = bits_to_f32(byte_perm(words[j / 2], kF32Magic >> 16, prmt_f32_selector(h + 2 * col)));
        v[col] = f32_mul(f32_sub(biased, g.zero[h]), g.scale[h]);
      }
      a[j] = pack_bf16_pair(v[0], v[1]);
    }
  }
}

// =============================================================================================
// 3. Tile shapes (tuning constants; the maps below depend on them). H100 numbers: 132 SMs,
//    228 KB shared memory and 64K registers per SM, 3.35 TB/s HBM.
// =============================================================================================

// mma.m16n8k16: 16 weight rows x 16 k x 8 tokens.
constexpr int kTileRows = kTileN;  // 16
constexpr int kMmaK = kTileK;      // 16
constexpr int kMmaTokens = 8;
// 8 warps; each owns 2 tile rows (32 output features) for all the CTA's tokens and the whole k
// range of the split: no reduction between warps. Two A tiles per warp let each x fragment read
// from shared memory feed two mma per token block (B traffic per mma halves), and 32 rows per
// warp keep the batch accumulators at 2 x 8 x 4 = 64 registers.
constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kWarpTiles = 2;
constexpr int kBlockTiles = kWarps * kWarpTiles;  // 16 tile rows
// 256 output features per CTA: every CTA re-reads x for its k range from L2, so x traffic is
// (N / kBlockN) * M * K * 2 bytes; at 256 it equals the 4-bit weight traffic at M = 64 (and is a
// quarter of it at M = 16), while N = 4096..28672 still gives 16..112 column blocks.
constexpr int kBlockN = kBlockTiles * kTileRows;
// cp.async moves 16-byte chunks: 8 values of x or of the scales, 4 words of qweight.
constexpr int kChunkBytes = 16;
constexpr int kChunkValues = 8;
// Shared memory per CTA at most 96 KB: under the 99 KB opt-in limit of sm_86/sm_89, and two CTAs
// per SM on H100 (2 x (96 + 1) KB <= 228 KB). A config takes as many stages as fit (3 or 4):
// 2-3 stages of 8-16 KB of weights in flight per CTA, 2-3x what Little's law asks of an SM's
// share of HBM (3.35 TB/s x ~1 us / 132 SMs ~ 25 KB).
constexpr int kSmemBudget = 96 * 1024;
// Decode: M <= 16 is one CTA row of tokens; larger M uses 64-token CTAs (grid.x = m blocks).
constexpr int kDecodeBlockM = 16;
constexpr int kBatchBlockM = 64;

// One instantiation per (weight bits, tokens per CTA). kBlockM = 16 (decode, M <= 16) or 64
// (batch): 64 tokens make each dequantized tile feed 8 mma, which is what keeps the tensor cores
// (not the dequantization) the limit at M = 64..256.
template <int kBits_, int kBlockM_>
struct TileConfig {
  static constexpr int kBits = kBits_;
  static constexpr int kBlockM = kBlockM_;
  // k16 tiles per pipeline stage. Decode streams 16 KB of weights per stage (8 tiles of 4-bit, 4
  // of 8-bit): at 3 TB/s decode is close to issue-bound (~20 instructions per tile and warp for
  // dequantization and mma, ~2 warp instructions per cycle per SM), so the fixed per-stage work
  // of every thread (barrier, copy addresses, group walk: ~150 instructions per warp) is
  // amortized over 16 tiles per warp rather than 8. Batch: 4 tiles, because its 64-token x tile
  // (8 KB per 4 tiles) dominates shared memory.
  static constexpr int kStageTiles = kBlockM == kDecodeBlockM ? 32 / kBits : 4;
  static constexpr int kBlockK = kStageTiles * kMmaK;
  static constexpr int kTokenBlocks = kBlockM / kMmaTokens;  // n8 mma blocks
  static constexpr int kTokenPairs = kBlockM / 16;           // ldmatrix.x4 per k16 step
  static constexpr int kTileWords = words_per_tile(kBits);
  static constexpr int kLaneWords = kBits / 4;  // words of a tile one lane dequantizes
  // Stage layout: [qweight tiles][x tile][scale slots][zero slots], all 16-byte multiples.
  static constexpr int kQBytes = kBlockTiles * kStageTiles * kTileWords * 4;
  static constexpr int kXBytes = kBlockM * kBlockK * 2;
  // One slot per group a stage can touch (at most one per k16 tile), kBlockN values each.
  static constexpr int kSlots = kStageTiles;
  static constexpr int kScaleBytes = kSlots * kBlockN * 2;
  static constexpr int kXOffset = kQBytes;
  static constexpr int kScaleOffset = kXOffset + kXBytes;
  static constexpr int kZeroOffset = kScaleOffset + kScaleBytes;
  static constexpr int kStageBytes = kZeroOffset + kScaleBytes;
  // decode 4-bit 28 KB x 3, decode 8-bit 22 KB x 4, batch 4-bit 20 KB x 4, batch 8-bit 28 KB x 3.
  static constexpr int kStages = kSmemBudget / kStageBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  // cp.async chunks per stage.
  static constexpr int kQChunksPerTile = kTileWords / 4;
  static constexpr int kQChunksPerRow = kStageTiles * kQChunksPerTile;
  static constexpr int kQChunks = kBlockTiles * kQChunksPerRow;
  static constexpr int kQChunksPerThread = kQChunks / kThreads;
  static constexpr int kXChunksPerRow = kBlockK / kChunkValues;
  static constexpr int kXChunks = kBlockM * kXChunksPerRow;
  static constexpr int kXChunksPerThread = (kXChunks + kThreads - 1) / kThreads;
  static constexpr int kSlotChunks = kBlockN / kChunkValues;  // 32 per slot and tensor
  // Chunk tid + kThreads * i of a thread is its chunk tid moved down by whole rows (the kernel
  // keeps one source pointer per operand and steps it, see q_chunk_row / x_chunk_row).
  static constexpr int kQRowsPerPass = kThreads / kQChunksPerRow;
  static constexpr int kXRowsPerPass = kThreads / kXChunksPerRow;

  // CTAs per SM (the launch bounds' minimum and what the split rule plans with): 2 = 16 warps,
  // registers capped at 128, which the decode kernels (~80) and the 4-bit batch kernel (64
  // accumulators) fit without spilling; the 8-bit batch kernel needs a few more (two words and
  // four weight chunks per thread), so it runs one CTA per SM with up to 255 registers.
  static constexpr int kCtasPerSm = kBits == 8 && kBlockM == 64 ? 1 : 2;

  static_assert(kBlockM % 16 == 0, "ldmatrix.x4 loads 16 tokens");
  static_assert(kQChunks % kThreads == 0 && kThreads % kQChunksPerRow == 0, "whole qweight rows per pass");
  static_assert(kXRowsPerPass % 8 == 0, "a pass keeps the x swizzle phase (row % 8)");
  static_assert(kXChunksPerRow % 8 == 0, "the x swizzle permutes groups of 8 chunks");
  static_assert(kStages >= 3, "at least two stages in flight");
  static_assert(kSmemBytes <= kSmemBudget, "shared memory budget");
};

// Hopper batch GEMM (quant/weight_only_cuda.cu, linear_kernel<..., kWgmma = true>, sm_90a, opt-in):
// the batch config's x tile ([64 tokens][64 k], 128-byte rows, chunk c at c ^ (row % 8)) is
// wgmma's 128-byte-swizzled K-major layout, so wgmma.m64n64k16 reads it as the B operand
// (tokens = N) while each warp's dequantized A fragments of its tile i (16 features: the
// mma.m16n8k16 A fragment is wgmma's register A fragment of that warp's 16 rows) are the A
// operand: one wgmma per warp tile and k16 step, 4 warps' tiles at once. The x tiles start on
// 1024-byte atoms (the kernel aligns its shared memory up; stage and x offsets are atom multiples).
template <class Cfg>
TORCH_EXT_HOST_DEVICE uint64_t x_wgmma_desc(uint32_t x_tile_address, int t) {
  return wgmma_kmajor_sw128_desc(x_tile_address + uint32_t(t * kMmaK * 2));
}
template <class Cfg>
constexpr bool wgmma_config_ok() {
  return Cfg::kBlockM == 64 && Cfg::kBlockK * 2 == kWgmmaSwizzleRowBytes && Cfg::kXOffset % kWgmmaAtomBytes == 0 &&
         Cfg::kStageBytes % kWgmmaAtomBytes == 0;
}
static_assert(wgmma_config_ok<TileConfig<4, kBatchBlockM>>() && wgmma_config_ok<TileConfig<8, kBatchBlockM>>(),
              "batch x tiles in wgmma's layout, on atoms");

TORCH_EXT_HOST_DEVICE int block_m_for(int64_t m) { return m <= kDecodeBlockM ? kDecodeBlockM : kBatchBlockM; }

// What the host plan needs of the config a launch uses.
struct ConfigFacts {
  int stage_tiles;
  int ctas_per_sm;
};
template <class Cfg>
TORCH_EXT_HOST_DEVICE ConfigFacts facts_of() {
  return ConfigFacts{Cfg::kStageTiles, Cfg::kCtasPerSm};
}
TORCH_EXT_HOST_DEVICE ConfigFacts config_facts(int bits, int block_m) {
  if (bits == 4) {
    return block_m == kDecodeBlockM ? facts_of<TileConfig<4, kDecodeBlockM>>()
                                    : facts_of<TileConfig<4, kBatchBlockM>>();
  }
  return block_m == kDecodeBlockM ? facts_of<TileConfig<8, kDecodeBlockM>>() : facts_of<TileConfig<8, kBatchBlockM>>();
}

// =============================================================================================
// 4. Split-K rule (host). Small M streams the weights, and 8192 output features are only 32 CTA
//    columns for 132 SMs, so K is split when the CTAs do not fill the CTA slots (num_sms x the
//    config's CTAs per SM). Splits are chosen among the counts that still fit in the slots (one
//    wave; this also bounds the workspace by slots x 64 x 256 x 4 bytes), minimizing the bytes
//    one CTA moves, CTAs being assumed to run at a fixed share of their SM:
//      ceil(k_iters / s) * stage_bytes                                  its k range
//      + partial_bytes + s * ctas * partial_bytes / slots               partial sums, written
//      + kReduceOverheadBytes                                           and reduced (s > 1)
//    stage_bytes = weights + x rows a CTA reads per stage; partial_bytes = the fp32 partial sums
//    a CTA writes. Filling every slot (16 warps per SM) is also what hides the dequantization's
//    instruction latency. 8192 x 8192 4-bit on 132 SMs: M = 1..64 split 8 ways, M = 256 2 ways
//    (256 CTAs each); 8-bit (one CTA per SM at M > 16) M = 64 4 ways, M = 256 not at all.
// =============================================================================================

// The reduce kernel's launch gap and ramp, ~2 us at a CTA slot's share of HBM bandwidth
// (3.35 TB/s / 264 slots ~ 12.7 GB/s).
constexpr int64_t kReduceOverheadBytes = 24 * 1024;
// Grid limits: gridDim.y (column blocks) and gridDim.z (splits) <= 65535.
constexpr int64_t kMaxGridYZ = 65535;

struct LinearPlan {
  int block_m;            // tokens per CTA: the tile config
  int stage_tiles;        // its k16 tiles per pipeline stage
  int64_t m_blocks;       // gridDim.x
  int64_t n_blocks;       // gridDim.y
  int64_t k_tiles;        // k16 tiles of K
  int64_t k_iters;        // pipeline stages of K
  int64_t splits;         // gridDim.z (1: the GEMM writes y)
  int64_t iters_per_split;  // stages per split; the last split may have fewer, none is empty
};

TORCH_EXT_HOST_DEVICE int64_t split_cost(int64_t ctas, int64_t k_iters, int64_t splits, int64_t slots,
                                         int64_t stage_bytes, int64_t partial_bytes) {
  int64_t cost = ceil_div(k_iters, splits) * stage_bytes;
  if (splits > 1) cost += partial_bytes + splits * ctas * partial_bytes / slots + kReduceOverheadBytes;
  return cost;
}

// How the rows of x pick their weight (weight_only.h, row_experts): kNoExperts, one weight for all;
// kRowPerBlock: each row its own expert, one row per CTA (in the decode config); kDecodeBlockM or
// kBatchBlockM: rows grouped by expert in blocks of that many (that config), a CTA per block.
constexpr int64_t kNoExperts = 0, kRowPerBlock = 1;
TORCH_EXT_HOST_DEVICE bool expert_rows_valid(int64_t expert_rows) {
  return expert_rows == kRowPerBlock || expert_rows == kDecodeBlockM || expert_rows == kBatchBlockM;
}

// `allow_split` = false when the caller has no workspace. forced_splits > 0 replaces the cost
// rule's choice (clamped to 1..k_iters, normalized to the count its ranges give): the tuning knob
// TORCH_EXT_WO_SPLITS of the benchmarks. `expert_rows`: see kNoExperts.
TORCH_EXT_HOST_DEVICE LinearPlan plan_linear(int64_t m, int64_t n, int64_t k, int bits, int64_t num_sms,
                                             bool allow_split, int64_t forced_splits = 0,
                                             int64_t expert_rows = kNoExperts) {
  const bool row_per_block = expert_rows == kRowPerBlock;
  LinearPlan p{};
  p.block_m = expert_rows == kNoExperts ? block_m_for(m) : row_per_block ? kDecodeBlockM : int(expert_rows);
  const ConfigFacts config = config_facts(bits, p.block_m);
  p.stage_tiles = config.stage_tiles;
  p.m_blocks = row_per_block ? m : ceil_div(m, p.block_m);
  p.n_blocks = ceil_div(n, kBlockN);
  p.k_tiles = tiles_for(k);
  p.k_iters = ceil_div(p.k_tiles, p.stage_tiles);
  p.splits = 1;
  p.iters_per_split = p.k_iters;
  if (num_sms < 1) num_sms = 1;
  const int64_t ctas = p.m_blocks * p.n_blocks, slots = num_sms * config.ctas_per_sm;
  if (!allow_split || p.k_iters < 2) return p;
  if (forced_splits > 0) {
    p.iters_per_split = ceil_div(p.k_iters, min64(min64(forced_splits, p.k_iters), kMaxGridYZ));
    p.splits = ceil_div(p.k_iters, p.iters_per_split);
    return p;
  }
  if (ctas >= slots) return p;
  const int64_t rows = row_per_block ? 1 : min64(m, p.block_m);  // x rows and partial rows a CTA really moves
  const int64_t stage_bytes =
      int64_t(kBlockTiles) * p.stage_tiles * words_per_tile(bits) * 4 + rows * p.stage_tiles * kMmaK * 2;
  const int64_t partial_bytes = rows * kBlockN * int64_t(sizeof(float));
  const int64_t max_splits = min64(min64(p.k_iters, slots / ctas), kMaxGridYZ);
  int64_t best = 1, best_cost = split_cost(ctas, p.k_iters, 1, slots, stage_bytes, partial_bytes);
  for (int64_t s = 2; s <= max_splits; ++s) {
    const int64_t per_split = ceil_div(p.k_iters, s);
    if (ceil_div(p.k_iters, per_split) != s) continue;  // the same ranges as a smaller count
    const int64_t cost = split_cost(ctas, p.k_iters, s, slots, stage_bytes, partial_bytes);
    if (cost < best_cost) {
      best = s;
      best_cost = cost;
    }
  }
  p.splits = best;
  p.iters_per_split = ceil_div(p.k_iters, best);
  return p;
}

// Bytes of fp32 partial sums [splits][m][n] (0 without split).
TORCH_EXT_HOST_DEVICE int64_t partial_bytes(const LinearPlan& p, int64_t m, int64_t n) {
  return p.splits > 1 ? p.splits * m * n * int64_t(sizeof(float)) : 0;
}

// Offset of the partial sum of (split, token m, feature n) in the workspace [splits][M][N].
TORCH_EXT_HOST_DEVICE int64_t partial_offset(int64_t split, int64_t m, int64_t n, int64_t rows, int64_t cols) {
  return (split * rows + m) * cols + n;
}

// k16 tiles per quantization group: group_size / 16, capped at the k tiles (a group that covers
// all of K, e.g. per-channel quantization, behaves the same at any larger size).
TORCH_EXT_HOST_DEVICE int group_tiles_for(int64_t group_size, int64_t k_tiles) {
  const int64_t tiles = group_size / kMmaK, cap = k_tiles > 0 ? k_tiles : 1;
  return int(tiles < cap ? tiles : cap);
}

// The cp.async paths need 16-byte aligned chunks: x's rows (base and row stride), and whole
// 8-value chunks of every scale / zero row (N % 8 == 0). Addresses as integers; 0 = no tensor.
TORCH_EXT_HOST_DEVICE bool x_vectorizable(uint64_t x_address, int64_t row_stride, int64_t element_bytes) {
  return x_address % kChunkBytes == 0 && (row_stride * element_bytes) % kChunkBytes == 0;
}
TORCH_EXT_HOST_DEVICE bool scales_vectorizable(int64_t n, uint64_t scales_address, uint64_t zeros_address) {
  return n % kChunkValues == 0 && scales_address % kChunkBytes == 0 && zeros_address % kChunkBytes == 0;
}

// =============================================================================================
// 5. What a CTA and a pipeline stage own (device; 32-bit: the host checks K < 2^30).
// =============================================================================================

// k16 tiles [kt_begin, kt_end) = stages [iter_begin, iter_begin + iters) of split `split`.
struct SplitRange {
  int iter_begin, iters;
  int kt_end;  // exclusive bound of the k tiles this split computes (the last stage may be short)
};
TORCH_EXT_HOST_DEVICE SplitRange split_range(int split, int iters_per_split, int k_iters, int k_tiles,
                                             int stage_tiles) {
  SplitRange r;
  r.iter_begin = split * iters_per_split;
  const int iter_end = k_iters < r.iter_begin + iters_per_split ? k_iters : r.iter_begin + iters_per_split;
  r.iters = iter_end > r.iter_begin ? iter_end - r.iter_begin : 0;
  const int kt_end = iter_end * stage_tiles;
  r.kt_end = kt_end < k_tiles ? kt_end : k_tiles;
  return r;
}

// The k16 tiles of a pipeline stage that the split computes, and the quantization groups they
// touch: groups first_group .. first_group + groups - 1 land in scale slots 0 .. groups - 1.
struct StageSpan {
  int kt0;      // first k tile of the stage
  int kt_stop;  // exclusive; kt0 < kt_stop <= kt0 + stage_tiles
  int first_group;
  int groups;
};
// Walks a split's stages in order (the loader kStages - 1 ahead of the compute, one walker each)
// with group_tiles = group_size / 16 >= 1: one division when the CTA starts, then only adds (a
// division per stage costs ~25 instructions per thread, a visible share of a decode stage).
struct StageWalker {
  int group;            // group of the next stage's first tile
  int next_group_tile;  // first tile of the group after that
};
TORCH_EXT_HOST_DEVICE StageWalker stage_walker(int iter, int stage_tiles, int group_tiles) {
  const int group = int(uint32_t(iter * stage_tiles) / uint32_t(group_tiles));
  return StageWalker{group, (group + 1) * group_tiles};
}
// The span of stage `iter`, the walker's next stage (kt_end: the split's exclusive tile bound);
// w moves to stage iter + 1.
TORCH_EXT_HOST_DEVICE StageSpan next_stage(StageWalker& w, int iter, int stage_tiles, int kt_end, int group_tiles) {
  StageSpan s;
  s.kt0 = iter * stage_tiles;
  s.kt_stop = s.kt0 + stage_tiles < kt_end ? s.kt0 + stage_tiles : kt_end;
  s.first_group = w.group;
  s.groups = 1;
  int boundary = w.next_group_tile;
  while (boundary < s.kt_stop) {  // group starts inside the stage (one at most for groups >= stages)
    ++s.groups;
    boundary += group_tiles;
  }
  w.group = s.first_group + s.groups - 1;
  if (boundary == s.kt_stop) {  // the next stage starts a group
    ++w.group;
    boundary += group_tiles;
  }
  w.next_group_tile = boundary;
  return s;
}

// Full stage in one group: the compute loop runs without per-tile checks.
TORCH_EXT_HOST_DEVICE bool stage_is_uniform(const StageSpan& s, int stage_tiles) {
  return s.kt_stop - s.kt0 == stage_tiles && s.groups == 1;
}

// Walks the groups of a stage tile by tile without dividing: slot of the current tile, and the
// first tile of the next group.
struct GroupCursor {
  int slot;
  int next_group_tile;
};
TORCH_EXT_HOST_DEVICE GroupCursor group_cursor(const StageSpan& s, int group_tiles) {
  return GroupCursor{0, (s.first_group + 1) * group_tiles};
}
// Moves to tile kt (tiles visited in increasing order, one at a time).
TORCH_EXT_HOST_DEVICE void advance(GroupCursor& c, int kt, int group_tiles) {
  if (kt >= c.next_group_tile) {
    ++c.slot;
    c.next_group_tile += group_tiles;
  }
}

// Tokens blocks of 8 that hold at least one real token in CTA row m0 (1..kBlockM / 8): later
// blocks skip their ldmatrix and mma (warp-uniform).
TORCH_EXT_HOST_DEVICE int active_token_blocks(int64_t m, int64_t m0, int block_m) {
  const int64_t blocks = ceil_div(m - m0, kMmaTokens);
  return int(blocks < block_m / kMmaTokens ? blocks : block_m / kMmaTokens);
}

// =============================================================================================
// 6. Global -> shared maps of one stage (chunk id = tid + kThreads * i).
// =============================================================================================

// qweight: tile row `row` of the block streams the contiguous run of its stage tiles; the
// stage stores the runs back to back, so chunk id lands at word 4 * id and a lane's word of tile
// (row, t) is at q_smem_word.
template <class Cfg>
TORCH_EXT_HOST_DEVICE int q_chunk_row(int id) { return id / Cfg::kQChunksPerRow; }
template <class Cfg>
TORCH_EXT_HOST_DEVICE int q_chunk_tile(int id) { return (id % Cfg::kQChunksPerRow) / Cfg::kQChunksPerTile; }
// Word offset of the chunk inside its row's run (global and shared alike).
template <class Cfg>
TORCH_EXT_HOST_DEVICE int q_chunk_word(int id) { return (id % Cfg::kQChunksPerRow) * 4; }
template <class Cfg>
TORCH_EXT_HOST_DEVICE int q_smem_word(int tile_row, int t, int word) {
  return (tile_row * Cfg::kStageTiles + t) * Cfg::kTileWords + word;
}
// Loaded only when the tile row exists and the tile is one the split computes; otherwise zeros
// (never consumed: the compute loop stops at kt_stop, and rows past N are discarded).
TORCH_EXT_HOST_DEVICE bool q_chunk_valid(int64_t tile_row_global, int64_t n_tiles, int kt, int kt_stop) {
  return tile_row_global < n_tiles && kt < kt_stop;
}

// x tile: [kBlockM tokens][kBlockK] 16-bit values, rows of 8 or 16 chunks, chunk c stored at
// c ^ (row % 8): the 8 rows one ldmatrix matrix reads (8 tokens, one logical chunk) hit 8
// distinct 16-byte bank groups (a row is a multiple of 128 bytes), and cp.async writes stay
// whole 16-byte chunks.
template <class Cfg>
TORCH_EXT_HOST_DEVICE int x_chunk_row(int id) { return id / Cfg::kXChunksPerRow; }
template <class Cfg>
TORCH_EXT_HOST_DEVICE int x_chunk_col(int id) { return id % Cfg::kXChunksPerRow; }
template <class Cfg>
TORCH_EXT_HOST_DEVICE int x_smem_offset(int row, int chunk) {
  return row * Cfg::kBlockK + ((chunk ^ (row & 7)) * kChunkValues);
}
// Bytes of the chunk starting at k that exist (k < k_limit = min(K, 16 * kt_stop)): 0..16. The
// rest is zero-filled, so x is never read past K and the weights' padding columns meet zeros.
TORCH_EXT_HOST_DEVICE int x_chunk_bytes(int k, int k_limit) {
  const int bytes = 2 * (k_limit - k);
  return bytes < 0 ? 0 : (bytes > kChunkBytes ? kChunkBytes : bytes);
}
// Token rows past M are not copied at all: what stays in shared memory only reaches accumulator
// columns (tokens) the epilogue never writes (an mma's column t depends on B's column t only).
TORCH_EXT_HOST_DEVICE bool x_row_exists(int64_t m0, int row, int64_t m) { return m0 + row < m; }

// The rows of y (and of x, through x_row) CTA `block_x` computes: [m0, m_end). Row-expert mode
// (each row with its own weight: MoE experts picked on the device) gives every CTA one row, and
// y row r reads x row r / x_row_divisor (the token of a (token, slot) pair); otherwise the
// CTA's block_m rows, y row r reading x row r (also when blocks of rows share an expert).
struct BlockRows {
  int m0, m_end;
  int64_t x_row0;  // x row of y row m0
};
TORCH_EXT_HOST_DEVICE BlockRows block_rows(int block_x, int block_m, int64_t m, bool row_per_block,
                                           int64_t x_row_divisor) {
  if (row_per_block) return {block_x, block_x + 1, int64_t(block_x) / x_row_divisor};
  const int m0 = block_x * block_m;
  return {m0, int(m), int64_t(m0)};
}
// With row experts, a CTA's weight is that of its first row's expert, row_experts[m0]: blocks
// of grouped rows start on a segment's real row, as the plans pad each expert's segment at its
// end. -1 there marks a block past the last segment (grids are sized for the most rows a
// routing can need): the CTA does no k work and writes its rows as the bias alone (zeros).
TORCH_EXT_HOST_DEVICE bool block_is_idle(int32_t expert) { return expert < 0; }

// Scale and zero slots: chunk id < groups * kSlotChunks * tensors (tensor 0 = scales, 1 = zeros).
struct ScaleChunk {
  int tensor, slot, chunk;
};
TORCH_EXT_HOST_DEVICE ScaleChunk scale_chunk(int id, int groups) {
  const int per_tensor = groups * (kBlockN / kChunkValues);
  ScaleChunk c;
  c.tensor = id >= per_tensor ? 1 : 0;
  const int rem = id - c.tensor * per_tensor;
  c.slot = rem / (kBlockN / kChunkValues);
  c.chunk = rem % (kBlockN / kChunkValues);
  return c;
}
// Index (values) of (slot, feature nl of the block) inside the scale or zero slot area.
TORCH_EXT_HOST_DEVICE int scale_smem_index(int slot, int nl) { return slot * kBlockN + nl; }
// Offset in scales/zeros [groups][N] of (group, n).
TORCH_EXT_HOST_DEVICE int64_t scale_offset(int64_t group, int64_t n, int64_t cols) { return group * cols + n; }

// =============================================================================================
// 7. Fragment maps (per warp and lane).
// =============================================================================================

// Tile row (within the block) of the warp's i-th tile.
TORCH_EXT_HOST_DEVICE int warp_tile_row(int warp, int i) { return warp * kWarpTiles + i; }
// Weight row (within a tile) of the lane's A values of row half h: r = lane / 4 and r + 8.
TORCH_EXT_HOST_DEVICE int lane_row(int lane, int h) { return lane / 4 + 8 * h; }
// ldmatrix.x4 source row for two B fragments (16 tokens x 16 k, x stored [token][k]): lane gives
// token (lane / 16) * 8 + lane % 8 at chunk (lane / 8) % 2 of the k16 step, so matrices 0..3 are
// (tokens 0-7, k 0-7), (tokens 0-7, k 8-15), (tokens 8-15, k 0-7), (tokens 8-15, k 8-15): b0, b1
// of the first 8-token block, then b0, b1 of the second. (ldmatrix: register j of lane l gets
// row l / 4, columns 2 (l % 4) + {0, 1} of matrix j = B's (k, token) pairs.)
TORCH_EXT_HOST_DEVICE int ldmatrix_b_token(int lane) { return (lane / 16) * 8 + lane % 8; }
TORCH_EXT_HOST_DEVICE int ldmatrix_b_chunk(int lane) { return (lane / 8) % 2; }
// x tile offset (values) of lane's ldmatrix row address for token pair p, k16 step t.
template <class Cfg>
TORCH_EXT_HOST_DEVICE int x_fragment_offset(int pair, int t, int lane) {
  return x_smem_offset<Cfg>(pair * 16 + ldmatrix_b_token(lane), 2 * t + ldmatrix_b_chunk(lane));
}
// Accumulator e (< 4) of an m16n8 block: weight row (output feature within the tile) and token.
TORCH_EXT_HOST_DEVICE int acc_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
TORCH_EXT_HOST_DEVICE int acc_token(int lane, int e) { return 2 * (lane % 4) + e % 2; }
// The epilogue writes (m, n) only inside the problem.
TORCH_EXT_HOST_DEVICE bool output_in_bounds(int64_t m, int64_t n, int64_t rows, int64_t cols) {
  return m < rows && n < cols;
}

// =============================================================================================
// 8. dequantize_weight: a CTA expands kDqTiles tiles of one tile row (16 rows x 256 columns),
//    staged in shared memory with 16-byte copies. Its 512 chunks of 8 consecutive outputs of one
//    row go to the threads in kDqPasses passes: chunk c is row c / 32, columns 8 (c % 32)..; so a
//    thread makes 8 values from one scale / zero pair (8 divides the group) and writes them with
//    one 16-byte store (32 for fp32 output), and a warp writes 512 contiguous bytes of a row.
//    (The first version, one column per thread and 2-byte stores, ran 8192 x 8192 at ~0.38 TB/s
//    on the H100.)
// =============================================================================================
constexpr int kDqThreads = 256;
constexpr int kDqTiles = kDqThreads / kTileK;  // 16 tiles = 256 columns
// A streaming kernel wants many warps per SM for loads in flight: the bound caps registers at 85.
constexpr int kDqMinCtas = 3;
constexpr int kDqChunkValues = 8;
constexpr int kDqChunksPerRow = kDqTiles * kTileK / kDqChunkValues;          // 32
constexpr int kDqPasses = kTileRows * kDqChunksPerRow / kDqThreads;          // 2
static_assert(kDqChunksPerRow == 32 && kTileRows * kDqChunksPerRow % kDqThreads == 0, "a warp per row");
TORCH_EXT_HOST_DEVICE int dq_chunk_row(int tid, int pass) { return (pass * kDqThreads + tid) / kDqChunksPerRow; }
// The chunk's first column inside the CTA's 256 (tile (column / 16), column % 16 in it).
TORCH_EXT_HOST_DEVICE int dq_chunk_col(int tid, int pass) {
  return kDqChunkValues * ((pass * kDqThreads + tid) % kDqChunksPerRow);
}

// Inverse of tile_row / tile_col: the word and slot holding (row i, column j) of a tile.
TORCH_EXT_HOST_DEVICE int tile_word_of(int bits, int i, int j) {
  const int word = 4 * (i % 8) + (j % 8) / 2;
  return bits == 4 ? word : word + 32 * (j / 8);
}
TORCH_EXT_HOST_DEVICE int tile_slot_of(int bits, int i, int j) {
  if (bits == 4) return 2 * (2 * (j % 2) + j / 8) + i / 8;  // byte 2 (j % 2) + j / 8, nibble i / 8
  return 2 * (j % 2) + i / 8;
}
// The value q of (i, j) from the tile's words.
TORCH_EXT_HOST_DEVICE uint32_t tile_value(const uint32_t* tile, int bits, int i, int j) {
  const uint32_t word = tile[tile_word_of(bits, i, j)];
  return (word >> (bits * tile_slot_of(bits, i, j))) & ((1u << bits) - 1u);
}
// (q - zero) * scale rounds once to the output type when the product is exact in the compute
// type: fp32 holds it for 16-bit scales (<= 9 + 11 significant bits); fp32 scales into a 16-bit
// output need fp64 (a 24-bit product rounded twice could differ).
TORCH_EXT_HOST_DEVICE constexpr bool dequant_needs_fp64(ScalarKind scale, ScalarKind out) {
  return scale == ScalarKind::kFloat32 && out != ScalarKind::kFloat32;
}

}  // namespace wo_cuda
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::quant
