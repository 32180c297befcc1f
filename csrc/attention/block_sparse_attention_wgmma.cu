// Hopper forward of block-sparse attention (attention/block_sparse_attention_wgmma.h), sm_90a
// only: the mma.sync forward's CTA, key walk, masks, MoBA choices and online softmax
// (attention/block_sparse_attention_cuda_row.cuh), with both products on wgmma. The layouts and
// descriptors are host+device functions in attention/block_sparse_attention_cuda_index.h
// section 10, checked on the CPU by tests/cpp/block_sparse_attention_cuda_sim.cpp against a
// model of wgmma's addressing written from the PTX ISA.
//
// fwd_wgmma_kernel<T, D, kBlockQ>: warpgroup g owns query rows 64 g .. 64 g + 63 of the block
// (1 or 2 warpgroups: block_q 64 / 128); the threads are the mma.sync kernel's (4 warps per 64
// rows), so every per-lane map (rows, masks, softmax state, epilogue) is that kernel's.
//   - Q stays in shared memory (wgmma reads its A operand there): no Q fragments in registers, and
//     the tensor cores, not ldmatrix, move the K and V operands (the mma.sync forward spends one
//     ldmatrix.x4 on every two mmas: ncu had it at 40-44% SM throughput on the H100).
//   - Per 64-key step: S = Q K^T as D / 16 wgmma.m64n64k16 (K-major A and B), waited; mask and
//     online softmax on S's 32 accumulators per thread exactly as the mma.sync kernel; O rescaled;
//     O += P V as 4 wgmma.m64n<D>k16 with P straight from S's registers (acc_to_a) and V read
//     transposed from shared memory; waited. Nothing stays in flight across the loop's back-edge
//     (ptxas would serialize every wgmma, see quant/w8a8_wgmma.cu). Overlap comes from the other
//     warpgroups on the SM (block_q 64 at D = 128: 2 CTAs of one warpgroup per SM; block_q 128:
//     one CTA of two), not from within one.
//   - K / V of step t + 1 load (cp.async, zero-filled past the list / Sk) while step t computes;
//     copies land, are fenced into the async proxy, then a CTA barrier, as in the W8A8 kernel.
//   - Epilogue: a CTA barrier (the other warpgroup may still read its Q rows, whose bytes the
//     staging below overwrites), then the mma.sync kernel's store_warp_rows and lse.
#include "attention/block_sparse_attention_cuda_row.cuh"
#include "attention/block_sparse_attention_wgmma.h"
#include "common/cuda/wgmma.cuh"

