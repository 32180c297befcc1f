// Shared-memory matrix descriptors of Hopper's wgmma (PTX ISA, "Matrix Descriptor Format"),
// host+device so that the simulators in tests/cpp check the kernels' operand addressing on the
// CPU: bits 0-13 start address >> 4, 16-29 leading-dimension byte offset >> 4, 32-45
// stride-dimension byte offset >> 4, 49-51 base offset (0: atoms 1024-byte aligned), 62-63
// swizzle mode (1 = 128-byte). Used by common/wgmma_gemm_tile.h, quant/weight_only_cuda_index.h
// and attention/block_sparse_attention_cuda_index.h.
//
// With the 128-byte swizzle every operand row is 128 bytes and 8 rows make a 1024-byte atom,
// 16-byte chunk c of row r stored at chunk c ^ (r % 8):
//   K-major (rows along M / N, K inside a row): 8-row groups kWgmmaAtomBytes apart (SBO); one
//     instruction's K slice (32 bytes) lies inside a row, so the leading offset is unused (16
//     bytes, i.e. 1, as CUTLASS encodes it); k step s starts 32 s bytes into the row.
//   MN-major (16-bit operands read transposed: rows along K, M / N inside a row): 64-element
//     column blocks LBO apart, 8-row K groups SBO apart (CUTLASS's canonical
//     ((T, 8, m), (8, k)) : ((1, T, LBO), (8T, SBO)) layout).
#pragma once

#include <cstdint>

#include "common/macros.h"

namespace torch_ext {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

constexpr int kWgmmaSwizzleRowBytes = 128;
constexpr int kWgmmaAtomBytes = 8 * kWgmmaSwizzleRowBytes;

TORCH_EXT_HOST_DEVICE uint64_t wgmma_sw128_desc(uint32_t shared_address, uint32_t leading_bytes,
                                                uint32_t stride_bytes) {
  return uint64_t((shared_address & 0x3FFFF) >> 4) | (uint64_t(leading_bytes >> 4) << 16) |
         (uint64_t(stride_bytes >> 4) << 32) | (uint64_t(1) << 62);
}
// A K-major operand whose 8-row groups are contiguous atoms.
TORCH_EXT_HOST_DEVICE uint64_t wgmma_kmajor_sw128_desc(uint32_t shared_address) {
  return wgmma_sw128_desc(shared_address, 16, kWgmmaAtomBytes);
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext
