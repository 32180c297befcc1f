// CUDA kernels of W8A8 (quant/w8a8_cuda.h). Every index map, the rounding and the tile rules are
// host+device functions in quant/w8a8_cuda_index.h, run thread by thread on the CPU by
// tests/cpp/w8a8_cuda_sim.cpp.
//
// quantize_kernel<T, kGroup>: one read of x per row (bandwidth-bound). kGroup = 32 (a warp per
//   row, 8 rows per CTA, rows up to 4 KB) or 256 (the CTA per row). Thread j of the group reads
//   16-byte chunks j, j + kGroup, ... (coalesced), keeps the first kQuantPacks of them in
//   registers, reduces the row's absmax (warp shuffles, then 8 warp maxima through shared memory
//   for the CTA variant), and quantizes from registers; only chunks past the register cache are
//   read a second time (from L2: the CTA just read them). Unaligned x uses element loads into
//   the same chunks; q is stored as 4- or 8-byte words when aligned, else bytes.
//
// mm_kernel<O, Cfg, Op>: tensor-core GEMM, out = (A B^T) * a_scale * b_scale + bias, shared by
//   scaled_int8_mm (Op = Int8Mma: int8 operands, mma .s8 into int32) and scaled_fp8_mm
//   (Op = Fp8Mma: float8_e4m3fn operands, mma .e4m3 into fp32, sm_89+). Both mmas are
//   m16n8k32 with byte operands and the same fragment maps, so everything else is shared.
//   - A CTA owns a Cfg::kBM x Cfg::kBN tile (128 x 128 with 8 warps, or 32 x 64 with 4 warps for
//     small grids); CTAs are ordered in groups of 8 m blocks for L2 reuse (ix::tile_of).
//   - K streams through a Cfg::kStages-deep cp.async ring of 64-byte-wide stages: every thread
//     copies whole 16-byte chunks of A and B rows (zero-filled past M, N and K: tails multiply
//     zeros), stored XOR-swizzled so ldmatrix is conflict-free (ix::smem_offset). A / B or their
//     strides not 16-byte aligned: synchronous byte loads into the same layout.
//   - Per k32 step a warp loads its A fragments (one ldmatrix.x4 per m16 tile) and B fragments
//     (one ldmatrix.x4 per two n8 tiles) and issues kMI x kNI mma.m16n8k32 (.s8 into int32 or
//     .e4m3 into fp32; zero-filled tails are +0 in both encodings).
//   - Epilogue: float(acc) * a_scale[m or 0] * b_scale[n or 0] (+ bias[n]) in fp32, one rounding
//     to O, element stores inside [M, N] only.
//   - fp8 on archs without mma .e4m3 (the sm_80 build): the kernel body is a trap; the launcher
//     refuses devices below compute capability 8.9 before that. sm_89 runs mma .e4m3 natively
//     (QMMA); sm_90 has no fp8 mma.sync, so Fp8Mma widens the fragments to fp16 itself and chains
//     two mma.m16n8k16 (ix::f16_step_a_reg): fp16 tensor-core rate, not fp8.
//   - On a compute capability 9.0 device, problems whose wgmma tiles (128 x 256 int8, 128 x 128 fp8) fill every SM can go to
//     the wgmma kernel of quant/w8a8_wgmma.cu instead (sm_90a builds; runs_wgmma below).
#include <type_traits>

#include "common/cuda/cp_async.cuh"
#include "common/cuda/mma.cuh"
#include "common/cuda/vec.cuh"
#include "quant/int8_outliers_index.h"
#include "quant/w8a8_cuda.h"
#include "quant/w8a8_cuda_index.h"
#include "quant/w8a8_mm_operands.h"
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
#include "common/cuda/hopper_switch.h"
#include "quant/w8a8_wgmma.h"
#include "quant/w8a8_wgmma_index.h"
#endif

