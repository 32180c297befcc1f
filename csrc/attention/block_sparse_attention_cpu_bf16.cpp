// block_sparse_attention's forward and backward for bf16 with AVX512_BF16 dot products
// (vdpbf16ps); the walks, masks and softmax steps: attention/block_sparse_attention_cpu_forward.h.
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
//
// With cpu::amx_bf16_kernel_mode() on (or emulate), every product runs on AMX-BF16 tiles
// instead (PairMatmul, common/cpu/amx_pair_matmul.h): the packed pair layouts above are
// TDPBF16PS's B operand as they are. There the forward also takes runs of whole key blocks as one
// group (DotKernel), and S leaves the tiles unscaled (the softmax applies the scale) and P V adds
// to O in place where the softmax left alpha at 1.
#include <cstring>
#include <optional>
#include <unordered_map>
#include <utility>
#include <vector>

#include "attention/block_sparse_attention_cpu_forward.h"
#include "common/cpu/aligned_buffer.h"
#include "common/cpu/amx.h"
#include "common/cpu/amx_pair_matmul.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {
namespace {

using namespace block_sparse_cpu;

constexpr int kLanes = 16;  // fp32 lanes of a zmm; pairs of bf16 per dot-product vector

// Pair k of a bf16 row (bf16 2k and 2k + 1) in every 32-bit lane; the row may be 2-byte aligned only.
inline __m512bh broadcast_pair(const BFloat16* row, int64_t k) {
  int32_t pair;
  std::memcpy(&pair, row + 2 * k, sizeof(pair));
  return (__m512bh)_mm512_set1_epi32(pair);
}

// c[r][n0, n0 + 16 NV) = out_scale * sum_k a[r].pair(k) . b[k][n0, ...) (row_scale null) or
// row_scale[r] * c[r][...] + that sum (unscaled); b rows ld_b uint32 apart, a row's pairs ld_a
// pairs apart (1: a bf16 row; more: a column of a [pairs x ld_a] pair matrix).
template <int R, int NV>
void dot_tile(const BFloat16* const* a, const uint32_t* b, int64_t ld_b, int pairs, float* const* c, int n0,
              const float* row_scale, float out_scale, int64_t ld_a) {
  __m512 acc[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v)
      acc[r][v] = row_scale ? _mm512_mul_ps(_mm512_loadu_ps(c[r] + n0 + v * kLanes), _mm512_set1_ps(row_scale[r]))
                            : _mm512_setzero_ps();
  for (int k = 0; k < pairs; ++k) {
    __m512bh bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + k * ld_b + n0 + v * kLanes);
    for (int r = 0; r < R; ++r) {
      const __m512bh ar = broadcast_pair(a[r], k * ld_a);
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
                   int n0, const float* row_scale, float out_scale, int64_t ld_a) {
  int r = 0;
  for (; r + R <= rows; r += R)
    dot_tile<R, NV>(a + r, b, ld_b, pairs, c + r, n0, row_scale ? row_scale + r : nullptr, out_scale, ld_a);
  if constexpr (R > 1) {
    if (r < rows)
      dot_row_tiles<R / 2, NV>(a + r, rows - r, b, ld_b, pairs, c + r, n0, row_scale ? row_scale + r : nullptr,
                               out_scale, ld_a);
  }
}

// The whole [rows x cols] product (cols a multiple of 16): 4 rows x 4 vectors (16 accumulators
// of 32 zmm), then 4 x 2, then 8 rows x 1 vector (a 16-key block), as the FMA kernel tiles.
void dot_matmul(const BFloat16* const* a, int rows, const uint32_t* b, int64_t ld_b, int pairs, float* const* c,
                int cols, const float* row_scale, float out_scale, int64_t ld_a = 1) {
  int n0 = 0;
  for (; n0 + 4 * kLanes <= cols; n0 += 4 * kLanes)
    dot_row_tiles<4, 4>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale, ld_a);
  for (; n0 + 2 * kLanes <= cols; n0 += 2 * kLanes)
    dot_row_tiles<4, 2>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale, ld_a);
  for (; n0 + kLanes <= cols; n0 += kLanes) dot_row_tiles<8, 1>(a, rows, b, ld_b, pairs, c, n0, row_scale, out_scale, ld_a);
}

