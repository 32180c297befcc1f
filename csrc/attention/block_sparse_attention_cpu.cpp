// CPU kernels of block-sparse attention and MoBA gating, compiled once per ISA level.
//
// FlashAttention-2 on the CPU; the forward's and the backward's walks, masks and softmax steps are
// in block_sparse_attention_cpu_forward.h, shared with the AVX512_BF16 kernels. Here: the
// register-blocked micro-kernel (S = Q K^T, O = alpha * O + P V and the backward's products, over
// row-pointer arrays so that only the active rows take part and no tile is copied to compact
// it), the widening forward and backward policies (operands in fp32, the query rows pre-scaled)
// and MoBA gating. The backward recomputes P from lse: dq per query block, dk/dv per key block walking
// the transposed lists; every output element has one writer, so there are no atomics and results
// are deterministic. fp64 (gradcheck, reference checks) runs the same code with one double lane.
#include "attention/block_sparse_attention_cpu_forward.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA {

namespace {

using namespace block_sparse_cpu;

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
// Forward: the micro-kernel policy of every ISA level (block_sparse_attention_cpu_forward.h):
// operands widened to Acc, the query rows pre-scaled.
// ---------------------------------------------------------------------------------------------
template <typename T>
class WideningKernel {
  using Acc = AccOf<T>;

 public:
  WideningKernel(Workspace<Acc>& w, const Geometry& g) : w_(w), dim_(g.head_dim) {}
  static int max_group_blocks(const Geometry&) { return 1; }
  static Acc score_scale() { return Acc(1); }  // the query rows are pre-scaled
  void load_queries(const T* q, int64_t stride, int n, float scale) {
    pack_rows(q, stride, n, n, dim_, Acc(scale), w_.q.data());
  }
  void load_keys(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int keys, int padded) {
    pack_transposed(k, k_stride, keys, padded, dim_, w_.k_t.data());
    pack_rows(v, v_stride, keys, padded, dim_, Acc(1), w_.v_rows.data());
  }
  void scores(int active, int padded) {
    w_.point(w_.a_ptr.data(), w_.q.data(), dim_, active, w_.rows.data());
    w_.point(w_.b_ptr.data(), w_.k_t.data(), padded, dim_);
    w_.point(w_.c_ptr.data(), w_.s.data(), padded, active);
    matmul(w_.a_ptr.data(), active, w_.b_ptr.data(), dim_, w_.c_ptr.data(), padded, Init::kZero);
  }
  auto p_store(int a, int padded) {  // P in place of S
    return [row = w_.s.data() + int64_t(a) * padded](int c, typename Lanes<Acc>::Vec p) { store(row + c, p); };
  }
  void accumulate(int active, int padded, Acc* acc) {
    w_.point(w_.a_ptr.data(), w_.s.data(), padded, active);
    w_.point(w_.b_ptr.data(), w_.v_rows.data(), dim_, padded);
    w_.point(w_.c_ptr.data(), acc, dim_, active, w_.rows.data());
    matmul(w_.a_ptr.data(), active, w_.b_ptr.data(), padded, w_.c_ptr.data(), dim_, Init::kScaled, w_.scale.data());
  }

 private:
  Workspace<Acc>& w_;
  int dim_;
};


// ---------------------------------------------------------------------------------------------
// Backward: the micro-kernel policy of every ISA level (backward_pass in
// block_sparse_attention_cpu_forward.h): operands widened to Acc, the query rows pre-scaled.
// ---------------------------------------------------------------------------------------------
template <typename T>
class WideningBackwardKernel {
  using Acc = AccOf<T>;

 public:
  WideningBackwardKernel(Workspace<Acc>& w, const Geometry& g)
      : w_(w), dim_(g.head_dim), q_ptr_(size_t(g.block_q)),
        d_out_ptr_(size_t(g.block_q)) {}
  static constexpr bool kScaledKeyGrad = false;  // dK accumulates with the pre-scaled queries