namespace torch_ext::cuda {
namespace {

namespace ix = ::torch_ext::quant::w8a8_cuda;

// Dynamic shared memory above this needs cudaFuncAttributeMaxDynamicSharedMemorySize.
constexpr int kDefaultSharedBytes = 48 * 1024;
// 32-bit index paths in the GEMM (rows, columns, k) keep this margin below 2^31.
constexpr int64_t kMaxMmDim = (int64_t(1) << 31) - 256;
constexpr int64_t kMaxGrid = 2147483647;

// ---------------------------------------------------------------------------------------------
// quantize_per_token
// ---------------------------------------------------------------------------------------------

template <typename T>
struct QuantArgs {
  const T* x;
  int64_t x_row_stride;
  int64_t rows, k;
  float clip;
  int8_t* q;
  float* scale;
  bool vector;  // x and its row stride 16-byte aligned
  const uint32_t* zero_mask;  // int8_linear's outlier columns (count as 0), or null
};

// Chunk c of a row, with the masked columns zeroed.
template <typename T>
__device__ __forceinline__ Pack16<T> load_chunk(const QuantArgs<T>& a, const T* row, int64_t c) {
  constexpr int V = Pack16<T>::kSize;
  const int len = ix::quant_chunk_len(c, V, a.k);
  Pack16<T> pack = load_pack16_partial(row + c * V, len, a.vector);
  if (a.zero_mask != nullptr) {
    const uint32_t zero = ::torch_ext::quant::int8_outliers::chunk_zero_bits(a.zero_mask, c * V, V);
#pragma unroll
    for (int e = 0; e < V; ++e)
      if ((zero >> e) & 1u) pack.v[e] = T{0};
  }
  return pack;
}

template <typename T>
__device__ __forceinline__ float pack_absmax(const Pack16<T>& pack, float amax) {
#pragma unroll
  for (int e = 0; e < Pack16<T>::kSize; ++e) amax = fmaxf(amax, fabsf(to_compute(pack.v[e])));
  return amax;
}

template <typename T>
__device__ __forceinline__ void quantize_chunk(const Pack16<T>& pack, float scale, int8_t* dst, int len) {
  constexpr int V = Pack16<T>::kSize;
  uint32_t words[V / 4];
#pragma unroll
  for (int w = 0; w < V / 4; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b)
      word |= uint32_t(uint8_t(ix::quant_value(to_compute(pack.v[4 * w + b]), scale))) << (8 * b);
    words[w] = word;
  }
  if (ix::quant_q_store_vector(reinterpret_cast<uintptr_t>(dst), len, V)) {
    if constexpr (V == 4) {
      *reinterpret_cast<uint32_t*>(dst) = words[0];
    } else {
      *reinterpret_cast<uint2*>(dst) = make_uint2(words[0], words[1]);
    }
  } else {
    for (int e = 0; e < len; ++e) dst[e] = int8_t(words[e / 4] >> (8 * (e % 4)));
  }
}

template <typename T, int kGroup>
__global__ void __launch_bounds__(ix::kQuantThreads) quantize_kernel(const QuantArgs<T> a) {
  constexpr int kRowsPerCta = ix::kQuantThreads / kGroup;
  __shared__ float warp_max[ix::kQuantWarps];
  const int tid = threadIdx.x;
  const int j = tid % kGroup;
  const int64_t row = int64_t(blockIdx.x) * kRowsPerCta + tid / kGroup;
  if constexpr (kGroup == 32) {
    if (row >= a.rows) return;  // whole warps; the warp variant has no CTA barrier
  }
  constexpr int V = Pack16<T>::kSize;
  const T* const x = a.x + row * a.x_row_stride;
  const int64_t chunks = ix::ceil_div(a.k, V);

  // Pass 1: absmax; the first kQuantPacks chunks of the thread stay in registers.
  Pack16<T> cache[ix::kQuantPacks];
  float amax = 0.f;
#pragma unroll
  for (int i = 0; i < ix::kQuantPacks; ++i) {
    const int64_t c = ix::quant_chunk(j, i, kGroup);
    if (c < chunks) {
      cache[i] = load_chunk(a, x, c);
      amax = pack_absmax(cache[i], amax);
    }
  }
  for (int64_t c = ix::quant_chunk(j, ix::kQuantPacks, kGroup); c < chunks; c += kGroup)
    amax = pack_absmax(load_chunk(a, x, c), amax);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, offset));
  if constexpr (kGroup > 32) {
    if (tid % 32 == 0) warp_max[tid / 32] = amax;
    __syncthreads();
#pragma unroll
    for (int w = 0; w < ix::kQuantWarps; ++w) amax = fmaxf(amax, warp_max[w]);
  }
  const float scale = ix::quant_row_scale(amax, a.clip);
  if (j == 0) a.scale[row] = scale;

  // Pass 2: quantize (registers, then the re-read tail).
  int8_t* const q = a.q + row * a.k;
