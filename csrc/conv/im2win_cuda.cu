// CUDA kernels of the im2win convolution. Semantics: conv/im2win.h. The implicit-GEMM
// formulation, the workspace layouts, the tile shapes and every index map the kernels use:
// conv/im2win_index.h (host+device, checked by CPU tests).
//
// Two paths, chosen on the host by make_plan (shared with im2win_conv_workspace_bytes):
//
// GEMM (fp32, fp16, bf16 with at least kMinGemmRows output channels per group), after the
// im2win paper: transform the input into the window buffer on the GPU, then an implicit GEMM
// over it (M = output channels per group, N = batch*Ho*Wo, K = S * RCp, one GEMM per group).
//   1. window_transform_kernel<internal>: input (any strides) -> window [N][Ho][width][G][RCp],
//      channels innermost so a receptive field's kernel column is one contiguous 16-byte-aligned
//      run (zero-padded from R*Cg to RCp), in the input dtype.
//   2. pack_weight_kernel: weight (any strides) -> A_g in the layout its GEMM loads best.
//   3. fp32: simt_gemm_kernel, the paper's SIMT kernel: 128x128x8 block tile, 256 threads, 8x8
//      register micro-tile, double-buffered shared memory, register prefetch of the next tile,
//      float4 global and shared loads.
//      fp16/bf16: mma_gemm_kernel: mma.sync.m16n8k16 (fp32 accumulation), ldmatrix from
//      swizzled shared memory, 3-stage cp.async pipeline with zero-fill for tails.
//      Both add the bias in fp32 and round once into the output (any strides).
//   4. Split-K (ix::choose_split_k) when the output tiles cannot fill the GPU, as in the weight
//      gradient (tiny M x N, huge K): blockIdx.z also splits the reduction, the GEMMs write fp32
//      partial sums to the workspace and split_k_reduce_kernel adds them in a fixed order
//      (deterministic), adds the bias and rounds once.
//   The zero padding of RCp (and of Mp for fp32) makes every operand load a legal 16-byte
//   vector, so the GEMMs need no scalar load path; the scalar accesses are where the user's
//   strides are: the transform's reads, the weight packing and the epilogue's stores.
//
// Direct (fp64 for gradcheck, depthwise and other Kg < kMinGemmRows, shapes past the 32-bit
// limits of the GEMM kernels, a missing workspace): one thread per output, no workspace.
#include <algorithm>
#include <type_traits>

#include "common/alignment.h"
#include "common/cuda/cp_async.cuh"
#include "common/cuda/grid_limits.h"
#include "common/cuda/mma.cuh"
#include "common/cuda/vec.cuh"
#include "conv/im2win_cuda.h"
#include "conv/im2win_index.h"

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::im2win_index;

// Grid limits: x up to 2^31 - 1 blocks, y and z up to 65535 (ix::kMaxGridYZ). The elementwise
// kernels loop with a grid stride; the GEMMs' grids are bounded by gemm_fits_int32.
// The window and the packed weights start at multiples of 256 bytes of the workspace.
constexpr int64_t kWorkspaceAlign = 256;
// Elementwise kernels (weight packing): 256 threads, enough blocks to fill the GPU and then
// grid-stride (a grid of 2^16 blocks covers 16M elements per sweep).
constexpr int kPackThreads = 256;
constexpr int64_t kPackMaxBlocks = 1 << 16;
// Window transform: 256 threads per block; a block covers one output row (n, i) and
// kTransformColumns window columns. Threads run along the positions of a window column
// (consecutive addresses, coalesced writes) and each decodes its position once (four 32-bit
// divisions) for up to 32 columns; the columns' input offsets come from a shared table.
constexpr int kTransformThreads = 256;
constexpr int kTransformColumns = 32;
// Direct kernel: one thread per output pixel of a (n, k) plane; 256 threads along the pixels
// so that neighbouring threads read neighbouring inputs and share every weight.
constexpr int kDirectThreads = 256;
// Default dynamic shared memory limit; larger pipelines must opt in.
constexpr int kDefaultSharedBytes = 48 * 1024;

// ---------------------------------------------------------------------------------------------
// Host plan
// ---------------------------------------------------------------------------------------------

enum class Path { kInvalid, kEmpty, kDirect, kGemm };

// Workspace of the GEMM path: [window | packed weights | split-K partials], each part starting
// at a multiple of kWorkspaceAlign bytes.
struct Plan {
  Path path = Path::kEmpty;
  ix::GemmLayout layout{};
  ix::SplitK split{1, 0};
  int64_t window_bytes = 0;   // rounded up to kWorkspaceAlign
  int64_t weight_bytes = 0;   // rounded up to kWorkspaceAlign
  int64_t partial_bytes = 0;  // fp32 [splits][K][gemm_n] when splits > 1
};

int64_t element_bytes(ScalarKind kind) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return 4;
    case ScalarKind::kFloat16:
    case ScalarKind::kBFloat16:
      return 2;
    case ScalarKind::kFloat64:
      return 8;
  }
  return 0;
}

