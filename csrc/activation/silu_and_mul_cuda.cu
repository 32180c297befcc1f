// CUDA kernels of silu_and_mul and its backward.
//
// Purely memory-bound (3 element accesses per output, a handful of FLOPs), so the design is
// about bytes in flight: each thread moves 16-byte packs (8 fp16/bf16 or 4 fp32 per load),
// rows are spread over gridDim.y and column packs over gridDim.x, and math runs in fp32
// (fp64 for double inputs).
// The 16-byte path needs every row start aligned: d and the row strides multiples of the
// pack, base pointers 16-byte aligned. Any other shape runs the same kernel one element per
// step (kPack = 1), every access bounds-checked by the column loop.
#include <algorithm>

#include "activation/silu_and_mul_cuda.h"
#include "common/alignment.h"
#include "common/cuda/grid_limits.h"
#include "common/cuda/vec.cuh"

namespace torch_ext::cuda {
namespace {

// 128 threads: enough packs in flight per SM with several blocks resident, and a small
// block keeps a one-token row (d = 4096: 512 packs) spread over more SMs.
constexpr int kThreads = 128;

struct Forward {
  template <typename T, int kPack>
  __device__ static void apply(const SiluAndMulParams& p, int64_t row, int64_t col) {
    const T* gate = static_cast<const T*>(p.x) + row * p.x_row_stride + col;
    const T* up = gate + p.d;
    T* out = static_cast<T*>(p.out) + row * p.out_row_stride + col;
    if constexpr (kPack > 1) {
      const Pack16<T> g = load_pack16(gate), u = load_pack16(up);
      Pack16<T> y;
#pragma unroll
      for (int i = 0; i < kPack; ++i) y.v[i] = from_compute<T>(silu_mul(to_compute(g.v[i]), to_compute(u.v[i])));
      store_pack16(out, y);
    } else {
      *out = from_compute<T>(silu_mul(to_compute(*gate), to_compute(*up)));
    }
  }
  template <typename C>
  __device__ static C silu_mul(C g, C u) {
    return g / (C(1) + fast_exp(-g)) * u;
  }
};

struct Backward {
  template <typename T, int kPack>
  __device__ static void apply(const SiluAndMulBackwardParams& p, int64_t row, int64_t col) {
    const T* dy = static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride + col;
    const T* gate = static_cast<const T*>(p.x) + row * p.x_row_stride + col;
    const T* up = gate + p.d;
    T* d_gate = static_cast<T*>(p.grad_x) + row * p.grad_x_row_stride + col;
    T* d_up = d_gate + p.d;
    if constexpr (kPack > 1) {
      const Pack16<T> g = load_pack16(gate), u = load_pack16(up), y = load_pack16(dy);
      Pack16<T> dg, du;
#pragma unroll
      for (int i = 0; i < kPack; ++i)
        grad(to_compute(g.v[i]), to_compute(u.v[i]), to_compute(y.v[i]), dg.v[i], du.v[i]);
      store_pack16(d_gate, dg);
      store_pack16(d_up, du);
    } else {
      grad(to_compute(*gate), to_compute(*up), to_compute(*dy), *d_gate, *d_up);
    }
  }
  // silu'(g) = s + g * s * (1 - s) with s = sigmoid(g).
  template <typename C, typename T>
  __device__ static void grad(C g, C u, C dy, T& d_gate, T& d_up) {
    const C s = C(1) / (C(1) + fast_exp(-g));
    const C silu = g * s;
    d_up = from_compute<T>(dy * silu);
    d_gate = from_compute<T>(dy * u * (s + silu * (C(1) - s)));
  }
};

template <typename Op, typename T, int kPack, typename Params>
__global__ void __launch_bounds__(kThreads) rowwise_kernel(const Params p) {
  const int64_t packs_per_row = p.d / kPack;  // kPack divides d (see can_vectorize)
  for (int64_t row = blockIdx.y; row < p.rows; row += gridDim.y) {
    for (int64_t pack = int64_t(blockIdx.x) * kThreads + threadIdx.x; pack < packs_per_row;
         pack += int64_t(gridDim.x) * kThreads) {
      Op::template apply<T, kPack>(p, row, pack * kPack);
    }
  }
}

template <typename T>
bool can_vectorize(int64_t d, std::initializer_list<const void*> pointers, std::initializer_list<int64_t> strides) {
  constexpr int kPack = Pack16<T>::kSize;
  if (d % kPack != 0) return false;
  for (const void* ptr : pointers)
    if (!is_aligned(ptr, 16)) return false;
  for (int64_t stride : strides)
    if (stride % kPack != 0) return false;
  return true;
}

template <typename Op, typename T, int kPack, typename Params>
cudaError_t launch(const Params& p, cudaStream_t stream) {
  const int64_t packs_per_row = p.d / kPack;
  const dim3 grid(unsigned(std::min<int64_t>((packs_per_row + kThreads - 1) / kThreads, 1 << 16)),
                  unsigned(std::min<int64_t>(p.rows, kMaxGridYZ)));
  rowwise_kernel<Op, T, kPack><<<grid, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t silu_and_mul(const SiluAndMulParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    status = can_vectorize<T>(p.d, {p.x, p.out}, {p.x_row_stride, p.out_row_stride})
                 ? launch<Forward, T, Pack16<T>::kSize>(p, stream)
                 : launch<Forward, T, 1>(p, stream);
  });
  return status;
}

cudaError_t silu_and_mul_backward(const SiluAndMulBackwardParams& p, cudaStream_t stream) {
  if (p.rows == 0 || p.d == 0) return cudaSuccess;
  cudaError_t status = cudaSuccess;
  visit_storage_type(p.dtype, [&](auto tag) {
    using T = decltype(tag);
    status = can_vectorize<T>(p.d, {p.grad_out, p.x, p.grad_x},
                              {p.grad_out_row_stride, p.x_row_stride, p.grad_x_row_stride})
                 ? launch<Backward, T, Pack16<T>::kSize>(p, stream)
                 : launch<Backward, T, 1>(p, stream);
  });
  return status;
}

}  // namespace torch_ext::cuda