#pragma unroll
  for (int i = 0; i < ix::kQuantPacks; ++i) {
    const int64_t c = ix::quant_chunk(j, i, kGroup);
    if (c < chunks) quantize_chunk(cache[i], scale, q + c * V, ix::quant_chunk_len(c, V, a.k));
  }
  for (int64_t c = ix::quant_chunk(j, ix::kQuantPacks, kGroup); c < chunks; c += kGroup)
    quantize_chunk(load_chunk(a, x, c), scale, q + c * V, ix::quant_chunk_len(c, V, a.k));
}

template <typename T>
cudaError_t launch_quantize(const QuantizePerTokenParams& p, cudaStream_t stream) {
  QuantArgs<T> a{};
  a.x = static_cast<const T*>(p.x);
  a.x_row_stride = p.x_row_stride;
  a.rows = p.rows;
  a.k = p.k;
  a.clip = p.clip;
  a.q = p.q;
  a.scale = p.scale;
  a.vector = ix::quant_x_vectorizable(reinterpret_cast<uintptr_t>(p.x), p.x_row_stride, int(sizeof(T)));
  a.zero_mask = p.zero_mask;
  const int group = ix::quant_group_threads(p.k, int(sizeof(T)));
  const int64_t blocks = ix::ceil_div(p.rows, ix::quant_rows_per_cta(group));
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  if (group == 32) {
    quantize_kernel<T, 32><<<unsigned(blocks), ix::kQuantThreads, 0, stream>>>(a);
  } else {
    quantize_kernel<T, ix::kQuantThreads><<<unsigned(blocks), ix::kQuantThreads, 0, stream>>>(a);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// scaled_int8_mm, scaled_fp8_mm
// ---------------------------------------------------------------------------------------------

}  // namespace

// What differs between the two GEMMs (outside the anonymous namespace: Fp8Mma::mma is unused,
// without a warning, in builds for archs without mma .e4m3).
namespace w8a8_mma {
struct Int8Mma {
  using Elem = int8_t;
  using Acc = int32_t;
  using Params = ScaledInt8MmParams;
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  using WgmmaTile = ::torch_ext::quant::w8a8_wgmma::Int8Tile;
  static cudaError_t sm90(const Params& p, cudaStream_t stream) { return scaled_int8_mm_sm90(p, stream); }
  static cudaError_t sm90_tma(const Params& p, cudaStream_t stream) { return scaled_int8_mm_sm90_tma(p, stream); }
#endif
  static __host__ __device__ constexpr bool available() { return true; }
  static constexpr int kMinArch = 80;  // the project's minimum
  static __device__ __forceinline__ void mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
    mma_m16n8k32_s8(d, a, b);
  }
  static bool a_per_row(const Params&) { return true; }
};
struct Fp8Mma {
  using Elem = uint8_t;  // float8_e4m3fn bits
  using Acc = float;
  using Params = ScaledFp8MmParams;
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  using WgmmaTile = ::torch_ext::quant::w8a8_wgmma::Fp8Tile;
  static cudaError_t sm90(const Params& p, cudaStream_t stream) { return scaled_fp8_mm_sm90(p, stream); }
  static cudaError_t sm90_tma(const Params& p, cudaStream_t stream) { return scaled_fp8_mm_sm90_tma(p, stream); }
#endif
  static __host__ __device__ constexpr bool available() { return fp8_mma_available(); }
  // mma .e4m3: compute capability 8.9 (Ada) and later, and the kernel the driver picked must
  // come from compute_89+ code (a build without an sm_89+ target runs the sm_80 trap body even
  // on an sm_89 / sm_90 device).
  static constexpr int kMinArch = 89;
  // sm_90: widened to two fp16 mmas chained into d (see ix::f16_step_a_reg); elsewhere the
  // e4m3 mma itself.
  static __device__ __forceinline__ void mma(Acc (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900
    uint32_t a16[4][2], b16[2][2];
#pragma unroll
    for (int r = 0; r < 4; ++r) cvt_e4m3x4_to_f16x4(a[r], a16[r]);
#pragma unroll
    for (int r = 0; r < 2; ++r) cvt_e4m3x4_to_f16x4(b[r], b16[r]);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      uint32_t af[4], bf[2];
#pragma unroll
      for (int r = 0; r < 4; ++r) af[r] = a16[ix::f16_step_a_reg(h, r)][ix::f16_step_a_half(r)];
#pragma unroll
      for (int r = 0; r < 2; ++r) bf[r] = b16[ix::f16_step_b_reg(h)][ix::f16_step_b_half(r)];
      mma_m16n8k16_f16(d, af, bf);
    }
#else
    mma_m16n8k32_e4m3(d, a, b);
#endif
  }
  static bool a_per_row(const Params& p) { return p.a_scale_per_row; }
};
}  // namespace w8a8_mma

namespace {

using w8a8_mma::Fp8Mma;
using w8a8_mma::Int8Mma;

// The operands, then the grid and the copy path.
template <typename O, class Op>
struct MmArgs : MmOperands<typename Op::Elem, O> {
  int m_blocks, n_blocks, k_iters;
  bool vector;  // cp.async path (ix::mm_vectorizable)
};

// `bytes` (0..16) bytes from src, zeros after, as one 16-byte shared store: the unaligned path.
template <typename Elem>
__device__ __forceinline__ void copy_chunk_sync(unsigned char* dst, const Elem* src, int bytes) {
  uint32_t w[4] = {0, 0, 0, 0};
#pragma unroll
  for (int e = 0; e < ix::kChunkBytes; ++e)
    if (e < bytes) w[e / 4] |= uint32_t(uint8_t(src[e])) << (8 * (e % 4));
  *reinterpret_cast<uint4*>(dst) = make_uint4(w[0], w[1], w[2], w[3]);
}

template <typename O, class Cfg, class Op>
__device__ __forceinline__ void mm_cta(const MmArgs<O, Op>& p) {
  using Elem = typename Op::Elem;
  using Acc = typename Op::Acc;
  constexpr int kStages = Cfg::kStages;
  constexpr int kMI = Cfg::kMI, kNI = Cfg::kNI;
  constexpr int kRowsPerPass = Cfg::kThreads / ix::kChunksPerRow;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int warp_m = ix::warp_m_of(warp, Cfg::kWarpsN), warp_n = ix::warp_n_of(warp, Cfg::kWarpsN);
  const ix::TileCoord tile = ix::tile_of(blockIdx.x, p.m_blocks, p.n_blocks);
  const int m0 = int(tile.mb) * Cfg::kBM, n0 = int(tile.nb) * Cfg::kBN;

  // This thread's chunks: rows chunk_row(tid) + i * kRowsPerPass, column chunk_col(tid) (fixed).
  const int row0 = ix::chunk_row(tid), col = ix::chunk_col(tid);
  const Elem* a_src[Cfg::kAChunksPerThread];
  const Elem* b_src[Cfg::kBChunksPerThread];
#pragma unroll
  for (int i = 0; i < Cfg::kAChunksPerThread; ++i) {
    const int m = m0 + row0 + i * kRowsPerPass;
    a_src[i] = m < p.m ? p.a + int64_t(m) * p.a_row_stride + col * ix::kChunkBytes : nullptr;
  }
#pragma unroll
  for (int i = 0; i < Cfg::kBChunksPerThread; ++i) {
    const int n = n0 + row0 + i * kRowsPerPass;
    b_src[i] = n < p.n ? p.b + int64_t(n) * p.b_row_stride + col * ix::kChunkBytes : nullptr;
  }

  // One operand's chunks of a stage: rows row0 + i * kRowsPerPass of its tile, chunk `col`
  // (clipped at K; rows past M / N have a null source and are zero-filled from `base`).
  const auto load_operand = [&]<int kChunks>(const Elem* const (&src_rows)[kChunks], const Elem* base,
                                            unsigned char* tile, int iter) {
    const int k = iter * ix::kBK + col * ix::kChunkBytes;
#pragma unroll
    for (int i = 0; i < kChunks; ++i) {
      const int bytes = ix::chunk_bytes(k, p.k, src_rows[i] != nullptr);
      unsigned char* const dst = tile + ix::smem_offset(row0 + i * kRowsPerPass, col);
      const Elem* const src = bytes > 0 ? src_rows[i] + iter * ix::kBK : base;
      if (p.vector) {
        cp_async_16_partial(dst, src, bytes);
      } else {
        copy_chunk_sync(dst, src, bytes);
      }
    }
  };
  const auto load_stage = [&](int stage, int iter) {
    unsigned char* const sa = smem + stage * Cfg::kStageBytes;
    load_operand(a_src, p.a, sa, iter);
    load_operand(b_src, p.b, sa + Cfg::kBOffset, iter);
  };

  Acc acc[kMI][kNI][4];
  zero_accumulators(acc);

  const auto compute_stage = [&](int stage, int) {
    const unsigned char* const sa = smem + stage * Cfg::kStageBytes;
    const unsigned char* const sb = sa + Cfg::kBOffset;
#pragma unroll
    for (int ks = 0; ks < ix::kKSteps; ++ks) {
      uint32_t af[kMI][4], bf[kNI][2];
#pragma unroll
      for (int i = 0; i < kMI; ++i)
        ldmatrix_x4(af[i], sa + ix::smem_offset(ix::a_ldsm_row(warp_m, i, lane, Cfg::kWM), ix::a_ldsm_chunk(ks, lane)));
#pragma unroll
      for (int j = 0; j < kNI / 2; ++j)
        ldmatrix_x4_b_pair(bf[2 * j], bf[2 * j + 1],
                           sb + ix::smem_offset(ix::b_ldsm_row(warp_n, j, lane, Cfg::kWN), ix::b_ldsm_chunk(ks, lane)));
#pragma unroll
      for (int i = 0; i < kMI; ++i)
#pragma unroll
        for (int j = 0; j < kNI; ++j) Op::mma(acc[i][j], af[i], bf[j]);
    }
  };

  cp_async_pipeline<kStages>(0, p.k_iters, load_stage, compute_stage);

  // Epilogue: scales and bias of the thread's 2 kNI columns once, then its 2 kMI rows.
  float b_scale[kNI][2], bias[kNI][2];
#pragma unroll
  for (int j = 0; j < kNI; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int n = n0 + ix::acc_col(warp_n, j, lane, e, Cfg::kWN);
      const bool ok = n < p.n;
      b_scale[j][e] = ok ? __ldg(p.b_scale + ix::scale_index(n, p.per_channel)) : 0.f;
      bias[j][e] = ok && p.bias != nullptr ? __ldg(p.bias + n) : 0.f;
    }
#pragma unroll
  for (int i = 0; i < kMI; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int m = m0 + ix::acc_row(warp_m, i, lane, 2 * half, Cfg::kWM);
      if (m >= p.m) continue;
      const float a_scale = __ldg(p.a_scale + ix::scale_index(m, p.a_per_row));
      O* const out_row = p.out + int64_t(m) * p.out_row_stride;
#pragma unroll
      for (int j = 0; j < kNI; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int n = n0 + ix::acc_col(warp_n, j, lane, e, Cfg::kWN);
          if (!ix::output_in_bounds(m, n, p.m, p.n)) continue;
          const float v = ix::epilogue_value(acc[i][j][2 * half + e], a_scale, b_scale[j][e], p.bias != nullptr,
                                             bias[j][e]);
          out_row[n] = from_compute<O>(v);
        }
    }
}

template <typename O, class Cfg, class Op>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinCtas) mm_kernel(const MmArgs<O, Op> p) {
  if constexpr (Op::available()) {
    mm_cta<O, Cfg, Op>(p);
  } else {
    __trap();  // fp8 in a build for an arch without mma .e4m3; the launcher never gets here
  }
}