namespace torch_ext::cuda {
namespace {

template <typename T, int kD, int kBlockQ>
__device__ __forceinline__ void fwd_wgmma_cta(const BlockSparseForwardParams& p) {
  using Tr = RowTraits<kD, kBlockQ, false>;
  constexpr bool kBf16 = std::is_same_v<T, BFloat16>;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  // The swizzle works on absolute address bits: tiles start on 1024-byte atoms (the launcher
  // asks for one atom more).
  const uint32_t base = aligned_shared_address(smem_raw, kWgmmaAtomBytes);
  unsigned char* const smem = align_shared_up(smem_raw, kWgmmaAtomBytes);

  const auto [tid, lane, warp, qb, h, b, q0, warp_row0, causal, selection, top_k, scale_log2] =
      row_place<kBlockQ>(p);
  const int warpgroup = warp / 4;

  const RowCta<T> c = row_cta_setup<T, Tr>(p, qb, b, h);
  // Group 0: Q; group 1: step 0.
  load_rows<T, kD, Tr::kThreads, Tr::kRowCopies, WgmmaLayout<kBlockQ>>(smem + Tr::kQOffset, bhsd_ptr<T>(p.q, b, h),
                                                                       p.q.seq_stride, q0, c.seq_q, tid);
  cp_async_commit();
  if (c.tiles > 0) load_kv_step<T, Tr, WgmmaLayout<ix::kTileKv>>(smem, c, 0, 0, tid);
  cp_async_commit();
  load_selection_table<Tr>(p, smem, qb, b, h, tid);
  // This warpgroup's 64 Q rows: rows 64 g.. of each column block.
  const uint32_t q_tile = base + Tr::kQOffset + warpgroup * ix::kWgmmaRows * kWgmmaSwizzleRowBytes;

  float o[Tr::kON][4];
  zero_accumulators(o);
  ix::RowState rs[2] = {ix::row_state_init(), ix::row_state_init()};
  const int q_pos[2] = {q0 + warp_row0 + ix::acc_row(lane, 0), q0 + warp_row0 + ix::acc_row(lane, 2)};

  for (int t = 0; t < c.tiles; ++t) {
    const int st = t % ix::kStages;
    cp_async_wait<0>();
    fence_proxy_async_shared();
    __syncthreads();  // step t landed for every thread; step t - 1's slot is free (its wgmma waited)
    if (t + 1 < c.tiles) load_kv_step<T, Tr, WgmmaLayout<ix::kTileKv>>(smem, c, t + 1, (t + 1) % ix::kStages, tid);
    cp_async_commit();

    const uint32_t k_tile = base + Tr::kStageOffset + st * Tr::kStageBytes;
    const uint32_t v_tile = k_tile + Tr::kKvBytes;
    float s[Tr::kSN][4];
    wgmma_fence();
#pragma unroll
    for (int k16 = 0; k16 < Tr::kK16; ++k16)
      wgmma_m64n64k16_ss<kBf16>(s, ix::wgmma_kmajor_desc<kBlockQ>(q_tile, k16),
                                ix::wgmma_kmajor_desc<ix::kTileKv>(k_tile, k16), k16 > 0);
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(s);

    const StepMask m = make_step_mask<Tr>(smem, c, st, q0 + warp_row0, warp_row0, lane, causal, top_k, selection);
    online_softmax_step<Tr>(s, o, rs, m, c, q_pos, causal, scale_log2, lane);

    // P as A fragments, all four k16 steps before the first wgmma: a register written between
    // wgmmas of one batch makes ptxas insert a fence before each (warning C7519).
    uint32_t pa[ix::kTileKv / 16][4];
#pragma unroll
    for (int kk = 0; kk < ix::kTileKv / 16; ++kk) acc_to_a<T>(pa[kk], s, kk);
    // O was rescaled and P written by ordinary instructions: pin both, then the wgmma fence
    // (CUTLASS's order), so the compiler cannot sink those writes past the fence.
    wgmma_fence_operands(o);
#pragma unroll
    for (int kk = 0; kk < ix::kTileKv / 16; ++kk) wgmma_fence_operands(pa[kk]);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < ix::kTileKv / 16; ++kk) {
      if constexpr (kD == 128) {
        wgmma_m64n128k16_rs<kBf16, true>(o, pa[kk], ix::wgmma_v_desc(v_tile, kk));
      } else {
        wgmma_m64n64k16_rs<kBf16, true>(o, pa[kk], ix::wgmma_v_desc(v_tile, kk));
      }
    }
    wgmma_commit();
    wgmma_wait<0>();
    wgmma_fence_operands(o);
  }
  cp_async_wait_all();  // only an empty group remains
  __syncthreads();      // every warpgroup's wgmma read its Q rows: the staging may overwrite them

  store_forward_rows<T, kD>(p, o, rs, smem + Tr::kQOffset, c, b, h, q0, warp_row0, q_pos, lane);
}

template <typename T, int kD, int kBlockQ>
__global__ void __launch_bounds__(RowTraits<kD, kBlockQ, false>::kThreads, 1)
    fwd_wgmma_kernel(const BlockSparseForwardParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  fwd_wgmma_cta<T, kD, kBlockQ>(p);
#else
  __trap();  // only compiled for sm_90a; the launcher runs it on compute capability 9.0 only
#endif
}

template <typename T, int kD, int kBlockQ>
cudaError_t launch(const BlockSparseForwardParams& p, cudaStream_t stream) {
  const int smem = ix::wgmma_forward_smem_bytes<kD, kBlockQ>(p.selection.blocks != nullptr ? p.selection.top_k : 0);
  const auto kernel = fwd_wgmma_kernel<T, kD, kBlockQ>;
  const cudaError_t status = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (status != cudaSuccess) return status;
  const dim3 grid(unsigned(ix::ceil_div(p.seq_q, kBlockQ)), unsigned(p.heads_q), unsigned(p.batch));
  kernel<<<grid, RowTraits<kD, kBlockQ, false>::kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename T, int kD>
cudaError_t launch_block_q(const BlockSparseForwardParams& p, cudaStream_t stream) {
  return p.block_q == 64 ? launch<T, kD, 64>(p, stream) : launch<T, kD, 128>(p, stream);
}

}  // namespace

cudaError_t block_sparse_attention_forward_sm90(const attention::BlockSparseForwardParams& p, cudaStream_t stream) {
  if (p.dtype == ScalarKind::kFloat16) {
    return p.head_dim == 64 ? launch_block_q<Half, 64>(p, stream) : launch_block_q<Half, 128>(p, stream);
  }
  return p.head_dim == 64 ? launch_block_q<BFloat16, 64>(p, stream) : launch_block_q<BFloat16, 128>(p, stream);
}

}  // namespace torch_ext::cuda
