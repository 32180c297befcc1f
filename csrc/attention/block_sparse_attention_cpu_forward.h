// The forward pass of block-sparse attention on the CPU and what it shares with the backward,
// included by block_sparse_attention_cpu.cpp (every ISA level; also the backward and MoBA gating)
// and block_sparse_attention_cpu_bf16.cpp (AVX512_BF16); defined in each file's ISA namespace.
//
// The forward is FlashAttention-2: a task is one query block of the query heads of one KV head
// (up to kBundleHeads of them, walked in turn); per listed key block (or group of whole ones),
// S = Q K^T for the rows that see it ("active" rows: not wholly above the causal diagonal and,
// under MoBA, rows that chose the block), the online softmax turns S into P, and
// O = alpha * O + P V. forward_pass() owns the walk, the masks and the softmax; a micro-kernel
// policy owns the operand packing, P's layout and the two products (see forward_pass).
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
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

namespace block_sparse_cpu {

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
constexpr int kMaxGroupBlocks = 16;  // the most key blocks a forward kernel may take at once
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
// p with its lanes from `count` on set to 0 (count < the vector's width).
template <typename Acc, typename V>
V first_lanes_only(V p, int count) {
  alignas(64) Acc lanes[V::kWidth];
  store(lanes, p);
  for (int i = std::max(count, 0); i < V::kWidth; ++i) lanes[i] = Acc(0);
  return load(lanes);
}

// Online softmax on a row of scores score_scale * s (s: a kernel's products as they are):
// store_p(c, P[c .. c + W)) receives P = exp(score_scale * s - m), exactly 0 past `visible` (the
// kernel's own P layout: fp32 in place, or bf16 for its P V product); m and l are updated, and
// alpha rescales the row's running output (O = alpha * O + P V; alpha 0 on the row's first
// block, where m = -inf and O is 0). m is raised only when the block's maximum exceeds it by
// more than kLazyRescale (FlashAttention-4's conditional rescaling): P stays below
// e^kLazyRescale, l >= 1 still (the block that set m holds a P of 1), and alpha is exactly 1 for
// most blocks past the first, where a kernel can add P V to O in place (the AMX kernel does: no
// pass over O). s is left with the scaled scores, -inf past `visible`.
template <typename Acc>
constexpr Acc kLazyRescale = Acc(8);  // P < e^8 ~ 3000: far from fp32's range at any length

template <typename Acc, typename StoreP>
void online_softmax_row(Acc* s, int visible, int padded, Acc score_scale, Acc& m, Acc& l, Acc& alpha,
                        const StoreP& store_p) {
  using L = Lanes<Acc>;
  using V = typename L::Vec;
  constexpr int W = V::kWidth;
  if (!(score_scale > Acc(0))) {  // scaled first: the masked columns' -inf must stay -inf
    const V scale = L::splat(score_scale);
    for (int c = 0; c < padded; c += W) store(s + c, load(s + c) * scale);
    score_scale = Acc(1);
  }
  const V scale = L::splat(score_scale);
  for (int c = visible; c < padded; ++c) s[c] = -kInf<Acc>;
  V row_max = L::splat(-kInf<Acc>);
  for (int c = 0; c < padded; c += W) row_max = max(row_max, load(s + c) * scale);
  const Acc block_max = Acc(reduce_max(row_max));
  alpha = Acc(1);
  if (block_max > m + kLazyRescale<Acc>) {  // always on the first block (m = -inf)
    alpha = std::exp(m - block_max);
    m = block_max;
  }
  const V shift = L::splat(-m);
  V sum = L::splat(Acc(0));
  for (int c = 0; c < padded; c += W) {
    V p = exp(fmadd(load(s + c), scale, shift));
    // (exp saturates at ~1e-38 for the masked -inf, not 0)
    if (c + W > visible) p = first_lanes_only<Acc>(p, visible - c);
    store_p(c, p);
    sum = sum + p;
  }
  l = l * alpha + Acc(reduce_add(sum));
}

// Thread-local buffers of one parallel_for chunk, sized for the largest block.
template <typename Acc>
struct Workspace {
  std::vector<Acc> q, d_out, acc, k_t, v_t, k_rows, v_rows, s, dp, p_t, ds_t, scale;
  std::vector<int> rows, visible;
  std::vector<const Acc*> a_ptr, b_ptr;
  std::vector<Acc*> c_ptr;
  RowChoices choices;