template <typename O, class Cfg, class Op>
cudaError_t launch_mm(const typename Op::Params& p, cudaStream_t stream) {
  MmArgs<O, Op> a{};
  fill_mm_operands(a, p, Op::a_per_row(p));
  a.m_blocks = int(ix::ceil_div(p.m, Cfg::kBM));
  a.n_blocks = int(ix::ceil_div(p.n, Cfg::kBN));
  a.k_iters = int(ix::ceil_div(p.k, ix::kBK));
  a.vector = ix::mm_vectorizable(reinterpret_cast<uintptr_t>(p.a), p.a_row_stride, reinterpret_cast<uintptr_t>(p.b),
                                 p.b_row_stride);
  const int64_t blocks = int64_t(a.m_blocks) * a.n_blocks;
  if (blocks > kMaxGrid) return cudaErrorInvalidValue;
  const auto kernel = mm_kernel<O, Cfg, Op>;
  if constexpr (Op::kMinArch > 80) {
    cudaFuncAttributes attributes{};
    const cudaError_t status = cudaFuncGetAttributes(&attributes, kernel);
    if (status != cudaSuccess) return status;
    if (attributes.ptxVersion < Op::kMinArch) return cudaErrorNotSupported;
  }
  if constexpr (Cfg::kSmemBytes > kDefaultSharedBytes) {
    const cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Cfg::kSmemBytes);
    if (status != cudaSuccess) return status;
  }
  kernel<<<unsigned(blocks), Cfg::kThreads, Cfg::kSmemBytes, stream>>>(a);
  return cudaGetLastError();
}