// Strides, dilations >= 1 and non-negative sizes: everything the index math divides by.
bool geometry_is_valid(const ConvGeometry& g) {
  return g.N >= 0 && g.C >= 0 && g.H >= 0 && g.W >= 0 && g.K >= 0 && g.R >= 0 && g.S >= 0 && g.stride_h >= 1 &&
         g.stride_w >= 1 && g.dilation_h >= 1 && g.dilation_w >= 1 && g.input_dilation_h >= 1 &&
         g.input_dilation_w >= 1;
}

Plan make_plan(const Im2winConvParams& p) {
  const ConvGeometry& g = p.geometry;
  Plan plan;
  if (!geometry_is_valid(g) || g.groups < 1 || g.C % g.groups != 0 || g.K % g.groups != 0 ||
      element_bytes(p.dtype) == 0) {
    plan.path = Path::kInvalid;
    return plan;
  }
  if (g.N == 0 || g.K == 0 || g.Ho <= 0 || g.Wo <= 0) return plan;  // kEmpty
  plan.path = Path::kDirect;
  // An empty reduction (no channels or an empty kernel) writes the bias: the direct kernel.
  if (p.dtype == ScalarKind::kFloat64 || g.C == 0 || g.R == 0 || g.S == 0) return plan;
  if (g.K / g.groups < ix::kMinGemmRows) return plan;
  const int64_t bytes = element_bytes(p.dtype);
  const ix::GemmLayout layout = ix::make_gemm_layout(g, 16 / bytes);
  if (!ix::gemm_fits_int32(layout)) return plan;
  plan.path = Path::kGemm;
  plan.layout = layout;
  const bool simt = p.dtype == ScalarKind::kFloat32;
  plan.window_bytes = ix::round_up(ix::gemm_window_elements(g, layout) * bytes, kWorkspaceAlign);
  plan.weight_bytes = ix::round_up(
      (simt ? ix::packed_weight_elements_k_major(layout) : ix::packed_weight_elements_m_major(layout)) * bytes,
      kWorkspaceAlign);
  const int64_t block_m = simt ? ix::simt::kBlockM : ix::mma::kBlockM;
  const int64_t block_n = simt ? ix::simt::kBlockN : ix::mma::kBlockN;
  const int64_t block_k = simt ? ix::simt::kBlockK : ix::mma::kBlockK;
  const int64_t output_tiles = ix::ceil_div(layout.gemm_n, block_n) * ix::ceil_div(layout.kg, block_m) * g.groups;
  plan.split = ix::choose_split_k(output_tiles, g.groups, layout.gemm_k, block_k);
  if (plan.split.splits > 1) plan.partial_bytes = plan.split.splits * g.K * layout.gemm_n * int64_t(sizeof(float));
  return plan;
}

unsigned grid_1d(int64_t blocks, int64_t cap) { return unsigned(std::max<int64_t>(1, std::min(blocks, cap))); }

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float4 load_float4(const float* p) { return __ldg(reinterpret_cast<const float4*>(p)); }

// ---------------------------------------------------------------------------------------------
// Window transform (internal GEMM layout and the public im2win.h layout)
// ---------------------------------------------------------------------------------------------

struct TransformArgs {
  ConvGeometry g;
  ix::GemmLayout layout;  // kInternal: the destination layout
  const void* input;
  Strides4 input_strides;
  void* window;
  Strides4 window_strides;  // public layout: destination strides [N][C][Ho][width*R]
  int64_t width;
  int64_t inner_count;  // positions per window column: G*RCp (internal) or C*R (public)
  int64_t column_tiles;
  int64_t total_tiles;  // N * Ho * column_tiles
};

// One block per (output row n*Ho + i, tile of kTransformColumns window columns); threads
// (x: position in a window column, y: column). A position decodes to (input channel c, kernel
// row h) once; the element of column m is input[row(c, h) + column(m)], or zero.
template <typename T, bool kInternal>
__global__ void __launch_bounds__(kTransformThreads) window_transform_kernel(const TransformArgs a) {
  __shared__ int64_t column_source[kTransformColumns];
  const T* __restrict__ input = static_cast<const T*>(a.input);
  T* __restrict__ window = static_cast<T*>(a.window);
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  for (int64_t tile = blockIdx.x; tile < a.total_tiles; tile += gridDim.x) {
    const int64_t row = tile / a.column_tiles;  // n*Ho + i
    const int64_t m0 = (tile - row * a.column_tiles) * kTransformColumns;
    const int64_t n = row / a.g.Ho, i = row - n * a.g.Ho;
    const int columns = int(min(int64_t(kTransformColumns), a.width - m0));
    __syncthreads();  // the previous tile's readers of column_source are done
    if (tid < columns) column_source[tid] = ix::input_column_offset(a.g, a.input_strides, m0 + tid);
    __syncthreads();
    for (int64_t inner = threadIdx.x; inner < a.inner_count; inner += blockDim.x) {
      int64_t source_row, destination, column_step;
      if constexpr (kInternal) {
        int32_t channel, h;
        const bool real = ix::decode_window_inner(int32_t(inner), int32_t(a.layout.rc_padded),
                                                  int32_t(a.layout.rc), int32_t(a.layout.cg), &channel, &h);
        source_row = real ? ix::input_row_offset(a.g, a.input_strides, n, channel, i, h) : -1;
        destination = ix::gemm_window_offset(a.g, a.layout, n, i, m0, inner);
        column_step = a.layout.column_stride;
      } else {
        const int64_t channel = inner / a.g.R, h = inner - channel * a.g.R;
        source_row = ix::input_row_offset(a.g, a.input_strides, n, channel, i, h);
        destination = ix::public_window_offset(a.g, a.window_strides, n, channel, i, m0, h);
        column_step = a.g.R * a.window_strides.d3;
      }
      for (int mm = threadIdx.y; mm < columns; mm += blockDim.y) {
        const int64_t source_column = column_source[mm];
        T value{};  // +0 for every storage type
        if (source_row >= 0 && source_column >= 0) value = input[source_row + source_column];
        window[destination + mm * column_step] = value;
      }
    }
  }
}