  // group_blocks: the most key blocks whose scores the forward holds at once (s's width).
  explicit Workspace(const Geometry& g, int group_blocks = 1) : choices(ceil_div(g.seq_kv, g.block_kv), g.block_q) {
    const size_t bq = size_t(g.block_q), d = size_t(g.head_dim);
    const size_t kp = size_t(round_up_to_lanes<Acc>(g.block_kv));
    const size_t pointers = std::max({bq, kp, d});
    for (auto* v : {&q, &d_out, &acc}) v->resize(bq * d);
    for (auto* v : {&k_t, &v_t, &k_rows, &v_rows}) v->resize(kp * d);
    for (auto* v : {&dp, &p_t, &ds_t}) v->resize(bq * kp);
    s.resize(bq * kp * size_t(group_blocks));
    scale.resize(bq);
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

// One query head's walk over the key blocks listed for its query block that at least one of its
// rows attends, in groups: runs of up to max_group listed blocks that every row of the query
// block sees whole (no causal cut, no MoBA choice missing, no short last block) come as one
// group, the others alone (max_group 1: every block alone, as the backward's dq pass walks).
// next() fills w.rows / w.visible for the group's rows (w is shared: use the group before the
// next call of any walk). `choices` holds the walk's MoBA marks while it runs.
template <typename Acc>
class KeyBlockWalk {
 public:
  struct Group {
    const int32_t* blocks;  // the key block ids
    int count;              // how many
    int active;             // rows (w.rows / w.visible)
    int keys;               // keys of the first block (a group's are all whole)
    int width;              // score columns of all of them: count * padded
  };

  KeyBlockWalk(const Geometry& g, int max_group, RowChoices& choices)
      : g_(g), max_group_(max_group), choices_storage_(choices) {}

  void start(const BlockSparseForwardParams& p, int64_t b, int64_t h, int64_t qb) {
    p_ = &p;
    b_ = b;
    h_ = h;
    qb_ = qb;
    list_ = list_of(p.blocks, b, h, qb, &count_);
    choices_ = mark_choices(p.selection, g_, choices_storage_, b, h, qb);
    t_ = 0;
    carry_ = -1;
  }
  // The next group (count 0: the walk is over, and its MoBA marks are cleared).
  Group next(Workspace<Acc>& w) {
    const int n = g_.rows_in(qb_), whole_width = round_up_to_lanes<Acc>(g_.block_kv);
    int pending = 0;
    const auto flush = [&] {
      for (int r = 0; r < n; ++r) {
        w.rows[r] = r;
        w.visible[r] = pending * whole_width;
      }
      return Group{group_, pending, n, g_.block_kv, pending * whole_width};
    };
    const auto alone = [&](int32_t kb, int active) {
      single_ = kb;
      const int keys = g_.keys_in(kb);
      return Group{&single_, 1, active, keys, round_up_to_lanes<Acc>(keys)};
    };
    if (carry_ >= 0) {  // a block that ended the last group
      const int32_t kb = std::exchange(carry_, -1);
      return alone(kb, active_rows(g_, choices_, qb_, kb, w.rows.data(), w.visible.data()));
    }
    while (t_ < count_) {
      const int32_t kb = list_[t_++];
      const int active = active_rows(g_, choices_, qb_, kb, w.rows.data(), w.visible.data());
      if (active == 0) continue;
      const int keys = g_.keys_in(kb);
      const bool whole = max_group_ > 1 && active == n && keys == whole_width &&
                         std::all_of(w.visible.begin(), w.visible.begin() + n, [&](int v) { return v == keys; });
      if (!whole && pending == 0) return alone(kb, active);
      if (!whole) {  // the group first (it rewrites the row lists), then this block
        carry_ = kb;
        return flush();
      }
      group_[pending++] = kb;
      if (pending == max_group_) return flush();
    }
    if (pending > 0) return flush();
    if (choices_) choices_storage_.unmark(p_->selection, b_, h_, qb_ * g_.block_q, n);
    choices_ = nullptr;
    return Group{nullptr, 0, 0, 0, 0};
  }

 private:
  const Geometry& g_;
  int max_group_;
  RowChoices& choices_storage_;
  const BlockSparseForwardParams* p_ = nullptr;
  int64_t b_ = 0, h_ = 0, qb_ = 0;
  const int32_t* list_ = nullptr;
  int32_t count_ = 0, t_ = 0, carry_ = -1, single_ = 0;
  const RowChoices* choices_ = nullptr;
  int32_t group_[kMaxGroupBlocks] = {};
};

// ---------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------
// A task is one query block of up to kBundleHeads query heads of one KV head (a GQA group, or a
// slice of a larger one). Their walks advance in lockstep, a group of key blocks per head in
// turn, so that where their lists agree (dense and causal masks) the packed K and V of a group
// are still in L2 for the next head: one KV head's packed K and V at S = 8192, D = 128 are 4 MB,
// twice a Sapphire Rapids core's L2, and read from L3 once per query head and block they took
// the tile products to 2.5x their L2-resident time (measured there).
constexpr int kBundleHeads = 8;

// The running output of one query head's query block: O (n x dim), the softmax's m and l.
template <typename Acc>
struct HeadOutput {
  std::vector<Acc> acc, m, l;
  explicit HeadOutput(const Geometry& g)
      : acc(size_t(g.block_q) * g.head_dim), m(size_t(g.block_q)), l(size_t(g.block_q)) {}
  void reset(int n, int dim) {
    std::fill(acc.begin(), acc.begin() + int64_t(n) * dim, Acc(0));
    std::fill(m.begin(), m.begin() + n, -kInf<Acc>);
    std::fill(l.begin(), l.begin() + n, Acc(0));
  }
};

// Kernel, built per parallel_for chunk as Kernel(workspace, geometry), provides:
//   max_group_blocks(g)        (static) the most key blocks it takes at once (1: one at a time)
//   load_queries(q, stride, n, scale)  a query head's n query rows (T, row stride `stride`)
//   load_keys(k, k_stride, v, v_stride, keys, padded)  one more key block of the group, zero
//                              past `keys`
//   scores(active, width)      w.s[a][0, width) = q[w.rows[a]] . k for the active rows and the
//                              keys of the group's blocks side by side (`padded` columns each),
//                              the scores over score_scale() (1: the kernel scaled them already)
//   p_store(a, width)          where the softmax puts row a's P: a functor (c, P[c .. c + W))
//   accumulate(active, width, acc)  acc[w.rows[a]] = w.scale[a] * acc[w.rows[a]] + P[a] V (acc:
//                              rows of head_dim); ends the group
template <typename T, typename Kernel>
void forward_pass(const BlockSparseForwardParams& p) {
  using Acc = AccOf<T>;
  using L = Lanes<Acc>;
  constexpr int W = kWidthOf<Acc>;
  const Geometry g(p);
  const int dim = p.head_dim;
  const int64_t nq = ceil_div(p.seq_q, p.block_q), group = p.heads_q / p.heads_kv;
  const int64_t bundle = std::min<int64_t>(group, kBundleHeads), bundles = ceil_div(group, bundle);
  const int max_group = Kernel::max_group_blocks(g);
  parallel_for(0, p.batch * p.heads_kv * bundles * nq, 1, [&](int64_t begin, int64_t end) {
    Workspace<Acc> w(g, max_group);
    Kernel kernel(w, g);
    std::vector<HeadOutput<Acc>> outputs(size_t(bundle), HeadOutput<Acc>{g});
    std::vector<RowChoices> choices(size_t(bundle), RowChoices{ceil_div(g.seq_kv, g.block_kv), g.block_q});
    std::vector<KeyBlockWalk<Acc>> walks;
    for (int64_t i = 0; i < bundle; ++i) walks.emplace_back(g, max_group, choices[size_t(i)]);
    for (int64_t task = begin; task < end; ++task) {
      // Query blocks in zigzag order (query_block_task), the bundles of a KV head next to each other.
      const int64_t qb = zigzag(task % nq, nq), slice = task / nq % bundles, hk = task / nq / bundles % p.heads_kv,
                    b = task / nq / bundles / p.heads_kv;
      const int64_t h0 = hk * group + slice * bundle, heads = std::min(bundle, (hk + 1) * group - h0);
      const int64_t r0 = qb * p.block_q;
      const int n = g.rows_in(qb);
      for (int64_t i = 0; i < heads; ++i) {
        outputs[i].reset(n, dim);
        walks[i].start(p, b, h0 + i, qb);
      }
      for (int64_t live = heads; live > 0;) {
        live = 0;
        for (int64_t i = 0; i < heads; ++i) {
          const auto step = walks[i].next(w);
          if (step.count == 0) continue;
          ++live;
          HeadOutput<Acc>& out = outputs[i];
          kernel.load_queries(row_of<T>(p.q, b, h0 + i, r0), p.q.seq_stride, n, p.scale);
          for (int j = 0; j < step.count; ++j) {
            const int64_t c0 = int64_t(step.blocks[j]) * p.block_kv;
            kernel.load_keys(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, row_of<T>(p.v, b, hk, c0), p.v.seq_stride,
                             step.keys, step.width / step.count);
          }
          kernel.scores(step.active, step.width);
          for (int a = 0; a < step.active; ++a) {
            const int r = w.rows[a];
            online_softmax_row(w.s.data() + int64_t(a) * step.width, w.visible[a], step.width,
                               Acc(kernel.score_scale()), out.m[r], out.l[r], w.scale[a],
                               kernel.p_store(a, step.width));
          }
          kernel.accumulate(step.active, step.width, out.acc.data());
        }
      }
      for (int64_t i = 0; i < heads; ++i) {
        const HeadOutput<Acc>& out = outputs[i];
        for (int r = 0; r < n; ++r) {
          T* dst = row_of<T>(p.out, b, h0 + i, r0 + r);
          const Acc l = out.l[r];
          const auto inv = L::splat(l > 0 ? Acc(1) / l : Acc(0));  // a row that saw nothing: out 0
          for (int d = 0; d < dim; d += W) store(dst + d, load(out.acc.data() + int64_t(r) * dim + d) * inv);
          p.lse[(b * p.heads_q + h0 + i) * p.seq_q + r0 + r] = l > 0 ? float(out.m[r] + std::log(l)) : -kInf<float>;
        }
      }
    }
  });
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

// P and dS in place of the S and dP of the active rows (row a: lse / delta row lse_row[a]).
template <typename Acc>
void softmax_grad_rows(Workspace<Acc>& w, int active, int padded, const float* lse, const float* delta,
                       const int* lse_row) {
  for (int a = 0; a < active; ++a)
    softmax_grad_row(w.s.data() + int64_t(a) * padded, w.dp.data() + int64_t(a) * padded, w.visible[a], padded,
                     Acc(lse[lse_row[a]]), Acc(delta[lse_row[a]]));
}

// Kernel, built per parallel_for chunk as Kernel(workspace, geometry), provides:
//   load_queries(q, q_stride, d_out, d_out_stride, n, scale)   a query block's n rows (dq pass)
//   load_active_queries(q, q_stride, d_out, d_out_stride, rows, active, scale)  rows[a] as row a
//   load_keys(k, k_stride, v, v_stride, keys, padded, with_rows)  one key block, zero past `keys`
//   scores(active, padded, index)  S (scaled) and dP of the active rows into w.s / w.dp, query row
//                                  a the loaded row index[a] (null: a)
//   accumulate_dq(active, padded)  w.acc[w.rows[a]] += dS[a] K, dS in w.dp
//   accumulate_dkv(active, keys, padded, dk, dv)  dv += P^T dO, dk += dS^T Q (compacted rows)
//   kScaledKeyGrad                 dk still needs the softmax scale (the queries were not scaled)
// Runs body(w, kernel, task) for tasks [0, tasks) across threads, each parallel_for chunk with its
// own workspace and kernel.
template <typename Acc, typename Kernel, typename Body>
void for_each_task(const Geometry& g, int64_t tasks, const Body& body) {
  parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    Workspace<Acc> w(g);
    Kernel kernel(w, g);
    for (int64_t task = begin; task < end; ++task) body(w, kernel, task);
  });
}

// dst[0, dim) = scale * src[0, dim), rounded to T.
template <typename T, typename Acc>
void store_scaled(T* dst, const Acc* src, int dim, Acc scale) {
  constexpr int W = kWidthOf<Acc>;
  const auto s = Lanes<Acc>::splat(scale);
  for (int d = 0; d < dim; d += W) store(dst + d, load(src + d) * s);
}

template <typename T, typename Kernel>
void grad_q(const BlockSparseBackwardParams& bp, const Geometry& g) {
  using Acc = AccOf<T>;
  const BlockSparseForwardParams& p = bp.forward;
  const int dim = p.head_dim;
  const int64_t nq = ceil_div(p.seq_q, p.block_q), group = p.heads_q / p.heads_kv;
  for_each_task<Acc, Kernel>(g, p.batch * p.heads_q * nq, [&](Workspace<Acc>& w, Kernel& kernel, int64_t task) {
    const auto [b, h, qb] = query_block_task(p, task, nq);
    const int64_t hk = h / group, r0 = qb * p.block_q, row0 = (b * p.heads_q + h) * p.seq_q + r0;
    const int n = g.rows_in(qb);
    kernel.load_queries(row_of<T>(p.q, b, h, r0), p.q.seq_stride, row_of<T>(bp.grad_out, b, h, r0),
                        bp.grad_out.seq_stride, n, p.scale);
    std::fill(w.acc.begin(), w.acc.begin() + int64_t(n) * dim, Acc(0));
    KeyBlockWalk<Acc> walk(g, 1, w.choices);
    walk.start(p, b, h, qb);
    for (auto step = walk.next(w); step.count > 0; step = walk.next(w)) {
      const int64_t c0 = int64_t(step.blocks[0]) * p.block_kv;
      const int padded = step.width;
      kernel.load_keys(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, row_of<T>(p.v, b, hk, c0), p.v.seq_stride,
                       step.keys, padded, true);
      kernel.scores(step.active, padded, w.rows.data());
      softmax_grad_rows(w, step.active, padded, p.lse + row0, bp.delta + row0, w.rows.data());
      kernel.accumulate_dq(step.active, padded);  // scaled at the end
    }
    for (int r = 0; r < n; ++r)
      store_scaled(row_of<T>(bp.grad_q, b, h, r0 + r), w.acc.data() + int64_t(r) * dim, dim, Acc(p.scale));
  });
}

template <typename T, typename Kernel>
void grad_kv(const BlockSparseBackwardParams& bp, const Geometry& g) {
  using Acc = AccOf<T>;
  const BlockSparseForwardParams& p = bp.forward;
  const int dim = p.head_dim;
  const int64_t nk = ceil_div(p.seq_kv, p.block_kv), group = p.heads_q / p.heads_kv;
  for_each_task<Acc, Kernel>(g, p.batch * p.heads_kv * nk, [&](Workspace<Acc>& w, Kernel& kernel, int64_t task) {
    const int64_t kb = zigzag(task % nk, nk), hk = task / nk % p.heads_kv, b = task / nk / p.heads_kv;
    const int keys = g.keys_in(kb), padded = round_up_to_lanes<Acc>(keys);
    const int64_t c0 = kb * p.block_kv;
    kernel.load_keys(row_of<T>(p.k, b, hk, c0), p.k.seq_stride, row_of<T>(p.v, b, hk, c0), p.v.seq_stride, keys,
                     padded, false);
    std::vector<Acc> dk_rows(size_t(keys) * dim, Acc(0)), dv_rows(size_t(keys) * dim, Acc(0));  // a task: many blocks
    Acc* dk = dk_rows.data();
    Acc* dv = dv_rows.data();
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
        kernel.load_active_queries(row_of<T>(p.q, b, h, r0), p.q.seq_stride, row_of<T>(bp.grad_out, b, h, r0),
                                   bp.grad_out.seq_stride, w.rows.data(), active, p.scale);
        kernel.scores(active, padded, nullptr);
        softmax_grad_rows(w, active, padded, p.lse + row0, bp.delta + row0, w.rows.data());
        kernel.accumulate_dkv(active, keys, padded, dk, dv);
      }
    }
    const Acc dk_scale = Kernel::kScaledKeyGrad ? Acc(p.scale) : Acc(1);
    for (int c = 0; c < keys; ++c) {
      store_scaled(row_of<T>(bp.grad_k, b, hk, c0 + c), dk + int64_t(c) * dim, dim, dk_scale);
      store_scaled(row_of<T>(bp.grad_v, b, hk, c0 + c), dv + int64_t(c) * dim, dim, Acc(1));
    }
  });
}

template <typename T, typename Kernel>
void backward_pass(const BlockSparseBackwardParams& p) {
  const Geometry g(p.forward);
  compute_delta<T>(p);
  grad_q<T, Kernel>(p, g);
  grad_kv<T, Kernel>(p, g);
}

}  // namespace block_sparse_cpu
}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
