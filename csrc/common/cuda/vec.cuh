// Device helpers shared by the CUDA kernels: storage-type conversions and 16-byte packs.
// CUDA-only (included from .cu files); no torch headers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/dtype.h"

namespace torch_ext::cuda {

// Kernels load storage types (float, Half, BFloat16, double) and compute in compute_t<T>:
// fp32 for every type but double, which stays double (reference checks, gradcheck).
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

__device__ __forceinline__ float to_compute(float x) { return x; }
__device__ __forceinline__ double to_compute(double x) { return x; }
__device__ __forceinline__ float to_compute(Half x) { return __half2float(__ushort_as_half(x.bits)); }
__device__ __forceinline__ float to_compute(BFloat16 x) { return __bfloat162float(__ushort_as_bfloat16(x.bits)); }

template <typename T>
__device__ __forceinline__ T from_compute(compute_t<T> x);
template <>
__device__ __forceinline__ float from_compute<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_compute<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ Half from_compute<Half>(float x) {
  return Half{__half_as_ushort(__float2half_rn(x))};
}
template <>
__device__ __forceinline__ BFloat16 from_compute<BFloat16>(float x) {
  return BFloat16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
}

// e^x: the fast SFU approximation in fp32 (2 ulp plus range effects), exact libm in fp64.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Two fp32 values rounded to T (Half / BFloat16) in one 32-bit register, `lo` in the low half: the
// element order of an mma.m16n8k16 fragment register (k 2t in the low half, 2t + 1 in the high).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack_pair<Half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack_pair<BFloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// kSize elements of T in one 16-byte register group: the unit of a 128-bit load or store.
template <typename T>
struct alignas(16) Pack16 {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// 128-bit load through the read-only path; p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ Pack16<T> load_pack16(const T* p) {
  const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
  Pack16<T> pack;
  static_assert(sizeof(pack) == sizeof(raw), "a pack is 16 bytes");
  __builtin_memcpy(&pack, &raw, sizeof(raw));
  return pack;
}

template <typename T>
__device__ __forceinline__ void store_pack16(T* p, const Pack16<T>& pack) {
  *reinterpret_cast<Pack16<T>*>(p) = pack;
}

// The first `len` (0..kSize) elements at p, zeros after: one 128-bit load when `vector` (p
// 16-byte aligned) and the pack is whole, else element loads that never touch p[len..]. The
// tail / unaligned loader of row-chunked kernels.
template <typename T>
__device__ __forceinline__ Pack16<T> load_pack16_partial(const T* p, int len, bool vector) {
  if (vector && len == Pack16<T>::kSize) return load_pack16(p);
  Pack16<T> pack;
#pragma unroll
  for (int e = 0; e < Pack16<T>::kSize; ++e) pack.v[e] = e < len ? p[e] : T{0};
  return pack;
}

}  // namespace torch_ext::cuda
