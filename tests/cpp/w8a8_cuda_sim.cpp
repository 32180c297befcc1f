// CPU simulation of the CUDA W8A8 kernels (csrc/quant/w8a8_cuda.cu).
//
// No GPU here or in CI, so this program runs the kernels' logic on the CPU with the very
// host-device functions they call (csrc/quant/w8a8_cuda_index.h) and checks them against
// independent definitions (the PTX fragment layouts of mma.m16n8k32 .s8 and of ldmatrix, plain
// references):
//  (a) quantize_kernel thread by thread on random rows (fp32 / fp16 / bf16, both row-group
//      variants, rows longer than the register cache, unaligned x and row strides, odd q
//      offsets, clip, zero rows, exact .5 ties): every load in bounds and, on the vector path,
//      16-byte aligned, every q byte written once, q and scale bit for bit against the CPU
//      kernel's formula;
//  (b) mm_kernel thread by thread on random small problems (odd M, N, K including 0, both tile
//      configs, per-tensor / per-channel scales, bias or not, fp32 / fp16 / bf16 out, aligned and
//      unaligned A / B): every cp.async / byte copy (bounds, alignment, zero fill), a shared-memory
//      model that checks each read against the pipeline's commit / wait / barrier order,
//      ldmatrix (addresses, bank conflicts) and an integer model of mma.m16n8k32 assembled from
//      the PTX fragment maps, the epilogue; out must equal float(exact int64 dot) * a_scale *
//      b_scale + bias rounded once, every output written once and nothing else touched;
//  (c) the same mm_kernel as scaled_fp8_mm (Op = Fp8Mma: e4m3 operands, fp32 accumulators):
//      the same thread-by-thread run with a model of mma.m16n8k32 .e4m3 assembled from the same
//      fragment maps and an independent e4m3 decoding; the in-mma fp32 summation is
//      implementation-defined, so the model picks per case one rounding per mma, sequential
//      fp32 adds in a random order, or the kernel's sm_90 path (e4m3 widened to fp16 and
//      regrouped by ix::f16_step_*, two mma.m16n8k16 f16 from the PTX maps), and out is
//      compared with a double reference
//      under an error bound (k u sum |products| through the scales, the epilogue roundings and
//      the output rounding); bitwise where every partial sum is exact in fp32 (small integer
//      operands); NaN operands (0x7F / 0xFF) must give NaN in their row / column and only
//      there; per-row or per-tensor a_scale;
//  (d) the CTA order (a bijection onto the tiles), the config rule, e4m3 decoding of all 256
//      codes against an independent definition;
//  (e) the Hopper wgmma_mm_kernel (csrc/quant/w8a8_wgmma_index.h) on every aligned problem of
//      (b) and (c): its copies into 128-byte-swizzled stages, its ring (a slot refilled only
//      after the wgmma batch that read it completed), each wgmma's operands read through the
//      descriptors it builds with a model of the PTX descriptor and swizzle, its epilogue walk
//      against the PTX accumulator layout of m64nN; the same output checks as (b) / (c).
// Usage: w8a8_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

#include "quant/int8_outliers_index.h"
#include "quant/w8a8_cuda_index.h"
#include "quant/w8a8_wgmma_index.h"
#include "mma_spec.h"
#include "sim_common.h"

using namespace torch_ext;
namespace ix = torch_ext::quant::w8a8_cuda;
namespace ox = torch_ext::quant::int8_outliers;

std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------
// Independent definitions (mma_spec.h): PTX ISA "Matrix Fragments for mma.m16n8k32" (.s8 and
// .e4m3), "... for mma.m16n8k16" (.f16, the sm_90 fp8 path) and ldmatrix.
// ---------------------------------------------------------------------------------------------
using spec = mma_spec::M16n8k32;
using spec16 = mma_spec::M16n8k16;
using mma_spec::ldmatrix_x4;

// mma.m16n8k32.row.col.s32.s8.s8.s32 on int64 (no overflow in the small problems; checked).
void mma(int64_t (&c)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  int A[16][32], B[32][8];
  mma_spec::assemble_operands<spec>(
      A, B, [&](int lane, int i) { return int(int8_t(mma_spec::element_bits<spec>(a[lane], i))); },
      [&](int lane, int i) { return int(int8_t(mma_spec::element_bits<spec>(b[lane], i))); });
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      c[lane][i] += mma_spec::accumulator_dot<spec>(A, B, lane, i, int64_t(0));
      CHECK(c[lane][i] >= INT32_MIN && c[lane][i] <= INT32_MAX);
    }
}

// float8_e4m3fn, from the OCP definition: (-1)^s 2^(e - 7) (1 + m / 8), e = 0: 2^-6 m / 8;
// s 1111 111 NaN.
double spec_e4m3(uint8_t bits) {
  const int s = bits >> 7, e = (bits >> 3) & 15, m = bits & 7;
  if (e == 15 && m == 7) return NAN;
  const double mag = e == 0 ? std::ldexp(m / 8.0, -6) : std::ldexp(1.0 + m / 8.0, e - 7);
  return s ? -mag : mag;
}

