// Index math of the CUDA W8A8 kernels (quant/w8a8_cuda.cu), host+device so that
// tests/cpp/w8a8_cuda_sim.cpp runs on the CPU exactly what the GPU runs: the quantize_per_token
// row split, chunking and rounding; the scaled_int8_mm / scaled_fp8_mm tile shapes, CTA order,
// global -> shared chunk maps with the shared swizzle, ldmatrix addressing, the mma.m16n8k32
// fragment maps (shared by .s8 and .e4m3) with the sm_90 regrouping into m16n8k16 fp16, tail
// predicates, the e4m3 decoding and the epilogues. Plain C++ apart from a few device intrinsics
// behind __CUDA_ARCH__, each with a host twin of the same IEEE semantics.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/dtype.h"
#include "common/float_bits.h"
#include "common/exact_float.h"
#include "common/index_math.h"
#include "common/macros.h"

namespace torch_ext::quant {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace w8a8_cuda {

using index_math::ceil_div;
using index_math::clamp_int;
using index_math::min64;

// f32_add / f32_mul / f32_div (one rounding each): common/exact_float.h.
// int32 -> fp32, round to nearest even (exact below 2^24).
TORCH_EXT_HOST_DEVICE float i32_to_f32(int32_t v) {
#if defined(__CUDA_ARCH__)
  return __int2float_rn(v);
#else
  return float(v);
#endif
}

// 16-byte chunks: the unit of every vector load, cp.async and shared-memory row segment.
constexpr int kChunkBytes = 16;

// =============================================================================================
// 1. quantize_per_token
//    Bandwidth-bound: each x value is read once from HBM (twice only for rows too long to keep
//    in registers, the second read hitting L2) and each q byte written once.
// =============================================================================================

// 256 threads per CTA: 8 warps, enough resident warps (64 per SM at 8 CTAs) to keep ~40 KB of
// loads in flight per SM, which is what 3.35 TB/s x ~1.5 us latency / 132 SMs asks.
constexpr int kQuantThreads = 256;
// 16-byte packs a thread keeps in registers (8 x 4 = 32 registers): a row of up to
// group * 128 bytes is read from HBM once.
constexpr int kQuantPacks = 8;
// A warp per row when the row fits the warp's registers (<= 32 x 8 x 16 = 4 KB: k <= 1024 fp32,
// 2048 fp16/bf16): no shared memory or barrier; 8 rows per CTA. Longer rows take the whole CTA
// (registers hold 32 KB: k <= 8192 fp32, 16384 fp16/bf16; beyond, the tail packs are re-read).
constexpr int kQuantWarpRowBytes = 32 * kQuantPacks * kChunkBytes;

// Threads that share one row: 32 (warp) or kQuantThreads (CTA).
TORCH_EXT_HOST_DEVICE int quant_group_threads(int64_t k, int element_bytes) {
  return k * element_bytes <= kQuantWarpRowBytes ? 32 : kQuantThreads;
}
TORCH_EXT_HOST_DEVICE int quant_rows_per_cta(int group_threads) { return kQuantThreads / group_threads; }
// Values per 16-byte chunk of x (4 fp32, 8 fp16/bf16); chunk c covers [c V, c V + V) of the row.
TORCH_EXT_HOST_DEVICE int quant_chunk_values(int element_bytes) { return kChunkBytes / element_bytes; }
// The i-th chunk of thread j of a row group (consecutive threads read consecutive 16 bytes).
TORCH_EXT_HOST_DEVICE int64_t quant_chunk(int j, int64_t i, int group_threads) { return j + i * group_threads; }
// Values of chunk c that exist (0..V; V for all but the last chunk of a row).
TORCH_EXT_HOST_DEVICE int quant_chunk_len(int64_t c, int values, int64_t k) {
  const int64_t rest = k - c * values;
  return rest <= 0 ? 0 : (rest >= values ? values : int(rest));
}
// 16-byte loads need x's base and row stride 16-byte aligned; otherwise element loads.
TORCH_EXT_HOST_DEVICE bool quant_x_vectorizable(uint64_t x_address, int64_t row_stride, int element_bytes) {
  return x_address % kChunkBytes == 0 && (row_stride * element_bytes) % kChunkBytes == 0;
}
// q of a full chunk is stored as one V-byte word when its address is V-aligned (V = 4 or 8).
TORCH_EXT_HOST_DEVICE bool quant_q_store_vector(uint64_t q_address, int len, int values) {
  return len == values && q_address % uint64_t(values) == 0;
}
// scale = amax / 127 after the optional clip (std::min order of the CPU kernel); 1 for amax 0.
TORCH_EXT_HOST_DEVICE float quant_row_scale(float amax, float clip) {
  if (clip > 0.0f) amax = clip < amax ? clip : amax;
  return amax > 0.0f ? f32_div(amax, 127.0f) : 1.0f;
}
// saturate_int8(round_half_even(x / scale)). __float2int_rn saturates at the int32 range, so the
// int clamp equals the CPU's float clamp followed by the conversion.
TORCH_EXT_HOST_DEVICE int8_t quant_value(float x, float scale) {
  const float v = f32_div(x, scale);
#if defined(__CUDA_ARCH__)
  const int r = __float2int_rn(v);
#else
  const float rf = std::nearbyint(v);
  const int r = rf >= 2147483647.0f ? 2147483647 : (rf <= -2147483648.0f ? int(-2147483647 - 1) : int(rf));
#endif
  return int8_t(clamp_int(r, -128, 127));
}
// Block reduction: partial maxima of the warps in shared memory, one slot per warp.
constexpr int kQuantWarps = kQuantThreads / 32;

// =============================================================================================
// 2. scaled_int8_mm: tile configurations
//    mma.sync.m16n8k32 s8 x s8 -> s32. A CTA owns a kBM x kBN output tile and walks K in
//    kBK = 64-byte stages through a kStages-deep cp.async ring; warp (wm, wn) owns the
//    kWM x kWN sub-tile: kMI = kWM / 16 m16 tiles x kNI = kWN / 8 n8 tiles of accumulators.
// =============================================================================================

// K bytes per stage: 4 chunks per row, 2 mma k-steps. 64 (not 128) keeps a 128 x 128 stage at
// 16 KB, so 4 stages (64 KB) let two CTAs share an SM (2 x 64 KB < 227 KB).
constexpr int kBK = 64;
constexpr int kMmaK = 32;
constexpr int kChunksPerRow = kBK / kChunkBytes;  // 4
constexpr int kKSteps = kBK / kMmaK;              // 2
// CTAs of kGroupM consecutive m blocks run next to each other along n (grouped order): ~260
// resident large CTAs then touch 8 A strips and ~33 B strips (41 MB at K = 8192, inside the
// 50 MB L2) instead of every A strip.
constexpr int kGroupM = 8;

template <int kBM_, int kBN_, int kWM_, int kWN_, int kStages_, int kMinCtas_>
struct MmConfig {
  static constexpr int kBM = kBM_, kBN = kBN_, kWM = kWM_, kWN = kWN_, kStages = kStages_;
  static constexpr int kMinCtas = kMinCtas_;  // __launch_bounds__ minimum CTAs per SM
  static constexpr int kWarpsM = kBM / kWM, kWarpsN = kBN / kWN;
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMI = kWM / 16, kNI = kWN / 8;
  static constexpr int kAChunks = kBM * kChunksPerRow, kBChunks = kBN * kChunksPerRow;
  static constexpr int kAChunksPerThread = kAChunks / kThreads, kBChunksPerThread = kBChunks / kThreads;
  static constexpr int kABytes = kBM * kBK, kBBytes = kBN * kBK;
  static constexpr int kBOffset = kABytes;
  static constexpr int kStageBytes = kABytes + kBBytes;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kBM % kWM == 0 && kBN % kWN == 0 && kWM % 16 == 0 && kWN % 16 == 0, "ldmatrix.x4 covers 16 rows");
  static_assert(kAChunks % kThreads == 0 && kBChunks % kThreads == 0, "whole chunks per thread");
  static_assert(kThreads % kChunksPerRow == 0, "a thread's chunks share one column");
};
// Large M: 128 x 128 tile, 8 warps of 64 x 32 (4 x 4 mma tiles = 64 int32 accumulators per
// thread). Per k32 step a warp issues 4 + 2 ldmatrix.x4 for 16 mma (smem traffic 6 x 512 B for
// 16 x 16 K MACs); the CTA's global traffic per MAC is (1/128 + 1/128) bytes, ~2x below what
// the 2 PFLOP/s int8 rate needs from L2 on H100. 4 stages: 3 x 16 KB in flight per CTA, with two
// CTAs per SM ~96 KB, well above Little's law for L2 latency. __launch_bounds__(256, 2) caps
// registers at 128 (accumulators 64, fragments 24, addresses).
using LargeConfig = MmConfig<128, 128, 64, 32, 4, 2>;
// Small M (decode, or grids that would leave SMs idle): 32 x 64 tile, 4 warps of 32 x 16 (2 x 2
// mma tiles). M = 1..32 at N = 8192 gives 128 CTAs, one per SM; each streams its 64 B rows
// (its share of the weight traffic) through 8 stages of 6 KB: 7 x 4 KB of B in flight, about the
// ~25 KB per SM Little's law asks of HBM (3.35 TB/s x ~1 us / 132). 48 KB of shared memory.
using SmallConfig = MmConfig<32, 64, 32, 16, 8, 4>;

// Large tiles once they fill every SM with at least one CTA; below that the small tile gives up
// to 8x more CTAs (and reads B from HBM once when M <= 32).
TORCH_EXT_HOST_DEVICE bool use_large_config(int64_t m, int64_t n, int64_t num_sms) {
  return ceil_div(m, LargeConfig::kBM) * ceil_div(n, LargeConfig::kBN) >= num_sms;
}

// CTA `pid` (1-D grid) -> (m block, n block): groups of kGroupM m blocks, n-major inside a group.
using index_math::TileCoord;
TORCH_EXT_HOST_DEVICE TileCoord tile_of(int64_t pid, int64_t m_blocks, int64_t n_blocks) {
  return index_math::grouped_tile(pid, m_blocks, n_blocks, kGroupM);
}

// 16-byte cp.async needs 16-byte aligned sources: base pointers and row strides of A and B.
TORCH_EXT_HOST_DEVICE bool mm_vectorizable(uint64_t a_address, int64_t a_stride, uint64_t b_address,
                                          int64_t b_stride) {
  return a_address % kChunkBytes == 0 && a_stride % kChunkBytes == 0 && b_address % kChunkBytes == 0 &&
         b_stride % kChunkBytes == 0;
}

// =============================================================================================
// 3. Global -> shared (chunk id = tid + kThreads * i; row = id / 4, chunk = id % 4)
// =============================================================================================

TORCH_EXT_HOST_DEVICE int chunk_row(int id) { return id / kChunksPerRow; }
TORCH_EXT_HOST_DEVICE int chunk_col(int id) { return id % kChunksPerRow; }
// Shared layout of an operand stage: [rows][64 bytes], logical chunk c of row r stored at chunk
// c ^ ((r / 2) % 4). ldmatrix reads one logical chunk of 8 consecutive rows: unswizzled, the 8
// rows (64 B apart) hit only 2 of the 8 16-byte bank groups of a 128-byte wavefront (4-way
// conflict); with the XOR, (r % 2, (r / 2) % 4) takes 8 distinct values, so the 8 addresses fall
// into 8 distinct bank groups (conflict-free). cp.async writes stay whole 16-byte chunks.
TORCH_EXT_HOST_DEVICE int smem_offset(int row, int chunk) {
  return row * kBK + ((chunk ^ ((row >> 1) & 3)) * kChunkBytes);
}
// Bytes of the chunk starting at column k that exist (0..16); the rest is zero-filled so K tails
// multiply zeros. Rows past M / N are zero-filled entirely (bytes 0).
TORCH_EXT_HOST_DEVICE int chunk_bytes(int64_t k, int64_t k_total, bool row_exists) {
  if (!row_exists) return 0;
  const int64_t rest = k_total - k;
  return rest <= 0 ? 0 : (rest >= kChunkBytes ? kChunkBytes : int(rest));
}

// =============================================================================================
// 4. Fragments (PTX ISA, mma.m16n8k32 with .s8 A/B, .s32 C/D; g = lane / 4, t = lane % 4;
//    .e4m3 A/B with .f32 C/D use the very same maps, one byte per element)
//    A (16 x 32, row): reg 0: row g, k 4t..4t+3; reg 1: row g+8, same k; reg 2: row g,
//      k 16+4t..; reg 3: row g+8, k 16+4t.. (byte j of a reg = k + j).
//    B (32 x 8, col): reg 0: column (n) g, k 4t..4t+3; reg 1: column g, k 16+4t...
//    C (16 x 8): c0, c1: row g, columns 2t, 2t+1; c2, c3: row g+8.
//    ldmatrix .b16 8x8: lane l receives row l / 4, 16-bit columns 2 (l % 4), +1 of the matrix =
//    bytes 4 (l % 4)..+3 of a 16-byte row: for an [rows][k] int8 tile, exactly the A / B
//    register of rows (8) x k (16 bytes). So one ldmatrix.x4 loads a whole A fragment and one
//    loads the B fragments of two n8 tiles.
// =============================================================================================

// Warp w of a CTA owns sub-tile (warp_m, warp_n) = (w / kWarpsN, w % kWarpsN).
TORCH_EXT_HOST_DEVICE int warp_m_of(int warp, int warps_n) { return warp / warps_n; }
TORCH_EXT_HOST_DEVICE int warp_n_of(int warp, int warps_n) { return warp % warps_n; }

// ldmatrix.x4 source row of `lane` for A m16 tile `mi`, k32 step `ks` (matrices 0..3 = regs
// 0..3): row (lane % 8) + 8 ((lane / 8) % 2), logical chunk 2 ks + lane / 16.
TORCH_EXT_HOST_DEVICE int a_ldsm_row(int warp_m, int mi, int lane, int wm) {
  return warp_m * wm + 16 * mi + (lane % 8) + 8 * ((lane / 8) % 2);
}
TORCH_EXT_HOST_DEVICE int a_ldsm_chunk(int ks, int lane) { return 2 * ks + lane / 16; }
// ldmatrix.x4 source row for B n8 tiles 2 nj, 2 nj + 1 (regs: tile 2nj reg 0, reg 1, tile
// 2nj+1 reg 0, reg 1): n (lane % 8) + 8 (lane / 16), logical chunk 2 ks + (lane / 8) % 2.
TORCH_EXT_HOST_DEVICE int b_ldsm_row(int warp_n, int nj, int lane, int wn) {
  return warp_n * wn + 16 * nj + (lane % 8) + 8 * (lane / 16);
}
TORCH_EXT_HOST_DEVICE int b_ldsm_chunk(int ks, int lane) { return 2 * ks + (lane / 8) % 2; }

// Accumulator e (< 4) of n8 tile nj in m16 tile mi: row and column inside the CTA tile.
TORCH_EXT_HOST_DEVICE int acc_row(int warp_m, int mi, int lane, int e, int wm) {
  return warp_m * wm + 16 * mi + lane / 4 + 8 * (e / 2);
}
TORCH_EXT_HOST_DEVICE int acc_col(int warp_n, int nj, int lane, int e, int wn) {
  return warp_n * wn + 8 * nj + 2 * (lane % 4) + e % 2;
}
TORCH_EXT_HOST_DEVICE bool output_in_bounds(int64_t m, int64_t n, int64_t rows, int64_t cols) {
  return m < rows && n < cols;
}
// acc * a_scale * b_scale (+ bias), left to right, each step rounded once in fp32 (no bias: no
// + 0, which would turn -0 into +0), as the CPU kernels compute it. fp8: acc is the fp32 sum.
TORCH_EXT_HOST_DEVICE float epilogue_value(float acc, float a_scale, float b_scale, bool has_bias, float bias) {
  const float v = f32_mul(f32_mul(acc, a_scale), b_scale);
  return has_bias ? f32_add(v, bias) : v;
}
// int8: float(acc) (round to nearest even) first.
TORCH_EXT_HOST_DEVICE float epilogue_value(int32_t acc, float a_scale, float b_scale, bool has_bias, float bias) {
  return epilogue_value(i32_to_f32(acc), a_scale, b_scale, has_bias, bias);
}
// Index of the scale of row / column i: i when per-row / per-channel, else 0 (one scale).
TORCH_EXT_HOST_DEVICE int64_t scale_index(int64_t i, bool per_index) { return per_index ? i : 0; }

// =============================================================================================
// 5. float8_e4m3fn (OCP E4M3): s eeee mmm, bias 7; e = 0: subnormal m 2^-9; 0x7F / 0xFF NaN, no
//    infinities (e = 15 with m < 7 are the normals 256..448). The mma decodes its operands
//    itself; this is the scalar decoding (exact in fp32) for references and scalar paths.
// =============================================================================================
constexpr uint8_t kE4m3NanBits = 0x7F;
TORCH_EXT_HOST_DEVICE bool e4m3_is_nan(uint8_t bits) { return (bits & 0x7F) == 0x7F; }
TORCH_EXT_HOST_DEVICE float e4m3_to_f32(uint8_t bits) {
  const uint32_t sign = uint32_t(bits & 0x80) << 24;
  const uint32_t exponent = (bits >> 3) & 0xF, mantissa = bits & 7u;
  if (e4m3_is_nan(bits)) return bits_as_float(sign | 0x7FC00000u);
  if (exponent == 0) {
    // m 2^-9 (m < 8): normalize into an fp32 normal; 0 keeps its sign.
    if (mantissa == 0) return bits_as_float(sign);
    const int shift = mantissa >= 4 ? 0 : (mantissa >= 2 ? 1 : 2);  // leading one to bit 2
    const uint32_t m = (mantissa << shift) & 3u;                    // bits below the leading one
    return bits_as_float(sign | (uint32_t(127 - 7 - shift) << 23) | (m << 21));
  }
  return bits_as_float(sign | ((exponent + 127 - 7) << 23) | (mantissa << 20));
}

// sm_90 (Hopper) has no fp8 mma.sync in hardware (its fp8 tensor-core path is wgmma): ptxas
// widens mma .e4m3 to fp16 itself, but computes each a * b into a temporary and adds c with
// FADDs, which costs 4 registers per mma in flight and spills the 128 x 128 tile. The kernel
// widens instead (cvt_e4m3x4_to_f16x4: register -> f16x2 halves 0 (bytes 0, 1) and 1 (bytes
// 2, 3)) and chains two mma.m16n8k16 f16 into d. k is summed over, so any k permutation shared
// by A and B is correct: in k16 step h, f16 register r of A is half r / 2 of e4m3 register
// 2 h + r % 2 and f16 register r of B is half r of e4m3 register h (lane t's f16 k 2t + j + 8q
// is e4m3 k 16 h + 4t + 2q + j for both operands).
TORCH_EXT_HOST_DEVICE int f16_step_a_reg(int h, int r) { return 2 * h + r % 2; }
TORCH_EXT_HOST_DEVICE int f16_step_a_half(int r) { return r / 2; }
TORCH_EXT_HOST_DEVICE int f16_step_b_reg(int h) { return h; }
TORCH_EXT_HOST_DEVICE int f16_step_b_half(int r) { return r; }

}  // namespace w8a8_cuda
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::quant