// The kernels' products: dot_matmul, or amx::tile_pair_matmul on the hardware or emulated tiles
// as cpu::amx_bf16_kernel_mode() says when the kernel is built (once per parallel_for chunk, on
// the thread that runs it: the tile configuration is per thread, held while the kernel lives).
class PairMatmul {
 public:
  PairMatmul() {
    switch (amx_bf16_kernel_mode()) {
      case AmxMode::kOn:
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
        hardware_.emplace();
#endif
        break;
      case AmxMode::kEmulate:
        emulated_.emplace();
        break;
      case AmxMode::kOff:
        break;
    }
  }

  // b_segment_shifts / b_segment_pairs: B in segments (amx::tile_pair_matmul), given only where
  // the products run on tiles (DotKernel::max_group_blocks).
  void operator()(const BFloat16* const* a, int rows, const uint32_t* b, int64_t ld_b, int pairs, float* const* c,
                  int cols, const float* row_scale, float out_scale, int64_t ld_a = 1,
                  const int64_t* b_segment_shifts = nullptr, int64_t b_segment_pairs = 0) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
    if (hardware_)
      return amx::tile_pair_matmul<amx::HardwareTiles>(a, rows, 2 * int64_t(pairs), ld_a, b, ld_b, pairs, c, cols,
                                                       row_scale, out_scale, staging_, b_segment_shifts,
                                                       b_segment_pairs);
#endif
    if (emulated_)
      return amx::tile_pair_matmul<amx::EmulatedTiles>(a, rows, 2 * int64_t(pairs), ld_a, b, ld_b, pairs, c, cols,
                                                       row_scale, out_scale, staging_, b_segment_shifts,
                                                       b_segment_pairs);
    dot_matmul(a, rows, b, ld_b, pairs, c, cols, row_scale, out_scale, ld_a);
  }

 private:
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__AMX_BF16__)
  std::optional<amx::TileSession<amx::HardwareTiles>> hardware_;
#endif
  std::optional<amx::TileSession<amx::EmulatedTiles>> emulated_;
  LineAlignedVector<uint32_t> staging_;  // the A rows as tile steps
};

// pairs[d/2][c] = (k[c][d], k[c][d+1]), pairs along the head dim: each key row is dim/2 32-bit pairs,
// transposed 16 x 16 pairs at a time in registers; keys past `keys` are zero.
void pack_dim_pairs(const BFloat16* k, int64_t stride, int keys, int padded, int dim, uint32_t* pairs) {
  VecF block[kLanes];
  for (int c = 0; c < padded; c += kLanes)
    for (int d2 = 0; d2 < dim / 2; d2 += kLanes) {
      for (int i = 0; i < kLanes; ++i)
        block[i] = c + i < keys ? VecF{_mm512_loadu_ps(k + (c + i) * stride + 2 * d2)} : broadcast(0.0f);
      transpose(block);
      for (int i = 0; i < kLanes; ++i)
        _mm512_storeu_ps(reinterpret_cast<float*>(pairs + int64_t(d2 + i) * padded + c), block[i].v);
    }
}

// pairs[c/2][d] = (row(c)[d], row(c+1)[d]), pairs along the rows: two rows interleaved 16 bits at a
// time; rows past `count` are zero, `padded` even, dim a multiple of 16.
template <typename RowOf>
void pack_row_pairs(const RowOf& row, int count, int padded, int dim, uint32_t* pairs) {
  const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37,
                                       5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
  const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
  for (int c = 0; c < padded; c += 2) {
    uint32_t* out = pairs + int64_t(c / 2) * dim;
    for (int d = 0; d < dim; d += 32) {
      const __mmask32 part = dim - d >= 32 ? ~__mmask32(0) : __mmask32(0xFFFF);  // a last 16 values
      const __m512i first = c < count ? _mm512_maskz_loadu_epi16(part, row(c) + d) : _mm512_setzero_si512();
      const __m512i second = c + 1 < count ? _mm512_maskz_loadu_epi16(part, row(c + 1) + d) : _mm512_setzero_si512();
      _mm512_storeu_si512(out + d, _mm512_permutex2var_epi16(first, low, second));
      if (dim - d >= 32) _mm512_storeu_si512(out + d + kLanes, _mm512_permutex2var_epi16(first, high, second));
    }
  }
}

// n (a multiple of 16) fp32 values to bf16 pairs, round to nearest even.
void round_to_bf16(const float* src, int n, uint32_t* dst) {
  int c = 0;
  for (; c + 2 * kLanes <= n; c += 2 * kLanes) {
    const __m512bh pair = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + c + kLanes), _mm512_loadu_ps(src + c));
    _mm512_storeu_si512(dst + c / 2, (__m512i)pair);
  }
  if (c < n)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + c / 2), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + c)));
}

