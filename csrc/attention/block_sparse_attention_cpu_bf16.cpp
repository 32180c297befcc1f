// block_sparse_attention's forward for bf16 with AVX512_BF16 dot products (vdpbf16ps); the walk,
// masks and online softmax: attention/block_sparse_attention_cpu_forward.h.
//
// Compiled only at the AVX-512 level with -mavx512bf16, in its own ISA namespace (avx512_bf16),
// and called only when the CPU has the extension (avx512_bf16_active()) and head_dim % 32 == 0.
// vdpbf16ps multiplies 16 pairs of adjacent bf16 values and adds both products into one fp32
// lane: twice the fp32 FMA rate, operands never widened. Pairs run along the reduction dimension:
//   S = Q K^T  pairs along the head dim: K is packed [dim/2][padded] of (k[c][d], k[c][d+1]),
//              a 32-bit transpose of the key rows; the query rows are used in place.
//   O += P V   pairs along the keys: V is packed [padded/2][dim] of (v[c][d], v[c+1][d]); P is
//              rounded to bf16 for this product (as FlashAttention does on GPUs), while the row
//              sums l of the softmax use the fp32 P.
// Products of bf16 values are exact in fp32, so S matches the FMA kernel up to summation order;
// O carries P's rounding (relative 2^-9 per element, averaging out over the keys).
#include <cstring>

#include "attention/block_sparse_attention_cpu_forward.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace block_sparse_cpu;

constexpr int kLanes = 16;  // fp32 lanes of a zmm; pairs of bf16 per dot-product vector

// Pair k of a bf16 row (bf16 2k and 2k + 1) in every 32-bit lane; the row may be 2-byte aligned only.
inline __m512bh broadcast_pair(const BFloat16* row, int k) {
  int32_t pair;
  std::memcpy(&pair, row + 2 * k, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// c[r][n0, n0 + 16 NV) = out_scale * sum_k a[r].pair(k) . b[k][n0, ...) (row_scale null) or
// row_scale[r] * c[r][...] + that sum (unscaled); b rows ld_b uint32 apart.
template <int R, int NV>
void dot_tile(const BFloat16* const* a, const uint32_t* b, int64_t ld_b, int pairs, float* const* c, int n0,
              const float* row_scale, float out_scale) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = row_scale ? _mm512_mul_ps(_mm512_loadu_ps(c[r] + n0 + v * kLanes), _mm512_set1_ps(row_scale[r]))
                            : _mm512_setzero_ps();
  for (int k = 0; k < pairs; ++k) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + k * ld_b + n0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512bh ar = broadcast_pair(a[r], k);
      for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_dpbf16_ps(acc[r][v], ar, bv[v]);
    }
  }
  const __m512 scale = _mm512_set1_ps(row_scale ? 1.0f : out_scale);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(c[r] + n0 + v * kLanes, _mm512_mul_ps(acc[r][v], scale));
}

// All rows in tiles of R, the remainder in tiles of R/2, R/4, ...
template <int R, int NV>
void dot_row_tiles(const BFloat16* const* a, int rows, const uint32_t* b, int64_t ld_b, int pairs, float* const* c,
                   int n0, const float* row_scale, float out_scale) {
  int r = 0;
  for (; r + R <= rows; r += R)
    dot_tile<R, NV>(a + r, b, ld_b, pairs, c + r, n0, row_scale ? row_scale + r : nullptr, out_scale);
  if constexpr (R > 1) {
    if (r < rows)
      dot_row_tiles<R / 2, NV>(a + r, rows - r, b, ld_b, pairs, c + r, n0, row_scale ? row_scale + r : nullptr,
                               out_scale);
  }
}

// The whole [rows x cols] product (cols a multiple of 16): 4 rows x 4 vectors (16 accumulators
// of 32 zmm), then 4 x 2, then 8 rows x 1 vector (a 16-key block), as the FMA kernel tiles.
void dot_matmul(const BFloat16* const* a, int rows, const uint32_t* b, int64_t ld_b, int pairs, float* const* c,
                int cols, const float* row_scale, float out_scale) {
  int n0 = 0;
  for (; n0 + 4 * kLanes <= cols; n0 += 4 * kLanes)
    dot_row_tiles<4, 4>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale);
  for (; n0 + 2 * kLanes <= cols; n0 += 2 * kLanes)
    dot_row_tiles<4, 2>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale);
  for (; n0 + kLanes <= cols; n0 += kLanes) dot_row_tiles<8, 1>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale);
}