  void load_queries(const T* q, int64_t q_stride, const T* d_out, int64_t d_out_stride, int n, float scale) {
    pack_rows(q, q_stride, n, n, dim_, Acc(scale), w_.q.data());
    pack_rows(d_out, d_out_stride, n, n, dim_, Acc(1), w_.d_out.data());
  }
  // Rows rows[a] (of the block at q / d_out) compacted: row a of q / d_out.
  void load_active_queries(const T* q, int64_t q_stride, const T* d_out, int64_t d_out_stride, const int* rows,
                           int active, float scale) {
    for (int a = 0; a < active; ++a) {
      pack_rows(q + rows[a] * q_stride, 0, 1, 1, dim_, Acc(scale), w_.q.data() + int64_t(a) * dim_);
      pack_rows(d_out + rows[a] * d_out_stride, 0, 1, 1, dim_, Acc(1), w_.d_out.data() + int64_t(a) * dim_);
    }
  }
  // with_rows: also K as rows, for dQ += dS K.
  void load_keys(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int keys, int padded, bool with_rows) {
    pack_transposed(k, k_stride, keys, padded, dim_, w_.k_t.data());
    pack_transposed(v, v_stride, keys, padded, dim_, w_.v_t.data());
    if (with_rows) pack_rows(k, k_stride, keys, padded, dim_, Acc(1), w_.k_rows.data());
  }
  // S and dP of the active rows into w.s / w.dp; query row a is loaded row index[a] (null: a).
  void scores(int active, int padded, const int* index) {
    w_.point(q_ptr_.data(), w_.q.data(), dim_, active, index);
    w_.point(d_out_ptr_.data(), w_.d_out.data(), dim_, active, index);
    w_.point(w_.b_ptr.data(), w_.k_t.data(), padded, dim_);
    w_.point(w_.c_ptr.data(), w_.s.data(), padded, active);
    matmul(q_ptr_.data(), active, w_.b_ptr.data(), dim_, w_.c_ptr.data(), padded, Init::kZero);
    w_.point(w_.b_ptr.data(), w_.v_t.data(), padded, dim_);
    w_.point(w_.c_ptr.data(), w_.dp.data(), padded, active);
    matmul(d_out_ptr_.data(), active, w_.b_ptr.data(), dim_, w_.c_ptr.data(), padded, Init::kZero);
  }
  // w.acc[w.rows[a]] += dS[a] K
  void accumulate_dq(int active, int padded) {
    w_.point(w_.a_ptr.data(), w_.dp.data(), padded, active);
    w_.point(w_.b_ptr.data(), w_.k_rows.data(), dim_, padded);
    w_.point(w_.c_ptr.data(), w_.acc.data(), dim_, active, w_.rows.data());
    matmul(w_.a_ptr.data(), active, w_.b_ptr.data(), padded, w_.c_ptr.data(), dim_, Init::kAccumulate);
  }
  // dv += P^T dO, dk += dS^T Q over the compacted active rows ([keys x dim] each).
  void accumulate_dkv(int active, int keys, int padded, Acc* dk, Acc* dv) {
    for (int a = 0; a < active; ++a)
      for (int c = 0; c < keys; ++c) {
        w_.p_t[int64_t(c) * active + a] = w_.s[int64_t(a) * padded + c];
        w_.ds_t[int64_t(c) * active + a] = w_.dp[int64_t(a) * padded + c];
      }
    w_.point(q_ptr_.data(), w_.q.data(), dim_, active);
    w_.point(d_out_ptr_.data(), w_.d_out.data(), dim_, active);
    w_.point(w_.a_ptr.data(), w_.p_t.data(), active, keys);
    w_.point(w_.c_ptr.data(), dv, dim_, keys);
    matmul(w_.a_ptr.data(), keys, d_out_ptr_.data(), active, w_.c_ptr.data(), dim_, Init::kAccumulate);
    w_.point(w_.a_ptr.data(), w_.ds_t.data(), active, keys);
    w_.point(w_.c_ptr.data(), dk, dim_, keys);
    matmul(w_.a_ptr.data(), keys, q_ptr_.data(), active, w_.c_ptr.data(), dim_, Init::kAccumulate);
  }

 private:
  Workspace<Acc>& w_;
  int dim_;
  std::vector<const Acc*> q_ptr_, d_out_ptr_;
};

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
  visit_storage_type(p.dtype, [&](auto tag) { forward_pass<decltype(tag), WideningKernel<decltype(tag)>>(p); });
}

void block_sparse_attention_backward(const BlockSparseBackwardParams& p) {
  visit_storage_type(p.forward.dtype, [&](auto tag) {
    backward_pass<decltype(tag), WideningBackwardKernel<decltype(tag)>>(p);
  });
}

void moba_select(const MobaSelectParams& p) {
  visit_storage_type(p.dtype, [&](auto tag) { select<decltype(tag)>(p); });
}

void moba_block_lists(const MobaBlockListsParams& p) { block_lists(p); }

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA
