// Index math of the CUDA im2win convolution (conv/im2win_cuda.cu), host+device so that CPU
// tests can check exactly what the GPU kernels compute: the internal window layout, the maps
// from a GEMM row / column / reduction index to window, weight and output addresses, the tail
// predicates, the tile shapes, and the thread and fragment maps of the fp32 SIMT kernel and
// the fp16/bf16 mma.m16n8k16 kernel. Plain C++, no CUDA types; int64 wherever a product of
// sizes can pass 2^31.
//
// The implicit GEMM, one per group g (G = groups, Cg = C/G input, Kg = K/G output channels):
//   out[n][g*Kg + m][i][j] = bias[g*Kg + m] + sum_kk A_g[m][kk] * B_g[kk][col]
//   GEMM row m < Kg, column col = (n*Ho + i)*Wo + j < N*Ho*Wo, reduction kk < gemm_k,
//   kk = w*RCp + r: kernel column w < S, r = h*Cg + c < R*Cg (kernel row h, channel c).
// RCp is R*Cg rounded up to one 16-byte vector (4 fp32, 8 fp16/bf16); the rows
// R*Cg <= r < RCp are zeros in both operands, so every vector of the reduction lies inside one
// kernel column and every load of both operands is a 16-byte load.
//
// Internal window buffer (workspace), in the input dtype:
//   [N][Ho][width][G][RCp],  win[n][i][m][g][h*Cg + c] = x[n][g*Cg + c][i*sh + h*dh - pad_top][m - pad_left]
// (virtual input coordinates, see conv/im2win.h; zero where padding or an inserted zero;
// zero for the padding rows r >= R*Cg). Then B_g[kk][col] = win[n][i][j*sw + w*dw][g][r]: the
// receptive field of one output pixel for one kernel column is ONE contiguous run of RCp.
// It is im2win.h's window with channels innermost and the groups split out of C, so that a
// group's run (h, c) is contiguous too.
//
// Packed weights (workspace, after the window): A_g[m][kk] = wt[g*Kg + m][c][h][w], zero in the
// padding rows and (fp32) the padding columns:
//   fp32:      [G][gemm_k][Mp], m innermost, Mp = Kg rounded up to 4 (float4 loads along m)
//   fp16/bf16: [G][Kg][gemm_k], kk innermost (the mma "row" A operand, ldmatrix-ready)
// Split-K partial sums (workspace, last; only when choose_split_k splits): fp32 [splits][K][gemm_n].
#pragma once

#include <cstdint>

#include "common/index_math.h"
#include "common/macros.h"
#include "conv/im2win.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace im2win_index {

// ---------------------------------------------------------------------------------------------
// Tile shapes (tuning constants; the thread maps below depend on them).
// ---------------------------------------------------------------------------------------------

// fp32 SIMT kernel: the paper's 128x128x8 block tile, 256 threads, 8x8 accumulators each.
namespace simt {
// 128x128 outputs per block: 8x8 per thread x 256 threads. Each k step a thread reads 8 A + 8 B
// values from shared memory for 64 FMAs (4 FMA per shared load), enough to run near FMA peak.
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
// 8 reduction steps per tile: one float4 of A and one of B per thread per tile (8*128 = 256*4),
// and 2 stages x (8x128 + 8x128) floats = 16 KB of shared memory, so 2 blocks fit on any SM.
constexpr int kBlockK = 8;
// 8 warps as 4 (M) x 2 (N); a warp is 4 (M) x 8 (N) threads, each owning two 4-row and two
// 4-column slices 64 apart: the float4 fragment reads of a warp then hit 4 (A) and 8 (B)
// consecutive float4s, one shared-memory wavefront each.
constexpr int kThreads = 256;
constexpr int kWarpsM = 4;
constexpr int kWarpsN = 2;
constexpr int kThreadM = 8;
constexpr int kThreadN = 8;
// 64 accumulators + 16 fragments + 8 prefetch registers + addresses stay under 128 registers,
// so two blocks (16 warps) are resident per SM to hide global latency.
constexpr int kMinBlocksPerSm = 2;
// A fp32 vector: 16 bytes.
constexpr int kVector = 4;
static_assert(kBlockM * kBlockK == kThreads * kVector && kBlockN * kBlockK == kThreads * kVector,
              "one float4 of A and one of B per thread per tile");
static_assert(kWarpsM * kWarpsN * 32 == kThreads, "warp grid");
}  // namespace simt

// fp16/bf16 tensor-core kernel: mma.sync.m16n8k16 (fp32 accumulation), ldmatrix, cp.async.
namespace mma {
// 128x128 block tile: 8 warps as 2 (M) x 4 (N), each a 64x32 warp tile = 4 m16 x 4 n8 mma tiles
// (64 fp32 accumulators per thread). Per k16 step a warp issues 4 + 2 ldmatrix.x4 for 16 mma.
constexpr int kBlockM = 128;
constexpr int kBlockN = 128;
constexpr int kThreads = 256;
constexpr int kWarpsM = 2;
constexpr int kWarpsN = 4;
constexpr int kWarpM = kBlockM / kWarpsM;  // 64
constexpr int kWarpN = kBlockN / kWarpsN;  // 32
constexpr int kMmaM = 16;
constexpr int kMmaN = 8;
constexpr int kMmaK = 16;
constexpr int kWarpTilesM = kWarpM / kMmaM;  // 4
constexpr int kWarpTilesN = kWarpN / kMmaN;  // 4
// 32 reduction elements (4 chunks of 16 bytes) per stage and row: two k16 mma steps, and each
// thread issues 2 A + 2 B cp.async of 16 bytes per stage (128 rows x 4 chunks = 2 x 256).
constexpr int kBlockK = 32;
constexpr int kVector = 8;                       // 16-bit elements per 16-byte chunk
constexpr int kChunksK = kBlockK / kVector;      // 4
// 3 stages: 2 tiles in flight while one is computed; (128 + 128) x 32 x 2 bytes x 3 = 48 KB, so
// two blocks fit in the shared memory of every target (sm_86/sm_89 have 100 KB per SM).
constexpr int kStages = 3;
// 64 accumulators + 16 A + 8 B fragment registers + addresses: under 128 registers for 2 blocks.
constexpr int kMinBlocksPerSm = 2;
constexpr int kTileElements = kBlockM * kBlockK;  // one operand tile of a stage (A and B alike)
static_assert(kBlockM == kBlockN, "A and B stage tiles share one layout");
static_assert(kBlockM * kChunksK == 2 * kThreads, "two 16-byte chunks per operand and thread");
static_assert(kChunksK == 4, "the swizzle below is for 4 chunks per row");
}  // namespace mma

// Split-K. The weight-gradient pass makes GEMMs with few output tiles and a huge reduction
// (M = Kg, N = Cg*R*S, K = batch*Ho*Wo: e.g. 64 x 576 x 401408 = 5 tiles), and small-batch deep
// layers do too. When the output tiles (x groups) cannot fill the GPU, blockIdx.z also splits the
// reduction into `splits` ranges of k_tiles_per_split tiles; every block writes fp32 partial
// sums to the workspace and a second kernel adds them in split order (deterministic), adds the
// bias and rounds once.
// 256 blocks: two resident blocks on each SM of an H100 (132) or A100 (108). A constant, not a
// device query, because the workspace size must be a pure host function of the parameters.
constexpr int64_t kSplitTargetBlocks = 256;
// At least 512 reduction elements per split, so that a block's prologue and its 64 KB partial
// tile write (and the reduction's read) stay small next to its 2*128*128*512 FLOPs.
constexpr int64_t kSplitMinK = 512;

// Output channels per group below which the direct kernel runs instead of the GEMM: a
// 128-row tile would be mostly padding (depthwise: Kg = 1), and the direct kernel needs no
// workspace.
constexpr int64_t kMinGemmRows = 8;
// The largest value the kernels' 32-bit index paths take (see gemm_fits_int32, direct_fits_int32).
constexpr int64_t kMaxInt32 = 2147483647;
// Grid limit of blockIdx.y / blockIdx.z.
constexpr int64_t kMaxGridYZ = 65535;

// ---------------------------------------------------------------------------------------------
// Geometry of the implicit GEMM and its workspace
// ---------------------------------------------------------------------------------------------

using index_math::ceil_div;
using index_math::round_up;

struct GemmLayout {
  int64_t groups;
  int64_t cg;             // input channels per group
  int64_t kg;             // output channels per group: GEMM rows
  int64_t rc;             // R*Cg: one kernel column's reduction run
  int64_t rc_padded;      // RCp: rc rounded up to the vector
  int64_t width;          // window_width(g): window columns per output row
  int64_t column_stride;  // G*RCp: window elements between columns m and m+1
  int64_t gemm_n;         // N*Ho*Wo: GEMM columns (output pixels)
  int64_t gemm_k;         // S*RCp: reduction length (a multiple of the vector)
  int64_t m_padded;       // Kg rounded up to 4: row length of the fp32 packed weights
};

// `vector` = elements per 16 bytes of the window dtype (4 for fp32, 8 for fp16/bf16).
TORCH_EXT_HOST_DEVICE GemmLayout make_gemm_layout(const ConvGeometry& g, int64_t vector) {
  GemmLayout l{};
  l.groups = g.groups;
  l.cg = g.C / g.groups;
  l.kg = g.K / g.groups;
  l.rc = g.R * l.cg;
  l.rc_padded = round_up(l.rc, vector);
  l.width = window_width(g);
  l.column_stride = l.groups * l.rc_padded;
  l.gemm_n = g.N * g.Ho * g.Wo;
  l.gemm_k = g.S * l.rc_padded;
  l.m_padded = round_up(l.kg, 4);
  return l;
}

// Elements of the internal window, [N][Ho][width][G][RCp].
TORCH_EXT_HOST_DEVICE int64_t gemm_window_elements(const ConvGeometry& g, const GemmLayout& l) {
  return g.N * g.Ho * l.width * l.column_stride;
}
// Elements of the packed weights: fp32 [G][gemm_k][Mp], fp16/bf16 [G][Kg][gemm_k].
TORCH_EXT_HOST_DEVICE int64_t packed_weight_elements_k_major(const GemmLayout& l) {
  return l.groups * l.gemm_k * l.m_padded;
}
TORCH_EXT_HOST_DEVICE int64_t packed_weight_elements_m_major(const GemmLayout& l) {
  return l.groups * l.kg * l.gemm_k;
}

// The GEMM path decodes GEMM columns (output pixels) and the reduction index in 32 bits
// (unsigned divisions are inline; 64-bit ones are calls that cost registers), and launches one
// block per (column tile, row tile, group) with blockIdx.y/z <= 65535. Shapes beyond that take
// the direct kernel. Addresses (products) stay 64-bit.
TORCH_EXT_HOST_DEVICE bool gemm_fits_int32(const GemmLayout& l) {
  const int64_t max_tile = 128;  // the larger block tile side of the two GEMM kernels
  return l.gemm_n + max_tile <= kMaxInt32 && l.gemm_k + max_tile <= kMaxInt32 && l.column_stride <= kMaxInt32 &&
         ceil_div(l.kg, max_tile) <= kMaxGridYZ && l.groups <= kMaxGridYZ;
}

// The direct kernel's 32-bit path: output planes (n, k) and pixels of a plane, output channels,
// the kernel loops (R, S, Cg) and every non-negative virtual input coordinate it divides by the
// input dilation fit in 31 bits.
TORCH_EXT_HOST_DEVICE bool direct_fits_int32(const ConvGeometry& g) {
  const int64_t max_row = (g.Ho - 1) * g.stride_h + (g.R - 1) * g.dilation_h + (g.pad_top < 0 ? -g.pad_top : 0);
  const int64_t max_col = (g.Wo - 1) * g.stride_w + (g.S - 1) * g.dilation_w + (g.pad_left < 0 ? -g.pad_left : 0);
  return g.N * g.K <= kMaxInt32 && g.Ho * g.Wo <= kMaxInt32 && g.K <= kMaxInt32 && max_row <= kMaxInt32 &&
         max_col <= kMaxInt32 && g.input_dilation_h <= kMaxInt32 && g.input_dilation_w <= kMaxInt32 &&
         g.R <= kMaxInt32 && g.S <= kMaxInt32 && g.C <= kMaxInt32;
}

struct SplitK {
  int64_t splits;             // reduction ranges (1: no split, the GEMM writes the output)
  int64_t k_tiles_per_split;  // block_k tiles per range; the last range may be shorter, none is empty
};

// output_tiles = column tiles x row tiles x groups of the kernel's block tile; block_k its
// reduction tile. groups*splits <= kMaxGridYZ (blockIdx.z = group*splits + split).
TORCH_EXT_HOST_DEVICE SplitK choose_split_k(int64_t output_tiles, int64_t groups, int64_t gemm_k, int64_t block_k) {
  const int64_t k_tiles = ceil_div(gemm_k, block_k);
  int64_t splits = 1;
  if (output_tiles < kSplitTargetBlocks) {
    splits = ceil_div(kSplitTargetBlocks, output_tiles);
    const int64_t by_k = gemm_k / kSplitMinK;
    if (splits > by_k) splits = by_k;
    if (splits > kMaxGridYZ / groups) splits = kMaxGridYZ / groups;
    if (splits < 1) splits = 1;
  }
  const int64_t per = ceil_div(k_tiles, splits);
  return SplitK{ceil_div(k_tiles, per), per};
}

// Offset of the fp32 partial sum of (split, output channel g*Kg + m, GEMM column col) in the
// split-K workspace [splits][K][gemm_n].
TORCH_EXT_HOST_DEVICE int64_t split_k_partial_offset(int64_t split, int64_t channel, int64_t col, int64_t channels,
                                                     int64_t gemm_n) {
  return (split * channels + channel) * gemm_n + col;
}

// ---------------------------------------------------------------------------------------------
// Window transform: where each window element comes from
// ---------------------------------------------------------------------------------------------

// real_input_index (im2win.h) with no division for input_dilation == 1 and the division in
// `Index`: int64_t (any value) or uint32_t (the kernels' fast path: the caller has checked that
// a non-negative virtual_index and input_dilation fit, see direct_fits_int32).
template <typename Index = int64_t>
TORCH_EXT_HOST_DEVICE int64_t real_input_index_fast(int64_t virtual_index, int64_t input_dilation, int64_t size) {
  if (virtual_index < 0) return -1;
  if (input_dilation == 1) return virtual_index < size ? virtual_index : -1;
  const Index v = Index(virtual_index), d = Index(input_dilation);
  const Index real = v / d;
  if (v - real * d != 0) return -1;
  return int64_t(real) < size ? int64_t(real) : -1;
}

// Offset in the input of row (n, c, virtual row i*sh + h*dh - pad_top), or -1 where that row is
// padding or an inserted zero. s = input strides [N][C][H][W].
TORCH_EXT_HOST_DEVICE int64_t input_row_offset(const ConvGeometry& g, const Strides4& s, int64_t n, int64_t c,
                                               int64_t i, int64_t h) {
  const int64_t y = real_input_index_fast(i * g.stride_h + h * g.dilation_h - g.pad_top, g.input_dilation_h, g.H);
  return y < 0 ? -1 : n * s.d0 + c * s.d1 + y * s.d2;
}

// Offset in an input row of window column m (virtual column m - pad_left), or -1 where it is
// padding or an inserted zero. A window element is x[row + column] when both are >= 0, else 0.
TORCH_EXT_HOST_DEVICE int64_t input_column_offset(const ConvGeometry& g, const Strides4& s, int64_t m) {
  const int64_t x = real_input_index_fast(m - g.pad_left, g.input_dilation_w, g.W);
  return x < 0 ? -1 : x * s.d3;
}

// Decodes a position inside one window column of the internal layout, inner = g*RCp + r
// (inner < G*RCp): sets the input channel (g*Cg + c) and kernel row h, and returns false for a
// padding row (r >= R*Cg: the element is zero). 32-bit: the host checks gemm_fits_int32.
TORCH_EXT_HOST_DEVICE bool decode_window_inner(int32_t inner, int32_t rc_padded, int32_t rc, int32_t cg,
                                               int32_t* channel, int32_t* h) {
  const uint32_t group = uint32_t(inner) / uint32_t(rc_padded);
  const uint32_t r = uint32_t(inner) - group * uint32_t(rc_padded);
  const uint32_t row = r / uint32_t(cg);
  *h = int32_t(row);
  *channel = int32_t(group * uint32_t(cg) + (r - row * uint32_t(cg)));
  return r < uint32_t(rc);
}

// Offset of internal window element (n, i, m, inner = g*RCp + r).
TORCH_EXT_HOST_DEVICE int64_t gemm_window_offset(const ConvGeometry& g, const GemmLayout& l, int64_t n, int64_t i,
                                                 int64_t m, int64_t inner) {
  return ((n * g.Ho + i) * l.width + m) * l.column_stride + inner;
}

// Offset of element (n, c, i, q = m*R + h) of the public window [N][C][Ho][width*R] (im2win.h)
// with destination strides ws.
TORCH_EXT_HOST_DEVICE int64_t public_window_offset(const ConvGeometry& g, const Strides4& ws, int64_t n, int64_t c,
                                                   int64_t i, int64_t m, int64_t h) {
  return n * ws.d0 + c * ws.d1 + i * ws.d2 + (m * g.R + h) * ws.d3;
}

// ---------------------------------------------------------------------------------------------
// GEMM column (output pixel), reduction index and row -> addresses
// ---------------------------------------------------------------------------------------------

struct GemmPixel {
  int64_t n, i, j;
};

// col = (n*Ho + i)*Wo + j. The divisions run in `Index`: int64_t, or uint32_t in the GEMM
// kernels (gemm_fits_int32 guarantees col < 2^31).
template <typename Index = int64_t>
TORCH_EXT_HOST_DEVICE GemmPixel decode_gemm_column(const ConvGeometry& g, int64_t col) {
  const Index c = Index(col), wo = Index(g.Wo), ho = Index(g.Ho);
  const Index row = c / wo;
  const Index n = row / ho;
  GemmPixel p;
  p.n = int64_t(n);
  p.i = int64_t(row - n * ho);
  p.j = int64_t(c - row * wo);
  return p;
}

// Window offset of B_g[0][col]: the first element of output pixel col's receptive field
// (kernel column 0, r = 0) in group `group`.
template <typename Index = int64_t>
TORCH_EXT_HOST_DEVICE int64_t gemm_column_window_base(const ConvGeometry& g, const GemmLayout& l, int64_t col,
                                                      int64_t group) {
  const GemmPixel p = decode_gemm_column<Index>(g, col);
  return ((p.n * g.Ho + p.i) * l.width + p.j * g.stride_w) * l.column_stride + group * l.rc_padded;
}

// Window elements between kernel columns w and w+1 of one receptive field: dw window columns.
TORCH_EXT_HOST_DEVICE int64_t gemm_k_column_step(const ConvGeometry& g, const GemmLayout& l) {
  return g.dilation_w * l.column_stride;
}

// Offset of B_g[kk][col] from gemm_column_window_base: kk = w*RCp + r -> w*column_step + r.
// Valid for 0 <= kk < gemm_k; a 16-byte vector starting at a multiple of the vector stays in
// one kernel column because RCp is a multiple of it.
TORCH_EXT_HOST_DEVICE int64_t gemm_k_window_offset(int32_t kk, int32_t rc_padded, int64_t k_column_step) {
  const uint32_t w = uint32_t(kk) / uint32_t(rc_padded);
  return int64_t(w) * k_column_step + int64_t(uint32_t(kk) - w * uint32_t(rc_padded));
}

// Offset in the weight (strides ws, [K][Cg][R][S]) of A_g[m][kk], or -1 where A is zero
// padding (r >= R*Cg, m >= Kg, kk >= gemm_k).
TORCH_EXT_HOST_DEVICE int64_t weight_source_offset(const GemmLayout& l, const Strides4& ws, int64_t group, int64_t m,
                                                   int64_t kk) {
  if (m >= l.kg || kk >= l.gemm_k) return -1;
  const int64_t w = kk / l.rc_padded;
  const int64_t r = kk - w * l.rc_padded;
  if (r >= l.rc) return -1;
  const int64_t h = r / l.cg;
  const int64_t c = r - h * l.cg;
  return (group * l.kg + m) * ws.d0 + c * ws.d1 + h * ws.d2 + w * ws.d3;
}

