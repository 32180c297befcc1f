// CPU kernels of block-sparse attention and MoBA gating, compiled once per ISA level.
//
// FlashAttention-2 on the CPU. A forward task is one query block of one (batch, head): its rows
// are widened to fp32 and pre-scaled once; for every listed key block the keys are packed
// transposed and the values row-major (fp32, zero-padded to whole vectors), S = Q K^T comes from
// a register-blocked micro-kernel, the online softmax turns S into P in place, and
// O = alpha * O + P V runs through the same micro-kernel. Only the rows that see the key block
// take part ("active" rows: not wholly above the causal diagonal and, under MoBA, rows that chose
// the block), addressed through row-pointer arrays, so token-level selection costs only what it
// computes and no tile is copied to compact it. The backward recomputes P from lse: dq per query
// block, dk/dv per key block walking the transposed lists; every output element has one writer,
// so there are no atomics and results are deterministic. fp64 (gradcheck, reference checks) runs
// the same code with one double lane.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "attention/block_sparse_attention.h"
#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {

// One double lane with VecF's interface, so the fp64 path runs the same kernels. Beside VecF's
// overloads (not in the anonymous namespace below, where these names would hide them).
struct VecD {
  static constexpr int kWidth = 1;
  double v;
};
inline VecD load(const double* p) { return {*p}; }
inline void store(double* p, VecD x) { *p = x.v; }
inline VecD operator-(VecD a, VecD b) { return {a.v - b.v}; }
inline VecD operator+(VecD a, VecD b) { return {a.v + b.v}; }
inline VecD operator*(VecD a, VecD b) { return {a.v * b.v}; }
inline VecD fmadd(VecD a, VecD b, VecD c) { return {a.v * b.v + c.v}; }
inline VecD max(VecD a, VecD b) { return {a.v > b.v ? a.v : b.v}; }
inline VecD exp(VecD a) { return {std::exp(a.v)}; }
inline double reduce_max(VecD a) { return a.v; }
inline double reduce_add(VecD a) { return a.v; }
inline void transpose(VecD (&)[1]) {}

