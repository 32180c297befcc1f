// Host side of the copy engine's tensor copies (common/cuda/tma.cuh): the tensor map of a
// row-major 2-D byte matrix, read in boxes whose rows are one 128-byte swizzle row, the shared
// layout the Hopper GEMMs' descriptors declare (common/wgmma_gemm_tile.h, section 2). The driver
// call is looked up through the runtime (no link against libcuda). No torch headers.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace torch_ext::cuda {

// The tensor map of `rows` rows of `row_bytes` bytes, `row_stride` bytes apart, starting at base
// (16-byte aligned, row_stride a multiple of 16: what the copy engine requires), read in boxes
// of box_rows x 128 bytes with the 128-byte swizzle; outside the matrix the boxes read zeros.
inline cudaError_t make_swizzled_byte_matrix_map(CUtensorMap* map, const void* base, uint64_t row_bytes,
                                                 uint64_t rows, uint64_t row_stride, uint32_t box_rows) {
  static PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      fn = nullptr;
      (void)cudaGetLastError();  // a failed lookup must not surface at the caller's next launch check
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  if (encode == nullptr) return cudaErrorNotSupported;
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || row_stride % 16 != 0 || rows == 0 || row_bytes == 0) {
    return cudaErrorInvalidValue;
  }
  const cuuint64_t dims[2] = {row_bytes, rows};
  const cuuint64_t strides[1] = {row_stride};
  const cuuint32_t box[2] = {128, box_rows};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult status =
      encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
             CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return status == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
}

}  // namespace torch_ext::cuda