// Packed-weight offsets of A_g[m][kk]: fp32 [G][gemm_k][Mp], fp16/bf16 [G][Kg][gemm_k].
TORCH_EXT_HOST_DEVICE int64_t packed_weight_offset_k_major(const GemmLayout& l, int64_t group, int64_t m,
                                                           int64_t kk) {
  return (group * l.gemm_k + kk) * l.m_padded + m;
}
TORCH_EXT_HOST_DEVICE int64_t packed_weight_offset_m_major(const GemmLayout& l, int64_t group, int64_t m,
                                                           int64_t kk) {
  return (group * l.kg + m) * l.gemm_k + kk;
}

// Offset in the output (strides os, [N][K][Ho][Wo]) of GEMM column col without the channel
// term; the element of GEMM row m in group g is at this + (g*Kg + m)*os.d1.
template <typename Index = int64_t>
TORCH_EXT_HOST_DEVICE int64_t gemm_output_pixel_offset(const ConvGeometry& g, const Strides4& os, int64_t col) {
  const GemmPixel p = decode_gemm_column<Index>(g, col);
  return p.n * os.d0 + p.i * os.d2 + p.j * os.d3;
}

// Tail predicate of one 16-byte chunk of an operand tile: its row (GEMM row m or column col)
// exists and its first reduction index is inside gemm_k. Chunks start at multiples of the
// vector and gemm_k is one, so a chunk is wholly inside or wholly outside (then zero-filled).
TORCH_EXT_HOST_DEVICE bool chunk_in_bounds(int64_t row, int64_t rows, int64_t kk, int64_t gemm_k) {
  return row < rows && kk < gemm_k;
}

// ---------------------------------------------------------------------------------------------
// fp32 SIMT kernel maps (tid < simt::kThreads)
// ---------------------------------------------------------------------------------------------

// Row (in the block tile) of accumulator row a < 8 of thread tid: two 4-row slices 64 apart.
TORCH_EXT_HOST_DEVICE int simt_thread_row(int tid, int a) {
  const int warp_m = (tid / 32) / simt::kWarpsN, lane_m = (tid % 32) / 8;
  return (a / 4) * (simt::kBlockM / 2) + warp_m * 16 + lane_m * 4 + a % 4;
}
// Column (in the block tile) of accumulator column b < 8 of thread tid: two 4-column slices.
TORCH_EXT_HOST_DEVICE int simt_thread_col(int tid, int b) {
  const int warp_n = (tid / 32) % simt::kWarpsN, lane_n = tid % 8;
  return (b / 4) * (simt::kBlockN / 2) + warp_n * 32 + lane_n * 4 + b % 4;
}
// The float4 of A a thread loads per tile: reduction row k (of kBlockK) and first GEMM row m
// (a warp reads one 512-byte run of the k-major packed weights and stores it as is).
TORCH_EXT_HOST_DEVICE int simt_a_load_k(int tid) { return tid / (simt::kBlockM / simt::kVector); }
TORCH_EXT_HOST_DEVICE int simt_a_load_m(int tid) { return (tid % (simt::kBlockM / simt::kVector)) * simt::kVector; }
// The float4 of B a thread loads per tile: GEMM column (of kBlockN) and first reduction row;
// a warp covers 32 consecutive columns, so its transposed scalar stores hit 32 banks.
TORCH_EXT_HOST_DEVICE int simt_b_load_col(int tid) { return tid % simt::kBlockN; }
TORCH_EXT_HOST_DEVICE int simt_b_load_k(int tid) { return (tid / simt::kBlockN) * simt::kVector; }

// ---------------------------------------------------------------------------------------------
// fp16/bf16 mma.m16n8k16 kernel maps
// ---------------------------------------------------------------------------------------------

// cp.async chunks: thread tid copies chunk mma_load_chunk(tid) of rows mma_load_row(tid, 0..1)
// of both the A (GEMM rows) and the B (GEMM columns) stage tile.
TORCH_EXT_HOST_DEVICE int mma_load_row(int tid, int i) {
  return tid / mma::kChunksK + i * (mma::kThreads / mma::kChunksK);
}
TORCH_EXT_HOST_DEVICE int mma_load_chunk(int tid) { return tid % mma::kChunksK; }