// The forward's packed key blocks (K, then V, as bf16 pairs), kept for the parallel_for chunk
// that packed them: a chunk walks the same key blocks once per query block, and once more per
// query head of a GQA group, so packing each once (measured with perf on a Sapphire Rapids VM,
// S = 4096, D = 128: the K packing alone took a tenth of the AMX forward). Keyed by the block's
// first K row (unique per batch, head and block within a call; a chunk lives within one call).
// About kMaxBytes per thread (S = 8192, D = 128: one KV head's 128 blocks of 64 keys are 4 MB):
// make_room starts over past it, between groups of blocks (a group's blocks stay put).
class PackedKeyBlocks {
 public:
  static constexpr size_t kMaxBytes = size_t(8) << 20;

  void make_room(size_t words) {
    if ((data_.size() + words) * sizeof(uint32_t) <= kMaxBytes) return;
    index_.clear();
    data_.clear();
  }
  // The offset of the block's packed pairs (2 * words), and whether it must be packed there now.
  std::pair<size_t, bool> slot(const BFloat16* k, const BFloat16* v, int keys, int padded, size_t words) {
    const auto found = index_.find(k);
    if (found != index_.end() && found->second.v == v && found->second.keys == keys &&
        found->second.padded == padded)
      return {found->second.offset, false};
    const size_t offset = data_.size();
    data_.resize(offset + 2 * words);
    index_[k] = Entry{v, keys, padded, offset};
    return {offset, true};
  }
  uint32_t* at(size_t offset) { return data_.data() + offset; }

 private:
  struct Entry {
    const BFloat16* v;
    int keys, padded;
    size_t offset;
  };
  std::unordered_map<const BFloat16*, Entry> index_;
  LineAlignedVector<uint32_t> data_;  // tile operands: blocks start on lines (padded x dim / 2 words)
};

// The forward's policy (forward_pass). On tiles, up to kTileGroupBlocks key blocks at once (the
// whole ones of 32-key multiples): S of each block into its columns of one score row, then one
// P V product over all their keys, B the blocks' V pairs as segments. A block's P V alone is 2
// tile steps of k per 32 x 32 block of O, against loading and storing that block of O (measured
// on a Sapphire Rapids VM, 64-key blocks, D = 128: ~40 cycles per TDPBF16PS instead of ~16).
class DotKernel {
 public:
  static constexpr int kTileGroupBlocks = 8;
  static_assert(kTileGroupBlocks <= kMaxGroupBlocks);

  static int max_group_blocks(const Geometry& g) {
    return amx::bf16_products_on_tiles() && g.block_kv % 32 == 0 ? kTileGroupBlocks : 1;
  }

  DotKernel(Workspace<float>& w, const Geometry& g)
      : w_(w), dim_(g.head_dim),
        p_(size_t(g.block_q) * round_up_to_lanes<float>(g.block_kv) * max_group_blocks(g) / 2),
        q_rows_(size_t(g.block_q)), a_ptr_(size_t(g.block_q)) {}

  void load_queries(const BFloat16* q, int64_t stride, int n, float scale) {
    scale_ = scale;
    for (int r = 0; r < n; ++r) q_rows_[r] = q + r * stride;
  }

  void load_keys(const BFloat16* k, int64_t k_stride, const BFloat16* v, int64_t v_stride, int keys, int padded) {
    block_words_ = size_t(padded) * dim_ / 2;
    if (count_ == 0) packed_.make_room(2 * block_words_ * kTileGroupBlocks);
    const auto [offset, fresh] = packed_.slot(k, v, keys, padded, block_words_);
    group_[count_++] = offset;
    if (!fresh) return;
    pack_dim_pairs(k, k_stride, keys, padded, dim_, packed_.at(offset));
    pack_row_pairs([&](int c) { return v + c * v_stride; }, keys, padded, dim_, packed_.at(offset + block_words_));
  }

  float score_scale() const { return scale_; }  // applied by the softmax: the tiles store S as it is

  void scores(int active, int width) {
    const int padded = width / count_;
    for (int a = 0; a < active; ++a) a_ptr_[a] = q_rows_[w_.rows[a]];
    for (int i = 0; i < count_; ++i) {
      w_.point(w_.c_ptr.data(), w_.s.data() + i * padded, width, active);
      matmul_(a_ptr_.data(), active, packed_.at(group_[i]), padded, dim_ / 2, w_.c_ptr.data(), padded, nullptr, 1.0f);
    }
  }

  // P as bf16 (round to nearest even) for the P V product, straight from the softmax.
  auto p_store(int a, int width) {
    return [row = p_.data() + int64_t(a) * width / 2](int c, VecF p) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + c / 2), (__m256i)_mm512_cvtneps_pbh(p.v));
    };
  }

  void accumulate(int active, int width, float* acc) {
    for (int a = 0; a < active; ++a) a_ptr_[a] = reinterpret_cast<const BFloat16*>(p_.data() + int64_t(a) * width / 2);
    w_.point(w_.c_ptr.data(), acc, dim_, active, w_.rows.data());
    int64_t shifts[kMaxGroupBlocks];  // bytes from the first block's V pairs to each block's
    for (int i = 0; i < count_; ++i) shifts[i] = int64_t(group_[i] - group_[0]) * int64_t(sizeof(uint32_t));
    matmul_(a_ptr_.data(), active, packed_.at(group_[0] + block_words_), dim_, width / 2, w_.c_ptr.data(), dim_,
            w_.scale.data(), 1.0f, 1, count_ > 1 ? shifts : nullptr, width / count_ / 2);
    count_ = 0;
  }

 private:
  Workspace<float>& w_;
  int dim_;
  float scale_ = 1.0f;
  PackedKeyBlocks packed_;
  size_t group_[kMaxGroupBlocks] = {};  // the group's key blocks: K pairs at group_[i], V pairs after
  int count_ = 0;
  size_t block_words_ = 0;
  LineAlignedVector<uint32_t> p_;  // bf16 pairs
  std::vector<const BFloat16*> q_rows_, a_ptr_;
  PairMatmul matmul_;
};

// The backward's policy (backward_pass): the five products with vdpbf16ps on bf16 operands, fp32
// accumulators. S = Q K^T and dP = dO V^T pair along the head dim (K and V packed as the forward
// packs K, the query and output-gradient rows used in place); dQ += dS K pairs along the keys (K
// packed as the forward packs V); dV += P^T dO and dK += dS^T Q pair along the query rows (rows of
// dO and Q interleaved, and so rows of P and dS, whose columns are then the P^T and dS^T rows). P
// and dS are rounded to bf16 for these products, as FlashAttention's backward does on GPUs; the
// softmax gradient itself runs in fp32.
class BackwardDotKernel {
 public:
  static constexpr bool kScaledKeyGrad = true;  // the queries are not pre-scaled

  BackwardDotKernel(Workspace<float>& w, const Geometry& g)
      : w_(w), dim_(g.head_dim), rows_max_(g.block_q + 1), padded_max_(round_up_to_lanes<float>(g.block_kv)),
        k_pairs_(size_t(padded_max_) * dim_ / 2), v_pairs_(k_pairs_.size()), k_row_pairs_(k_pairs_.size()),
        q_pairs_(size_t(rows_max_ / 2) * dim_), d_out_pairs_(q_pairs_.size()),
        p_(size_t(g.block_q) * padded_max_ / 2), ds_(p_.size()), p_t_(size_t(rows_max_ / 2) * padded_max_),
        ds_t_(p_t_.size()), q_rows_(size_t(g.block_q)), d_out_rows_(size_t(g.block_q)),
        a_ptr_(size_t(std::max(g.block_q, padded_max_))), ones_(a_ptr_.size(), 1.0f) {}

  void load_queries(const BFloat16* q, int64_t q_stride, const BFloat16* d_out, int64_t d_out_stride, int n,
                    float scale) {
    scale_ = scale;
    for (int r = 0; r < n; ++r) {
      q_rows_[r] = q + r * q_stride;
      d_out_rows_[r] = d_out + r * d_out_stride;
    }
  }

  void load_active_queries(const BFloat16* q, int64_t q_stride, const BFloat16* d_out, int64_t d_out_stride,
                           const int* rows, int active, float scale) {
    load_queries(q, q_stride, d_out, d_out_stride, 0, scale);
    for (int a = 0; a < active; ++a) {
      q_rows_[a] = q + rows[a] * q_stride;
      d_out_rows_[a] = d_out + rows[a] * d_out_stride;
    }
    const int even = active + (active & 1);
    pack_row_pairs([&](int a) { return q_rows_[a]; }, active, even, dim_, q_pairs_.data());
    pack_row_pairs([&](int a) { return d_out_rows_[a]; }, active, even, dim_, d_out_pairs_.data());
  }

  void load_keys(const BFloat16* k, int64_t k_stride, const BFloat16* v, int64_t v_stride, int keys, int padded,
                 bool with_rows) {
    pack_dim_pairs(k, k_stride, keys, padded, dim_, k_pairs_.data());
    pack_dim_pairs(v, v_stride, keys, padded, dim_, v_pairs_.data());
    if (with_rows) pack_row_pairs([&](int c) { return k + c * k_stride; }, keys, padded, dim_, k_row_pairs_.data());
  }

  void scores(int active, int padded, const int* index) {
    w_.point(w_.c_ptr.data(), w_.s.data(), padded, active);
    for (int a = 0; a < active; ++a) a_ptr_[a] = q_rows_[index ? index[a] : a];
    matmul_(a_ptr_.data(), active, k_pairs_.data(), padded, dim_ / 2, w_.c_ptr.data(), padded, nullptr, scale_);
    w_.point(w_.c_ptr.data(), w_.dp.data(), padded, active);
    for (int a = 0; a < active; ++a) a_ptr_[a] = d_out_rows_[index ? index[a] : a];
    matmul_(a_ptr_.data(), active, v_pairs_.data(), padded, dim_ / 2, w_.c_ptr.data(), padded, nullptr, 1.0f);
  }

  void accumulate_dq(int active, int padded) {
    for (int a = 0; a < active; ++a) a_ptr_[a] = rounded(w_.dp.data(), ds_.data(), a, padded);
    w_.point(w_.c_ptr.data(), w_.acc.data(), dim_, active, w_.rows.data());
    matmul_(a_ptr_.data(), active, k_row_pairs_.data(), dim_, padded / 2, w_.c_ptr.data(), dim_, ones_.data(),
            1.0f);
  }

  void accumulate_dkv(int active, int keys, int padded, float* dk, float* dv) {
    const int even = active + (active & 1);
    row_pairs(w_.s.data(), p_.data(), p_t_.data(), active, keys, padded);
    w_.point(w_.c_ptr.data(), dv, dim_, keys);
    matmul_(a_ptr_.data(), keys, d_out_pairs_.data(), dim_, even / 2, w_.c_ptr.data(), dim_, ones_.data(), 1.0f,
            padded);
    row_pairs(w_.dp.data(), ds_.data(), ds_t_.data(), active, keys, padded);
    w_.point(w_.c_ptr.data(), dk, dim_, keys);
    matmul_(a_ptr_.data(), keys, q_pairs_.data(), dim_, even / 2, w_.c_ptr.data(), dim_, ones_.data(), 1.0f,
            padded);
  }

 private:
  // Row a of src ([.. x padded] fp32) rounded to bf16 into the same row of dst.
  static const BFloat16* rounded(const float* src, uint32_t* dst, int a, int padded) {
    round_to_bf16(src + int64_t(a) * padded, padded, dst + int64_t(a) * padded / 2);
    return reinterpret_cast<const BFloat16*>(dst + int64_t(a) * padded / 2);
  }
  // The active rows of src ([.. x padded] fp32) rounded to bf16 (into bf16) and paired along the
  // rows into pairs ([even/2 x padded]): column c of pairs is row c of src^T as bf16 pairs, which
  // a_ptr_[c] points at (pair stride padded).
  void row_pairs(const float* src, uint32_t* bf16, uint32_t* pairs, int active, int keys, int padded) {
    for (int a = 0; a < active; ++a) rounded(src, bf16, a, padded);
    const BFloat16* rows = reinterpret_cast<const BFloat16*>(bf16);
    pack_row_pairs([&](int a) { return rows + int64_t(a) * padded; }, active, active + (active & 1), padded, pairs);
    for (int c = 0; c < keys; ++c) a_ptr_[c] = reinterpret_cast<const BFloat16*>(pairs + c);
  }

  Workspace<float>& w_;
  int dim_, rows_max_, padded_max_;
  float scale_ = 1.0f;
  // bf16 pairs
  LineAlignedVector<uint32_t> k_pairs_, v_pairs_, k_row_pairs_, q_pairs_, d_out_pairs_, p_, ds_, p_t_, ds_t_;
  std::vector<const BFloat16*> q_rows_, d_out_rows_, a_ptr_;
  std::vector<float> ones_;
  PairMatmul matmul_;
};

}  // namespace

void block_sparse_attention_forward_bf16(const attention::BlockSparseForwardParams& p) {
  forward_pass<BFloat16, DotKernel>(p);
}

void block_sparse_attention_backward_bf16(const attention::BlockSparseBackwardParams& p) {
  backward_pass<BFloat16, BackwardDotKernel>(p);
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
