// Index math of the Hopper W8A8 GEMM (quant/w8a8_wgmma.cu, sm_90a: wgmma), host+device so that
// tests/cpp/w8a8_wgmma_sim.cpp runs on the CPU what the GPU runs: the tile shape and the choice
// of this kernel, the global -> shared chunk map into the 128-byte-swizzled K-major layout that
// wgmma reads, the shared-memory matrix descriptors and their per-k-step advance, the
// accumulator -> output map, and the pipeline's slot rule. Tail predicates, the CTA order, the
// scale indexing and the epilogue rounding are scaled_int8_mm's (quant/w8a8_cuda_index.h), so
// both GEMMs give the same bits for int8.
#pragma once

#include <cstdint>

#include "common/macros.h"
#include "common/wgmma_gemm_tile.h"
#include "quant/w8a8_cuda_index.h"

namespace torch_ext::quant {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace w8a8_wgmma {

using w8a8_cuda::ceil_div;
using w8a8_cuda::kChunkBytes;

// The shared Hopper GEMM tile (common/wgmma_gemm_tile.h): 128 x kBN per CTA of 2 warpgroups,
// 128-byte K stages, the swizzled copy map, descriptors and accumulator map.
using namespace ::torch_ext::wgmma_gemm;

// =============================================================================================
// 1. Tiles (the CTA shape and the pipeline: common/wgmma_gemm_tile.h). The widths, and why:
//    - int8 (Int8Tile, kBN = 256): n256 is wgmma's widest, so A's 64 x 32 bytes from shared
//      memory feed the most MACs, and 128 x 256 per CTA moves (1/256 + 1/128) bytes from L2 per
//      MAC, 1.5x less than 128 x 128 (at H100's ~1000 TMAC/s still ~12 TB/s from L2 over all
//      SMs, so the CTA order keeps strips L2-resident: w8a8_cuda::tile_of, 8 m blocks per
//      group). 128 s32 accumulators per thread, exact.
//    - e4m3 (Fp8Tile, kBN = 128): Hopper's fp8 wgmma keeps only about 14 mantissa bits while
//      it accumulates (DeepSeek-V3 report, section 3.3.2), so each 128-deep k block goes into a
//      fresh accumulator that is then added into fp32 registers ("promotion"), two such
//      accumulators in turn so that one batch runs while the other is added: 64 + 2 x 64
//      registers per thread at n128, where n256 would need 384.
//    - K stages of 128 bytes hold 128 int8 / e4m3 values: int8 4 x 48 KB, fp8 6 x 32 KB.
// =============================================================================================

using Int8Tile = WgmmaTile<256, false>;
using Fp8Tile = WgmmaTile<128, true>;

// This kernel when the operands take 16-byte copies and the grid of 128 x kBN tiles gives every
// SM at least one CTA; smaller problems (decode) keep scaled_int8_mm's tiles, which spread B's
// stream over more SMs.
template <class Tile>
TORCH_EXT_HOST_DEVICE bool use_tile(int64_t m, int64_t n, int64_t num_sms, bool vectorizable) {
  return vectorizable && ceil_div(m, kBM) * ceil_div(n, Tile::kBN) >= num_sms;
}

}  // namespace w8a8_wgmma
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::quant