bool is_float_kind(ScalarKind kind) {
  return kind == ScalarKind::kFloat32 || kind == ScalarKind::kFloat16 || kind == ScalarKind::kBFloat16;
}

// The Hopper wgmma GEMM (quant/w8a8_wgmma.cu) for problems that fill the device, when this build
// has it and the device is compute capability 9.0, unless TORCH_EXT_WGMMA=0 is in the environment
// (read at every call, so one process can compare both kernels). Measured on an H100 (2026-11-26,
// docs/perf/gpu-h100.md), M = 4096, 8192 x 8192: int8 545 us against 948 us on mma.sync, e4m3
// 856 us against 1694 us; it passed tests/test_w8a8_hopper.py and the sanitizers there.
// TORCH_EXT_WGMMA_TMA=1 runs its copy-engine variant (2-CTA clusters, B multicast: quant/w8a8_wgmma_tma.cu),
// opt-in until it has run on a GPU.
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
template <class Op>
bool runs_wgmma(const typename Op::Params& p, int num_sms) {
  const bool vector = ix::mm_vectorizable(reinterpret_cast<uintptr_t>(p.a), p.a_row_stride,
                                          reinterpret_cast<uintptr_t>(p.b), p.b_row_stride);
  return ::torch_ext::quant::w8a8_wgmma::use_tile<typename Op::WgmmaTile>(p.m, p.n, num_sms, vector) &&
         hopper_kernel_enabled("TORCH_EXT_WGMMA", true);
}
#endif

