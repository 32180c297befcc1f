// Host side of the copy engine's tensor copies (common/cuda/tma.cuh): the tensor map of a
// row-major tensor of up to 4 dimensions, read in boxes of box_rows rows of one 128-byte swizzle
// row each (and 1 along the outer dimensions), the shared layout the Hopper GEMMs' descriptors
// declare (common/wgmma_gemm_tile.h, section 2). The driver call is looked up through the runtime
// (no link against libcuda). No torch headers.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <cstdint>

namespace torch_ext::cuda {

// A tensor of dims[0] elements of elem_bytes (1 or 2) per row, dims[1] rows, then dims[2] and
// dims[3] (1 where unused); strides[i] = bytes between consecutive indices of dimension i + 1.
// Boxes reaching outside the tensor read zeros.
struct TensorMapShape {
  uint64_t dims[4];
  uint64_t strides[3];
};

inline cudaError_t make_swizzled_tensor_map(CUtensorMap* map, const void* base, const TensorMapShape& shape,
                                            uint32_t elem_bytes, uint32_t box_rows) {
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
  // What the copy engine cannot describe (cudaErrorNotSupported: the caller runs its cp.async
  // kernel): no entry point, an unaligned base, strides that are not multiples of 16, below the
  // extent of the dimension inside them (an expanded operand's stride 0) or 2^40 and above.
  if (encode == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return cudaErrorNotSupported;
  if (elem_bytes != 1 && elem_bytes != 2) return cudaErrorInvalidValue;
  for (const uint64_t dim : shape.dims)
    if (dim == 0) return cudaErrorInvalidValue;
  uint64_t inner_extent = shape.dims[0] * elem_bytes;
  for (int i = 0; i < 3; ++i) {
    const uint64_t stride = shape.strides[i];
    if (stride % 16 != 0 || stride < inner_extent || stride >= (uint64_t(1) << 40)) return cudaErrorNotSupported;
    inner_extent = stride * shape.dims[i + 1];
  }
  const cuuint32_t box[4] = {128 / elem_bytes, box_rows, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  const CUresult status = encode(
      map, elem_bytes == 1 ? CU_TENSOR_MAP_DATA_TYPE_UINT8 : CU_TENSOR_MAP_DATA_TYPE_UINT16, 4, const_cast<void*>(base),
      shape.dims, shape.strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return status == CUDA_SUCCESS ? cudaSuccess : cudaErrorNotSupported;
}

}  // namespace torch_ext::cuda
