// CPU kernels of silu_and_mul, compiled once per ISA level (see common/cpu/dispatch.h).
//
// Memory-bound: each element is read once and written once, so the work is split into
// column blocks of whole SIMD vectors spread over torch's threads, and all math runs in
// fp32 registers whatever the storage type.
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "activation/silu_and_mul.h"
#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

// Columns per task: 4 KiB of fp32 output, large enough to amortize scheduling, small enough
// that a single long row (decode: one token, d = 14336) still spreads over all cores.
constexpr int64_t kBlockColumns = 1024;
// Minimum elements per thread before splitting pays off (torch's own grain is 32768).
constexpr int64_t kMinElementsPerTask = 16384;

// Calls body(row, col_begin, col_end) over rows x [0, d) in column blocks, in parallel.
template <typename Body>
void for_each_block(int64_t rows, int64_t d, const Body& body) {
  const int64_t blocks_per_row = (d + kBlockColumns - 1) / kBlockColumns;
  const int64_t grain = std::max<int64_t>(1, kMinElementsPerTask / kBlockColumns);
  parallel_for(0, rows * blocks_per_row, grain, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t row = block / blocks_per_row;
      const int64_t col_begin = (block % blocks_per_row) * kBlockColumns;
      body(row, col_begin, std::min(d, col_begin + kBlockColumns));
    }
  });
}

inline VecF silu_mul(VecF gate, VecF up) { return gate * sigmoid(gate) * up; }

template <typename T>
void forward(const SiluAndMulParams& p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  for_each_block(p.rows, p.d, [&](int64_t row, int64_t begin, int64_t end) {
    const T* gate = x + row * p.x_row_stride;
    const T* up = gate + p.d;
    T* y = out + row * p.out_row_stride;
    if constexpr (std::is_same_v<T, double>) {
      // float64 serves reference checks and gradcheck: exact libm math, no SIMD.
      for (int64_t j = begin; j < end; ++j) y[j] = gate[j] / (1.0 + std::exp(-gate[j])) * up[j];
    } else {
      int64_t j = begin;
      for (; j + VecF::kWidth <= end; j += VecF::kWidth) store(y + j, silu_mul(load(gate + j), load(up + j)));
      if (j < end) {
        const int tail = int(end - j);
        store_partial(y + j, silu_mul(load_partial(gate + j, tail), load_partial(up + j, tail)), tail);
      }
    }
  });
}

// silu'(g) = s + g * s * (1 - s) with s = sigmoid(g).
inline void silu_mul_grad(VecF gate, VecF up, VecF dy, VecF& d_gate, VecF& d_up) {
  const VecF s = sigmoid(gate);
  const VecF silu = gate * s;
  d_up = dy * silu;
  d_gate = dy * up * fmadd(silu, broadcast(1.0f) - s, s);
}

template <typename T>
void backward(const SiluAndMulBackwardParams& p) {
  const T* grad_out = static_cast<const T*>(p.grad_out);
  const T* x = static_cast<const T*>(p.x);
  T* grad_x = static_cast<T*>(p.grad_x);
  for_each_block(p.rows, p.d, [&](int64_t row, int64_t begin, int64_t end) {
    const T* dy = grad_out + row * p.grad_out_row_stride;
    const T* gate = x + row * p.x_row_stride;
    const T* up = gate + p.d;
    T* d_gate = grad_x + row * p.grad_x_row_stride;
    T* d_up = d_gate + p.d;
    if constexpr (std::is_same_v<T, double>) {
      for (int64_t j = begin; j < end; ++j) {
        const double s = 1.0 / (1.0 + std::exp(-gate[j])), silu = gate[j] * s;
        d_up[j] = dy[j] * silu;
        d_gate[j] = dy[j] * up[j] * (s + silu * (1.0 - s));
      }
    } else {
      VecF dg, du;
      int64_t j = begin;
      for (; j + VecF::kWidth <= end; j += VecF::kWidth) {
        silu_mul_grad(load(gate + j), load(up + j), load(dy + j), dg, du);
        store(d_gate + j, dg);
        store(d_up + j, du);
      }
      if (j < end) {
        const int tail = int(end - j);
        silu_mul_grad(load_partial(gate + j, tail), load_partial(up + j, tail), load_partial(dy + j, tail), dg,
                      du);
        store_partial(d_gate + j, dg, tail);
        store_partial(d_up + j, du, tail);
      }
    }
  });
}

}  // namespace

void silu_and_mul(const SiluAndMulParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}
void silu_and_mul_backward(const SiluAndMulBackwardParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { backward<decltype(tag)>(p); });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