// Threads along a window column: the smallest power of two >= the positions, 32..256.
dim3 transform_block(int64_t inner_count) {
  int x = 32;
  while (x < kTransformThreads && x < inner_count) x *= 2;
  return dim3(unsigned(x), unsigned(kTransformThreads / x));
}

template <typename T, bool kInternal>
cudaError_t launch_transform(TransformArgs a, cudaStream_t stream) {
  a.column_tiles = ix::ceil_div(a.width, kTransformColumns);
  a.total_tiles = a.g.N * a.g.Ho * a.column_tiles;
  window_transform_kernel<T, kInternal>
      <<<grid_1d(a.total_tiles, kMaxGridX), transform_block(a.inner_count), 0, stream>>>(a);
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Weight packing: A_g[m][kk] from the weight (any strides), zero in the padding
// ---------------------------------------------------------------------------------------------

// kKMajor: [G][gemm_k][Mp] (fp32 SIMT); else [G][Kg][gemm_k] (tensor cores).
template <typename T, bool kKMajor>
__global__ void __launch_bounds__(kPackThreads)
    pack_weight_kernel(const T* __restrict__ weight, const Strides4 ws, const ix::GemmLayout l,
                       T* __restrict__ packed, const int64_t total) {
  for (int64_t idx = int64_t(blockIdx.x) * kPackThreads + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * kPackThreads) {
    int64_t group, m, kk;
    if constexpr (kKMajor) {
      m = idx % l.m_padded;
      const int64_t rest = idx / l.m_padded;
      kk = rest % l.gemm_k;
      group = rest / l.gemm_k;
    } else {
      kk = idx % l.gemm_k;
      const int64_t rest = idx / l.gemm_k;
      m = rest % l.kg;
      group = rest / l.kg;
    }
    const int64_t source = ix::weight_source_offset(l, ws, group, m, kk);
    packed[idx] = source >= 0 ? weight[source] : T{};
  }
}

// ---------------------------------------------------------------------------------------------
// GEMM kernels
// ---------------------------------------------------------------------------------------------

template <typename T>
struct GemmArgs {
  ConvGeometry g;
  ix::GemmLayout l;
  const T* window;  // workspace, [N][Ho][width][G][RCp]
  const T* weight;  // workspace, packed A_g
  const T* bias;    // [K] or nullptr
  T* out;
  Strides4 out_strides;
  int64_t k_column_step;  // window elements between kernel columns: dw * G * RCp
  float* partial;         // workspace, split-K partial sums [splits][K][gemm_n] (splits > 1)
  int32_t splits;
  int32_t k_tiles_per_split;
};

// One block per tile: blockIdx.x = column tile (fastest, so neighbouring blocks share their
// weight tile in L2 and stream different windows), blockIdx.y = row tile, blockIdx.z =
// group * splits + split. gemm_fits_int32 and choose_split_k bound all three, and the GEMM
// columns to 31 bits (32-bit decodes). The block reduces k tiles [kt_begin, kt_begin + kt_count).
struct TileIndex {
  int64_t group, m0, n0;
  int32_t split, kt_begin, kt_count;
};
template <int kBlockM, int kBlockN, int kBlockK, typename Args>
__device__ __forceinline__ TileIndex block_tile(const Args& a) {
  const uint32_t split = blockIdx.z % uint32_t(a.splits);
  const int k_tiles = int((a.l.gemm_k + kBlockK - 1) / kBlockK);
  const int kt_begin = int(split) * a.k_tiles_per_split;
  return TileIndex{int64_t(blockIdx.z / uint32_t(a.splits)), int64_t(blockIdx.y) * kBlockM,
                   int64_t(blockIdx.x) * kBlockN, int32_t(split), kt_begin,
                   min(a.k_tiles_per_split, k_tiles - kt_begin)};
}

// fp32: the paper's SIMT micro-kernel. Per tile of kBlockK reduction steps each thread loads one
// float4 of A (k-major packed weights: a warp reads 512 contiguous bytes, stored as is) and one
// float4 of B (one window column's reduction run, stored transposed into [k][column]) into
// registers while the current shared tile is being consumed, then stores them into the other
// shared buffer: one __syncthreads per tile.
__global__ void __launch_bounds__(ix::simt::kThreads, ix::simt::kMinBlocksPerSm)
    simt_gemm_kernel(const GemmArgs<float> a) {
  using namespace ix::simt;
  __shared__ __align__(16) float a_tile[2][kBlockK][kBlockM];
  __shared__ __align__(16) float b_tile[2][kBlockK][kBlockN];
  const int tid = threadIdx.x;
  const int a_k = ix::simt_a_load_k(tid), a_m = ix::simt_a_load_m(tid);
  const int b_col = ix::simt_b_load_col(tid), b_k = ix::simt_b_load_k(tid);
  const int row_lo = ix::simt_thread_row(tid, 0), row_hi = ix::simt_thread_row(tid, 4);
  const int col_lo = ix::simt_thread_col(tid, 0), col_hi = ix::simt_thread_col(tid, 4);
  const int gemm_k = int(a.l.gemm_k), rc_padded = int(a.l.rc_padded);
  const float4 zero4 = make_float4(0.f, 0.f, 0.f, 0.f);

  const TileIndex t = block_tile<kBlockM, kBlockN, kBlockK>(a);
  // This thread's A float4: GEMM rows m0 + a_m .. +3 (all real or all padding: Mp % 4 == 0),
  // reduction row k0 + a_k. Its address is recomputed per tile from the kernel parameters:
  // a long-lived pointer would cost the two registers that keep sm_90a from spilling.
  const bool a_ok = ix::chunk_in_bounds(t.m0 + a_m, a.l.m_padded, 0, gemm_k);
  // This thread's B float4: GEMM column n0 + b_col, reduction rows k0 + b_k .. +3.
  const bool b_ok = ix::chunk_in_bounds(t.n0 + b_col, a.l.gemm_n, 0, gemm_k);
  const float* b_src =
      a.window + (b_ok ? ix::gemm_column_window_base<uint32_t>(a.g, a.l, t.n0 + b_col, t.group) : 0);

  float4 a_next, b_next;
  const auto load_tile = [&](int k0) {
    const int ka = k0 + a_k;
    a_next = a_ok && ka < gemm_k
                 ? load_float4(a.weight + ix::packed_weight_offset_k_major(a.l, t.group, t.m0 + a_m, ka))
                 : zero4;
    const int kb = k0 + b_k;
    b_next = b_ok && kb < gemm_k ? load_float4(b_src + ix::gemm_k_window_offset(kb, rc_padded, a.k_column_step))
                                 : zero4;
  };
  const auto store_tile = [&](int buf) {
    *reinterpret_cast<float4*>(&a_tile[buf][a_k][a_m]) = a_next;
    b_tile[buf][b_k + 0][b_col] = b_next.x;
    b_tile[buf][b_k + 1][b_col] = b_next.y;
    b_tile[buf][b_k + 2][b_col] = b_next.z;
    b_tile[buf][b_k + 3][b_col] = b_next.w;
  };

  float acc[kThreadM][kThreadN];
#pragma unroll
  for (int r = 0; r < kThreadM; ++r)
#pragma unroll
    for (int c = 0; c < kThreadN; ++c) acc[r][c] = 0.f;

  load_tile(t.kt_begin * kBlockK);
  store_tile(0);
  __syncthreads();
  const int kt_end = t.kt_begin + t.kt_count;
  for (int kt = t.kt_begin; kt < kt_end; ++kt) {
    const int buf = (kt - t.kt_begin) & 1;
    const bool more = kt + 1 < kt_end;
    if (more) load_tile((kt + 1) * kBlockK);  // in flight during the FMAs below
#pragma unroll
    for (int k = 0; k < kBlockK; ++k) {
      const float4 a0 = *reinterpret_cast<const float4*>(&a_tile[buf][k][row_lo]);
      const float4 a1 = *reinterpret_cast<const float4*>(&a_tile[buf][k][row_hi]);
      const float4 b0 = *reinterpret_cast<const float4*>(&b_tile[buf][k][col_lo]);
      const float4 b1 = *reinterpret_cast<const float4*>(&b_tile[buf][k][col_hi]);
      const float av[kThreadM] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
      const float bv[kThreadN] = {b0.x, b0.y, b0.z, b0.w, b1.x, b1.y, b1.z, b1.w};
#pragma unroll
      for (int r = 0; r < kThreadM; ++r)
#pragma unroll
        for (int c = 0; c < kThreadN; ++c) acc[r][c] = fmaf(av[r], bv[c], acc[r][c]);
    }
    // The other buffer was last read in the previous iteration, before its barrier.
    if (more) store_tile(buf ^ 1);
    __syncthreads();
  }

  // Epilogue: split-K partial sums, or bias in fp32 and stores with the output's strides.
  if (a.splits > 1) {
#pragma unroll
    for (int r = 0; r < kThreadM; ++r) {
      const int64_t m = t.m0 + ix::simt_thread_row(tid, r);
      if (m >= a.l.kg) continue;
      float* const part = a.partial + ix::split_k_partial_offset(t.split, t.group * a.l.kg + m, t.n0,
                                                                 a.l.groups * a.l.kg, a.l.gemm_n);
#pragma unroll
      for (int c = 0; c < kThreadN; ++c) {
        const int col = ix::simt_thread_col(tid, c);
        if (t.n0 + col < a.l.gemm_n) part[col] = acc[r][c];
      }
    }
    return;
  }
  int64_t pixel[kThreadN];
#pragma unroll
  for (int c = 0; c < kThreadN; ++c) {
    const int64_t out_col = t.n0 + ix::simt_thread_col(tid, c);
    pixel[c] = out_col < a.l.gemm_n ? ix::gemm_output_pixel_offset<uint32_t>(a.g, a.out_strides, out_col) : -1;
  }
#pragma unroll
  for (int r = 0; r < kThreadM; ++r) {
    const int64_t m = t.m0 + ix::simt_thread_row(tid, r);
    if (m >= a.l.kg) continue;
    const int64_t channel = t.group * a.l.kg + m;
    const float bias = a.bias != nullptr ? a.bias[channel] : 0.f;
    float* out = a.out + channel * a.out_strides.d1;
#pragma unroll
    for (int c = 0; c < kThreadN; ++c)
      if (pixel[c] >= 0) out[pixel[c]] = acc[r][c] + bias;
  }
}

// fp16/bf16 on tensor cores. Per stage each thread cp.asyncs two 16-byte chunks of the A tile
// (packed weights, [Kg][gemm_k]) and two of the B tile (window runs) into swizzled
// [128 rows][32] shared tiles, zero-filling chunks past a tail; kStages-1 stages are in flight
// while one is consumed by 2 k16 steps of 4 + 2 ldmatrix.x4 and 16 mma per warp.
template <typename T>
__global__ void __launch_bounds__(ix::mma::kThreads, ix::mma::kMinBlocksPerSm)
    mma_gemm_kernel(const GemmArgs<T> a) {
  using namespace ix::mma;
  extern __shared__ uint4 mma_shared[];  // kStages x (A tile, B tile), 16-byte aligned
  T* const smem = reinterpret_cast<T*>(mma_shared);
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_row0 = ix::mma_warp_row0(warp), warp_col0 = ix::mma_warp_col0(warp);
  const int load_chunk = ix::mma_load_chunk(tid);
  const int gemm_k = int(a.l.gemm_k), rc_padded = int(a.l.rc_padded);

  const TileIndex t = block_tile<kBlockM, kBlockN, kBlockK>(a);
  // This thread's two chunk rows of the A (GEMM rows) and B (GEMM columns) tiles.
  const T* a_src[2];
  const T* b_src[2];
  bool a_ok[2], b_ok[2];
  int smem_offset[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int row = ix::mma_load_row(tid, i);
    smem_offset[i] = ix::mma_smem_offset(row, load_chunk);
    const int64_t m = t.m0 + row;
    a_ok[i] = m < a.l.kg;
    a_src[i] = a.weight + (a_ok[i] ? ix::packed_weight_offset_m_major(a.l, t.group, m, load_chunk * kVector) : 0);
    const int64_t col = t.n0 + row;
    b_ok[i] = col < a.l.gemm_n;
    b_src[i] = a.window + (b_ok[i] ? ix::gemm_column_window_base<uint32_t>(a.g, a.l, col, t.group) : 0);
  }
  const auto load_stage = [&](int stage, int k0) {
    T* const sa = smem + stage * 2 * kTileElements;
    T* const sb = sa + kTileElements;
    const int kk = k0 + load_chunk * kVector;
    const bool k_ok = kk < gemm_k;  // == chunk_in_bounds(row, rows, kk, gemm_k) with row_ok
    const int64_t b_offset = k_ok ? ix::gemm_k_window_offset(kk, rc_padded, a.k_column_step) : 0;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const bool pa = a_ok[i] && k_ok;
      cp_async_16_zfill(sa + smem_offset[i], pa ? a_src[i] + k0 : a.weight, pa);
      const bool pb = b_ok[i] && k_ok;
      cp_async_16_zfill(sb + smem_offset[i], pb ? b_src[i] + b_offset : a.window, pb);
    }
  };

  float acc[kWarpTilesM][kWarpTilesN][4];
#pragma unroll
  for (int mt = 0; mt < kWarpTilesM; ++mt)
#pragma unroll
    for (int nt = 0; nt < kWarpTilesN; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  // Prologue: local tiles 0..kStages-2 in flight (one commit group per stage, empty past the
  // end, so that the group count below stays uniform). Local tile it is k tile kt_begin + it.
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < t.kt_count) load_stage(s, (t.kt_begin + s) * kBlockK);
    cp_async_commit();
  }
  for (int it = 0; it < t.kt_count; ++it) {
    cp_async_wait<kStages - 2>();  // this thread's copies of tile it have landed
    __syncthreads();               // everyone's have; everyone is done with tile it-1
    const int next = it + kStages - 1;
    if (next < t.kt_count) load_stage(next % kStages, (t.kt_begin + next) * kBlockK);  // tile it-1's stage
    cp_async_commit();

    const T* const sa = smem + (it % kStages) * 2 * kTileElements;
    const T* const sb = sa + kTileElements;
#pragma unroll
    for (int ks = 0; ks < kBlockK / kMmaK; ++ks) {
      const int chunk0 = ks * (kMmaK / kVector);
      uint32_t af[kWarpTilesM][4];
      uint32_t bf[kWarpTilesN][2];
#pragma unroll
      for (int mt = 0; mt < kWarpTilesM; ++mt) {
        const int row = warp_row0 + mt * kMmaM + ix::ldmatrix_a_row(lane);
        ldmatrix_x4(af[mt], sa + ix::mma_smem_offset(row, chunk0 + ix::ldmatrix_a_chunk(lane)));
      }
#pragma unroll
      for (int np = 0; np < kWarpTilesN / 2; ++np) {
        const int row = warp_col0 + np * 2 * kMmaN + ix::ldmatrix_b_row(lane);
        ldmatrix_x4_b_pair(bf[2 * np], bf[2 * np + 1], sb + ix::mma_smem_offset(row, chunk0 + ix::ldmatrix_b_chunk(lane)));
      }
#pragma unroll
      for (int mt = 0; mt < kWarpTilesM; ++mt)
#pragma unroll
        for (int nt = 0; nt < kWarpTilesN; ++nt) mma_m16n8k16<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  }
  cp_async_wait_all();  // only empty groups remain (commits past the last tile)

  // Epilogue: accumulator (lane, e) -> (row, column) by the m16n8k16 C layout. Split-K writes
  // fp32 partial sums; otherwise bias in fp32, one rounding to T, the output's strides.
  if (a.splits > 1) {
#pragma unroll
    for (int mt = 0; mt < kWarpTilesM; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int64_t m = t.m0 + warp_row0 + mt * kMmaM + ix::mma_acc_row(lane, 2 * half);
        if (m >= a.l.kg) continue;
        float* const part = a.partial + ix::split_k_partial_offset(t.split, t.group * a.l.kg + m, t.n0,
                                                                   a.l.groups * a.l.kg, a.l.gemm_n);
#pragma unroll
        for (int nt = 0; nt < kWarpTilesN; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int col = warp_col0 + nt * kMmaN + ix::mma_acc_col(lane, e);
            if (t.n0 + col < a.l.gemm_n) part[col] = acc[mt][nt][2 * half + e];
          }
      }
    return;
  }
  int64_t pixel[kWarpTilesN][2];
#pragma unroll
  for (int nt = 0; nt < kWarpTilesN; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int64_t col = t.n0 + warp_col0 + nt * kMmaN + ix::mma_acc_col(lane, e);
      pixel[nt][e] = col < a.l.gemm_n ? ix::gemm_output_pixel_offset<uint32_t>(a.g, a.out_strides, col) : -1;
    }
#pragma unroll
  for (int mt = 0; mt < kWarpTilesM; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t m = t.m0 + warp_row0 + mt * kMmaM + ix::mma_acc_row(lane, 2 * half);
      if (m >= a.l.kg) continue;
      const int64_t channel = t.group * a.l.kg + m;
      const float bias = a.bias != nullptr ? to_compute(a.bias[channel]) : 0.f;
      T* const out = a.out + channel * a.out_strides.d1;
#pragma unroll
      for (int nt = 0; nt < kWarpTilesN; ++nt)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          if (pixel[nt][e] >= 0) out[pixel[nt][e]] = from_compute<T>(acc[mt][nt][2 * half + e] + bias);
    }
}

