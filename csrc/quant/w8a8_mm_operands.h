// The operands of a W8A8 GEMM launch as its kernels read them (shared by the mma.sync kernel of
// quant/w8a8_cuda.cu and the wgmma kernel of quant/w8a8_wgmma.cu), filled from the host
// parameters of scaled_int8_mm / scaled_fp8_mm (quant/w8a8.h). No torch headers.
#pragma once

#include <cstdint>

namespace torch_ext::cuda {

template <typename Elem, typename O>
struct MmOperands {
  const Elem* a;  // [m, k], unit column stride
  const Elem* b;  // [n, k], unit column stride
  int64_t a_row_stride, b_row_stride;
  const float* a_scale;
  const float* b_scale;
  const float* bias;  // nullptr: none
  O* out;
  int64_t out_row_stride;
  int m, n, k;       // below 2^31 (the launchers' limit)
  bool a_per_row;    // a_scale[m] (else a_scale[0])
  bool per_channel;  // b_scale[n] (else b_scale[0])
};

// Params: ScaledInt8MmParams or ScaledFp8MmParams; a_per_row from the op (int8: always).
template <typename Elem, typename O, class Params>
void fill_mm_operands(MmOperands<Elem, O>& o, const Params& p, bool a_per_row) {
  o.a = reinterpret_cast<const Elem*>(p.a);
  o.b = reinterpret_cast<const Elem*>(p.b);
  o.a_row_stride = p.a_row_stride;
  o.b_row_stride = p.b_row_stride;
  o.a_scale = p.a_scale;
  o.b_scale = p.b_scale;
  o.bias = p.bias;
  o.out = static_cast<O*>(p.out);
  o.out_row_stride = p.out_row_stride;
  o.m = int(p.m);
  o.n = int(p.n);
  o.k = int(p.k);
  o.a_per_row = a_per_row;
  o.per_channel = p.b_scale_per_channel;
}

}  // namespace torch_ext::cuda