class DotKernel {
 public:
  DotKernel(Workspace<float>& w, const Geometry& g)
      : w_(w), dim_(g.head_dim), padded_max_(round_up_to_lanes<float>(g.block_kv)),
        k_pairs_(size_t(padded_max_) * dim_ / 2), v_pairs_(size_t(padded_max_) * dim_ / 2),
        p_(size_t(g.block_q) * padded_max_ / 2), q_rows_(size_t(g.block_q)), a_ptr_(size_t(g.block_q)) {}

  void load_queries(const BFloat16* q, int64_t stride, int n, float scale) {
    scale_ = scale;
    for (int r = 0; r < n; ++r) q_rows_[r] = q + r * stride;
  }

  void load_keys(const BFloat16* k, int64_t k_stride, const BFloat16* v, int64_t v_stride, int keys, int padded) {
    pack_key_pairs(k, k_stride, keys, padded);
    pack_value_pairs(v, v_stride, keys, padded);
  }

  void scores(int active, int padded) {
    for (int a = 0; a < active; ++a) a_ptr_[a] = q_rows_[w_.rows[a]];
    w_.point(w_.c_ptr.data(), w_.s.data(), padded, active);
    dot_matmul(a_ptr_.data(), active, k_pairs_.data(), padded, dim_ / 2, w_.c_ptr.data(), padded, nullptr, scale_);
  }

  void accumulate(int active, int padded) {
    for (int a = 0; a < active; ++a) {
      round_to_bf16(w_.s.data() + int64_t(a) * padded, padded, p_.data() + int64_t(a) * padded / 2);
      a_ptr_[a] = reinterpret_cast<const BFloat16*>(p_.data() + int64_t(a) * padded / 2);
    }
    w_.point(w_.c_ptr.data(), w_.acc.data(), dim_, active, w_.rows.data());
    dot_matmul(a_ptr_.data(), active, v_pairs_.data(), dim_, padded / 2, w_.c_ptr.data(), dim_, w_.scale.data(), 1.0f);
  }

 private:
  // k_pairs_[d/2][c] = (k[c][d], k[c][d+1]): each key row is dim/2 32-bit pairs, transposed 16 x 16
  // pairs at a time in registers; keys past `keys` are zero.
  void pack_key_pairs(const BFloat16* k, int64_t stride, int keys, int padded) {
    VecF block[kLanes];
    for (int c = 0; c < padded; c += kLanes)
      for (int d2 = 0; d2 < dim_ / 2; d2 += kLanes) {
        for (int i = 0; i < kLanes; ++i)
          block[i] = c + i < keys ? VecF{_mm512_loadu_ps(k + (c + i) * stride + 2 * d2)} : broadcast(0.0f);
        transpose(block);
        for (int i = 0; i < kLanes; ++i)
          _mm512_storeu_ps(reinterpret_cast<float*>(k_pairs_.data() + int64_t(d2 + i) * padded + c), block[i].v);
      }
  }

  // v_pairs_[c/2][d] = (v[c][d], v[c+1][d]): two value rows interleaved 16 bits at a time; a row
  // past `keys` is zero.
  void pack_value_pairs(const BFloat16* v, int64_t stride, int keys, int padded) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int c = 0; c < padded; c += 2) {
      uint32_t* out = v_pairs_.data() + int64_t(c / 2) * dim_;
      for (int d = 0; d < dim_; d += 32) {
        const __m512i first = c < keys ? _mm512_loadu_si512(v + c * stride + d) : _mm512_setzero_si512();
        const __m512i second = c + 1 < keys ? _mm512_loadu_si512(v + (c + 1) * stride + d) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(first, low, second));
        _mm512_storeu_si512(out + d + kLanes, _mm512_permutex2var_epi16(first, high, second));
      }
    }
  }

  // n (a multiple of 16) fp32 values to bf16 pairs, round to nearest even.
  static void round_to_bf16(const float* src, int n, uint32_t* dst) {
    int c = 0;
    for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
      const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + kLanes), _mm512_loadu_ps(src + c));
      _mm512_storeu_si512(dst + c / 2, (__m512i)pair);
    }
    if (c < n) _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
  }

  Workspace<float>& w_;
  int dim_, padded_max_;
  float scale_ = 1.0f;
  std::vector<uint32_t> k_pairs_, v_pairs_, p_;  // bf16 pairs
  std::vector<const BFloat16*> q_rows_, a_ptr_;
};

}  // namespace

void block_sparse_attention_forward_bf16(const attention::BlockSparseForwardParams& p) {
  forward_pass<BFloat16, DotKernel>(p);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