// Shared-memory stage tiles are [128 rows][32 elements] of 16-bit values, each row 4 chunks of
// 16 bytes stored at chunk ^ ((row / 2) % 4): the 8 rows one ldmatrix matrix reads (8
// consecutive rows, one logical chunk) land in 8 distinct 16-byte bank groups.
TORCH_EXT_HOST_DEVICE int mma_swizzle_chunk(int row, int chunk) { return chunk ^ ((row >> 1) & 3); }
// Element offset of (row, first element of logical chunk) in a stage tile.
TORCH_EXT_HOST_DEVICE int mma_smem_offset(int row, int chunk) {
  return row * mma::kBlockK + mma_swizzle_chunk(row, chunk) * mma::kVector;
}

// First tile row / column of warp `warp` (< 8) in the block tile.
TORCH_EXT_HOST_DEVICE int mma_warp_row0(int warp) { return (warp / mma::kWarpsN) * mma::kWarpM; }
TORCH_EXT_HOST_DEVICE int mma_warp_col0(int warp) { return (warp % mma::kWarpsN) * mma::kWarpN; }

// ldmatrix.x4 source rows for an A fragment (16 rows x 16 k): lane gives the address of row
// lane % 16 at chunk lane / 16 (relative to the fragment's first row and k16 step), so that
// matrices 0..3 are (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
// = registers a0..a3 of mma.m16n8k16.
TORCH_EXT_HOST_DEVICE int ldmatrix_a_row(int lane) { return lane % 16; }
TORCH_EXT_HOST_DEVICE int ldmatrix_a_chunk(int lane) { return lane / 16; }
// ldmatrix.x4 source rows for two B fragments (16 columns x 16 k, B stored [column][k]): lane
// gives column (lane / 16)*8 + lane % 8 at chunk (lane / 8) % 2, so that matrices 0..3 are
// (cols 0-7, k 0-7), (cols 0-7, k 8-15), (cols 8-15, k 0-7), (cols 8-15, k 8-15) = b0, b1 of
// the first n8 tile, then b0, b1 of the second.
TORCH_EXT_HOST_DEVICE int ldmatrix_b_row(int lane) { return (lane / 16) * 8 + lane % 8; }
TORCH_EXT_HOST_DEVICE int ldmatrix_b_chunk(int lane) { return (lane / 8) % 2; }
// What ldmatrix (no .trans) delivers: in register j, lane holds row lane / 4, columns
// 2*(lane % 4) + half (half = low/high 16 bits) of matrix j.
TORCH_EXT_HOST_DEVICE int ldmatrix_dest_row(int lane) { return lane / 4; }
TORCH_EXT_HOST_DEVICE int ldmatrix_dest_col(int lane, int half) { return (lane % 4) * 2 + half; }

// mma.m16n8k16 operand fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), element e of
// a lane = 16-bit half e % 2 of register e / 2.
// A (16x16, row-major), e < 8: row and k.
TORCH_EXT_HOST_DEVICE int mma_a_row(int lane, int e) { return lane / 4 + ((e / 2) % 2) * 8; }
TORCH_EXT_HOST_DEVICE int mma_a_k(int lane, int e) { return (lane % 4) * 2 + (e / 4) * 8 + e % 2; }
// B (16x8, "col"), e < 4: k and column.
TORCH_EXT_HOST_DEVICE int mma_b_k(int lane, int e) { return (lane % 4) * 2 + (e / 2) * 8 + e % 2; }
TORCH_EXT_HOST_DEVICE int mma_b_col(int lane, int /*e*/) { return lane / 4; }
// C/D accumulators (16x8 fp32), e < 4: row and column.
TORCH_EXT_HOST_DEVICE int mma_acc_row(int lane, int e) { return lane / 4 + (e / 2) * 8; }
TORCH_EXT_HOST_DEVICE int mma_acc_col(int lane, int e) { return (lane % 4) * 2 + e % 2; }

}  // namespace im2win_index
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