// Validation and dispatch shared by scaled_int8_mm and scaled_fp8_mm. Order: invalid parameters,
// then (fp8) the device's compute capability, then empty outputs (no launch).
template <class Op>
cudaError_t scaled_mm(const typename Op::Params& p, cudaStream_t stream) {
  if (!is_float_kind(p.out_dtype) || p.m < 0 || p.n < 0 || p.k < 0 || p.m > kMaxMmDim || p.n > kMaxMmDim ||
      p.k > kMaxMmDim) {
    return cudaErrorInvalidValue;
  }
  const bool empty = p.m == 0 || p.n == 0;
  if (!empty && (p.a_scale == nullptr || p.b_scale == nullptr || p.out == nullptr ||
                 (p.k > 0 && (p.a == nullptr || p.b == nullptr)))) {
    return cudaErrorInvalidValue;
  }
  int device = 0;
  cudaError_t status = cudaSuccess;
  if constexpr (Op::kMinArch > 80) {
    int major = 0, minor = 0;
    status = cudaGetDevice(&device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
    if (status == cudaSuccess) status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
    if (status != cudaSuccess) return status;
    if (10 * major + minor < Op::kMinArch) return cudaErrorNotSupported;
  }
  if (empty) return cudaSuccess;
  int num_sms = 0;
  status = cudaGetDevice(&device);
  if (status == cudaSuccess) status = cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device);
  if (status != cudaSuccess) return status;
#if defined(TORCH_EXT_HAVE_SM90A_KERNELS)
  if (runs_wgmma<Op>(p, num_sms)) {
    // (K = 0 has no tensor map to describe: the cp.async kernel writes the epilogue of zero sums.
    // What the copy-engine variant cannot run, it answers with cudaErrorNotSupported before any
    // launch: no tensor-map entry point, operands its maps cannot describe (an expanded operand's
    // stride 0), registers or cluster size refused; the cp.async kernel then runs.)
    if (p.k > 0 && kernel_switch_on("TORCH_EXT_WGMMA_TMA", false)) {
      const cudaError_t status = Op::sm90_tma(p, stream);
      if (status != cudaErrorNotSupported) return status;
    }
    return Op::sm90(p, stream);
  }
#endif
  const bool large = ix::use_large_config(p.m, p.n, num_sms);
  status = cudaErrorInvalidValue;
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using O = decltype(tag);
    if constexpr (!std::is_same_v<O, double>) {
      status = large ? launch_mm<O, ix::LargeConfig, Op>(p, stream) : launch_mm<O, ix::SmallConfig, Op>(p, stream);
    }
  });
  return status;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

cudaError_t quantize_per_token(const QuantizePerTokenParams& p, cudaStream_t stream) {
  if (!is_float_kind(p.x_dtype) || p.rows < 0 || p.k < 0) return cudaErrorInvalidValue;
  if (p.rows == 0) return cudaSuccess;
  if (p.scale == nullptr || (p.k > 0 && (p.x == nullptr || p.q == nullptr))) return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) status = launch_quantize<T>(p, stream);
  });
  return status;
}

cudaError_t scaled_int8_mm(const ScaledInt8MmParams& p, cudaStream_t stream) {
  return scaled_mm<Int8Mma>(p, stream);
}

cudaError_t scaled_fp8_mm(const ScaledFp8MmParams& p, cudaStream_t stream) {
  return scaled_mm<Fp8Mma>(p, stream);
}

}  // namespace torch_ext::cuda