namespace {

using attention::BlockList;
using attention::BlockSparseBackwardParams;
using attention::BlockSparseForwardParams;
using attention::Bhsd;
using attention::MobaBlockListsParams;
using attention::MobaSelectParams;
using attention::MutableBhsd;
using attention::TokenSelection;

// The arithmetic type of storage type T (fp32 for fp32/bf16/fp16, fp64 for fp64) and its vector.
template <typename T>
using AccOf = std::conditional_t<std::is_same_v<T, double>, double, float>;
template <typename Acc>
struct Lanes {
  using Vec = VecF;
  static VecF splat(float x) { return broadcast(x); }
};
template <>
struct Lanes<double> {
  using Vec = VecD;
  static VecD splat(double x) { return {x}; }
};
template <typename Acc>
constexpr int kWidthOf = Lanes<Acc>::Vec::kWidth;
template <typename Acc>
constexpr Acc kInf = std::numeric_limits<Acc>::infinity();

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
template <typename Acc>
int round_up_to_lanes(int n) {
  return int(ceil_div(n, kWidthOf<Acc>) * kWidthOf<Acc>);
}
// Task t of n in the order 0, n-1, 1, n-2, ...: parallel_for hands each thread a contiguous range,
// and under causal masking late query blocks cost more than early ones.
inline int64_t zigzag(int64_t t, int64_t n) { return t % 2 == 0 ? t / 2 : n - 1 - t / 2; }

template <typename T>
const T* row_of(const Bhsd& t, int64_t b, int64_t h, int64_t s) {
  return static_cast<const T*>(t.data) + b * t.batch_stride + h * t.head_stride + s * t.seq_stride;
}
template <typename T>
T* row_of(const MutableBhsd& t, int64_t b, int64_t h, int64_t s) {
  return static_cast<T*>(t.data) + b * t.batch_stride + h * t.head_stride + s * t.seq_stride;
}

// ---------------------------------------------------------------------------------------------
// The micro-kernel: c[r][0, cols) = init + sum_k a[r][k] * b[k][0, cols) over row pointers, cols a
// multiple of the vector width. S = Q K^T is (Q rows) x (K^T rows), O += P V is (P rows) x (V
// rows), dV += P^T dO is (P^T rows) x (dO rows): the same kernel with different pointer arrays.
// ---------------------------------------------------------------------------------------------
enum class Init { kZero, kAccumulate, kScaled };  // kScaled: c[r] * row_scale[r] + ...

template <typename Acc, int R, int NV>
void tile(const Acc* const* a, const Acc* const* b, int depth, Acc* const* c, int n0, Init init,
          const Acc* row_scale) {
  using L = Lanes<Acc>;
  using V = typename L::Vec;
  constexpr int W = V::kWidth;
  const Acc* a_row[R];
  V acc[R][NV];
  for (int r = 0; r < R; ++r) {
    a_row[r] = a[r];
    for (int v = 0; v < NV; ++v) {
      if (init == Init::kZero) {
        acc[r][v] = L::splat(Acc(0));
      } else {
        const V old = load(c[r] + n0 + v * W);
        acc[r][v] = init == Init::kAccumulate ? old : old * L::splat(row_scale[r]);
      }
    }
  }
  for (int k = 0; k < depth; ++k) {
    const Acc* b_row = b[k] + n0;
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b_row + v * W);
    for (int r = 0; r < R; ++r) {
      const V ar = L::splat(a_row[r][k]);
      for (int v = 0; v < NV; ++v) acc[r][v] = fmadd(ar, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) store(c[r] + n0 + v * W, acc[r][v]);
}

// All rows in tiles of R, the remainder in tiles of R/2, R/4, ...
template <typename Acc, int R, int NV>
void row_tiles(const Acc* const* a, int rows, const Acc* const* b, int depth, Acc* const* c, int n0, Init init,
               const Acc* row_scale) {
  int r = 0;
  for (; r + R <= rows; r += R) tile<Acc, R, NV>(a + r, b, depth, c + r, n0, init, row_scale ? row_scale + r : nullptr);
  if constexpr (R > 1) {
    if (r < rows)
      row_tiles<Acc, R / 2, NV>(a + r, rows - r, b, depth, c + r, n0, init, row_scale ? row_scale + r : nullptr);
  }
}

template <typename Acc>
void matmul(const Acc* const* a, int rows, const Acc* const* b, int depth, Acc* const* c, int cols, Init init,
            const Acc* row_scale = nullptr) {
  constexpr int W = kWidthOf<Acc>;
  constexpr int kVecs = W == 8 ? 2 : 4;  // 4 rows x kVecs accumulators: AVX2 has 16 registers, AVX-512 32
  int n0 = 0;
  for (; n0 + kVecs * W <= cols; n0 += kVecs * W) row_tiles<Acc, 4, kVecs>(a, rows, b, depth, c, n0, init, row_scale);
  if constexpr (kVecs > 2) {
    for (; n0 + 2 * W <= cols; n0 += 2 * W) row_tiles<Acc, 4, 2>(a, rows, b, depth, c, n0, init, row_scale);
  }
  // One vector of columns (a 16-key block with AVX-512): 8 rows keep 8 FMA chains in flight.
  for (; n0 + W <= cols; n0 += W) row_tiles<Acc, 8, 1>(a, rows, b, depth, c, n0, init, row_scale);
}

// ---------------------------------------------------------------------------------------------
// Packing: a key block as rows [padded x dim] or transposed [dim x padded], widened to Acc, rows
// past `count` zero (their scores are masked; zero keeps 0 * value finite).
// ---------------------------------------------------------------------------------------------
template <typename T, typename Acc>
void pack_rows(const T* src, int64_t stride, int count, int padded, int dim, Acc scale, Acc* dst) {
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  for (int r = 0; r < padded; ++r)
    for (int d = 0; d < dim; d += W)
      store(dst + int64_t(r) * dim + d, r < count ? load(src + r * stride + d) * L::splat(scale) : L::splat(Acc(0)));
}

template <typename T, typename Acc>
void pack_transposed(const T* src, int64_t stride, int count, int padded, int dim, Acc* dst) {
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  typename L::Vec block[W];
  for (int c = 0; c < padded; c += W)
    for (int d = 0; d < dim; d += W) {
      for (int i = 0; i < W; ++i) block[i] = c + i < count ? load(src + (c + i) * stride + d) : L::splat(Acc(0));
      transpose(block);
      for (int i = 0; i < W; ++i) store(dst + int64_t(d + i) * padded + c, block[i]);
    }
}

// ---------------------------------------------------------------------------------------------
// Which rows of a query block see which keys of a key block.
// ---------------------------------------------------------------------------------------------
struct Geometry {
  int64_t seq_q, seq_kv;
  int32_t block_q, block_kv, head_dim;
  bool causal;

  explicit Geometry(const BlockSparseForwardParams& p)
      : seq_q(p.seq_q), seq_kv(p.seq_kv), block_q(p.block_q), block_kv(p.block_kv), head_dim(p.head_dim),
        causal(p.causal) {}
  int rows_in(int64_t query_block) const { return int(std::min<int64_t>(block_q, seq_q - query_block * block_q)); }
  int keys_in(int64_t key_block) const { return int(std::min<int64_t>(block_kv, seq_kv - key_block * block_kv)); }
  // The last key query i sees (bottom-right causal alignment); negative: none.
  int64_t last_key(int64_t i) const { return causal ? i + seq_kv - seq_q : seq_kv - 1; }
};

// MoBA: which rows of one query block chose which key blocks, as a bitset over the block's rows per
// key block. Marking costs rows x top_k once per query block; finding the rows that chose a listed
// block is then a scan of a few words. (Scanning every row's top_k choices for every listed block
// instead cost as much as the attention itself at block 16 / top-32: 64 x 32 compares per block.)
class RowChoices {
 public:
  RowChoices(int64_t num_kv_blocks, int block_q)
      : words_((block_q + 63) / 64), bits_(size_t(std::max<int64_t>(num_kv_blocks, 1)) * words_, 0) {}
  // Marks the choices of rows [r0, r0 + n) of (b, h), or unmarks them (restoring all-zero bits
  // touching only what was set: the lists may be far shorter than nk).
  void mark(const TokenSelection& sel, int64_t b, int64_t h, int64_t r0, int n) { visit(sel, b, h, r0, n, true); }
  void unmark(const TokenSelection& sel, int64_t b, int64_t h, int64_t r0, int n) { visit(sel, b, h, r0, n, false); }
  int words() const { return words_; }
  const uint64_t* rows_of(int32_t key_block) const { return bits_.data() + int64_t(key_block) * words_; }

 private:
  void visit(const TokenSelection& sel, int64_t b, int64_t h, int64_t r0, int n, bool set) {
    for (int r = 0; r < n; ++r) {
      const int32_t* chosen = sel.blocks + b * sel.batch_stride + h * sel.head_stride + (r0 + r) * sel.seq_stride;
      for (int t = 0; t < sel.top_k; ++t) {
        if (chosen[t] < 0) continue;
        uint64_t& word = bits_[size_t(chosen[t]) * words_ + r / 64];
        word = set ? word | (uint64_t(1) << (r % 64)) : 0;
      }
    }
  }
  int words_;
  std::vector<uint64_t> bits_;  // [nk][words_]
};

// The rows of query block qb (local indices, ascending) that see key block kb, and how many of its
// keys each sees: always a prefix, as the causal limit and the end of the sequence cut from the
// right. `choices` (MoBA; nullptr: every row) holds the rows of qb that chose each block.
inline int active_rows(const Geometry& g, const RowChoices* choices, int64_t qb, int32_t kb, int* rows,
                       int* visible) {
  const int64_t r0 = qb * g.block_q, c0 = int64_t(kb) * g.block_kv;
  const int keys = g.keys_in(kb);
  int active = 0;
  const auto take = [&](int r) {
    const int64_t seen = std::min<int64_t>(keys, g.last_key(r0 + r) - c0 + 1);
    if (seen <= 0) return;
    rows[active] = r;
    visible[active++] = int(seen);
  };
  if (choices == nullptr) {
    for (int r = 0, n = g.rows_in(qb); r < n; ++r) take(r);
    return active;
  }
  const uint64_t* bits = choices->rows_of(kb);
  for (int word = 0; word < choices->words(); ++word)
    for (uint64_t m = bits[word]; m != 0; m &= m - 1) take(word * 64 + std::countr_zero(m));
  return active;
}

inline const int32_t* list_of(const BlockList& l, int64_t b, int64_t h, int64_t block, int32_t* count) {
  *count = l.counts[b * l.counts_batch_stride + h * l.counts_head_stride + block];
  return l.indices + b * l.indices_batch_stride + h * l.indices_head_stride + block * l.max_blocks;
}

// ---------------------------------------------------------------------------------------------
// Row-wise softmax steps on a score row of `padded` columns, the first `visible` of them real.
// ---------------------------------------------------------------------------------------------
// Online softmax: s becomes P = exp(s - m_new) (0 past `visible`); m and l are updated and alpha
// = exp(m_old - m_new) rescales the row's running output (0 on its first block: m_old = -inf).
template <typename Acc>
void online_softmax_row(Acc* s, int visible, int padded, Acc& m, Acc& l, Acc& alpha) {
  using L = Lanes<Acc>;
  using V = typename L::Vec;
  constexpr int W = V::kWidth;
  for (int c = visible; c < padded; ++c) s[c] = -kInf<Acc>;
  V row_max = L::splat(-kInf<Acc>);
  for (int c = 0; c < padded; c += W) row_max = max(row_max, load(s + c));
  const Acc m_new = std::max(m, Acc(reduce_max(row_max)));
  alpha = std::exp(m - m_new);
  const V shift = L::splat(m_new);
  V sum = L::splat(Acc(0));
  for (int c = 0; c < padded; c += W) {
    const V p = exp(load(s + c) - shift);
    store(s + c, p);
    sum = sum + p;
  }
  // VecF's exp saturates at ~1e-38 instead of 0 for the masked lanes: far below one ulp of l (>= 1)
  // in the sum, but P itself must be exactly 0 there.
  for (int c = visible; c < padded; ++c) s[c] = Acc(0);
  l = l * alpha + Acc(reduce_add(sum));
  m = m_new;
}

// Backward: s becomes P = exp(s - lse) and dp becomes dS = P * (dP - delta), both 0 past `visible`.
template <typename Acc>
void softmax_grad_row(Acc* s, Acc* dp, int visible, int padded, Acc lse, Acc delta) {
  using L = Lanes<Acc>;
  using V = typename L::Vec;
  constexpr int W = V::kWidth;
  const V shift = L::splat(lse), d = L::splat(delta);
  for (int c = 0; c < padded; c += W) {
    const V p = exp(load(s + c) - shift);
    store(s + c, p);
    store(dp + c, p * (load(dp + c) - d));
  }
  for (int c = visible; c < padded; ++c) s[c] = dp[c] = Acc(0);
}

// Thread-local buffers of one parallel_for chunk, sized for the largest block.
template <typename Acc>
struct Workspace {
  std::vector<Acc> q, d_out, acc, k_t, v_t, k_rows, v_rows, s, dp, p_t, ds_t, m, l, scale;
  std::vector<int> rows, visible;
  std::vector<const Acc*> a_ptr, b_ptr;
  std::vector<Acc*> c_ptr;
  RowChoices choices;

  explicit Workspace(const Geometry& g) : choices(ceil_div(g.seq_kv, g.block_kv), g.block_q) {
    const size_t bq = size_t(g.block_q), d = size_t(g.head_dim);
    const size_t kp = size_t(round_up_to_lanes<Acc>(g.block_kv));
    const size_t pointers = std::max({bq, kp, d});
    for (auto* v : {&q, &d_out, &acc}) v->resize(bq * d);
    for (auto* v : {&k_t, &v_t, &k_rows, &v_rows}) v->resize(kp * d);
    for (auto* v : {&s, &dp, &p_t, &ds_t}) v->resize(bq * kp);
    for (auto* v : {&m, &l, &scale}) v->resize(bq);
    rows.resize(bq);
    visible.resize(bq);
    a_ptr.resize(pointers);
    b_ptr.resize(pointers);
    c_ptr.resize(pointers);
  }
  // Pointer arrays: rows of a buffer with row stride ld, optionally through an index list.
  static void point(const Acc** out, const Acc* base, int64_t ld, int n, const int* index = nullptr) {
    for (int i = 0; i < n; ++i) out[i] = base + (index ? index[i] : i) * ld;
  }
  static void point(Acc** out, Acc* base, int64_t ld, int n, const int* index = nullptr) {
    for (int i = 0; i < n; ++i) out[i] = base + (index ? index[i] : i) * ld;
  }
};

// A query-block task's (batch, query head, query block): query blocks in zigzag order, so that
// torch's contiguous split of the tasks gives each thread early and late (causal: cheap and
// expensive) blocks alike.
struct QueryBlockTask {
  int64_t b, h, qb;
};
inline QueryBlockTask query_block_task(const BlockSparseForwardParams& p, int64_t task, int64_t nq) {
  return {task / nq / p.heads_q, task / nq % p.heads_q, zigzag(task % nq, nq)};
}

// Under MoBA, marks the choices of query block qb's rows in `choices` and returns it (unmark it
// after use); without a token selection nullptr: every row attends every listed block.
inline const RowChoices* mark_choices(const TokenSelection& sel, const Geometry& g, RowChoices& choices, int64_t b,
                                      int64_t h, int64_t qb) {
  if (sel.blocks == nullptr) return nullptr;
  choices.mark(sel, b, h, qb * g.block_q, g.rows_in(qb));
  return &choices;
}

// Calls body(kb, active, keys, padded, c0) for each key block kb listed for query block qb of
// (b, h) that at least one of its rows attends, after active_rows filled w.rows / w.visible:
// `keys` in the block, `padded` to whole SIMD vectors, c0 its first key.
template <typename Acc, typename Body>
void for_each_listed_block(const BlockSparseForwardParams& p, const Geometry& g, Workspace<Acc>& w, int64_t b,
                           int64_t h, int64_t qb, const Body& body) {
  int32_t count;
  const int32_t* list = list_of(p.blocks, b, h, qb, &count);
  const RowChoices* choices = mark_choices(p.selection, g, w.choices, b, h, qb);
  for (int32_t t = 0; t < count; ++t) {
    const int32_t kb = list[t];
    const int active = active_rows(g, choices, qb, kb, w.rows.data(), w.visible.data());
    if (active == 0) continue;
    const int keys = g.keys_in(kb);
    body(kb, active, keys, round_up_to_lanes<Acc>(keys), int64_t(kb) * p.block_kv);
  }
  if (choices) w.choices.unmark(p.selection, b, h, qb * g.block_q, g.rows_in(qb));
}

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
template <typename T>
void forward(const BlockSparseForwardParams& p) {
  using Acc = AccOf<T>;
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  const Geometry g(p);
  const int dim = p.head_dim;
  const int64_t nq = ceil_div(p.seq_q, p.block_q), group = p.heads_q / p.heads_kv;
  parallel_for(0, p.batch * p.heads_q * nq, 1, [&](int64_t begin, int64_t end) {
    Workspace<Acc> w(g);
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, qb] = query_block_task(p, task, nq);
      const int64_t hk = h / group, r0 = qb * p.block_q;
      const int n = g.rows_in(qb);
      pack_rows(row_of<T>(p.q, b, h, r0), p.q.seq_stride, n, n, dim, Acc(p.scale), w.q.data());
      std::fill(w.acc.begin(), w.acc.begin() + int64_t(n) * dim, Acc(0));
      std::fill(w.m.begin(), w.m.begin() + n, -kInf<Acc>);
      std::fill(w.l.begin(), w.l.begin() + n, Acc(0));
      for_each_listed_block(p, g, w, b, h, qb, [&](int32_t, int active, int keys, int padded, int64_t c0) {
        pack_transposed(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, keys, padded, dim, w.k_t.data());
        pack_rows(row_of<T>(p.v, b, hk, c0), p.v.seq_stride, keys, padded, dim, Acc(1), w.v_rows.data());
        // S = Q K^T for the active rows
        w.point(w.a_ptr.data(), w.q.data(), dim, active, w.rows.data());
        w.point(w.b_ptr.data(), w.k_t.data(), padded, dim);
        w.point(w.c_ptr.data(), w.s.data(), padded, active);
        matmul(w.a_ptr.data(), active, w.b_ptr.data(), dim, w.c_ptr.data(), padded, Init::kZero);
        for (int a = 0; a < active; ++a) {
          const int r = w.rows[a];
          online_softmax_row(w.s.data() + int64_t(a) * padded, w.visible[a], padded, w.m[r], w.l[r], w.scale[a]);
        }
        // O = alpha * O + P V
        w.point(w.a_ptr.data(), w.s.data(), padded, active);
        w.point(w.b_ptr.data(), w.v_rows.data(), dim, padded);
        w.point(w.c_ptr.data(), w.acc.data(), dim, active, w.rows.data());
        matmul(w.a_ptr.data(), active, w.b_ptr.data(), padded, w.c_ptr.data(), dim, Init::kScaled, w.scale.data());
      });
      for (int r = 0; r < n; ++r) {
        T* out = row_of<T>(p.out, b, h, r0 + r);
        const Acc l = w.l[r];
        const auto inv = L::splat(l > 0 ? Acc(1) / l : Acc(0));  // a row that saw nothing: out 0
        for (int d = 0; d < dim; d += W) store(out + d, load(w.acc.data() + int64_t(r) * dim + d) * inv);
        p.lse[(b * p.heads_q + h) * p.seq_q + r0 + r] = l > 0 ? float(w.m[r] + std::log(l)) : -kInf<float>;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------
// delta[i] = rowsum(dO * O), in Acc, stored fp32.
template <typename T>
void compute_delta(const BlockSparseBackwardParams& bp) {
  using Acc = AccOf<T>;
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  const BlockSparseForwardParams& p = bp.forward;
  const int64_t rows = p.batch * p.heads_q * p.seq_q;
  parallel_for(0, rows, 256, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % p.seq_q, h = row / p.seq_q % p.heads_q, b = row / p.seq_q / p.heads_q;
      const T* d_out = row_of<T>(bp.grad_out, b, h, i);
      const T* out = row_of<T>(Bhsd{p.out.data, p.out.batch_stride, p.out.head_stride, p.out.seq_stride}, b, h, i);
      auto sum = L::splat(Acc(0));
      for (int d = 0; d < p.head_dim; d += W) sum = fmadd(load(d_out + d), load(out + d), sum);
      bp.delta[row] = float(reduce_add(sum));
    }
  });
}

// S and dP for the active rows (q and d_out rows given as pointers), then P and dS in place.
template <typename Acc>
void recompute_scores(Workspace<Acc>& w, int active, int dim, int padded, const Acc* const* q_rows,
                      const Acc* const* d_out_rows, const float* lse, const float* delta, const int* lse_row) {
  w.point(w.b_ptr.data(), w.k_t.data(), padded, dim);
  w.point(w.c_ptr.data(), w.s.data(), padded, active);
  matmul(q_rows, active, w.b_ptr.data(), dim, w.c_ptr.data(), padded, Init::kZero);
  w.point(w.b_ptr.data(), w.v_t.data(), padded, dim);
  w.point(w.c_ptr.data(), w.dp.data(), padded, active);
  matmul(d_out_rows, active, w.b_ptr.data(), dim, w.c_ptr.data(), padded, Init::kZero);
  for (int a = 0; a < active; ++a) {
    softmax_grad_row(w.s.data() + int64_t(a) * padded, w.dp.data() + int64_t(a) * padded, w.visible[a], padded,
                     Acc(lse[lse_row[a]]), Acc(delta[lse_row[a]]));
  }
}

template <typename T>
void grad_q(const BlockSparseBackwardParams& bp) {
  using Acc = AccOf<T>;
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  const BlockSparseForwardParams& p = bp.forward;
  const Geometry g(p);
  const int dim = p.head_dim;
  const int64_t nq = ceil_div(p.seq_q, p.block_q), group = p.heads_q / p.heads_kv;
  parallel_for(0, p.batch * p.heads_q * nq, 1, [&](int64_t begin, int64_t end) {
    Workspace<Acc> w(g);
    std::vector<const Acc*> q_ptr(size_t(p.block_q)), d_out_ptr(size_t(p.block_q));
    for (int64_t task = begin; task < end; ++task) {
      const auto [b, h, qb] = query_block_task(p, task, nq);
      const int64_t hk = h / group, r0 = qb * p.block_q, row0 = (b * p.heads_q + h) * p.seq_q + r0;
      const int n = g.rows_in(qb);
      pack_rows(row_of<T>(p.q, b, h, r0), p.q.seq_stride, n, n, dim, Acc(p.scale), w.q.data());
      pack_rows(row_of<T>(bp.grad_out, b, h, r0), bp.grad_out.seq_stride, n, n, dim, Acc(1), w.d_out.data());
      std::fill(w.acc.begin(), w.acc.begin() + int64_t(n) * dim, Acc(0));
      for_each_listed_block(p, g, w, b, h, qb, [&](int32_t, int active, int keys, int padded, int64_t c0) {
        pack_transposed(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, keys, padded, dim, w.k_t.data());
        pack_transposed(row_of<T>(p.v, b, hk, c0), p.v.seq_stride, keys, padded, dim, w.v_t.data());
        pack_rows(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, keys, padded, dim, Acc(1), w.k_rows.data());
        w.point(q_ptr.data(), w.q.data(), dim, active, w.rows.data());
        w.point(d_out_ptr.data(), w.d_out.data(), dim, active, w.rows.data());
        recompute_scores(w, active, dim, padded, q_ptr.data(), d_out_ptr.data(), p.lse + row0, bp.delta + row0,
                         w.rows.data());
        // dQ += dS K (scaled at the end)
        w.point(w.a_ptr.data(), w.dp.data(), padded, active);
        w.point(w.b_ptr.data(), w.k_rows.data(), dim, padded);
        w.point(w.c_ptr.data(), w.acc.data(), dim, active, w.rows.data());
        matmul(w.a_ptr.data(), active, w.b_ptr.data(), padded, w.c_ptr.data(), dim, Init::kAccumulate);
      });
      const auto scale = L::splat(Acc(p.scale));
      for (int r = 0; r < n; ++r) {
        T* dq = row_of<T>(bp.grad_q, b, h, r0 + r);
        for (int d = 0; d < dim; d += W) store(dq + d, load(w.acc.data() + int64_t(r) * dim + d) * scale);
      }
    }
  });
}

template <typename T>
void grad_kv(const BlockSparseBackwardParams& bp) {
  using Acc = AccOf<T>;
  constexpr int W = kWidthOf<Acc>;
  const BlockSparseForwardParams& p = bp.forward;
  const Geometry g(p);
  const int dim = p.head_dim;
  const int64_t nk = ceil_div(p.seq_kv, p.block_kv), group = p.heads_q / p.heads_kv;
  const int kp = round_up_to_lanes<Acc>(p.block_kv);
  parallel_for(0, p.batch * p.heads_kv * nk, 1, [&](int64_t begin, int64_t end) {
    Workspace<Acc> w(g);
    std::vector<Acc> dk(size_t(kp) * dim), dv(size_t(kp) * dim);
    std::vector<const Acc*> q_ptr(size_t(p.block_q)), d_out_ptr(size_t(p.block_q));
    std::vector<int> lse_row(size_t(p.block_q));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kb = zigzag(task % nk, nk), hk = task / nk % p.heads_kv, b = task / nk / p.heads_kv;
      const int keys = g.keys_in(kb), padded = round_up_to_lanes<Acc>(keys);
      const int64_t c0 = kb * p.block_kv;
      pack_transposed(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, keys, padded, dim, w.k_t.data());
      pack_transposed(row_of<T>(p.v, b, hk, c0), p.v.seq_stride, keys, padded, dim, w.v_t.data());
      std::fill(dk.begin(), dk.end(), Acc(0));
      std::fill(dv.begin(), dv.end(), Acc(0));
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        int32_t count;
        const int32_t* list = list_of(bp.transposed, b, h, kb, &count);
        for (int32_t t = 0; t < count; ++t) {
          const int64_t qb = list[t], r0 = qb * p.block_q, row0 = (b * p.heads_q + h) * p.seq_q + r0;
          const RowChoices* choices = mark_choices(p.selection, g, w.choices, b, h, qb);
          const int active = active_rows(g, choices, qb, int32_t(kb), w.rows.data(), w.visible.data());
          if (choices) w.choices.unmark(p.selection, b, h, r0, g.rows_in(qb));
          if (active == 0) continue;
          // Only the active rows are loaded, compacted: row a of q/d_out is query row rows[a].
          for (int a = 0; a < active; ++a) {
            const int r = w.rows[a];
            pack_rows(row_of<T>(p.q, b, h, r0 + r), 0, 1, 1, dim, Acc(p.scale), w.q.data() + int64_t(a) * dim);
            pack_rows(row_of<T>(bp.grad_out, b, h, r0 + r), 0, 1, 1, dim, Acc(1), w.d_out.data() + int64_t(a) * dim);
          }
          w.point(q_ptr.data(), w.q.data(), dim, active);
          w.point(d_out_ptr.data(), w.d_out.data(), dim, active);
          recompute_scores(w, active, dim, padded, q_ptr.data(), d_out_ptr.data(), p.lse + row0, bp.delta + row0,
                           w.rows.data());
          // P^T and dS^T: [keys x active]
          for (int a = 0; a < active; ++a)
            for (int c = 0; c < keys; ++c) {
              w.p_t[int64_t(c) * active + a] = w.s[int64_t(a) * padded + c];
              w.ds_t[int64_t(c) * active + a] = w.dp[int64_t(a) * padded + c];
            }
          // dV += P^T dO, dK += dS^T (scale Q)
          w.point(w.a_ptr.data(), w.p_t.data(), active, keys);
          w.point(w.c_ptr.data(), dv.data(), dim, keys);
          matmul(w.a_ptr.data(), keys, d_out_ptr.data(), active, w.c_ptr.data(), dim, Init::kAccumulate);
          w.point(w.a_ptr.data(), w.ds_t.data(), active, keys);
          w.point(w.c_ptr.data(), dk.data(), dim, keys);
          matmul(w.a_ptr.data(), keys, q_ptr.data(), active, w.c_ptr.data(), dim, Init::kAccumulate);
        }
      }
      for (int c = 0; c < keys; ++c) {
        T* dk_row = row_of<T>(bp.grad_k, b, hk, c0 + c);
        T* dv_row = row_of<T>(bp.grad_v, b, hk, c0 + c);
        for (int d = 0; d < dim; d += W) {
          store(dk_row + d, load(dk.data() + int64_t(c) * dim + d));
          store(dv_row + d, load(dv.data() + int64_t(c) * dim + d));
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// MoBA gating
// ---------------------------------------------------------------------------------------------
// An unsigned integer of the score's width whose order is the score's order (NaN aside): the sign
// bit flipped for positives, every bit for negatives.
inline uint32_t order_key(float x) {
  const uint32_t u = std::bit_cast<uint32_t>(x);
  return u >> 31 ? ~u : u | 0x80000000u;
}
inline uint64_t order_key(double x) {
  const uint64_t u = std::bit_cast<uint64_t>(x);
  return u >> 63 ? ~u : u | (uint64_t(1) << 63);
}

// The want-th largest of keys[0, n) (1 <= want <= n), bit by bit from the top: the largest value
// that at least `want` keys reach. Each step is one branch-free counting pass, which the compiler
// vectorizes: no data-dependent branches, unlike a comparison-based selection on random scores.
template <typename Key>
Key kth_largest(const Key* keys, int n, int want) {
  Key prefix = 0;
  for (int bit = int(sizeof(Key)) * 8 - 1; bit >= 0; --bit) {
    const Key candidate = prefix | (Key(1) << bit);
    int reaching = 0;
    for (int j = 0; j < n; ++j) reaching += keys[j] >= candidate;
    if (reaching >= want) prefix = candidate;
  }
  return prefix;
}

// The best `want` of blocks [0, last) by (score desc, block id asc), written to ids ascending;
// returns how many. One ascending pass keeps the blocks above the want-th best score and, of those
// equal to it, the lowest ids: no sort of indices through a comparator, no sort of the result
// (selection was most of moba_select's time at block 16 / top-32).
template <typename Acc, typename Key>
int top_blocks(const Acc* scores, int last, int want, int32_t* ids, Key* keys) {
  if (want <= 0) return 0;
  if (last <= want) {
    for (int j = 0; j < last; ++j) ids[j] = j;
    return last;
  }
  for (int j = 0; j < last; ++j) keys[j] = order_key(scores[j]);
  const Key threshold = kth_largest(keys, last, want);
  int ties = want;  // how many blocks at exactly `threshold` are kept
  for (int j = 0; j < last; ++j) ties -= keys[j] > threshold;
  int kept = 0;
  for (int j = 0; j < last; ++j)
    if (keys[j] > threshold || (keys[j] == threshold && ties-- > 0)) ids[kept++] = j;
  return kept;
}

template <typename T>
void select(const MobaSelectParams& p) {
  using Acc = AccOf<T>;
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  constexpr int kRowsPerTask = 64;
  const int dim = p.head_dim, bs = p.block_size;
  const int nk = int(ceil_div(p.seq_kv, bs)), padded = round_up_to_lanes<Acc>(std::max(nk, 1));
  const int64_t group = p.heads_q / p.heads_kv;
  // Mean-pooled keys per (batch, kv head), transposed: [dim x padded].
  std::vector<Acc> pooled_t(size_t(p.batch * p.heads_kv) * dim * padded);
  parallel_for(0, p.batch * p.heads_kv, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> means(size_t(padded) * dim);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / p.heads_kv, hk = bh % p.heads_kv;
      for (int j = 0; j < nk; ++j) {
        const int keys = int(std::min<int64_t>(bs, p.seq_kv - int64_t(j) * bs));
        const auto inv = L::splat(Acc(1) / Acc(keys));
        for (int d = 0; d < dim; d += W) {
          auto sum = L::splat(Acc(0));
          for (int c = 0; c < keys; ++c) sum = sum + load(row_of<T>(p.k, b, hk, int64_t(j) * bs + c) + d);
          store(means.data() + int64_t(j) * dim + d, sum * inv);
        }
      }
      pack_transposed(means.data(), dim, nk, padded, dim, pooled_t.data() + bh * dim * padded);
    }
  });
  const int64_t tiles = ceil_div(p.seq_q, kRowsPerTask);
  parallel_for(0, p.batch * p.heads_q * tiles, 1, [&](int64_t begin, int64_t end) {
    std::vector<Acc> q(size_t(kRowsPerTask) * dim), scores(size_t(kRowsPerTask) * padded);
    std::vector<decltype(order_key(Acc()))> keys(size_t(std::max(nk, 1)));
    std::vector<const Acc*> a_ptr(kRowsPerTask), b_ptr(dim);
    std::vector<Acc*> c_ptr(kRowsPerTask);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t tile_id = task % tiles, h = task / tiles % p.heads_q, b = task / tiles / p.heads_q;
      const int64_t r0 = tile_id * kRowsPerTask;
      const int n = int(std::min<int64_t>(kRowsPerTask, p.seq_q - r0));
      pack_rows(row_of<T>(p.q, b, h, r0), p.q.seq_stride, n, n, dim, Acc(1), q.data());
      Workspace<Acc>::point(a_ptr.data(), q.data(), dim, n);
      Workspace<Acc>::point(b_ptr.data(), pooled_t.data() + (b * p.heads_kv + h / group) * dim * padded, padded, dim);
      Workspace<Acc>::point(c_ptr.data(), scores.data(), padded, n);
      matmul(a_ptr.data(), n, b_ptr.data(), dim, c_ptr.data(), padded, Init::kZero);
      for (int r = 0; r < n; ++r) {
        int32_t* out = p.selected + ((b * p.heads_q + h) * p.seq_q + r0 + r) * p.top_k;
        int chosen = 0;
        if (!p.causal) {
          chosen = top_blocks(scores.data() + int64_t(r) * padded, nk, p.top_k, out, keys.data());
        } else if (const int64_t position = r0 + r + p.seq_kv - p.seq_q; position >= 0) {
          // The best earlier blocks, then (the largest id) the block holding the token, always; never a later one.
          const int current = int(position / bs);
          chosen = top_blocks(scores.data() + int64_t(r) * padded, current, p.top_k - 1, out, keys.data());
          out[chosen++] = current;
        }
        std::fill(out + chosen, out + p.top_k, -1);
      }
    }
  });
}

// Per query block, a flag per key block set by its rows' choices; the flagged ids ascending, then
// (the slots past the count, never read) the others ascending: what the tensor-op path (CUDA)
// gives, one pass over the choices instead of a scatter into and a sort of [.., nq, nk] flags.
void block_lists(const MobaBlockListsParams& p) {
  const int64_t nq = ceil_div(p.seq_q, p.block_q);
  parallel_for(0, p.batch * p.heads * nq, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> listed(size_t(p.num_kv_blocks));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t qb = task % nq, bh = task / nq, r0 = qb * p.block_q;
      const int64_t entries = std::min<int64_t>(p.block_q, p.seq_q - r0) * p.top_k;
      const int32_t* chosen = p.token_blocks + (bh * p.seq_q + r0) * p.top_k;
      std::fill(listed.begin(), listed.end(), uint8_t(0));
      for (int64_t e = 0; e < entries; ++e)
        if (chosen[e] >= 0) listed[size_t(chosen[e])] = 1;
      int32_t* ids = p.indices + task * p.max_blocks;
      int32_t count = 0;
      for (int32_t j = 0; j < p.num_kv_blocks; ++j)
        if (listed[size_t(j)]) ids[count++] = j;
      p.counts[task] = count;
      for (int32_t j = 0, slot = count; j < p.num_kv_blocks && slot < p.max_blocks; ++j)
        if (!listed[size_t(j)]) ids[slot++] = j;
    }
  });
}

}  // namespace

void block_sparse_attention_forward(const BlockSparseForwardParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { forward<decltype(tag)>(p); });
}

void block_sparse_attention_backward(const BlockSparseBackwardParams& p) {
  visit_storage_type(p.forward.dtype, [&](auto tag) {
    compute_delta<decltype(tag)>(p);
    grad_q<decltype(tag)>(p);
    grad_kv<decltype(tag)>(p);
  });
}

void moba_select(const MobaSelectParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { select<decltype(tag)>(p); });
}

void moba_block_lists(const MobaBlockListsParams& p) { block_lists(p); }

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