// mma.m16n8k32.row.col.f32.e4m3.e4m3.f32 (same fragment maps as .s8). Products are exact in
// double and so is their sum over 32 (magnitudes 2^-18..2^17.6). Rounding model g_fp8_model:
// 0: d = fp32(c + exact sum), one rounding; 1: sequential fp32 adds of c and the 32 products in
// a random order, as a different summation tree might do; 2: the kernel's sm_90 path (below).
int g_fp8_model = 0;
// sm_90: each e4m3 register widened to two f16x2 (bytes 0, 1 -> half-register 0 with byte 0 low;
// exact), registers regrouped by ix::f16_step_* and two mma.m16n8k16 f16 chained into c (one
// fp32 rounding each). A wrong regrouping pairs different k of A and B: the exact cases catch it.
void mma_fp8_via_f16(float (&c)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  for (int h = 0; h < 2; ++h) {
    double A[16][16], B[16][8];
    mma_spec::assemble_operands<spec16>(
        A, B,
        [&](int lane, int i) {
          const int r = i / 2, byte = 2 * ix::f16_step_a_half(r) + i % 2;
          return spec_e4m3(uint8_t(a[lane][ix::f16_step_a_reg(h, r)] >> (8 * byte)));
        },
        [&](int lane, int i) {
          const int r = i / 2, byte = 2 * ix::f16_step_b_half(r) + i % 2;
          return spec_e4m3(uint8_t(b[lane][ix::f16_step_b_reg(h)] >> (8 * byte)));
        });
    mma_spec::mma_round_once<spec16>(c, A, B);
  }
}
void mma_fp8(float (&c)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  if (g_fp8_model == 2) {
    mma_fp8_via_f16(c, a, b);
    return;
  }
  double A[16][32], B[32][8];
  mma_spec::assemble_operands<spec>(
      A, B, [&](int lane, int i) { return spec_e4m3(uint8_t(mma_spec::element_bits<spec>(a[lane], i))); },
      [&](int lane, int i) { return spec_e4m3(uint8_t(mma_spec::element_bits<spec>(b[lane], i))); });
  for (int lane = 0; lane < 32; ++lane)
    for (int i = 0; i < 4; ++i) {
      double prod[32];
      for (int k = 0; k < 32; ++k) prod[k] = A[spec::c_row(lane, i)][k] * B[k][spec::c_col(lane, i)];
      if (g_fp8_model == 0) {
        double s = c[lane][i];
        for (int k = 0; k < 32; ++k) s += prod[k];
        c[lane][i] = float(s);
      } else {
        int order[33];
        for (int k = 0; k < 33; ++k) order[k] = k;
        std::shuffle(order, order + 33, rng);
        float s = 0.f;
        bool first = true;
        for (int k : order) {
          const float term = k == 32 ? c[lane][i] : float(prod[k]);  // products exact in fp32
          CHECK(k == 32 || std::isnan(prod[k]) || double(term) == prod[k]);
          s = first ? term : s + term;
          first = false;
        }
        c[lane][i] = s;
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Element types
// ---------------------------------------------------------------------------------------------
template <typename T>
T store_of(float f) {
  return from_float<T>(f);
}
template <typename T>
uint32_t bits_of(T v) {
  if constexpr (std::is_same_v<T, float>) {
    return float_as_bits(v);
  } else {
    return v.bits;
  }
}
const char* name_of(int kind) { return kind == 0 ? "fp32" : (kind == 1 ? "fp16" : "bf16"); }

// ---------------------------------------------------------------------------------------------
// (a) quantize_kernel
// ---------------------------------------------------------------------------------------------
template <typename T>
void sim_quantize(int64_t rows, int64_t k, int64_t x_off, int64_t x_stride, int64_t q_off, float clip) {
  constexpr int kBytes = int(sizeof(T));
  const int V = ix::quant_chunk_values(kBytes);
  CHECK(V == 16 / kBytes);
  // x: values of a few kinds (ties at .5 when the row max is 127, zero rows, tiny / huge).
  std::vector<T> x(size_t(x_off + std::max<int64_t>(0, rows - 1) * x_stride + k + 8));
  std::vector<float> xf(x.size(), 0.f);
  for (size_t i = 0; i < x.size(); ++i) x[i] = store_of<T>(0.f);
  for (int64_t r = 0; r < rows; ++r) {
    const int kind = int(rnd(0, 5));
    for (int64_t c = 0; c < k; ++c) {
      float v = 0.f;
      if (kind == 0) {
        v = 0.f;  // zero row
      } else if (kind == 1) {
        v = float(rnd(-254, 254)) * 0.5f;  // ties when |max| = 127
      } else if (kind == 2) {
        v = std::ldexp(float(rnd(-1000, 1000)), int(rnd(-30, 5)));
      } else {
        v = float(std::uniform_real_distribution<double>(-4.0, 4.0)(rng));
      }
      const size_t at = size_t(x_off + r * x_stride + c);
      x[at] = store_of<T>(v);
      xf[at] = to_float(x[at]);
    }
    if (kind == 1 && k > 0) {
      const size_t at = size_t(x_off + r * x_stride + rnd(0, k - 1));
      x[at] = store_of<T>(rnd(0, 1) ? 127.f : -127.f);
      xf[at] = to_float(x[at]);
    }
  }
  // int8_linear's zero mask (half the cases): random columns count as 0
  std::vector<uint32_t> mask;
  if (rnd(0, 1) == 1) {
    mask.assign(size_t(ox::mask_words(k)), 0u);
    for (int64_t c = 0; c < k; ++c)
      if (rnd(0, 4) == 0) mask[size_t(c / 32)] |= 1u << (c % 32);
  }
  const auto masked = [&](int64_t c) { return !mask.empty() && ((mask[size_t(c / 32)] >> (c % 32)) & 1u); };
  // reference (the CPU kernel's formula)
  std::vector<int8_t> q_ref(size_t(rows * k));
  std::vector<float> scale_ref(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) {
    float amax = 0.f;
    for (int64_t c = 0; c < k; ++c) amax = std::max(amax, masked(c) ? 0.f : std::fabs(xf[size_t(x_off + r * x_stride + c)]));
    if (clip > 0.f) amax = std::min(amax, clip);
    const float scale = amax > 0.f ? amax / 127.0f : 1.0f;
    scale_ref[size_t(r)] = scale;
    for (int64_t c = 0; c < k; ++c) {
      const float v = masked(c) ? 0.f : std::nearbyint(xf[size_t(x_off + r * x_stride + c)] / scale);
      q_ref[size_t(r * k + c)] = int8_t(std::clamp(v, -128.0f, 127.0f));
    }
  }

  // the kernel
  const bool vector = ix::quant_x_vectorizable(uint64_t(x_off) * kBytes, x_stride, kBytes);
  const int group = ix::quant_group_threads(k, kBytes);
  CHECK(group == 32 || group == ix::kQuantThreads);
  const int rows_per_cta = ix::quant_rows_per_cta(group);
  const int64_t blocks = ix::ceil_div(rows, rows_per_cta);
  const int64_t chunks = ix::ceil_div(k, V);
  std::vector<int8_t> q(size_t(q_off + rows * k + 16), int8_t(0x5A));
  std::vector<int> q_count(q.size(), 0);
  std::vector<float> scale(size_t(rows), NAN);
  std::vector<int> scale_count(size_t(rows), 0);
  std::vector<int> chunk_seen(static_cast<size_t>(chunks));

  const auto load_chunk = [&](int64_t row, int64_t c, float (&v)[8]) {
    const int len = ix::quant_chunk_len(c, V, k);
    CHECK(len >= 1 && len <= V);
    const int64_t src = x_off + row * x_stride + c * V;
    if (vector && len == V) CHECK((uint64_t(src) * kBytes) % 16 == 0);
    const uint32_t zero = mask.empty() ? 0u : ox::chunk_zero_bits(mask.data(), c * V, V);
    for (int e = 0; e < V; ++e) {
      CHECK(((zero >> e) & 1u) == (e < len && masked(c * V + e) ? 1u : 0u));
      if (e < len) {
        CHECK(c * V + e < k && row < rows && src + e >= 0 && src + e < int64_t(x.size()));
        v[e] = (zero >> e) & 1u ? 0.f : to_float(x[size_t(src + e)]);
      } else {
        v[e] = 0.f;
      }
    }
  };
  for (int64_t bx = 0; bx < blocks; ++bx) {
    for (int local = 0; local < rows_per_cta; ++local) {
      const int64_t row = bx * rows_per_cta + local;
      if (row >= rows) {
        CHECK(group == 32);  // only the warp variant has rows past the end (and no barrier)
        continue;
      }
      std::fill(chunk_seen.begin(), chunk_seen.end(), 0);
      // pass 1, per thread of the group
      std::vector<float> partial(static_cast<size_t>(group), 0.f);
      std::vector<std::vector<std::array<float, 8>>> cache(static_cast<size_t>(group));
      for (int j = 0; j < group; ++j) {
        float amax = 0.f;
        for (int i = 0; i < ix::kQuantPacks; ++i) {
          const int64_t c = ix::quant_chunk(j, i, group);
          if (c < chunks) {
            float v[8];
            load_chunk(row, c, v);
            ++chunk_seen[size_t(c)];
            std::array<float, 8> pack;
            std::copy(v, v + 8, pack.begin());
            cache[size_t(j)].push_back(pack);
            for (int e = 0; e < V; ++e) amax = std::fmax(amax, std::fabs(v[e]));
          }
        }
        for (int64_t c = ix::quant_chunk(j, ix::kQuantPacks, group); c < chunks; c += group) {
          float v[8];
          load_chunk(row, c, v);
          ++chunk_seen[size_t(c)];
          for (int e = 0; e < V; ++e) amax = std::fmax(amax, std::fabs(v[e]));
        }
        partial[size_t(j)] = amax;
      }
      for (int64_t c = 0; c < chunks; ++c) CHECK(chunk_seen[size_t(c)] == 1);  // every chunk once
      // warp shuffles (xor butterfly), then the warp maxima for the CTA variant
      for (int w = 0; w < group / 32; ++w)
        for (int offset = 16; offset > 0; offset /= 2) {
          std::vector<float> next(32);
          for (int l = 0; l < 32; ++l)
            next[size_t(l)] = std::fmax(partial[size_t(32 * w + l)], partial[size_t(32 * w + (l ^ offset))]);
          for (int l = 0; l < 32; ++l) partial[size_t(32 * w + l)] = next[size_t(l)];
        }
      float amax = partial[0];
      if (group > 32) {
        CHECK(group / 32 == ix::kQuantWarps);
        amax = 0.f;
        for (int w = 0; w < ix::kQuantWarps; ++w) amax = std::fmax(amax, partial[size_t(32 * w)]);
      }
      for (int j = 0; j < group; ++j)
        if (group == 32) CHECK(partial[size_t(j)] == amax);
      const float s = ix::quant_row_scale(amax, clip);
      scale[size_t(row)] = s;
      ++scale_count[size_t(row)];
      // pass 2
      for (int j = 0; j < group; ++j) {
        const auto store = [&](int64_t c, const float* v) {
          const int len = ix::quant_chunk_len(c, V, k);
          const int64_t dst = q_off + row * k + c * V;
          const bool vec = ix::quant_q_store_vector(uint64_t(dst), len, V);
          if (vec) CHECK(dst % V == 0 && len == V);
          for (int e = 0; e < (vec ? V : len); ++e) {
            CHECK(c * V + e < k && dst + e < int64_t(q.size()) - 16);
            q[size_t(dst + e)] = ix::quant_value(v[e], s);
            ++q_count[size_t(dst + e)];
          }
        };
        for (int i = 0; i < ix::kQuantPacks; ++i) {
          const int64_t c = ix::quant_chunk(j, i, group);
          if (c < chunks) store(c, cache[size_t(j)][size_t(i)].data());
        }
        for (int64_t c = ix::quant_chunk(j, ix::kQuantPacks, group); c < chunks; c += group) {
          float v[8];
          load_chunk(row, c, v);
          store(c, v);
        }
      }
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    CHECK(scale_count[size_t(r)] == 1);
    if (float_as_bits(scale[size_t(r)]) != float_as_bits(scale_ref[size_t(r)])) {
      fprintf(stderr, "quantize %s row %lld: scale %a want %a\n", name_of(kBytes == 4 ? 0 : 1), (long long)r,
              scale[size_t(r)], scale_ref[size_t(r)]);
      abort();
    }
  }
  for (size_t i = 0; i < q.size(); ++i) {
    const int64_t rel = int64_t(i) - q_off;
    if (rel >= 0 && rel < rows * k) {
      CHECK(q_count[i] == 1);
      if (q[i] != q_ref[size_t(rel)]) {
        fprintf(stderr, "quantize row %lld col %lld: q %d want %d (x %a scale %a)\n", (long long)(rel / k),
                (long long)(rel % k), q[i], q_ref[size_t(rel)], xf[size_t(x_off + rel / k * x_stride + rel % k)],
                scale_ref[size_t(rel / k)]);
        abort();
      }
    } else {
      CHECK(q_count[i] == 0 && q[i] == int8_t(0x5A));
    }
  }
}

void check_quantize_case() {
  const int kind = int(rnd(0, 2));
  const int bytes = kind == 0 ? 4 : 2;
  const int64_t rows = rnd(1, 20);
  int64_t k;
  const int size_kind = int(rnd(0, 3));
  if (size_kind == 0) {
    k = rnd(0, 40);
  } else if (size_kind == 1) {
    k = rnd(1, 3000);
  } else if (size_kind == 2) {  // near the warp / CTA threshold
    k = ix::kQuantWarpRowBytes / bytes + rnd(-9, 9);
  } else {  // past the register cache of the CTA variant
    k = int64_t(ix::kQuantThreads) * ix::kQuantPacks * (16 / bytes) + rnd(-20, 3000);
  }
  const bool aligned = rnd(0, 2) != 0;
  const int V = 16 / bytes;
  const int64_t x_off = aligned ? V * rnd(0, 2) : rnd(0, 9);
  const int64_t x_stride = aligned ? (k + V - 1) / V * V + V * rnd(0, 2) : k + rnd(0, 9);
  const int64_t q_off = rnd(0, 1) ? 0 : rnd(0, 9);
  const float clip = rnd(0, 2) == 0 ? float(std::uniform_real_distribution<double>(0.01, 3.0)(rng)) : 0.f;
  if (kind == 0) sim_quantize<float>(rows, k, x_off, x_stride, q_off, clip);
  if (kind == 1) sim_quantize<Half>(rows, k, x_off, x_stride, q_off, clip);
  if (kind == 2) sim_quantize<BFloat16>(rows, k, x_off, x_stride, q_off, clip);
}

// ---------------------------------------------------------------------------------------------
// (b), (c) mm_kernel (int8 and fp8)
// ---------------------------------------------------------------------------------------------
struct MmProblem {
  int64_t m, n, k;
  std::vector<uint8_t> a, b;  // int8 or e4m3 bytes; (m, k) at a_off + m * a_stride + k
  int64_t a_off, a_stride, b_off, b_stride;
  std::vector<float> a_scale, b_scale, bias;
  bool a_per_row, per_channel, has_bias;
  bool exact;  // fp8: every partial sum exact in fp32 (compare bitwise)
  int out_kind;
  int64_t out_off, out_stride;
};

// out[m, n] of the fp8 GEMM against a double reference. exact: bitwise against the fp32 formula
// (every partial sum exact, so any order gives float(dot)). Otherwise |out - ref| within
// |a_scale b_scale| (k + 2) u sum |products| (fp32 sums in any order) plus 4 u of the epilogue's
// magnitudes (three fp32 roundings) plus the output rounding (u_O, relative, and O's subnormal
// spacing). NaN operand in row m or column n: out must be NaN.
void check_fp8_output(const MmProblem& p, int64_t m, int64_t n, float got, float a_scale, float b_scale, int kind) {
  double dot = 0.0, abs_sum = 0.0;
  bool nan = false;
  for (int64_t k = 0; k < p.k; ++k) {
    const double x = spec_e4m3(p.a[size_t(p.a_off + m * p.a_stride + k)]);
    const double y = spec_e4m3(p.b[size_t(p.b_off + n * p.b_stride + k)]);
    nan = nan || std::isnan(x) || std::isnan(y);
    dot += x * y;  // exact: |products| in [2^-18, 2^17.6], k <= 2^9
    abs_sum += std::fabs(x * y);
  }
  if (nan) {
    if (!std::isnan(got)) {
      fprintf(stderr, "fp8 mm %s m %lld n %lld: NaN operand, got %a\n", name_of(kind), (long long)m, (long long)n, got);
      abort();
    }
    return;
  }
  const float bias = p.has_bias ? p.bias[size_t(n)] : 0.f;
  if (p.exact) {
    CHECK(std::fabs(dot) < 16777216.0 && float(dot) == dot);
    float want = float(dot) * a_scale * b_scale;
    if (p.has_bias) want += bias;
    const float want_o =
        kind == 0 ? want : (kind == 1 ? to_float(from_float<Half>(want)) : to_float(from_float<BFloat16>(want)));
    if (float_as_bits(got) != float_as_bits(want_o)) {
      fprintf(stderr, "fp8 mm (exact) %s m %lld n %lld: got %a want %a (dot %.17g)\n", name_of(kind), (long long)m,
              (long long)n, got, want_o, dot);
      abort();
    }
    return;
  }
  const double u = std::ldexp(1.0, -24);
  const double scaled = dot * double(a_scale) * double(b_scale);
  const double ref = scaled + (p.has_bias ? double(bias) : 0.0);
  double tol = std::fabs(double(a_scale) * double(b_scale)) * double(p.k + 2) * u * abs_sum +
               4 * u * (std::fabs(scaled) + std::fabs(double(bias)));
  const double u_o = kind == 0 ? u : (kind == 1 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8));
  const double tiny_o = kind == 0 ? std::ldexp(1.0, -149) : (kind == 1 ? std::ldexp(1.0, -24) : std::ldexp(1.0, -133));
  tol += u_o * (std::fabs(ref) + tol) + tiny_o;
  // Overflow: past O's rounding threshold (65520 for fp16) the result may be infinite.
  const double overflow_o = kind == 1 ? 65520.0 : (kind == 2 ? 3.3961775292304142e38 : 3.4028235677973366e38);
  if (std::fabs(ref) + tol >= overflow_o && std::isinf(got) && (got > 0) == (ref > 0)) return;
  if (!(std::fabs(double(got) - ref) <= tol)) {
    fprintf(stderr, "fp8 mm %s m %lld n %lld: got %.9g want %.9g tol %.3g (k %lld)\n", name_of(kind), (long long)m,
            (long long)n, got, ref, tol, (long long)p.k);
    abort();
  }
}

// The 16-byte chunk a thread copies: operand 0 (A) or 1 (B), tile row `row` of the tile starting
// at row `first`, columns k.. : the bytes that exist (ix::chunk_bytes: rows past M / N and
// columns past K zero-filled), every read in bounds and, where `aligned`, 16-byte aligned.
void read_operand_chunk(const MmProblem& p, int operand, int first, int row, int k, bool aligned,
                        uint8_t (&chunk)[16]) {
  const std::vector<uint8_t>& buf = operand == 0 ? p.a : p.b;
  const int64_t off = operand == 0 ? p.a_off : p.b_off, stride = operand == 0 ? p.a_stride : p.b_stride;
  const int64_t limit = operand == 0 ? p.m : p.n;
  const int bytes = ix::chunk_bytes(k, p.k, first + row < limit);
  std::memset(chunk, 0, 16);
  if (bytes == 0) return;
  const int64_t src = off + int64_t(first + row) * stride + k;
  if (aligned) CHECK(src % 16 == 0);
  for (int e = 0; e < bytes; ++e) {
    CHECK(k + e < p.k && first + row < limit && src + e < int64_t(buf.size()));
    chunk[e] = buf[size_t(src + e)];
  }
}

// The outputs of a simulated GEMM run (out, with the number of writes of each element) against
// the references: exact int64 dot products and the CPU kernel's epilogue (int8), the fp8 bound
// or bits; every output written once, nothing else touched.
template <typename O, bool kFp8>
void check_mm_output(const MmProblem& p, const std::vector<O>& out, const std::vector<int>& out_count) {
  for (size_t at = 0; at < out.size(); ++at) {
    const int64_t rel = int64_t(at) - p.out_off;
    const int64_t m = rel >= 0 ? rel / p.out_stride : -1, n = rel >= 0 ? rel % p.out_stride : -1;
    if (m < 0 || m >= p.m || n >= p.n) {
      CHECK(out_count[at] == 0 && bits_of(out[at]) == bits_of(store_of<O>(-7.25f)));
      continue;
    }
    CHECK(out_count[at] == 1);
    const float a_scale = p.a_scale[size_t(p.a_per_row ? m : 0)], b_scale = p.b_scale[size_t(p.per_channel ? n : 0)];
    if constexpr (kFp8) {
      check_fp8_output(p, m, n, to_float(out[at]), a_scale, b_scale, p.out_kind);
      continue;
    }
    int64_t dot = 0;
    for (int64_t k = 0; k < p.k; ++k)
      dot += int64_t(int8_t(p.a[size_t(p.a_off + m * p.a_stride + k)])) *
             int8_t(p.b[size_t(p.b_off + n * p.b_stride + k)]);
    CHECK(dot >= INT32_MIN && dot <= INT32_MAX);
    float want = float(int32_t(dot)) * a_scale * b_scale;
    if (p.has_bias) want += p.bias[size_t(n)];
    if (bits_of(out[at]) != bits_of(store_of<O>(want))) {
      fprintf(stderr, "mm %s m %lld n %lld: got 0x%x want 0x%x (dot %lld)\n", name_of(p.out_kind), (long long)m,
              (long long)n, bits_of(out[at]), bits_of(store_of<O>(want)), (long long)dot);
      abort();
    }
  }
}

template <typename O, class Cfg, bool kFp8>
void sim_mm(const MmProblem& p) {
  using Acc = std::conditional_t<kFp8, float, int64_t>;
  constexpr int kStages = Cfg::kStages, kMI = Cfg::kMI, kNI = Cfg::kNI;
  constexpr int kRowsPerPass = Cfg::kThreads / ix::kChunksPerRow;
  static_assert(kNI % 2 == 0, "B ldmatrix.x4 covers two n8 tiles");
  const int M = int(p.m), N = int(p.n);
  const int m_blocks = int(ix::ceil_div(p.m, Cfg::kBM)), n_blocks = int(ix::ceil_div(p.n, Cfg::kBN));
  const int k_iters = int(ix::ceil_div(p.k, ix::kBK));
  const bool vector = ix::mm_vectorizable(uint64_t(p.a_off), p.a_stride, uint64_t(p.b_off), p.b_stride);

  std::vector<O> out(size_t(p.out_off + (p.m - 1) * p.out_stride + p.n + 4), store_of<O>(-7.25f));
  std::vector<int> out_count(out.size(), 0);

  // the CTA order visits every tile once
  Smem smem;
  static Acc acc[Cfg::kWarps][kMI][kNI][32][4];
  walk_ctas(m_blocks, n_blocks, ix::tile_of, [&](const ix::TileCoord& tile) {
    const int m0 = int(tile.mb) * Cfg::kBM, n0 = int(tile.nb) * Cfg::kBN;
    smem.reset(Cfg::kSmemBytes);

    const auto load_stage = [&](int stage, int iter) {
      const size_t sa = size_t(stage) * Cfg::kStageBytes, sb = sa + Cfg::kBOffset;
      for (int tid = 0; tid < Cfg::kThreads; ++tid) {
        const int row0 = ix::chunk_row(tid), col = ix::chunk_col(tid);
        const int k = iter * ix::kBK + col * ix::kChunkBytes;
        for (int operand = 0; operand < 2; ++operand) {
          const int per_thread = operand == 0 ? Cfg::kAChunksPerThread : Cfg::kBChunksPerThread;
          for (int i = 0; i < per_thread; ++i) {
            const int id = tid + i * Cfg::kThreads;
            const int row = row0 + i * kRowsPerPass;
            CHECK(ix::chunk_row(id) == row && ix::chunk_col(id) == col);
            CHECK(row < (operand == 0 ? Cfg::kBM : Cfg::kBN));
            uint8_t chunk[16];
            read_operand_chunk(p, operand, operand == 0 ? m0 : n0, row, k, vector, chunk);
            const int dst = ix::smem_offset(row, col);
            CHECK(dst % 16 == 0 && dst + 16 <= (operand == 0 ? Cfg::kABytes : Cfg::kBBytes));
            smem.write((operand == 0 ? sa : sb) + size_t(dst), chunk, 16, vector);
          }
        }
      }
    };

    zero_all(acc);

    const auto compute_stage = [&](int stage) {
      const size_t sa = size_t(stage) * Cfg::kStageBytes, sb = sa + Cfg::kBOffset;
      for (int warp = 0; warp < Cfg::kWarps; ++warp) {
        const int wm = ix::warp_m_of(warp, Cfg::kWarpsN), wn = ix::warp_n_of(warp, Cfg::kWarpsN);
        CHECK(wm < Cfg::kWarpsM && wn < Cfg::kWarpsN);
        for (int ks = 0; ks < ix::kKSteps; ++ks) {
          static uint32_t af[kMI][32][4], bf[kNI][32][2];
          for (int i = 0; i < kMI; ++i) {
            int address[32];
            for (int lane = 0; lane < 32; ++lane)
              address[lane] = int(sa) + ix::smem_offset(ix::a_ldsm_row(wm, i, lane, Cfg::kWM), ix::a_ldsm_chunk(ks, lane));
            // independent: matrix j = (rows 8 (j % 2), k bytes 16 (j / 2)) of the m16 x k32 tile
            for (int lane = 0; lane < 32; ++lane) {
              const int j = lane / 8;
              CHECK(ix::a_ldsm_row(wm, i, lane, Cfg::kWM) == wm * Cfg::kWM + 16 * i + 8 * (j % 2) + lane % 8);
              CHECK(ix::a_ldsm_chunk(ks, lane) == 2 * ks + j / 2);
            }
            ldmatrix_x4(smem, address, af[i]);
          }
          for (int j = 0; j < kNI / 2; ++j) {
            int address[32];
            for (int lane = 0; lane < 32; ++lane)
              address[lane] = int(sb) + ix::smem_offset(ix::b_ldsm_row(wn, j, lane, Cfg::kWN), ix::b_ldsm_chunk(ks, lane));
            mma_spec::ldmatrix_x4_b_pair(smem, address, bf[2 * j], bf[2 * j + 1]);
          }
          for (int i = 0; i < kMI; ++i)
            for (int j = 0; j < kNI; ++j) {
              if constexpr (kFp8) {
                mma_fp8(acc[warp][i][j], af[i], bf[j]);
              } else {
                mma(acc[warp][i][j], af[i], bf[j]);
              }
            }
        }
      }
    };

    // pipeline, as the kernel issues it (every thread alike)
    run_pipeline(smem, kStages, k_iters, load_stage, compute_stage);

    // epilogue
    for (int warp = 0; warp < Cfg::kWarps; ++warp) {
      const int wm = ix::warp_m_of(warp, Cfg::kWarpsN), wn = ix::warp_n_of(warp, Cfg::kWarpsN);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < kMI; ++i)
          for (int j = 0; j < kNI; ++j)
            for (int e = 0; e < 4; ++e) {
              const int row = ix::acc_row(wm, i, lane, e, Cfg::kWM), col = ix::acc_col(wn, j, lane, e, Cfg::kWN);
              CHECK(row == wm * Cfg::kWM + 16 * i + spec::c_row(lane, e));
              CHECK(col == wn * Cfg::kWN + 8 * j + spec::c_col(lane, e));
              const int m = m0 + row, n = n0 + col;
              if (!ix::output_in_bounds(m, n, M, N)) continue;
              using KernelAcc = std::conditional_t<kFp8, float, int32_t>;  // the kernel's registers
              const float v = ix::epilogue_value(KernelAcc(acc[warp][i][j][lane][e]),
                                                 p.a_scale[size_t(ix::scale_index(m, p.a_per_row))],
                                                 p.b_scale[size_t(ix::scale_index(n, p.per_channel))], p.has_bias,
                                                 p.has_bias ? p.bias[size_t(n)] : 0.f);
              const size_t at = size_t(p.out_off + int64_t(m) * p.out_stride + n);
              out[at] = store_of<O>(v);
              ++out_count[at];
            }
    }
  });

  check_mm_output<O, kFp8>(p, out, out_count);
}

// (e) wgmma_mm_kernel (quant/w8a8_wgmma.cu, sm_90a) on the same problem: every thread's copies
// into the 128-byte-swizzled stages (bounds, alignment, zero fill), the pipeline order (the
// shared-memory model, plus: a slot is refilled only after the wgmma batch that read it has
// completed; every batch is followed by a wait that leaves at most that batch in flight), each
// wgmma's operands read back through the descriptor the kernel builds and the PTX descriptor / swizzle model (mma_spec::wgmma_sw128_address), and
// the epilogue's register walk checked against the PTX accumulator layout.
template <typename O, bool kFp8>
void sim_wgmma_mm(const MmProblem& p) {
  namespace wx = torch_ext::quant::w8a8_wgmma;
  using Tile = std::conditional_t<kFp8, wx::Fp8Tile, wx::Int8Tile>;
  static_assert(Tile::kPromote == kFp8, "fp8 promotes every k block");
  // int8: exact int64 sums (the kernel's int32 wraps the same way below 2^31); fp8: the kernel's
  // fp32 accumulator, each k block's exact sum rounded to fp32 and added (promotion).
  using Acc = std::conditional_t<kFp8, float, int64_t>;
  using BlockAcc = std::conditional_t<kFp8, double, int64_t>;
  using KernelAcc = std::conditional_t<kFp8, float, int32_t>;
  const int M = int(p.m), N = int(p.n);
  CHECK(ix::mm_vectorizable(uint64_t(p.a_off), p.a_stride, uint64_t(p.b_off), p.b_stride));
  const int m_blocks = int(wx::ceil_div(p.m, wx::kBM)), n_blocks = int(wx::ceil_div(p.n, Tile::kBN));
  const int k_iters = int(wx::ceil_div(p.k, wx::kBK));
  // The dynamic shared memory's address as the kernel sees it, then aligned up to an atom.
  const uint32_t raw = uint32_t(16 * rnd(0, 200));
  const uint32_t base = (raw + wx::kSwizzleAtomBytes - 1) & ~uint32_t(wx::kSwizzleAtomBytes - 1);
  CHECK(base - raw < uint32_t(wx::kSwizzleAtomBytes) && base - raw + Tile::kStages * Tile::kStageBytes <= uint32_t(Tile::kSmemBytes));
  const bool pair_stores = p.out_off % 2 == 0 && p.out_stride % 2 == 0;  // out_off counts elements of O

  std::vector<O> out(size_t(p.out_off + (p.m - 1) * p.out_stride + p.n + 4), store_of<O>(-7.25f));
  std::vector<int> out_count(out.size(), 0);
  Smem smem;
  static Acc acc[wx::kBM][Tile::kBN];
  static BlockAcc block[wx::kBM][Tile::kBN];
  walk_ctas(m_blocks, n_blocks, ix::tile_of, [&](const ix::TileCoord& tile) {
    const int m0 = int(tile.mb) * wx::kBM, n0 = int(tile.nb) * Tile::kBN;
    smem.reset(size_t(Tile::kStages) * Tile::kStageBytes);
    std::vector<int> slot_reader(Tile::kStages, -1);  // the iteration whose wgmma last read a slot
    int wgmma_complete = -1;                          // every batch up to this iteration is done

    const auto load_stage = [&](int iter) {
      const int stage = Tile::stage_of(iter);
      CHECK(slot_reader[size_t(stage)] <= wgmma_complete);
      for (int tid = 0; tid < wx::kThreads; ++tid) {
        const int col = wx::chunk_col(tid);
        const int k = iter * wx::kBK + col * ix::kChunkBytes;
        for (int operand = 0; operand < 2; ++operand) {
          const int per_thread = operand == 0 ? wx::kAChunksPerThread : Tile::kBChunksPerThread;
          for (int i = 0; i < per_thread; ++i) {
            const int row = wx::chunk_row(tid, i);
            CHECK(row < (operand == 0 ? wx::kBM : Tile::kBN));
            uint8_t chunk[16];
            read_operand_chunk(p, operand, operand == 0 ? m0 : n0, row, k, true, chunk);
            const int dst = (operand == 0 ? Tile::a_tile_offset(stage) : Tile::b_tile_offset(stage)) +
                            wx::swizzled_offset(row, col);
            CHECK(dst % 16 == 0 && dst + 16 <= (operand == 0 ? Tile::b_tile_offset(stage) : (stage + 1) * Tile::kStageBytes));
            smem.write(size_t(dst), chunk, 16, true);
          }
        }
      }
    };

    for (auto& row : acc)
      for (Acc& v : row) v = Acc(0);
    for (int s = 0; s < Tile::kLoadAhead; ++s) {
      if (s < k_iters) load_stage(s);
      smem.commit();
    }
    // The kernel's k loop as events, in its order: int8 issues each iteration into acc and waits
    // until one batch is in flight; fp8 issues pairs of iterations into block buffers 0 and 1,
    // waits (1 pending) and promotes buffer 0, waits (0) and promotes buffer 1, and an odd last
    // iteration alone (issue, wait 0, promote). Each iteration must be issued once, read only
    // slots whose copies landed, be promoted once in order after its batch completed, and its
    // slot refilled only after that.
    struct Event {
      char kind;  // 'i' issue, 'w' wait, 'p' promote
      int iter;   // the k iteration (a wait: the batches it leaves in flight)
      int buf;    // fp8's block buffer
    };
    std::vector<Event> events;
    if (!Tile::kPromote) {
      for (int iter = 0; iter < k_iters; ++iter)
        events.insert(events.end(), {{'i', iter, 0}, {'w', Tile::kBatchesInFlight, 0}});
    } else {
      int iter = 0;
      for (; iter + 2 <= k_iters; iter += 2)
        events.insert(events.end(), {{'i', iter, 0}, {'i', iter + 1, 1}, {'w', 1, 0}, {'p', iter, 0}, {'w', 0, 0},
                                     {'p', iter + 1, 1}});
      if (iter < k_iters) events.insert(events.end(), {{'i', iter, 0}, {'w', 0, 0}, {'p', iter, 0}});
    }
    std::vector<int> issued_batches;  // in issue order; complete up to wgmma_complete's index
    std::vector<int> issue_count(size_t(k_iters), 0), promoted(size_t(k_iters), 0);
    int buffer_iter[2] = {-1, -1};
    int completed = 0;  // issued_batches[0, completed) are complete
    int next_promote = 0;
    static BlockAcc buffers[2][wx::kBM][Tile::kBN];
    for (const Event& ev : events) {
      if (ev.kind == 'w') {
        completed = std::max(completed, int(issued_batches.size()) - ev.iter);  // ev.iter: batches left pending
        wgmma_complete = completed > 0 ? issued_batches[size_t(completed - 1)] : -1;
        continue;
      }
      if (ev.kind == 'p') {
        CHECK(buffer_iter[ev.buf] == ev.iter && ev.iter == next_promote && promoted[size_t(ev.iter)] == 0);
        CHECK(ev.iter <= wgmma_complete);  // its batch completed
        for (int r = 0; r < wx::kBM; ++r)
          for (int n = 0; n < Tile::kBN; ++n) acc[r][n] += Acc(buffers[ev.buf][r][n]);
        ++promoted[size_t(ev.iter)];
        ++next_promote;
        continue;
      }
      const int iter = ev.iter;
      CHECK(issue_count[size_t(iter)]++ == 0);
      if (Tile::kPromote) {
        CHECK(buffer_iter[ev.buf] < 0 || promoted[size_t(buffer_iter[ev.buf])] == 1);  // not overwritten unpromoted
        buffer_iter[ev.buf] = iter;
      }
      smem.wait(Tile::kLoadAhead - 1);
      smem.barrier();
      if (Tile::refill_iter(iter) < k_iters) load_stage(Tile::refill_iter(iter));
      smem.commit();
      const int stage = Tile::stage_of(iter);
      for (auto& row : block)
        for (BlockAcc& v : row) v = BlockAcc(0);
      for (int g = 0; g < wx::kWarpgroups; ++g) {
        const uint64_t desc_a = wx::make_smem_desc(base + uint32_t(Tile::a_warpgroup_offset(stage, g)));
        const uint64_t desc_b = wx::make_smem_desc(base + uint32_t(Tile::b_tile_offset(stage)));
        for (int ks = 0; ks < wx::kKSteps; ++ks) {
          static uint8_t A[64][32], B[Tile::kBN][32];
          const uint64_t da = wx::desc_at_k_step(desc_a, ks), db = wx::desc_at_k_step(desc_b, ks);
          for (int r = 0; r < 64; ++r)
            for (int k = 0; k < 32; ++k) CHECK(smem.read(mma_spec::wgmma_sw128_address(da, r, k) - base, &A[r][k], 1));
          for (int r = 0; r < Tile::kBN; ++r)
            for (int k = 0; k < 32; ++k) CHECK(smem.read(mma_spec::wgmma_sw128_address(db, r, k) - base, &B[r][k], 1));
          // the operands are the tiles' rows and k bytes iter * 128 + 32 ks ..
          const int kb = iter * wx::kBK + ks * wx::kWgmmaK;
          for (int r = 0; r < 64 && m0 + 64 * g + r < M; ++r)
            for (int n = 0; n < Tile::kBN && n0 + n < N; ++n) {
              Acc sum = 0;
              for (int k = 0; k < 32; ++k) {
                if constexpr (kFp8) {
                  sum += spec_e4m3(A[r][k]) * spec_e4m3(B[n][k]);
                } else {
                  sum += int64_t(int8_t(A[r][k])) * int8_t(B[n][k]);
                }
              }
              block[64 * g + r][n] += sum;
            }
          for (int k = 0; k < 32; ++k) {  // spot-check the operand bytes against the problem
            const int r = int(rnd(0, 63)), n = int(rnd(0, Tile::kBN - 1));
            const int64_t m = m0 + 64 * g + r, c = n0 + n;
            CHECK(A[r][k] == (m < M && kb + k < p.k ? p.a[size_t(p.a_off + m * p.a_stride + kb + k)] : 0));
            CHECK(B[n][k] == (c < N && kb + k < p.k ? p.b[size_t(p.b_off + c * p.b_stride + kb + k)] : 0));
          }
        }
      }
      if (Tile::kPromote) {
        for (int r = 0; r < wx::kBM; ++r)
          for (int n = 0; n < Tile::kBN; ++n) buffers[ev.buf][r][n] = block[r][n];  // a fresh k-block sum
      } else {
        for (int r = 0; r < wx::kBM; ++r)
          for (int n = 0; n < Tile::kBN; ++n) acc[r][n] += Acc(block[r][n]);  // int8: exact either way
      }
      slot_reader[size_t(stage)] = iter;
      issued_batches.push_back(iter);
    }
    for (int iter = 0; iter < k_iters; ++iter)
      CHECK(issue_count[size_t(iter)] == 1 && (!Tile::kPromote || promoted[size_t(iter)] == 1));
    smem.wait(0);

    // epilogue, register by register as the kernel walks them
    for (int warp = 0; warp < wx::kThreads / 32; ++warp) {
      const int g = warp / 4, w = warp % 4;
      for (int lane = 0; lane < 32; ++lane) {
        for (int i = 0; i < Tile::kAccRegs; ++i) {
          CHECK(wx::acc_row(g, w, lane, i) == 64 * g + mma_spec::Wgmma64::d_row(w, lane, i));
          CHECK(wx::acc_col(lane, i) == mma_spec::Wgmma64::d_col(lane, i));
        }
        for (int j = 0; j < Tile::kBN / 8; ++j) {
          const int n = n0 + wx::acc_col(lane, 4 * j);
          if (n >= N) continue;
          const bool second = n + 1 < N;
          for (int h = 0; h < 2; ++h) {
            const int row = wx::acc_row(g, w, lane, 2 * h), m = m0 + row;
            if (m >= M) continue;
            const size_t at = size_t(p.out_off + int64_t(m) * p.out_stride + n);
            if (second && pair_stores) CHECK(at % 2 == 0);
            for (int e = 0; e < (second ? 2 : 1); ++e) {
              CHECK(wx::acc_row(g, w, lane, 2 * h + e) == row && wx::acc_col(lane, 4 * j + 2 * h + e) == n - n0 + e);
              const KernelAcc v = KernelAcc(acc[row][n - n0 + e]);
              out[at + size_t(e)] = store_of<O>(ix::epilogue_value(
                  v, p.a_scale[size_t(ix::scale_index(m, p.a_per_row))],
                  p.b_scale[size_t(ix::scale_index(n + e, p.per_channel))], p.has_bias,
                  p.has_bias ? p.bias[size_t(n + e)] : 0.f));
              ++out_count[at + size_t(e)];
            }
          }
        }
      }
    }
  });
  check_mm_output<O, kFp8>(p, out, out_count);
}

float random_scale() { return std::ldexp(float(std::uniform_real_distribution<double>(0.5, 1.0)(rng)), int(rnd(-12, 2))); }

// Random e4m3 bytes: any finite code, or (exact) integers -8..8 whose partial sums stay exact in
// fp32 (|products| <= 64, k <= 260), with NaN codes sprinkled in when `nans`.
uint8_t random_e4m3(bool exact) {
  if (exact) {
    static const uint8_t kInts[] = {0x00, 0x38, 0x40, 0x44, 0x48, 0x4A, 0x4C, 0x4E, 0x50};  // 0, 1, 2, ..., 8
    const uint8_t v = kInts[rnd(0, 8)];
    return uint8_t(v | (rnd(0, 1) ? 0x80 : 0));
  }
  for (;;) {
    const uint8_t v = uint8_t(rnd(0, 255));
    if ((v & 0x7F) != 0x7F) return v;
  }
}

void check_mm_case(bool large, bool fp8) {
  MmProblem p;
  const int64_t max_mn = large ? 200 : 100;
  p.m = rnd(0, 3) == 0 ? rnd(1, 8) : rnd(1, max_mn);
  p.n = rnd(1, max_mn);
  // Now and then a K long enough for the wgmma kernel's 4-slot ring of 128-byte stages to wrap.
  p.k = rnd(0, 5) == 0 ? rnd(0, 3) : (rnd(0, 4) == 0 ? rnd(513, 1100) : rnd(1, 260));
  const bool aligned = rnd(0, 2) != 0;
  p.a_off = aligned ? 16 * rnd(0, 2) : rnd(0, 15);
  p.b_off = aligned ? 16 * rnd(0, 2) : rnd(0, 15);
  p.a_stride = aligned ? (p.k + 15) / 16 * 16 + 16 * rnd(0, 1) : p.k + rnd(0, 17);
  p.b_stride = aligned ? (p.k + 15) / 16 * 16 + 16 * rnd(0, 1) : p.k + rnd(0, 17);
  if (p.a_stride == 0) p.a_stride = 16;
  if (p.b_stride == 0) p.b_stride = 16;
  p.a.resize(size_t(p.a_off + (p.m - 1) * p.a_stride + p.k));
  p.b.resize(size_t(p.b_off + (p.n - 1) * p.b_stride + p.k));
  p.exact = fp8 && rnd(0, 2) == 0;
  if (fp8) {
    // Bytes outside the operands too (strides, offsets): NaN codes there must not leak in.
    for (auto* buf : {&p.a, &p.b})
      for (uint8_t& v : *buf) v = rnd(0, 3) == 0 ? uint8_t(rnd(0, 1) ? 0x7F : 0xFF) : random_e4m3(p.exact);
    for (int64_t r = 0; r < p.m; ++r)
      for (int64_t k = 0; k < p.k; ++k) p.a[size_t(p.a_off + r * p.a_stride + k)] = random_e4m3(p.exact);
    for (int64_t r = 0; r < p.n; ++r)
      for (int64_t k = 0; k < p.k; ++k) p.b[size_t(p.b_off + r * p.b_stride + k)] = random_e4m3(p.exact);
    if (p.k > 0 && rnd(0, 2) == 0) {  // a few NaN operands
      for (int t = int(rnd(1, 3)); t > 0; --t) {
        const bool in_a = rnd(0, 1) != 0;
        const int64_t r = rnd(0, (in_a ? p.m : p.n) - 1), k = rnd(0, p.k - 1);
        (in_a ? p.a : p.b)[size_t((in_a ? p.a_off : p.b_off) + r * (in_a ? p.a_stride : p.b_stride) + k)] =
            uint8_t(rnd(0, 1) ? 0x7F : 0xFF);
      }
    }
  } else {
    const bool extremes = rnd(0, 3) == 0;  // -128 / 127 heavy
    for (auto* buf : {&p.a, &p.b})
      for (uint8_t& v : *buf) v = uint8_t(int8_t(extremes && rnd(0, 1) ? (rnd(0, 1) ? 127 : -128) : rnd(-128, 127)));
  }
  p.a_per_row = !fp8 || rnd(0, 1) != 0;
  p.per_channel = rnd(0, 1) != 0;
  p.has_bias = rnd(0, 1) != 0;
  p.a_scale.resize(size_t(p.a_per_row ? p.m : 1));
  for (float& s : p.a_scale) s = fp8 && !p.exact ? std::ldexp(random_scale(), -6) : random_scale();  // fp16 range
  p.b_scale.resize(size_t(p.per_channel ? p.n : 1));
  for (float& s : p.b_scale) s = rnd(0, 7) == 0 ? -random_scale() : random_scale();  // -0 products: no + 0 without bias
  p.bias.resize(size_t(p.n));
  for (float& b : p.bias) b = float(std::uniform_real_distribution<double>(-2.0, 2.0)(rng));
  p.out_kind = int(rnd(0, 2));
  p.out_off = rnd(0, 3);
  p.out_stride = p.n + rnd(0, 5);
  g_fp8_model = int(rnd(0, 2));
  const auto run = [&](auto tag, auto fp8_tag) {
    using O = decltype(tag);
    constexpr bool kFp8 = decltype(fp8_tag)::value;
    if (large) {
      sim_mm<O, ix::LargeConfig, kFp8>(p);
    } else {
      sim_mm<O, ix::SmallConfig, kFp8>(p);
    }
    if (ix::mm_vectorizable(uint64_t(p.a_off), p.a_stride, uint64_t(p.b_off), p.b_stride)) sim_wgmma_mm<O, kFp8>(p);
  };
  const auto run_kind = [&](auto fp8_tag) {
    if (p.out_kind == 0) run(float{}, fp8_tag);
    if (p.out_kind == 1) run(Half{}, fp8_tag);
    if (p.out_kind == 2) run(BFloat16{}, fp8_tag);
  };
  if (fp8) {
    run_kind(std::true_type{});
  } else {
    run_kind(std::false_type{});
  }
}

// ---------------------------------------------------------------------------------------------
// (d) CTA order on larger grids, config rule, static facts, e4m3 decoding
// ---------------------------------------------------------------------------------------------
void check_static() {
  static_assert(ix::LargeConfig::kThreads == 256 && ix::LargeConfig::kSmemBytes == 64 * 1024, "large config");
  static_assert(ix::SmallConfig::kThreads == 128 && ix::SmallConfig::kSmemBytes == 48 * 1024, "small config");
  static_assert(ix::LargeConfig::kMinCtas * ix::LargeConfig::kSmemBytes <= 227 * 1024, "smem per SM");
  static_assert(ix::SmallConfig::kMinCtas * ix::SmallConfig::kSmemBytes <= 227 * 1024, "smem per SM");
  check_tile_order(ix::tile_of, rnd);
  {  // the wgmma kernel: shared-memory budget, the dispatch rule, descriptor fields
    namespace wx = torch_ext::quant::w8a8_wgmma;
    static_assert(wx::kThreads == 256 && wx::Int8Tile::kAccRegs == 128 && wx::Fp8Tile::kAccRegs == 64, "wgmma config");
    static_assert(wx::Int8Tile::kStages == 4 && wx::Fp8Tile::kStages == 6, "192 KB of stages");
    static_assert(wx::Int8Tile::kSmemBytes <= 227 * 1024 && wx::Fp8Tile::kSmemBytes <= 227 * 1024, "smem per SM");
    CHECK(wx::use_tile<wx::Int8Tile>(4096, 8192, 132, true) && wx::use_tile<wx::Int8Tile>(1100, 3901, 132, true));
    CHECK(!wx::use_tile<wx::Int8Tile>(4096, 8192, 132, false) && !wx::use_tile<wx::Int8Tile>(256, 8192, 132, true));
    CHECK(wx::use_tile<wx::Fp8Tile>(1100, 3901, 132, true) && !wx::use_tile<wx::Fp8Tile>(512, 4096, 132, true));
    for (uint32_t address = 0; address < 228 * 1024; address += 16) {
      const uint64_t desc = wx::make_smem_desc(address);
      CHECK(uint32_t(desc & 0x3FFF) << 4 == address && ((desc >> 32) & 0x3FFF) << 4 == 1024);
      CHECK((desc >> 62) == 1 && ((desc >> 49) & 7) == 0);
      if (address % 1024 == 0)
        for (int s = 0; s < wx::kKSteps; ++s) CHECK(mma_spec::wgmma_sw128_address(wx::desc_at_k_step(desc, s), 0, 0) == address + 32 * s);
    }
  }
  CHECK(ix::use_large_config(2048, 8192, 132) && ix::use_large_config(1024, 8192, 132));
  CHECK(!ix::use_large_config(16, 8192, 132) && !ix::use_large_config(128, 4096, 132));
  // smem swizzle: every (row, chunk) of a stage maps to a distinct chunk inside the row
  for (int row = 0; row < 128; ++row) {
    int seen = 0;
    for (int c = 0; c < ix::kChunksPerRow; ++c) {
      const int off = ix::smem_offset(row, c);
      CHECK(off / ix::kBK == row);
      seen |= 1 << ((off % ix::kBK) / 16);
    }
    CHECK(seen == 15);
  }
  // quant_value: ties to even and saturation
  CHECK(ix::quant_value(2.5f, 1.f) == 2 && ix::quant_value(-2.5f, 1.f) == -2 && ix::quant_value(3.5f, 1.f) == 4);
  CHECK(ix::quant_value(1e30f, 1.f) == 127 && ix::quant_value(-1e30f, 1.f) == -128);
  CHECK(ix::quant_value(-128.4f, 1.f) == -128 && ix::quant_value(127.5f, 1.f) == 127);
  CHECK(ix::quant_row_scale(0.f, 0.f) == 1.f && ix::quant_row_scale(254.f, 127.f) == 1.f);
  // e4m3: every code against the definition (bitwise, -0 included), NaN codes, a few anchors
  for (int c = 0; c < 256; ++c) {
    const double want = spec_e4m3(uint8_t(c));
    const float got = ix::e4m3_to_f32(uint8_t(c));
    CHECK(ix::e4m3_is_nan(uint8_t(c)) == std::isnan(want));
    if (std::isnan(want)) {
      CHECK(std::isnan(got));
    } else {
      CHECK(double(got) == want && std::signbit(got) == bool(c & 0x80));
    }
  }
  CHECK(ix::e4m3_to_f32(0x7E) == 448.f && ix::e4m3_to_f32(0x38) == 1.f && ix::e4m3_to_f32(0x01) == std::ldexp(1.f, -9));
  CHECK(ix::e4m3_to_f32(0x08) == std::ldexp(1.f, -6) && ix::e4m3_to_f32(0x07) == 7 * std::ldexp(1.f, -9));
  CHECK(ix::e4m3_to_f32(0xC0) == -2.f && ix::e4m3_is_nan(0x7F) && ix::e4m3_is_nan(0xFF) && !ix::e4m3_is_nan(0x7E));
  CHECK(spec_e4m3(0x7E) == 448.0 && spec_e4m3(0x01) == std::ldexp(1.0, -9) && spec_e4m3(0x40) == 2.0);
  // epilogue order: (acc * a_scale) * b_scale + bias, each rounded (not acc * (a_scale * b_scale))
  {
    int differ = 0;
    for (int t = 0; t < 1000; ++t) {
      const float acc = float(std::uniform_real_distribution<double>(-1e4, 1e4)(rng)), as = random_scale(),
                  bs = random_scale(), bias = float(std::uniform_real_distribution<double>(-2.0, 2.0)(rng));
      const float left = (acc * as) * bs;
      differ += left != acc * (as * bs);
      CHECK(ix::epilogue_value(acc, as, bs, false, bias) == left);
      CHECK(ix::epilogue_value(acc, as, bs, true, bias) == left + bias);
    }
    CHECK(differ > 0);  // the orders do differ: the check above decides
    CHECK(std::signbit(ix::epilogue_value(-0.f, 1.f, 1.f, false, 0.f)));
    CHECK(!std::signbit(ix::epilogue_value(-0.f, 1.f, 1.f, true, 0.f)));
    CHECK(std::isnan(ix::epilogue_value(NAN, 1.f, 1.f, true, 1.f)));
  }
}

// ---------------------------------------------------------------------------------------------
// (f) int8_linear's outlier kernels: column_max_kernel over its row splits, select_kernel thread
// by thread (runs of whole mask words, the block scans as prefix sums, the radix rounds'
// histograms and picks), against the CPU's rule (the columns above the threshold, or the `slots`
// largest maxima, equal ones lower column first; ascending, -1 padding); add_outliers_kernel's
// tiles cover every output once, columns in ascending order.
// ---------------------------------------------------------------------------------------------
void check_outlier_case() {
  const int64_t rows = rnd(0, 3) == 0 ? rnd(1, 3000) : rnd(1, 70);
  const int64_t k = rnd(0, 2) == 0 ? rnd(1, 40) : rnd(1, 40000);
  const int V = rnd(0, 1) ? 4 : 8;  // fp32 / 16-bit chunks
  const int slots = int(rnd(1, std::min<int64_t>(k, rnd(0, 1) ? 8 : 500)));
  const int levels = int(rnd(1, 12));  // few distinct magnitudes: ties at the pivot
  const float threshold = float(rnd(1, levels + 1));
  // column c's values: row r of a few; the column maximum is what matters
  std::vector<float> col_max_ref(size_t(k), 0.f);
  const auto value = [&](int64_t r, int64_t c) {  // deterministic per (r, c): levels and noise
    const uint64_t h = (uint64_t(r) * 0x9E3779B97F4A7C15ull) ^ (uint64_t(c) * 0xC2B2AE3D27D4EB4Full);
    const float level = float((h >> 20) % uint64_t(levels + 1));
    return ((h >> 7) & 1) ? -level : level;
  };
  // column_max_kernel
  const int splits = ox::search_splits(rows);
  CHECK(splits >= 1 && splits <= ox::kMaxSplits && (rows <= ox::kRowsPerSplit) == (splits == 1));
  const int64_t per = ox::split_rows(rows, splits);
  CHECK(per * splits >= rows);
  std::vector<float> partial(size_t(splits * k), NAN);
  std::vector<int> partial_writes(partial.size(), 0);
  const int64_t chunks = ix::ceil_div(k, V);
  for (int s = 0; s < splits; ++s)
    for (int64_t c = 0; c < chunks; ++c) {
      const int64_t r0 = s * per, r1 = std::min(rows, r0 + per);
      const int len = ix::quant_chunk_len(c, V, k);
      for (int e = 0; e < len; ++e) {
        float m = 0.f;
        for (int64_t r = r0; r < r1; ++r) m = std::fmax(m, std::fabs(value(r, c * V + e)));
        partial[size_t(s * k + c * V + e)] = m;
        ++partial_writes[size_t(s * k + c * V + e)];
      }
    }
  for (int w : partial_writes) CHECK(w == 1);
  for (int64_t c = 0; c < k; ++c)
    for (int64_t r = 0; r < rows; ++r) col_max_ref[size_t(c)] = std::fmax(col_max_ref[size_t(c)], std::fabs(value(r, c)));
  // select_kernel, phase 0: maxima into row 0
  for (int64_t c = 0; c < k; ++c) {
    float m = partial[size_t(c)];
    for (int s = 1; s < splits; ++s) m = std::fmax(m, partial[size_t(s * k + c)]);
    partial[size_t(c)] = m;
    CHECK(m == col_max_ref[size_t(c)]);
  }
  const int T = ox::kSelectThreads;
  std::vector<ox::ColumnRun> run(T);
  std::vector<int> owner(size_t(k), 0), word_owner(size_t(ox::mask_words(k)), 0);
  for (int t = 0; t < T; ++t) {
    run[size_t(t)] = ox::column_run(t, k);
    CHECK(run[size_t(t)].begin <= run[size_t(t)].end && (run[size_t(t)].begin == run[size_t(t)].end || run[size_t(t)].begin % 32 == 0));
    for (int64_t c = run[size_t(t)].begin; c < run[size_t(t)].end; ++c) ++owner[size_t(c)];
    if (t > 0 && run[size_t(t)].begin < run[size_t(t)].end) CHECK(run[size_t(t)].begin == run[size_t(t - 1)].end);
  }
  for (int o : owner) CHECK(o == 1);
  const auto key_of = [&](int64_t c) { return ox::outlier_key(partial[size_t(c)]); };
  const auto count_run = [&](int t, auto&& pred) {
    int64_t n = 0;
    for (int64_t c = run[size_t(t)].begin; c < run[size_t(t)].end; ++c) n += pred(key_of(c)) ? 1 : 0;
    return n;
  };
  uint32_t pivot = ox::outlier_key(threshold);
  int64_t ties = 0;
  // As the kernel: the counts above the threshold are the kept ones unless the cap applies; then
  // the radix pivot, and the counts recounted against it with the ties (equal counts are read only
  // when ties > 0, so they stay 0 below the cap).
  std::vector<int64_t> greater(T), equal(T, 0);
  int64_t greater_total = 0;
  for (int t = 0; t < T; ++t) {
    greater[size_t(t)] = count_run(t, [&](uint32_t key) { return key > pivot; });
    greater_total += greater[size_t(t)];
  }
  if (greater_total > slots) {
    uint32_t prefix = 0;
    int64_t need = slots;
    for (int round = 0; round < 32 / ox::kRadixBits; ++round) {
      uint32_t histogram[ox::kRadixBins] = {};
      for (int64_t c = 0; c < k; ++c)
        if ((key_of(c) & ox::radix_high_mask(round)) == prefix)
          ++histogram[(key_of(c) >> ox::radix_shift(round)) & (ox::kRadixBins - 1)];
      const ox::RadixPick pick = ox::radix_pick(histogram, need);
      CHECK(pick.need >= 1 && pick.need <= int64_t(histogram[pick.digit]));
      prefix |= uint32_t(pick.digit) << ox::radix_shift(round);
      need = pick.need;
    }
    pivot = prefix;
    greater_total = 0;
    int64_t equal_total = 0;
    for (int t = 0; t < T; ++t) {
      greater[size_t(t)] = count_run(t, [&](uint32_t key) { return key > pivot; });
      equal[size_t(t)] = count_run(t, [&](uint32_t key) { return key == pivot; });
      greater_total += greater[size_t(t)];
      equal_total += equal[size_t(t)];
    }
    ties = std::min(need, equal_total);
  }
  const int64_t kept_total = greater_total + ties;
  CHECK(kept_total <= slots);
  std::vector<int32_t> columns(size_t(slots), -77);
  std::vector<int> column_writes(size_t(slots), 0);
  std::vector<uint32_t> mask(size_t(ox::mask_words(k)), 0xDEADBEEFu);
  int64_t greater_prefix = 0, equal_prefix = 0;
  for (int t = 0; t < T; ++t) {
    int64_t greater_before = greater_prefix, equal_before = equal_prefix;
    greater_prefix += greater[size_t(t)];
    equal_prefix += equal[size_t(t)];
    const ox::ColumnRun r = run[size_t(t)];
    for (int64_t w = r.begin / 32; r.begin < r.end && 32 * w < r.end; ++w) {
      uint32_t word = 0;
      for (int64_t c = 32 * w; c < std::min(32 * w + 32, r.end); ++c) {
        const uint32_t key = key_of(c);
        if (ox::column_kept(key, pivot, equal_before, ties)) {
          const int64_t slot = ox::column_slot(greater_before, equal_before, ties);
          CHECK(slot >= 0 && slot < slots);
          columns[size_t(slot)] = int32_t(c);
          ++column_writes[size_t(slot)];
          word |= 1u << (c % 32);
        }
        greater_before += key > pivot ? 1 : 0;
        equal_before += key == pivot ? 1 : 0;
      }
      mask[size_t(w)] = word;
      ++word_owner[size_t(w)];
    }
  }
  for (int t = 0; t < T; ++t)
    for (int64_t s = kept_total + t; s < slots; s += T) {
      columns[size_t(s)] = -1;
      ++column_writes[size_t(s)];
    }
  for (int w : column_writes) CHECK(w == 1);
  for (int w : word_owner) CHECK(w == 1);
  // the CPU's rule
  std::vector<int64_t> want;
  for (int64_t c = 0; c < k; ++c)
    if (col_max_ref[size_t(c)] > threshold) want.push_back(c);
  if (int64_t(want.size()) > slots) {
    std::vector<int64_t> order(static_cast<size_t>(k));
    for (int64_t c = 0; c < k; ++c) order[size_t(c)] = c;
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return col_max_ref[size_t(a)] > col_max_ref[size_t(b)]; });
    want.assign(order.begin(), order.begin() + slots);
    std::sort(want.begin(), want.end());
  }
  for (int s = 0; s < slots; ++s) CHECK(columns[size_t(s)] == (s < int(want.size()) ? int32_t(want[size_t(s)]) : -1));
  std::vector<uint32_t> want_mask(size_t(ox::mask_words(k)), 0u);
  for (int64_t c : want) want_mask[size_t(c / 32)] |= 1u << (c % 32);
  CHECK(mask == want_mask);

  // add_outliers_kernel: grid (n / kAddColumns, m / kAddRows), thread = column n, rows of the tile;
  // the list walked in chunks, stopping at the first -1
  const int64_t n = rnd(1, 700), m = std::min<int64_t>(rows, 100);
  std::vector<int> out_writes(size_t(m * n), 0);
  for (int64_t by = 0; by < ix::ceil_div(n, ox::kAddColumns); ++by)
    for (int64_t bx = 0; bx < ix::ceil_div(m, ox::kAddRows); ++bx)
      for (int tid = 0; tid < ox::kAddColumns; ++tid) {
        const int64_t col = by * ox::kAddColumns + tid;
        std::vector<int32_t> walked;
        for (int base = 0; base < slots; base += ox::kAddChunk) {
          int32_t chunk[ox::kAddChunk];
          for (int j = 0; j < ox::kAddChunk; ++j) chunk[j] = base + j < slots ? columns[size_t(base + j)] : -1;
          if (chunk[0] < 0) break;
          for (int j = 0; j < ox::kAddChunk && chunk[j] >= 0; ++j) walked.push_back(chunk[j]);
        }
        CHECK(walked.size() == want.size() && std::equal(walked.begin(), walked.end(), want.begin()));
        if (col >= n) continue;
        for (int r = 0; r < ox::kAddRows; ++r)
          if (bx * ox::kAddRows + r < m) ++out_writes[size_t((bx * ox::kAddRows + r) * n + col)];
      }
  for (int w : out_writes) CHECK(w == 1);
}

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 100;
  const uint64_t seed = argc > 2 ? strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  check_static();
  for (int c = 0; c < cases; ++c) check_quantize_case();
  printf("quantize ok\n");
  for (int c = 0; c < cases; ++c) check_mm_case(c % 4 == 0, false);
  printf("mm ok\n");
  for (int c = 0; c < cases; ++c) check_mm_case(c % 4 == 0, true);
  printf("fp8 mm ok\n");
  for (int c = 0; c < cases; ++c) check_outlier_case();
  printf("outliers ok\n");
  printf("all ok\n");
  return 0;
}