// Split-K reduction: one thread per (output channel = blockIdx.y, GEMM column); the splits'
// partial sums in split order, the bias, one rounding, the output's strides. Split-K only runs
// with fewer than kSplitTargetBlocks output tiles, so channels and columns are below 2^15.
constexpr int kReduceThreads = 256;
template <typename T>
__global__ void __launch_bounds__(kReduceThreads) split_k_reduce_kernel(const GemmArgs<T> a) {
  const int64_t col = int64_t(blockIdx.x) * kReduceThreads + threadIdx.x;
  if (col >= a.l.gemm_n) return;
  const int64_t channel = blockIdx.y, channels = a.l.groups * a.l.kg;
  float sum = a.bias != nullptr ? to_compute(a.bias[channel]) : 0.f;
  float partial_sum = 0.f;
  for (int split = 0; split < a.splits; ++split)
    partial_sum += a.partial[ix::split_k_partial_offset(split, channel, col, channels, a.l.gemm_n)];
  sum += partial_sum;
  a.out[channel * a.out_strides.d1 + ix::gemm_output_pixel_offset<uint32_t>(a.g, a.out_strides, col)] =
      from_compute<T>(sum);
}

template <typename T>
cudaError_t launch_gemm(const Im2winConvParams& p, const Plan& plan, void* workspace, cudaStream_t stream) {
  const ConvGeometry& g = p.geometry;
  const ix::GemmLayout& l = plan.layout;
  T* const window = static_cast<T*>(workspace);
  T* const packed = reinterpret_cast<T*>(static_cast<char*>(workspace) + plan.window_bytes);
  constexpr bool kSimt = std::is_same_v<T, float>;

  // 1. Window.
  TransformArgs ta{};
  ta.g = g;
  ta.layout = l;
  ta.input = p.input;
  ta.input_strides = p.input_strides;
  ta.window = window;
  ta.width = l.width;
  ta.inner_count = l.column_stride;
  cudaError_t status = launch_transform<T, true>(ta, stream);
  if (status != cudaSuccess) return status;

  // 2. Packed weights.
  const int64_t weight_elements =
      kSimt ? ix::packed_weight_elements_k_major(l) : ix::packed_weight_elements_m_major(l);
  pack_weight_kernel<T, kSimt>
      <<<grid_1d(ix::ceil_div(weight_elements, kPackThreads), kPackMaxBlocks), kPackThreads, 0, stream>>>(
          static_cast<const T*>(p.weight), p.weight_strides, l, packed, weight_elements);
  status = cudaGetLastError();
  if (status != cudaSuccess) return status;

  // 3. GEMM.
  GemmArgs<T> ga{};
  ga.g = g;
  ga.l = l;
  ga.window = window;
  ga.weight = packed;
  ga.bias = static_cast<const T*>(p.bias);
  ga.out = static_cast<T*>(p.output);
  ga.out_strides = p.output_strides;
  ga.k_column_step = ix::gemm_k_column_step(g, l);
  ga.partial = reinterpret_cast<float*>(static_cast<char*>(workspace) + plan.window_bytes + plan.weight_bytes);
  ga.splits = int32_t(plan.split.splits);
  ga.k_tiles_per_split = int32_t(plan.split.k_tiles_per_split);
  const unsigned grid_z = unsigned(l.groups * plan.split.splits);
  if constexpr (kSimt) {
    namespace sc = ix::simt;
    const dim3 grid(unsigned(ix::ceil_div(l.gemm_n, sc::kBlockN)), unsigned(ix::ceil_div(l.kg, sc::kBlockM)),
                    grid_z);
    simt_gemm_kernel<<<grid, sc::kThreads, 0, stream>>>(ga);
  } else {
    namespace mc = ix::mma;
    const dim3 grid(unsigned(ix::ceil_div(l.gemm_n, mc::kBlockN)), unsigned(ix::ceil_div(l.kg, mc::kBlockM)),
                    grid_z);
    constexpr int kSharedBytes = mc::kStages * 2 * mc::kTileElements * int(sizeof(T));
    if constexpr (kSharedBytes > kDefaultSharedBytes) {
      status = cudaFuncSetAttribute(mma_gemm_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
      if (status != cudaSuccess) return status;
    }
    mma_gemm_kernel<T><<<grid, mc::kThreads, kSharedBytes, stream>>>(ga);
  }
  if (ga.splits > 1) {
    status = cudaGetLastError();
    if (status != cudaSuccess) return status;
    const dim3 grid(unsigned(ix::ceil_div(l.gemm_n, kReduceThreads)), unsigned(g.K));
    split_k_reduce_kernel<T><<<grid, kReduceThreads, 0, stream>>>(ga);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Direct kernel (fp64, small groups, fallback)
// ---------------------------------------------------------------------------------------------

template <typename T>
struct DirectArgs {
  ConvGeometry g;
  const T* input;
  Strides4 input_strides;
  const T* weight;
  Strides4 weight_strides;
  const T* bias;
  T* out;
  Strides4 out_strides;
  int64_t cg, kg;
  int64_t planes;      // N*K
  int64_t plane_size;  // Ho*Wo
};

// Index: uint32_t when direct_fits_int32 (every division inline), else int64_t.
template <typename T, typename Index>
__global__ void __launch_bounds__(kDirectThreads) direct_conv_kernel(const DirectArgs<T> a) {
  using C = compute_t<T>;
  const ConvGeometry& g = a.g;
  // One pixel per thread (blockIdx.x covers the plane: ceil(Ho*Wo / 256) < 2^31 blocks);
  // planes (n, k) loop over blockIdx.y, uniformly per block.
  const int64_t p = int64_t(blockIdx.x) * kDirectThreads + threadIdx.x;
  if (p >= a.plane_size) return;
  const int64_t i = int64_t(Index(p) / Index(g.Wo)), j = p - i * g.Wo;
  for (int64_t plane = blockIdx.y; plane < a.planes; plane += gridDim.y) {
    const int64_t n = int64_t(Index(plane) / Index(g.K)), k = plane - n * g.K;
    const int64_t group = int64_t(Index(k) / Index(a.kg));
    const T* const x = a.input + n * a.input_strides.d0 + group * a.cg * a.input_strides.d1;
    const T* const wk = a.weight + k * a.weight_strides.d0;
    C acc = C(0);
    for (Index h = 0; h < Index(g.R); ++h) {
      const int64_t y = ix::real_input_index_fast<Index>(i * g.stride_h + int64_t(h) * g.dilation_h - g.pad_top,
                                                         g.input_dilation_h, g.H);
      if (y < 0) continue;
      for (Index w = 0; w < Index(g.S); ++w) {
        const int64_t xc = ix::real_input_index_fast<Index>(
            j * g.stride_w + int64_t(w) * g.dilation_w - g.pad_left, g.input_dilation_w, g.W);
        if (xc < 0) continue;
        const T* xp = x + y * a.input_strides.d2 + xc * a.input_strides.d3;
        const T* wp = wk + int64_t(h) * a.weight_strides.d2 + int64_t(w) * a.weight_strides.d3;
        for (Index c = 0; c < Index(a.cg); ++c, xp += a.input_strides.d1, wp += a.weight_strides.d1)
          acc += to_compute(*xp) * to_compute(*wp);
      }
    }
    const C bias = a.bias != nullptr ? to_compute(a.bias[k]) : C(0);
    a.out[n * a.out_strides.d0 + k * a.out_strides.d1 + i * a.out_strides.d2 + j * a.out_strides.d3] =
        from_compute<T>(acc + bias);
  }
}

template <typename T>
cudaError_t launch_direct(const Im2winConvParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.geometry;
  DirectArgs<T> a{};
  a.g = g;
  a.input = static_cast<const T*>(p.input);
  a.input_strides = p.input_strides;
  a.weight = static_cast<const T*>(p.weight);
  a.weight_strides = p.weight_strides;
  a.bias = static_cast<const T*>(p.bias);
  a.out = static_cast<T*>(p.output);
  a.out_strides = p.output_strides;
  a.cg = g.C / g.groups;
  a.kg = g.K / g.groups;
  a.planes = g.N * g.K;
  a.plane_size = g.Ho * g.Wo;
  const int64_t pixel_blocks = ix::ceil_div(a.plane_size, kDirectThreads);
  if (pixel_blocks > kMaxGridX) return cudaErrorInvalidValue;  // a plane of over 2^39 pixels
  const dim3 grid(unsigned(pixel_blocks), grid_1d(a.planes, ix::kMaxGridYZ));
  if (ix::direct_fits_int32(g)) {
    direct_conv_kernel<T, uint32_t><<<grid, kDirectThreads, 0, stream>>>(a);
  } else {
    direct_conv_kernel<T, int64_t><<<grid, kDirectThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

int64_t im2win_conv_workspace_bytes(const Im2winConvParams& p) {
  const Plan plan = make_plan(p);
  return plan.path == Path::kGemm ? plan.window_bytes + plan.weight_bytes + plan.partial_bytes : 0;
}

cudaError_t im2win_conv(const Im2winConvParams& p, void* workspace, cudaStream_t stream) {
  Plan plan = make_plan(p);
  if (plan.path == Path::kInvalid) return cudaErrorInvalidValue;
  if (plan.path == Path::kEmpty) return cudaSuccess;
  if (plan.path == Path::kGemm && (workspace == nullptr || !is_aligned(workspace, 16))) plan.path = Path::kDirect;
  cudaError_t status = cudaSuccess;
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (std::is_same_v<T, double>) {
      status = launch_direct<T>(p, stream);
    } else {
      status = plan.path == Path::kGemm ? launch_gemm<T>(p, plan, workspace, stream) : launch_direct<T>(p, stream);
    }
  });
  return status;
}

cudaError_t im2win_transform(const Im2winTransformParams& p, cudaStream_t stream) {
  const ConvGeometry& g = p.geometry;
  if (!geometry_is_valid(g) || element_bytes(p.dtype) == 0) return cudaErrorInvalidValue;
  const int64_t width = window_width(g);
  if (g.N == 0 || g.C == 0 || g.Ho <= 0 || width <= 0 || g.R == 0) return cudaSuccess;
  TransformArgs a{};
  a.g = g;
  a.input = p.input;
  a.input_strides = p.input_strides;
  a.window = p.window;
  a.window_strides = p.window_strides;
  a.width = width;
  a.inner_count = g.C * g.R;
  cudaError_t status = cudaSuccess;
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    status = launch_transform<T, false>(a, stream);
  });
  return status;
}

}  // namespace torch_ext::cuda
