// CPU simulation of the CUDA block-sparse attention and MoBA kernels
// (csrc/attention/block_sparse_attention_cuda.cu).
//
// No GPU here or in CI, so this program runs the kernels' logic on the CPU, warp by warp and lane by
// lane, with the very host-device functions and traits they use
// (csrc/attention/block_sparse_attention_cuda_index.h), and checks them against independent
// definitions (the PTX fragment layouts of mma.m16n8k16 and ldmatrix, exact references):
//  (a) fragment maps: the accumulator -> A-operand reuse of P / dS (ix::c2a_*), ldmatrix
//      addressing of A / B / transposed B operands, against the PTX maps;
//  (b) the online-softmax recurrences (ix::softmax_*) over random tile walks with masked elements
//      and fully masked tiles, against a direct softmax in double;
//  (c) fwd_kernel thread by thread on random small problems (odd Sq / Sk, Sq != Sk, causal,
//      block_q 64 / 128, block_kv 16..128, head_dim 64 / 128, GQA, per-head or shared lists in
//      random order, empty lists, MoBA token selection, [B,H,S,D] and [B,S,H,D] strides with
//      padding): every cp.async (bounds, 16-byte alignment, zero fill) through a shared-memory model
//      that checks the pipeline's commit / wait / barrier order, ldmatrix (addresses, bank
//      conflicts) and an mma.m16n8k16 model assembled from the PTX maps (fp16 / bf16 operands,
//      fp32 accumulation), masking, softmax, the epilogue; out / lse against a double reference,
//      rows that see nothing exactly 0 / -inf, every output element written once and nothing else;
//  (d) the backward: bwd_delta_kernel, bwd_dq_kernel and bwd_dkdv_kernel the same way (the
//      transposed walk of each GQA group must visit every listed (query block, key block) pair
//      and 64-row sub-tile exactly once; the query-warp partial sums), dQ / dK / dV against
//      double references;
//  (e) moba_pool_kernel / moba_select_kernel with the warp's ballots and shuffles modelled lane by
//      lane: the selection equals a full sort of the same fp32 scores (ties: lower block id;
//      causal: current block forced, later blocks never; ascending ids, -1 padding), with
//      duplicated key blocks to force exact ties.
// Usage: block_sparse_attention_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <set>
#include <tuple>
#include <vector>

#include "attention/block_sparse_attention_cuda_index.h"
#include "common/float_bits.h"
#include "mma_spec.h"
#include "sim_common.h"

using namespace torch_ext;
namespace ix = torch_ext::attention::bsa_cuda;

std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
double rndu(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }
const double kInf = std::numeric_limits<double>::infinity();

// Independent definitions: the PTX ISA fragment maps of mma.m16n8k16 (.f16 / .bf16) and ldmatrix
// in mma_spec.h.
using Frag = mma_spec::M16n8k16;

template <typename T>
float val(uint16_t bits) {
  return to_float(T{bits});
}
template <typename T>
uint16_t bits_of(float f) {
  return from_float<T>(f).bits;
}
template <typename T>
uint32_t pack_pair(float lo, float hi) {
  return uint32_t(bits_of<T>(lo)) | (uint32_t(bits_of<T>(hi)) << 16);
}

struct WA {  // 4 registers per lane: an A fragment or an ldmatrix.x4 result
  uint32_t r[32][4];
};
struct WB {
  uint32_t r[32][2];
};
struct WC {  // an m16n8 fp32 accumulator tile
  float v[32][4];
};
WB b_half(const WA& x, int which) {  // registers 2 which, 2 which + 1 (n8 tile 2 nj + which)
  WB b;
  for (int l = 0; l < 32; ++l) {
    b.r[l][0] = x.r[l][2 * which];
    b.r[l][1] = x.r[l][2 * which + 1];
  }
  return b;
}
void zero(WC& c) {
  for (auto& l : c.v)
    for (float& x : l) x = 0.f;
}

// ldmatrix.sync.aligned.m8n8.x4(.trans).b16 (mma_spec.h: addresses 16-byte aligned, each 8-address
// phase conflict-free).
void ldmatrix_x4(Smem& sm, const int (&addr)[32], WA& out, bool trans) {
  if (trans)
    mma_spec::ldmatrix_x4_trans(sm, addr, out.r);
  else
    mma_spec::ldmatrix_x4(sm, addr, out.r);
}

// mma.m16n8k16.row.col.f32.{f16,bf16}: products exact in double, one fp32 rounding of c + sum.
template <typename T>
void mma(WC& c, const WA& a, const WB& b) {
  double A[16][16], B[16][8];
  mma_spec::assemble_operands<Frag>(
      A, B, [&](int lane, int i) { return double(val<T>(uint16_t(mma_spec::element_bits<Frag>(a.r[lane], i)))); },
      [&](int lane, int i) { return double(val<T>(uint16_t(mma_spec::element_bits<Frag>(b.r[lane], i)))); });
  mma_spec::mma_round_once<Frag>(c.v, A, B);
}

// The kernel's mma_n16: d0, d1 += a x the B fragments of two adjacent n8 tiles, one ldmatrix.x4
// result r (registers 0, 1 / 2, 3).
template <typename T>
void mma_n16(WC& d0, WC& d1, const WA& a, const WA& r) {
  mma<T>(d0, a, b_half(r, 0));
  mma<T>(d1, a, b_half(r, 1));
}

// The kernel's acc_to_a: the A fragment of k16 step kk from the accumulator tiles acc[0..] (ix::c2a_*),
// rounded to T.
template <typename T>
WA acc_to_a(const WC* acc, int kk) {
  WA a;
  for (int l = 0; l < 32; ++l)
    for (int r = 0; r < 4; ++r) {
      const WC& c = acc[ix::c2a_tile(kk, r)];
      a.r[l][r] = pack_pair<T>(c.v[l][ix::c2a_elem(r, 0)], c.v[l][ix::c2a_elem(r, 1)]);
    }
  return a;
}

// Warp shuffles of the quad reductions (xor 1, then xor 2), as the kernels do them.
void quad_reduce(float (&x)[32], bool is_max) {
  for (int off = 1; off <= 2; off *= 2) {
    float y[32];
    for (int l = 0; l < 32; ++l) y[l] = is_max ? std::fmax(x[l], x[l ^ off]) : x[l] + x[l ^ off];
    std::copy(y, y + 32, x);
  }
}

// ---------------------------------------------------------------------------------------------
// Global memory: 16-bit [B, H, S, D] tensors with free strides, plus write bookkeeping
// ---------------------------------------------------------------------------------------------
struct Tensor16 {
  std::vector<uint16_t> m;
  std::vector<int> writes;
  int64_t off = 0, bs = 0, hs = 0, ss = 0;
  int B = 0, H = 0, S = 0, D = 0;
  int64_t at(int64_t b, int64_t h, int64_t s) const { return off + b * bs + h * hs + s * ss; }
};
// [B, H, S, D] or [B, S, H, D] (transposed), seq / head strides padded by multiples of 8, base
// offset a multiple of 8 elements (16 bytes): what the launcher accepts.
Tensor16 make_tensor(int B, int H, int S, int D, uint16_t fill) {
  Tensor16 t;
  t.B = B;
  t.H = H;
  t.S = S;
  t.D = D;
  t.off = 8 * rnd(0, 3);
  const int64_t pad = rnd(0, 2) == 0 ? 8 * rnd(1, 2) : 0;
  if (rnd(0, 1) == 0) {
    t.ss = D + pad;
    t.hs = S * t.ss + 8 * rnd(0, 1);
    t.bs = H * t.hs;
  } else {
    t.hs = D;
    t.ss = H * D + pad;
    t.bs = S * t.ss + 8 * rnd(0, 1);
  }
  CHECK(ix::bhsd_vectorizable(uint64_t(t.off) * 2, t.bs, t.hs, t.ss));
  const int64_t size = t.off + std::max<int64_t>(0, (B - 1) * t.bs + (H - 1) * t.hs + (S - 1) * t.ss + D) + 8;
  t.m.assign(size_t(size), fill);
  t.writes.assign(size_t(size), 0);
  return t;
}
template <typename T>
void fill_random(Tensor16& t, double lo, double hi) {
  for (int b = 0; b < t.B; ++b)
    for (int h = 0; h < t.H; ++h)
      for (int s = 0; s < t.S; ++s)
        for (int d = 0; d < t.D; ++d) t.m[size_t(t.at(b, h, s) + d)] = bits_of<T>(float(rndu(lo, hi)));
}
template <typename T>
double get(const Tensor16& t, int b, int h, int s, int d) {
  return val<T>(t.m[size_t(t.at(b, h, s) + d)]);
}
// Every element of the logical tensor written exactly once, nothing else written.
void check_written_once(const Tensor16& t) {
  std::vector<char> inside(t.m.size(), 0);
  for (int b = 0; b < t.B; ++b)
    for (int h = 0; h < t.H; ++h)
      for (int s = 0; s < t.S; ++s)
        for (int d = 0; d < t.D; ++d) inside[size_t(t.at(b, h, s) + d)] = 1;
  for (size_t i = 0; i < t.m.size(); ++i) CHECK(t.writes[i] == (inside[i] ? 1 : 0));
}

// cp.async of 16 bytes (8 elements) from a tensor, zero-filled when !ok.
void cp16(Smem& sm, int dst, const Tensor16& t, int64_t src, bool ok) {
  uint8_t buf[16] = {};
  if (ok) {
    CHECK(src >= 0 && src % 8 == 0 && src + 8 <= int64_t(t.m.size()));
    memcpy(buf, &t.m[size_t(src)], 16);
  }
  sm.write(size_t(dst), buf, 16, true);
}
void cp4(Smem& sm, int dst, const std::vector<float>& m, int64_t src, bool ok) {
  float v = 0.f;
  if (ok) {
    CHECK(src >= 0 && src < int64_t(m.size()));
    v = m[size_t(src)];
  }
  sm.write(size_t(dst), reinterpret_cast<const uint8_t*>(&v), 4, true);
}
void st_i32(Smem& sm, int dst, int32_t v) { sm.write(size_t(dst), reinterpret_cast<const uint8_t*>(&v), 4, false); }
int32_t ld_i32(Smem& sm, int src) {
  int32_t v;
  CHECK(sm.read(size_t(src), &v, 4));
  return v;
}
float ld_f32(Smem& sm, int src) {
  float v;
  CHECK(sm.read(size_t(src), &v, 4));
  return v;
}

// ---------------------------------------------------------------------------------------------
// A problem
// ---------------------------------------------------------------------------------------------
struct Problem {
  int B, Hq, Hk, Sq, Sk, D, bq, bkv;
  bool causal;
  float scale;
  int nq, nk;
  // forward lists [B, Hm, nq, max_blocks], Hm = Hq or 1 (head stride 0)
  int max_blocks;
  int64_t cbs, chs, ibs, ihs;
  std::vector<int32_t> counts, indices;
  // transposed lists [B, Hq, nk, tmax]
  int tmax;
  std::vector<int32_t> tcounts, tindices;
  // MoBA selection [B, Hq, Sq, top_k] (seq stride top_k)
  bool sel;
  int top_k;
  std::vector<int32_t> selb;
  const int32_t* list(int b, int h, int qb) const {
    return &indices[size_t(b * ibs + h * ihs + int64_t(qb) * max_blocks)];
  }
  int count(int b, int h, int qb) const { return counts[size_t(b * cbs + h * chs + qb)]; }
  const int32_t* choices(int b, int h, int i) const {
    return &selb[size_t(((int64_t(b) * Hq + h) * Sq + i) * top_k)];
  }
};

Problem make_problem(int D, int bq, int bkv) {
  Problem P{};
  P.D = D;
  P.bq = bq;
  P.bkv = bkv;
  P.B = int(rnd(1, 2));
  P.Hk = int(rnd(1, 2));
  P.Hq = P.Hk * int(rnd(1, 3));
  P.Sq = int(rnd(1, 200));
  P.Sk = rnd(0, 9) == 0 ? P.Sq : int(rnd(rnd(0, 15) == 0 ? 0 : 1, 220));
  P.causal = rnd(0, 1) == 1;
  P.scale = float(rndu(0.5, 2.0) / std::sqrt(double(D)));
  P.nq = int(ix::ceil_div(P.Sq, bq));
  P.nk = int(ix::ceil_div(P.Sk, bkv));
  const bool shared = rnd(0, 2) == 0;
  const int Hm = shared ? 1 : P.Hq;
  P.max_blocks = std::max(1, P.nk + int(rnd(0, 2)));
  P.chs = shared ? 0 : P.nq;
  P.cbs = int64_t(Hm) * P.nq;
  P.ihs = shared ? 0 : int64_t(P.nq) * P.max_blocks;
  P.ibs = int64_t(Hm) * P.nq * P.max_blocks;
  P.counts.assign(size_t(P.B * Hm * P.nq), 0);
  P.indices.assign(size_t(P.B * Hm * P.nq * P.max_blocks), -7);  // unused slots: garbage
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < Hm; ++h)
      for (int qb = 0; qb < P.nq; ++qb) {
        std::vector<int32_t> blocks;
        const int mode = int(rnd(0, 7));  // 0: empty list, 1: every block, else a random subset
        for (int j = 0; j < P.nk; ++j) {
          // causal-plausible lists most of the time, anything otherwise (masked per element)
          const bool future = P.causal && int64_t(j) * bkv > int64_t(qb + 1) * bq - 1 + P.Sk - P.Sq;
          const bool take = mode == 0 ? false : (mode == 1 ? true : rnd(0, 2) != 0 && (!future || mode == 2));
          if (take) blocks.push_back(j);
        }
        std::shuffle(blocks.begin(), blocks.end(), rng);
        P.counts[size_t(b * P.cbs + h * P.chs + qb)] = int(blocks.size());
        const int64_t at = b * P.ibs + h * P.ihs + int64_t(qb) * P.max_blocks;
        std::copy(blocks.begin(), blocks.end(), P.indices.begin() + at);
      }
  // transposed: per (b, h, kb) the query blocks listing kb, in random order
  std::vector<std::vector<int32_t>> t(size_t(P.B * P.Hq * std::max(P.nk, 1)));
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h)
      for (int qb = 0; qb < P.nq; ++qb)
        for (int s = 0; s < P.count(b, h, qb); ++s)
          t[size_t((b * P.Hq + h) * P.nk + P.list(b, h, qb)[s])].push_back(qb);
  P.tmax = 1;
  for (auto& v : t) {
    std::shuffle(v.begin(), v.end(), rng);
    P.tmax = std::max(P.tmax, int(v.size()));
  }
  P.tcounts.assign(size_t(P.B * P.Hq * P.nk), 0);
  P.tindices.assign(size_t(P.B * P.Hq * P.nk * P.tmax), -9);
  for (size_t i = 0; i < size_t(P.B * P.Hq * P.nk); ++i) {
    P.tcounts[i] = int(t[i].size());
    std::copy(t[i].begin(), t[i].end(), P.tindices.begin() + int64_t(i) * P.tmax);
  }
  P.sel = rnd(0, 2) == 0;
  P.top_k = P.sel ? int(rnd(0, 9) == 0 ? 0 : rnd(1, 4)) : 0;
  if (P.sel) {
    P.selb.assign(size_t(P.B * P.Hq * P.Sq * std::max(P.top_k, 1)), -1);
    for (int b = 0; b < P.B; ++b)
      for (int h = 0; h < P.Hq; ++h)
        for (int i = 0; i < P.Sq; ++i) {
          // mostly blocks listed for the token's query block (else masked anyway), sometimes any
          std::vector<int32_t> pick;
          const int hm = P.chs == 0 ? 0 : h;
          for (int s = 0; s < P.count(b, hm, i / P.bq); ++s) pick.push_back(P.list(b, hm, i / P.bq)[s]);
          if (pick.empty() || rnd(0, 3) == 0)
            for (int j = 0; j < P.nk; ++j) pick.push_back(j);
          std::shuffle(pick.begin(), pick.end(), rng);
          pick.erase(std::unique(pick.begin(), pick.end()), pick.end());
          std::sort(pick.begin(), pick.end());
          pick.erase(std::unique(pick.begin(), pick.end()), pick.end());
          std::shuffle(pick.begin(), pick.end(), rng);
          for (int s = 0; s < P.top_k; ++s)
            P.selb[size_t(((int64_t(b) * P.Hq + h) * P.Sq + i) * P.top_k + s)] =
                s < int(pick.size()) && rnd(0, 4) != 0 ? pick[size_t(s)] : -1;
        }
  }
  return P;
}

// The reference visibility: key j is in a block listed for i's query block, j < Sk, causal, selection.
std::vector<char> reference_mask(const Problem& P, int b, int h) {
  std::vector<char> vis(size_t(P.Sq) * std::max(P.Sk, 1), 0);
  const int hm = P.chs == 0 ? 0 : h;
  for (int i = 0; i < P.Sq; ++i) {
    const int qb = i / P.bq;
    for (int s = 0; s < P.count(b, hm, qb); ++s) {
      const int blk = P.list(b, hm, qb)[s];
      if (P.sel) {
        bool chosen = false;
        for (int k = 0; k < P.top_k; ++k) chosen |= P.choices(b, h, i)[k] == blk;
        if (!chosen) continue;
      }
      for (int j = blk * P.bkv; j < std::min(P.Sk, (blk + 1) * P.bkv); ++j)
        if (!P.causal || j <= i + P.Sk - P.Sq) vis[size_t(i) * P.Sk + j] = 1;
    }
  }
  return vis;
}

struct Tensors {
  Tensor16 q, k, v, o, dout, dq, dk, dv;
  std::vector<float> lse, delta;
  std::vector<int> lse_writes, delta_writes;
};

// ---------------------------------------------------------------------------------------------
// (c) forward / dQ CTAs (they share the walk)
// ---------------------------------------------------------------------------------------------
int64_t g_hidden_steps = 0;  // warp steps the forward / dQ kernels skip (MoBA, causal, empty)
int64_t g_batch_merges = 0;  // moba_select chunks merged by the bitonic network
int64_t g_dead_slices = 0;   // n8 tiles of computed steps whose mmas they skip (dead 16-key slices)

template <class Tr>
struct RowSim {
  const Problem& P;
  Tensors& G;
  Smem& sm;
  int b = 0, h = 0, hk = 0, qb = 0, q0 = 0, count = 0, tiles = 0;
  const int32_t* list = nullptr;
  static constexpr int kD = Tr::kChunks * ix::kChunkElems;

  // Kernel start of CTA (b, h, qb): shared memory sized for the traits, then row_cta_setup.
  void start(int b_, int h_, int qb_) {
    sm.reset(size_t(Tr::smem_bytes(P.sel ? P.top_k : 0)));
    b = b_;
    h = h_;
    qb = qb_;
    sm.barrier();  // kernel start
    setup();
  }
  // The head of step t of the walk (cp_async_wait<0>, barrier, prefetch of step t + 1, commit):
  // step t's stage slot.
  int begin_step(int t) {
    const int st = t % ix::kStages;
    sm.wait(0);
    sm.barrier();  // step t landed for every thread; step t - 1's slot is free
    if (t + 1 < tiles) load_kv(t + 1, (t + 1) % ix::kStages);
    sm.commit();
    return st;
  }
  static int k_stage(int st) { return Tr::kStageOffset + st * Tr::kStageBytes; }
  // row_cta_setup: coordinates, list; load_selection_table: the MoBA table (plain stores)
  void setup() {
    hk = h / (P.Hq / P.Hk);
    const int hm = P.chs == 0 ? 0 : h;
    list = P.list(b, hm, qb);
    count = ix::list_count(P.count(b, hm, qb), P.max_blocks);
    tiles = P.Sk > 0 ? ix::walk_tiles(count, P.bkv) : 0;
    q0 = qb * Tr::kWarps * ix::kWarpRows;
    if (P.sel) {
      CHECK(Tr::kWarps * ix::kWarpRows <= Tr::kThreads);
      for (int r = 0; r < Tr::kWarps * ix::kWarpRows; ++r) {  // thread r: row r, filled then sorted
        std::vector<int32_t> row(size_t(P.top_k));
        for (int kk = 0; kk < P.top_k; ++kk) row[size_t(kk)] = q0 + r < P.Sq ? P.choices(b, h, q0 + r)[kk] : -1;
        std::vector<int32_t> expect = row;
        std::sort(expect.begin(), expect.end());
        ix::sort_choices(row.data(), P.top_k);
        CHECK(row == expect);
        const int stride = ix::selection_row_stride(P.top_k);
        CHECK(stride >= P.top_k && (P.top_k == 0 || stride % 2 == 1));
        for (int kk = 0; kk < P.top_k; ++kk) st_i32(sm, Tr::kSelOffset + 4 * (r * stride + kk), row[size_t(kk)]);
      }
    }
  }
  // load_rows: a [rows][D] tile from positions pos0.. (zero past Sq)
  void load_rows(int dst, const Tensor16& t, int hh, int pos0, int seq, int copies, int threads) {
    for (int tid = 0; tid < threads; ++tid)
      for (int i = 0; i < copies; ++i) {
        const int r = ix::copy_row(tid, i, threads, kD), c = ix::copy_chunk(tid, i, threads, kD);
        const int pos = pos0 + r;
        const bool ok = pos < seq;
        cp16(sm, dst + ix::smem_offset(r, c, kD), t, ok ? t.at(b, hh, pos) + c * ix::kChunkElems : 0, ok);
      }
  }
  // load_kv_step
  void load_kv(int t, int st) {
    const int ks = Tr::kStageOffset + st * Tr::kStageBytes, vs = ks + Tr::kKvBytes;
    for (int tid = 0; tid < Tr::kThreads; ++tid) {
      for (int i = 0; i < Tr::kKvCopies; ++i) {
        const int r = ix::copy_row(tid, i, Tr::kThreads, kD), ch = ix::copy_chunk(tid, i, Tr::kThreads, kD);
        const ix::Segment sg = ix::tile_segment(t, ix::row_segment(r, P.bkv), P.bkv);
        const int block = sg.slot < count ? list[sg.slot] : -1;
        const int64_t base = ix::segment_base(block, sg.offset, P.bkv, P.Sk);
        const int64_t pos = base + ix::row_in_segment(r, P.bkv);
        const bool ok = base >= 0 && pos < P.Sk;
        const int off = ix::smem_offset(r, ch, kD);
        cp16(sm, ks + off, G.k, ok ? G.k.at(b, hk, pos) + ch * 8 : 0, ok);
        cp16(sm, vs + off, G.v, ok ? G.v.at(b, hk, pos) + ch * 8 : 0, ok);
      }
      if (tid < ix::segments_per_tile(P.bkv)) {
        const ix::Segment sg = ix::tile_segment(t, tid, P.bkv);
        const int block = sg.slot < count ? list[sg.slot] : -1;
        const int seg = Tr::kSegOffset + 4 * st * 2 * ix::kMaxSegments;
        st_i32(sm, seg + 4 * tid, int(ix::segment_base(block, sg.offset, P.bkv, P.Sk)));
        st_i32(sm, seg + 4 * (ix::kMaxSegments + tid), block);
      }
    }
  }
  // S (+)= rows x tile^T: A per k16 step from `a`, B = the [64][D] tile at `tile`
  template <typename T>
  void rows_x_tile(WC (&s)[8], const WA& a, int tile, int k16, unsigned live) {
    for (int nj = 0; nj < 4; ++nj) {
      if (!((live >> nj) & 1u)) continue;  // a dead slice (checked in skipped(): nothing visible)
      int addr[32];
      for (int l = 0; l < 32; ++l)
        addr[l] = tile + ix::smem_offset(16 * nj + ix::ldsm_b_row(l), ix::ldsm_b_chunk(k16, l), kD);
      WA r;
      ldmatrix_x4(sm, addr, r, false);
      mma_n16<T>(s[2 * nj], s[2 * nj + 1], a, r);
    }
  }
  WA load_a(int base, int row0, int k16) {
    int addr[32];
    for (int l = 0; l < 32; ++l)
      addr[l] = base + ix::smem_offset(row0 + ix::ldsm_a_row(l), ix::ldsm_a_chunk(k16, l), kD);
    WA a;
    ldmatrix_x4(sm, addr, a, false);
    return a;
  }
  // acc += P x tile (tile read transposed), P from the accumulators
  template <typename T>
  void p_x_tile(std::vector<WC>& acc, const WC (&p)[8], int tile, unsigned live) {
    for (int kk = 0; kk < 4; ++kk) {
      if (!((live >> kk) & 1u)) continue;
      const WA a = acc_to_a<T>(p, kk);
      for (int nj = 0; nj < kD / 16; ++nj) {
        int addr[32];
        for (int l = 0; l < 32; ++l)
          addr[l] = tile + ix::smem_offset(16 * kk + ix::ldsm_bt_row(l), ix::ldsm_bt_chunk(nj, l), kD);
        WA r;
        ldmatrix_x4(sm, addr, r, true);
        mma_n16<T>(acc[size_t(2 * nj)], acc[size_t(2 * nj + 1)], a, r);
      }
    }
  }
  // make_step_mask, per lane
  struct Mask {
    bool full;
    bool hidden;  // the kernel's warp skips the step (checked below: then no element is visible)
    unsigned live;  // the 16-key slices it computes (the others: no element visible, checked below)
    ix::StepSegments seg;
    unsigned allowed[32][2];
  };
  Mask step_mask(int st, int warp) {
    Mask m;
    const int seg = Tr::kSegOffset + 4 * st * 2 * ix::kMaxSegments;
    const int nseg = ix::segments_per_tile(P.bkv), seg_len = ix::segment_len(P.bkv);
    bool all_full = true;
    int64_t last_key = -1, first_key = -1;
    int blocks[ix::kMaxSegments];
    for (int s = 0; s < ix::kMaxSegments; ++s) {
      m.seg.base[s] = s < nseg ? ld_i32(sm, seg + 4 * s) : -1;
      blocks[s] = s < nseg ? ld_i32(sm, seg + 4 * (ix::kMaxSegments + s)) : -1;
      if (s < nseg) {
        all_full = all_full && m.seg.base[s] >= 0 && m.seg.base[s] + seg_len <= P.Sk;
        last_key = std::max(last_key, int64_t(m.seg.base[s]) + seg_len - 1);
        if (m.seg.base[s] >= 0 && (first_key < 0 || m.seg.base[s] < first_key)) first_key = m.seg.base[s];
      }
    }
    m.full = ix::tile_fully_visible(q0 + warp * 16, last_key, all_full, P.sel, P.Sq, P.Sk, P.causal);
    m.hidden = ix::step_hidden_from_rows(first_key, q0 + warp * 16, P.Sq, P.Sk, P.causal);
    for (int l = 0; l < 32; ++l)
      for (int half = 0; half < 2; ++half) {
        m.allowed[l][half] = 0xfu;
        if (!P.sel) continue;
        const int row = warp * 16 + ix::acc_row(l, 2 * half);
        std::vector<int32_t> table(size_t(std::max(P.top_k, 1)));
        for (int k = 0; k < P.top_k; ++k)
          table[size_t(k)] = ld_i32(sm, Tr::kSelOffset + 4 * (row * ix::selection_row_stride(P.top_k) + k));
        unsigned bits = 0;
        for (int s = 0; s < ix::kMaxSegments; ++s)
          if (s < nseg && ix::sorted_choices_hold(table.data(), P.top_k, blocks[s])) {
            CHECK(ix::block_selected(table.data(), P.top_k, blocks[s]));
            bits |= 1u << s;
          } else {
            CHECK(s >= nseg || !ix::block_selected(table.data(), P.top_k, blocks[s]));
          }
        m.allowed[l][half] = bits;
      }
    unsigned live_segments = 0;
    for (int s = 0; s < nseg; ++s) live_segments |= m.seg.base[s] >= 0 ? 1u << s : 0u;
    if (P.sel) {  // the kernel's vote (__reduce_or_sync): segments some lane's rows chose
      unsigned any = 0;
      for (int l = 0; l < 32; ++l) any |= m.allowed[l][0] | m.allowed[l][1];
      live_segments &= any;
    }
    m.live = ix::live_slices(live_segments, P.bkv);
    for (int j = 0; j < ix::kSlices; ++j)  // slice j of the step: segment 16 j / segment length
      CHECK(((m.live >> j) & 1u) == ((live_segments >> ix::row_segment(16 * j, P.bkv)) & 1u));
    m.hidden = m.hidden || m.live == 0u;
    return m;
  }
  // A step the warp skips, and a slice of a step it computes no mma for, must hold no element
  // visible to any of its rows inside Sq (rows past Sq are computed but never stored).
  bool skipped(const Mask& m, int warp) {
    for (int j = 0; j < 8; ++j) {
      if (!m.hidden && ((m.live >> (j / 2)) & 1u)) continue;
      for (int l = 0; l < 32; ++l)
        for (int e = 0; e < 4; ++e)
          if (q_pos(warp, l, e / 2) < P.Sq) CHECK(!visible(m, j, e, l, q_pos(warp, l, e / 2)));
      if (!m.hidden) ++g_dead_slices;
    }
    if (!m.hidden) return false;
    ++g_hidden_steps;
    return true;
  }
  bool visible(const Mask& m, int j, int e, int lane, int q_pos) {
    const bool v = ix::step_element_visible(m.seg, m.allowed[lane][e / 2], 8 * j + ix::acc_col(lane, e), P.bkv, q_pos,
                                            P.Sq, P.Sk, P.causal);
    CHECK(!m.full || v);  // a step judged fully visible must be
    return m.full || v;
  }
  int q_pos(int warp, int lane, int half) { return q0 + warp * 16 + ix::acc_row(lane, 2 * half); }
  // store_warp_rows: scaled accumulators -> the warp's own shared rows -> 16-byte stores
  template <typename T>
  void store_rows(const std::vector<WC>& acc, const float (&scale)[32][2], int base, int warp, Tensor16& dst, int hh) {
    sm.barrier();  // __syncwarp (only this warp touches its rows)
    for (int j = 0; j < kD / 8; ++j)
      for (int l = 0; l < 32; ++l)
        for (int half = 0; half < 2; ++half) {
          const int row = warp * 16 + ix::acc_row(l, 2 * half), col = 8 * j + ix::acc_col(l, 0);
          CHECK(row / 16 == warp);
          const uint32_t v = pack_pair<T>(acc[size_t(j)].v[l][2 * half] * scale[l][half],
                                          acc[size_t(j)].v[l][2 * half + 1] * scale[l][half]);
          sm.write(size_t(base + ix::smem_elem_offset(row, col, kD)), reinterpret_cast<const uint8_t*>(&v), 4, false);
        }
    sm.barrier();  // __syncwarp
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < ix::kWarpRows * Tr::kChunks / 32; ++i) {
        const int r = ix::copy_row(l, i, 32, kD), c = ix::copy_chunk(l, i, 32, kD);
        const int pos = q0 + warp * 16 + r;
        if (pos >= P.Sq) continue;
        uint16_t v[8];
        CHECK(sm.read(size_t(base + ix::smem_offset(warp * 16 + r, c, kD)), v, 16));
        const int64_t at = dst.at(b, hh, pos) + c * 8;
        CHECK(at % 8 == 0 && at + 8 <= int64_t(dst.m.size()));
        for (int e = 0; e < 8; ++e) {
          dst.m[size_t(at + e)] = v[e];
          ++dst.writes[size_t(at + e)];
        }
      }
  }
};

template <typename T, int kD, int kBlockQ>
void sim_forward_cta(const Problem& P, Tensors& G, int b, int h, int qb) {
  using Tr = ix::RowTraits<kD, kBlockQ, false>;
  Smem sm;
  RowSim<Tr> c{P, G, sm};
  c.start(b, h, qb);
  c.load_rows(Tr::kQOffset, G.q, h, c.q0, P.Sq, Tr::kRowCopies, Tr::kThreads);
  sm.commit();
  if (c.tiles > 0) c.load_kv(0, 0);
  sm.commit();
  sm.wait(1);
  sm.barrier();
  constexpr int W = Tr::kWarps;
  std::vector<std::array<WA, Tr::kK16>> qf(W);
  for (int w = 0; w < W; ++w)
    for (int k16 = 0; k16 < Tr::kK16; ++k16) qf[size_t(w)][size_t(k16)] = c.load_a(Tr::kQOffset, w * 16, k16);
  std::vector<std::vector<WC>> o(W, std::vector<WC>(Tr::kON));
  for (auto& ow : o)
    for (auto& t : ow) zero(t);
  std::vector<std::array<std::array<ix::RowState, 2>, 32>> rs(W);
  for (auto& rw : rs)
    for (auto& rl : rw) rl = {ix::row_state_init(), ix::row_state_init()};
  const float scale_log2 = P.scale * ix::kLog2e;

  for (int t = 0; t < c.tiles; ++t) {
    const int st = c.begin_step(t);
    const int ks = c.k_stage(st), vs = ks + Tr::kKvBytes;
    for (int w = 0; w < W; ++w) {
      const auto m = c.step_mask(st, w);
      if (c.skipped(m, w)) continue;
      WC s[8];
      for (auto& x : s) zero(x);
      for (int k16 = 0; k16 < Tr::kK16; ++k16) c.template rows_x_tile<T>(s, qf[size_t(w)][size_t(k16)], ks, k16, m.live);
      float tile_max[2][32];
      for (int l = 0; l < 32; ++l) tile_max[0][l] = tile_max[1][l] = -INFINITY;
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) {
            float x = s[j].v[l][e] * scale_log2;
            if (!c.visible(m, j, e, l, c.q_pos(w, l, e / 2))) x = -INFINITY;
            s[j].v[l][e] = x;
            tile_max[e / 2][l] = std::fmax(tile_max[e / 2][l], x);
          }
      float alpha[32][2];
      for (int half = 0; half < 2; ++half) {
        quad_reduce(tile_max[half], true);
        for (int l = 0; l < 32; ++l)
          alpha[l][half] = ix::softmax_rescale(rs[size_t(w)][size_t(l)][size_t(half)], tile_max[half][l]);
      }
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) {
            auto& r = rs[size_t(w)][size_t(l)][size_t(e / 2)];
            s[j].v[l][e] = ix::softmax_prob(s[j].v[l][e], r);
            CHECK(!std::isnan(s[j].v[l][e]));
            r.l += s[j].v[l][e];
          }
      for (auto& ot : o[size_t(w)])
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) ot.v[l][e] *= alpha[l][e / 2];
      c.template p_x_tile<T>(o[size_t(w)], s, vs, m.live);
    }
  }
  sm.wait(0);
  for (int w = 0; w < W; ++w) {
    float inv[32][2], l_sum[2][32];
    for (int half = 0; half < 2; ++half) {
      for (int l = 0; l < 32; ++l) l_sum[half][l] = rs[size_t(w)][size_t(l)][size_t(half)].l;
      quad_reduce(l_sum[half], false);
      for (int l = 0; l < 32; ++l) {
        inv[l][half] = ix::softmax_out_scale(l_sum[half][l]);
        const int qp = c.q_pos(w, l, half);
        if (l % 4 == 0 && qp < P.Sq) {
          const size_t at = size_t((int64_t(b) * P.Hq + h) * P.Sq + qp);
          G.lse[at] = ix::softmax_lse(rs[size_t(w)][size_t(l)][size_t(half)].m, l_sum[half][l]);
          ++G.lse_writes[at];
        }
      }
    }
    c.template store_rows<T>(o[size_t(w)], inv, Tr::kQOffset, w, G.o, h);
  }
}

// ---------------------------------------------------------------------------------------------
// (d) backward
// ---------------------------------------------------------------------------------------------
template <typename T, int kD>
void sim_delta(const Problem& P, Tensors& G) {
  constexpr int kPer = kD / 8;
  const int64_t rows = int64_t(P.B) * P.Hq * P.Sq;
  const int64_t ctas = ix::ceil_div(rows, 256 / kPer);
  for (int64_t cta = 0; cta < ctas; ++cta)
    for (int warp = 0; warp < 8; ++warp) {
      float sum[32];
      bool ok[32];
      int64_t row[32];
      for (int l = 0; l < 32; ++l) {
        const int tid = warp * 32 + l;
        row[l] = cta * (256 / kPer) + tid / kPer;
        const int cc = tid % kPer;
        ok[l] = row[l] < rows;
        sum[l] = 0.f;
        if (!ok[l]) continue;
        const int64_t i = row[l] % P.Sq, bh = row[l] / P.Sq, hh = bh % P.Hq, bb = bh / P.Hq;
        for (int e = 0; e < 8; ++e)
          sum[l] = std::fma(float(get<T>(G.o, int(bb), int(hh), int(i), cc * 8 + e)),
                            float(get<T>(G.dout, int(bb), int(hh), int(i), cc * 8 + e)), sum[l]);
      }
      for (int off = kPer / 2; off > 0; off /= 2) {
        float y[32];
        for (int l = 0; l < 32; ++l) y[l] = sum[l] + sum[l ^ off];
        std::copy(y, y + 32, sum);
      }
      for (int l = 0; l < 32; ++l)
        if (ok[l] && (warp * 32 + l) % kPer == 0) {
          G.delta[size_t(row[l])] = sum[l];
          ++G.delta_writes[size_t(row[l])];
        }
    }
}

template <typename T, int kD, int kBlockQ>
void sim_dq_cta(const Problem& P, Tensors& G, int b, int h, int qb) {
  using Tr = ix::RowTraits<kD, kBlockQ, true>;
  Smem sm;
  RowSim<Tr> c{P, G, sm};
  c.start(b, h, qb);
  const int do_off = Tr::kQOffset + Tr::kRowBytes;
  c.load_rows(Tr::kQOffset, G.q, h, c.q0, P.Sq, Tr::kRowCopies, Tr::kThreads);
  c.load_rows(do_off, G.dout, h, c.q0, P.Sq, Tr::kRowCopies, Tr::kThreads);
  if (c.tiles > 0) c.load_kv(0, 0);
  sm.commit();
  constexpr int W = Tr::kWarps;
  float lse2[W][32][2], delta[W][32][2];
  for (int w = 0; w < W; ++w)
    for (int l = 0; l < 32; ++l)
      for (int half = 0; half < 2; ++half) {
        const int qp = c.q_pos(w, l, half);
        const size_t at = size_t((int64_t(b) * P.Hq + h) * P.Sq + qp);
        const bool ok = qp < P.Sq;
        lse2[w][l][half] = ok ? ix::lse_log2(G.lse[at]) : INFINITY;
        delta[w][l][half] = ok ? G.delta[at] : 0.f;
      }
  std::vector<std::vector<WC>> dq(W, std::vector<WC>(Tr::kON));
  for (auto& x : dq)
    for (auto& t : x) zero(t);
  const float scale_log2 = P.scale * ix::kLog2e;
  for (int t = 0; t < c.tiles; ++t) {
    const int st = c.begin_step(t);
    const int ks = c.k_stage(st), vs = ks + Tr::kKvBytes;
    for (int w = 0; w < W; ++w) {
      const auto m = c.step_mask(st, w);
      if (c.skipped(m, w)) continue;
      WC s[8], dp[8];
      for (int j = 0; j < 8; ++j) {
        zero(s[j]);
        zero(dp[j]);
      }
      for (int k16 = 0; k16 < Tr::kK16; ++k16) {
        c.template rows_x_tile<T>(s, c.load_a(Tr::kQOffset, w * 16, k16), ks, k16, m.live);
        c.template rows_x_tile<T>(dp, c.load_a(do_off, w * 16, k16), vs, k16, m.live);
      }
      for (int j = 0; j < 8; ++j)
        for (int l = 0; l < 32; ++l)
          for (int e = 0; e < 4; ++e) {
            const bool vis = c.visible(m, j, e, l, c.q_pos(w, l, e / 2));
            const float prob = vis ? ix::exp2_approx(s[j].v[l][e] * scale_log2 - lse2[w][l][e / 2]) : 0.f;
            CHECK(!std::isnan(prob));
            s[j].v[l][e] = prob * (dp[j].v[l][e] - delta[w][l][e / 2]);
          }
      c.template p_x_tile<T>(dq[size_t(w)], s, ks, m.live);
    }
  }
  sm.wait(0);
  sm.barrier();
  float scale[32][2];
  for (auto& x : scale) x[0] = x[1] = P.scale;
  for (int w = 0; w < W; ++w) c.template store_rows<T>(dq[size_t(w)], scale, Tr::kQOffset, w, G.dq, h);
}

// Visits of the transposed walk: (b, h, qb, kb, sub) -> count
using Visit = std::tuple<int, int, int, int, int>;

template <typename T, int kD, int kBlockKv>
void sim_dkdv_cta(const Problem& P, Tensors& G, int b, int hk, int kb, std::multiset<Visit>& visits) {
  using Tr = ix::DkdvTraits<kD, kBlockKv>;
  Smem sm;
  sm.reset(size_t(Tr::kSmemBytes));
  sm.barrier();
  const int group = P.Hq / P.Hk, k0 = kb * kBlockKv;
  const float scale_log2 = P.scale * ix::kLog2e;
  const int subs = P.bq / ix::kBwdQTile, nq = P.nq;
  const int32_t* counts = &P.tcounts[size_t((int64_t(b) * P.Hq + int64_t(hk) * group) * P.nk + kb)];
  const int64_t head_stride = P.nk;
  const ix::TransposedLists lists{counts, head_stride, group, P.tmax};
  const int steps = P.Sq > 0 ? ix::walk_steps(lists, subs) : 0;
  const auto load_rows = [&](int dst, const Tensor16& t, int hh, int pos0, int seq, int copies) {
    for (int tid = 0; tid < Tr::kThreads; ++tid)
      for (int i = 0; i < copies; ++i) {
        const int r = ix::copy_row(tid, i, Tr::kThreads, kD), cc = ix::copy_chunk(tid, i, Tr::kThreads, kD);
        const int pos = pos0 + r;
        const bool ok = pos < seq;
        cp16(sm, dst + ix::smem_offset(r, cc, kD), t, ok ? t.at(b, hh, pos) + cc * 8 : 0, ok);
      }
  };
  load_rows(Tr::kKOffset, G.k, hk, k0, P.Sk, Tr::kKvCopies);
  load_rows(Tr::kVOffset, G.v, hk, k0, P.Sk, Tr::kKvCopies);
  const auto load_step = [&](const ix::TransposedCursor& cur, int st) {
    const int stage = Tr::kStageOffset + st * Tr::kStageBytes;
    const int h = hk * group + cur.g;
    CHECK(cur.slot < counts[cur.g * head_stride] && cur.sub < subs);
    const int qb = P.tindices[size_t(((int64_t(b) * P.Hq + h) * P.nk + kb) * P.tmax + cur.slot)];
    const bool block_ok = qb >= 0 && qb < nq;
    visits.insert(Visit{b, h, qb, kb, cur.sub});
    const int qbase = block_ok ? qb * P.bq + cur.sub * ix::kBwdQTile : P.Sq;
    load_rows(stage, G.q, h, qbase, P.Sq, Tr::kTileCopies);
    load_rows(stage + Tr::kTileBytes, G.dout, h, qbase, P.Sq, Tr::kTileCopies);
    const int64_t row0 = (int64_t(b) * P.Hq + h) * P.Sq;
    for (int tid = 0; tid < Tr::kThreads; ++tid) {
      for (int r = tid; r < ix::kBwdQTile; r += Tr::kThreads) {
        const int pos = qbase + r;
        const bool ok = pos < P.Sq;
        cp4(sm, stage + Tr::kLseOffset + 4 * r, G.lse, row0 + pos, ok);
        cp4(sm, stage + Tr::kDeltaOffset + 4 * r, G.delta, row0 + pos, ok);
        bool allowed = ok;
        if (ok && P.sel) allowed = ix::block_selected(P.choices(b, h, pos), P.top_k, kb);
        st_i32(sm, stage + Tr::kPosOffset + 4 * r, allowed ? pos : -1);
      }
      if (tid == 0) st_i32(sm, stage + Tr::kQBaseOffset, qbase);
    }
  };
  ix::TransposedCursor loader = ix::cursor_begin(lists);
  if (steps > 0) load_step(loader, 0);
  sm.commit();
  constexpr int W = Tr::kWarps;
  std::vector<std::vector<WC>> dk(W, std::vector<WC>(Tr::kON)), dv(W, std::vector<WC>(Tr::kON));
  for (int w = 0; w < W; ++w)
    for (int j = 0; j < Tr::kON; ++j) {
      zero(dk[size_t(w)][size_t(j)]);
      zero(dv[size_t(w)][size_t(j)]);
    }
  // ldmatrix.x4 of the A map (K / V rows), B map (Q / dO rows) or transposed B map (Q / dO as [k][n])
  const auto ldsm = [&](int base, int row0, bool a_map, bool trans, int idx) {
    int addr[32];
    for (int l = 0; l < 32; ++l) {
      const int row = row0 + (a_map ? ix::ldsm_a_row(l) : ix::ldsm_b_row(l));
      const int chunk =
          trans ? ix::ldsm_bt_chunk(idx, l) : (a_map ? ix::ldsm_a_chunk(idx, l) : ix::ldsm_b_chunk(idx, l));
      addr[l] = base + ix::smem_offset(row, chunk, kD);
    }
    WA r;
    ldmatrix_x4(sm, addr, r, trans);
    return r;
  };
  for (int t = 0; t < steps; ++t) {
    const int st = t % ix::kStages;
    sm.wait(0);
    sm.barrier();
    if (t + 1 < steps) {
      ix::cursor_advance(loader, lists, subs);
      CHECK(ix::cursor_valid(loader, lists));
      load_step(loader, (t + 1) % ix::kStages);
    }
    sm.commit();
    const int stage = Tr::kStageOffset + st * Tr::kStageBytes;
    const int qs = stage, dos = stage + Tr::kTileBytes;
    const int qbase = ld_i32(sm, stage + Tr::kQBaseOffset);
    for (int w = 0; w < W; ++w) {
      const int wk = w % Tr::kWarpsKey, wq = w / Tr::kWarpsKey, key_row0 = wk * 16;
      for (int inner = 0; inner < Tr::kQCols / Tr::kQInner; ++inner) {
        const int qc0 = wq * Tr::kQCols + inner * Tr::kQInner;
        std::vector<WC> s(Tr::kNI), dp(Tr::kNI);
        for (int j = 0; j < Tr::kNI; ++j) {
          zero(s[size_t(j)]);
          zero(dp[size_t(j)]);
        }
        for (int k16 = 0; k16 < Tr::kK16; ++k16) {
          const WA ka = ldsm(Tr::kKOffset, key_row0, true, false, k16);
          const WA va = ldsm(Tr::kVOffset, key_row0, true, false, k16);
          for (int nj = 0; nj < Tr::kNI / 2; ++nj) {
            mma_n16<T>(s[size_t(2 * nj)], s[size_t(2 * nj + 1)], ka, ldsm(qs, qc0 + 16 * nj, false, false, k16));
            mma_n16<T>(dp[size_t(2 * nj)], dp[size_t(2 * nj + 1)], va, ldsm(dos, qc0 + 16 * nj, false, false, k16));
          }
        }
        for (int j = 0; j < Tr::kNI; ++j)
          for (int l = 0; l < 32; ++l)
            for (int e = 0; e < 4; ++e) {
              const int col = qc0 + 8 * j + ix::acc_col(l, e);
              const int qp = ld_i32(sm, stage + Tr::kPosOffset + 4 * col);
              const int kp = k0 + key_row0 + ix::acc_row(l, e);
              const bool vis = qp >= 0 && ix::key_visible(qp, kp, P.Sq, P.Sk, P.causal);
              CHECK(qp < 0 || qp == qbase + col);
              const float lse = ld_f32(sm, stage + Tr::kLseOffset + 4 * col);
              const float prob = vis ? ix::exp2_approx(s[size_t(j)].v[l][e] * scale_log2 - ix::lse_log2(lse)) : 0.f;
              CHECK(!std::isnan(prob));
              s[size_t(j)].v[l][e] = prob;
              dp[size_t(j)].v[l][e] = prob * (dp[size_t(j)].v[l][e] - ld_f32(sm, stage + Tr::kDeltaOffset + 4 * col));
            }
        for (int kk = 0; kk < Tr::kQInner / 16; ++kk) {
          const WA pa = acc_to_a<T>(s.data(), kk), da = acc_to_a<T>(dp.data(), kk);
          for (int nj = 0; nj < kD / 16; ++nj) {
            auto& dvw = dv[size_t(w)];
            auto& dkw = dk[size_t(w)];
            mma_n16<T>(dvw[size_t(2 * nj)], dvw[size_t(2 * nj + 1)], pa, ldsm(dos, qc0 + 16 * kk, true, true, nj));
            mma_n16<T>(dkw[size_t(2 * nj)], dkw[size_t(2 * nj + 1)], da, ldsm(qs, qc0 + 16 * kk, true, true, nj));
          }
        }
      }
    }
  }
  sm.wait(0);
  if (Tr::kWarpsQ > 1) {
    sm.barrier();
    const auto slot = [&](int q_warp, int wk) {
      return Tr::kStageOffset + 4 * ((q_warp - 1) * Tr::kWarpsKey + wk) * 2 * 16 * kD;
    };
    for (int w = 0; w < W; ++w) {
      const int wk = w % Tr::kWarpsKey, wq = w / Tr::kWarpsKey;
      if (wq == 0) continue;
      for (int j = 0; j < Tr::kON; ++j)
        for (int e = 0; e < 4; ++e)
          for (int l = 0; l < 32; ++l) {
            const int at = slot(wq, wk) + 4 * ((j * 4 + e) * 32 + l);
            CHECK(at + 4 * 16 * kD + 4 <= Tr::kSmemBytes);
            sm.write(size_t(at), reinterpret_cast<const uint8_t*>(&dk[size_t(w)][size_t(j)].v[l][e]), 4, false);
            sm.write(size_t(at + 4 * 16 * kD), reinterpret_cast<const uint8_t*>(&dv[size_t(w)][size_t(j)].v[l][e]), 4,
                     false);
          }
    }
    sm.barrier();
    for (int w = 0; w < Tr::kWarpsKey; ++w)
      for (int q_warp = 1; q_warp < Tr::kWarpsQ; ++q_warp)
        for (int j = 0; j < Tr::kON; ++j)
          for (int e = 0; e < 4; ++e)
            for (int l = 0; l < 32; ++l) {
              const int at = slot(q_warp, w) + 4 * ((j * 4 + e) * 32 + l);
              dk[size_t(w)][size_t(j)].v[l][e] += ld_f32(sm, at);
              dv[size_t(w)][size_t(j)].v[l][e] += ld_f32(sm, at + 4 * 16 * kD);
            }
  }
  for (int w = 0; w < Tr::kWarpsKey; ++w)  // query warp 0 of each key slab stores
    for (int l = 0; l < 32; ++l)
      for (int half = 0; half < 2; ++half) {
        const int pos = k0 + w * 16 + ix::acc_row(l, 2 * half);
        if (pos >= P.Sk) continue;
        for (int j = 0; j < Tr::kON; ++j) {
          const int col = 8 * j + ix::acc_col(l, 0);
          const uint32_t kv = pack_pair<T>(dk[size_t(w)][size_t(j)].v[l][2 * half] * P.scale,
                                           dk[size_t(w)][size_t(j)].v[l][2 * half + 1] * P.scale);
          const uint32_t vv =
              pack_pair<T>(dv[size_t(w)][size_t(j)].v[l][2 * half], dv[size_t(w)][size_t(j)].v[l][2 * half + 1]);
          for (int e = 0; e < 2; ++e) {
            const int64_t ak = G.dk.at(b, hk, pos) + col + e, av = G.dv.at(b, hk, pos) + col + e;
            CHECK(e != 0 || (ak % 2 == 0 && av % 2 == 0));  // 4-byte stores
            G.dk.m[size_t(ak)] = uint16_t(kv >> (16 * e));
            ++G.dk.writes[size_t(ak)];
            G.dv.m[size_t(av)] = uint16_t(vv >> (16 * e));
            ++G.dv.writes[size_t(av)];
          }
        }
      }
}

// ---------------------------------------------------------------------------------------------
// One attention case: forward, backward, references
// ---------------------------------------------------------------------------------------------
double max_abs(const std::vector<double>& v) {
  double m = 0;
  for (double x : v) m = std::max(m, std::fabs(x));
  return m;
}

template <typename T, int kD, int kBlockQ, int kBlockKv>
void attention_case(int* stats) {
  Problem P = make_problem(kD, kBlockQ, kBlockKv);
  const bool is_bf16 = std::is_same_v<T, BFloat16>;
  Tensors G;
  G.q = make_tensor(P.B, P.Hq, P.Sq, kD, 0);
  G.k = make_tensor(P.B, P.Hk, P.Sk, kD, 0);
  G.v = make_tensor(P.B, P.Hk, P.Sk, kD, 0);
  G.o = make_tensor(P.B, P.Hq, P.Sq, kD, 0x7E7E);
  G.dout = make_tensor(P.B, P.Hq, P.Sq, kD, 0);
  G.dq = make_tensor(P.B, P.Hq, P.Sq, kD, 0x7E7E);
  G.dk = make_tensor(P.B, P.Hk, P.Sk, kD, 0x7E7E);
  G.dv = make_tensor(P.B, P.Hk, P.Sk, kD, 0x7E7E);
  fill_random<T>(G.q, -1.5, 1.5);
  fill_random<T>(G.k, -1.5, 1.5);
  fill_random<T>(G.v, -1, 1);
  fill_random<T>(G.dout, -1, 1);
  const size_t rows = size_t(P.B * P.Hq * P.Sq);
  G.lse.assign(rows, NAN);
  G.delta.assign(rows, NAN);
  G.lse_writes.assign(rows, 0);
  G.delta_writes.assign(rows, 0);

  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h)
      for (int x = 0; x < P.nq; ++x) sim_forward_cta<T, kD, kBlockQ>(P, G, b, h, P.nq - 1 - x);
  check_written_once(G.o);
  for (int c : G.lse_writes) CHECK(c == 1);

  // references (double, from the stored 16-bit inputs)
  const int group = P.Hq / P.Hk;
  const double tol = is_bf16 ? 2e-2 : 4e-3;
  std::vector<double> dq_ref(size_t(P.B * P.Hq * P.Sq * kD), 0), dk_ref(size_t(P.B * P.Hk * P.Sk * kD), 0),
      dv_ref(size_t(P.B * P.Hk * P.Sk * kD), 0);
  std::vector<std::vector<double>> probs(size_t(P.B * P.Hq));
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h) {
      const int hk = h / group;
      const auto vis = reference_mask(P, b, h);
      auto& pr = probs[size_t(b * P.Hq + h)];
      pr.assign(size_t(P.Sq) * std::max(P.Sk, 1), 0.0);
      for (int i = 0; i < P.Sq; ++i) {
        std::vector<double> sc(size_t(std::max(P.Sk, 1)), -kInf);
        double mx = -kInf;
        for (int j = 0; j < P.Sk; ++j) {
          if (!vis[size_t(i) * P.Sk + j]) continue;
          double d = 0;
          for (int e = 0; e < kD; ++e) d += get<T>(G.q, b, h, i, e) * get<T>(G.k, b, hk, j, e);
          sc[size_t(j)] = d * P.scale;
          mx = std::max(mx, sc[size_t(j)]);
        }
        const float lse = G.lse[size_t((int64_t(b) * P.Hq + h) * P.Sq + i)];
        if (mx == -kInf) {
          CHECK(lse == -INFINITY);
          for (int e = 0; e < kD; ++e) CHECK(get<T>(G.o, b, h, i, e) == 0.0);
          ++stats[1];
          continue;
        }
        double sum = 0;
        for (int j = 0; j < P.Sk; ++j)
          if (sc[size_t(j)] > -kInf) sum += std::exp(sc[size_t(j)] - mx);
        const double lse_ref = mx + std::log(sum);
        CHECK(std::fabs(lse - lse_ref) <= 1e-4 * (1 + std::fabs(lse_ref)));
        for (int j = 0; j < P.Sk; ++j)
          if (sc[size_t(j)] > -kInf) pr[size_t(i) * P.Sk + j] = std::exp(sc[size_t(j)] - lse_ref);
        for (int e = 0; e < kD; ++e) {
          double ref = 0;
          for (int j = 0; j < P.Sk; ++j) ref += pr[size_t(i) * P.Sk + j] * get<T>(G.v, b, hk, j, e);
          const double got = get<T>(G.o, b, h, i, e);
          if (!(std::fabs(got - ref) <= tol)) {
            fprintf(stderr, "out mismatch b%d h%d i%d e%d got %g ref %g\n", b, h, i, e, got, ref);
            CHECK(false);
          }
        }
        ++stats[0];
      }
    }

  // backward
  if (kD == 64) sim_delta<T, 64>(P, G); else sim_delta<T, 128>(P, G);
  for (int c : G.delta_writes) CHECK(c == 1);
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h)
      for (int x = 0; x < P.nq; ++x) sim_dq_cta<T, kD, kBlockQ>(P, G, b, h, P.nq - 1 - x);
  std::multiset<Visit> visits;
  for (int b = 0; b < P.B; ++b)
    for (int hk = 0; hk < P.Hk; ++hk)
      for (int kb = 0; kb < P.nk; ++kb) sim_dkdv_cta<T, kD, kBlockKv>(P, G, b, hk, kb, visits);
  check_written_once(G.dq);
  check_written_once(G.dk);
  check_written_once(G.dv);
  // the transposed walk: every (b, h, listed qb, kb) pair, every 64-row sub-tile, exactly once
  std::multiset<Visit> expected;
  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h)
      for (int qb = 0; qb < P.nq; ++qb) {
        const int hm = P.chs == 0 ? 0 : h;
        for (int s = 0; s < P.count(b, hm, qb); ++s)
          for (int sub = 0; sub < kBlockQ / ix::kBwdQTile; ++sub)
            if (P.Sq > 0) expected.insert(Visit{b, h, qb, P.list(b, hm, qb)[s], sub});
      }
  CHECK(visits == expected);

  for (int b = 0; b < P.B; ++b)
    for (int h = 0; h < P.Hq; ++h) {
      const int hk = h / group;
      const auto& pr = probs[size_t(b * P.Hq + h)];
      for (int i = 0; i < P.Sq; ++i) {
        double delta = 0;
        for (int e = 0; e < kD; ++e) delta += get<T>(G.o, b, h, i, e) * get<T>(G.dout, b, h, i, e);
        CHECK(std::fabs(G.delta[size_t((int64_t(b) * P.Hq + h) * P.Sq + i)] - delta) <= 1e-4 * (1 + std::fabs(delta)));
        for (int j = 0; j < P.Sk; ++j) {
          const double p = pr[size_t(i) * P.Sk + j];
          if (p == 0) continue;
          double dp = 0;
          for (int e = 0; e < kD; ++e) dp += get<T>(G.dout, b, h, i, e) * get<T>(G.v, b, hk, j, e);
          const double ds = p * (dp - delta);
          for (int e = 0; e < kD; ++e) {
            dq_ref[size_t(((int64_t(b) * P.Hq + h) * P.Sq + i) * kD + e)] += P.scale * ds * get<T>(G.k, b, hk, j, e);
            dk_ref[size_t(((int64_t(b) * P.Hk + hk) * P.Sk + j) * kD + e)] += P.scale * ds * get<T>(G.q, b, h, i, e);
            dv_ref[size_t(((int64_t(b) * P.Hk + hk) * P.Sk + j) * kD + e)] += p * get<T>(G.dout, b, h, i, e);
          }
        }
      }
    }
  const auto compare = [&](const Tensor16& t, const std::vector<double>& ref, const char* name) {
    const double bound = tol * std::max(1.0, max_abs(ref)) * 2;
    for (int b = 0; b < t.B; ++b)
      for (int h = 0; h < t.H; ++h)
        for (int s = 0; s < t.S; ++s)
          for (int e = 0; e < kD; ++e) {
            const double r = ref[size_t(((int64_t(b) * t.H + h) * t.S + s) * kD + e)], g = get<T>(t, b, h, s, e);
            if (!(std::fabs(g - r) <= bound)) {
              fprintf(stderr, "%s mismatch b%d h%d s%d e%d got %g ref %g bound %g\n", name, b, h, s, e, g, r, bound);
              CHECK(false);
            }
          }
  };
  compare(G.dq, dq_ref, "dq");
  compare(G.dk, dk_ref, "dk");
  compare(G.dv, dv_ref, "dv");
}

// ---------------------------------------------------------------------------------------------
// (a) fragment maps, (b) online softmax
// ---------------------------------------------------------------------------------------------
void check_fragment_maps() {
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 4; ++e) {
      CHECK(ix::acc_row(lane, e) == Frag::c_row(lane, e));
      CHECK(ix::acc_col(lane, e) == Frag::c_col(lane, e));
    }
  // accumulator -> A: A element i = 2 r + half of k16 step kk is C element (row, 16 kk + col)
  mma_spec::check_accumulator_to_a(ix::c2a_tile, ix::c2a_elem);
  // ldmatrix maps: the A map puts (row, k) of a [m][k] tile where the A fragment wants it, the
  // B map (n, k) of a [n][k] tile, the transposed B map (k, n) of a [k][n] tile.
  for (int lane = 0; lane < 32; ++lane)
    for (int j = 0; j < 4; ++j)
      for (int half = 0; half < 2; ++half) {
        const int src = 8 * j + lane / 4;  // lane providing the row address read into (lane, j)
        // A: register j element half: row Frag::a_row(lane, 2j + half), col Frag::a_col(...)
        CHECK(ix::ldsm_a_row(src) == Frag::a_row(lane, 2 * j + half));
        CHECK(8 * (ix::ldsm_a_chunk(0, src) % 2) + 2 * (lane % 4) + half == Frag::a_col(lane, 2 * j + half));
        // B (tiles 2 nj + j / 2, register j % 2): n = ldsm row, k = chunk offset + column
        CHECK(ix::ldsm_b_row(src) == 8 * (j / 2) + Frag::b_n(lane));
        CHECK(8 * (ix::ldsm_b_chunk(0, src) % 2) + 2 * (lane % 4) + half == Frag::b_k(lane, 2 * (j % 2) + half));
        // transposed B: matrix row = k; lane gets column n = lane / 4 of rows 2 (lane % 4) + half
        const int tsrc = 8 * j + 2 * (lane % 4) + half;
        CHECK(ix::ldsm_bt_row(tsrc) == Frag::b_k(lane, 2 * (j % 2) + half));
        CHECK(8 * (ix::ldsm_bt_chunk(0, tsrc) % 2) + lane / 4 == 8 * (j / 2) + Frag::b_n(lane));
      }
}

// moba_select_kernel's shared memory: rows an odd number of 16-byte chunks long (ldmatrix reads
// 8 consecutive rows of a chunk: 8 distinct bank groups; ldmatrix_x4 below checks each use), the
// regions in order without overlap, the stage copies a bijection onto the stage's chunks, and the
// score tile's float2 writes (16 lanes per phase) on 32 distinct banks.
void check_moba_smem_layout() {
  for (int D = 1; D <= 256; ++D) {
    const int Dp = ix::moba_dim_padded(D), row = ix::moba_row_bytes(D);
    CHECK(Dp % 16 == 0 && Dp >= D && Dp - D < 16);
    CHECK(row % 16 == 0 && (row / 16) % 2 == 1 && row >= 2 * Dp);
    for (int split = 0; split < 2; ++split) {
      for (int warps = 1; warps <= ix::kMobaMaxWarps; warps *= 2) {
        const int rows = warps * ix::kMobaRowsPerWarp;
        const ix::MobaSmemLayout L = ix::moba_smem_layout(D, split == 1, warps);
        CHECK(L.q_hi == 0 && L.q_lo == rows * row);
        CHECK(L.stages == L.q_lo + split * rows * row && L.stages % 16 == 0);
        CHECK(L.lo_in_stage == ix::kMobaChunk * row && L.stage_bytes == 2 * L.lo_in_stage);
        CHECK(L.scores == L.stages + ix::kMobaStages * L.stage_bytes && L.scores % 16 == 0);
        CHECK(L.list_scores == L.scores + rows * ix::kMobaScoreStride * 4);
        CHECK(L.list_ids == L.list_scores + 4 * (ix::moba_list_index(rows - 1, 31) + 1));
        CHECK(L.ranges == L.list_ids + 4 * (ix::moba_list_index(rows - 1, 31) + 1));
        CHECK(L.total == L.ranges + 4 * (ix::moba_range_index(rows - 1, 1) + 1));
        for (int r = 0; r < rows; ++r)  // each (row, lane) entry and (row, field) its own word
          for (int f = 0; f < 2; ++f) CHECK(ix::moba_range_index(r, f) == 2 * r + f);
      }
      // opt-in shared memory per CTA: sm_86 / sm_89 / sm_120 99 KB, sm_80 163 KB, sm_90 227 KB
      CHECK(ix::moba_warps_for(D, split == 1, 101376) >= 1);
      CHECK(ix::moba_warps_for(D, split == 1, 232448) == ix::kMobaMaxWarps);
      CHECK(D > 128 || ix::moba_warps_for(D, split == 1, 101376) == ix::kMobaMaxWarps);
      const int w = ix::moba_warps_for(D, split == 1, 101376);
      CHECK(ix::moba_smem_layout(D, split == 1, w).total <= 101376 &&
            (w == ix::kMobaMaxWarps || ix::moba_smem_layout(D, split == 1, 2 * w).total > 101376));
    }
    std::vector<int> seen(size_t(2 * ix::kMobaChunk * (Dp / 8)), 0);
    for (int id = 0; id < ix::moba_stage_copies(D); ++id) {
      const ix::MobaCopy c = ix::moba_copy(id, D);
      CHECK(c.part >= 0 && c.part < 2 && c.row >= 0 && c.row < ix::kMobaChunk && c.chunk >= 0 && c.chunk < Dp / 8);
      ++seen[size_t((c.part * ix::kMobaChunk + c.row) * (Dp / 8) + c.chunk)];
    }
    for (int v : seen) CHECK(v == 1);
  }
  for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt)
    for (int e = 0; e < 4; e += 2)
      for (int phase = 0; phase < 2; ++phase) {
        unsigned banks = 0;
        for (int lane = 16 * phase; lane < 16 * phase + 16; ++lane) {
          const int w = ix::moba_score_index(ix::acc_row(lane, e), 8 * nt + ix::acc_col(lane, e));
          CHECK(w % 2 == 0 && w + 1 == ix::moba_score_index(ix::acc_row(lane, e + 1), 8 * nt + ix::acc_col(lane, e + 1)));
          CHECK(!(banks & (3u << (w % 32))));
          banks |= 3u << (w % 32);
        }
        CHECK(banks == 0xffffffffu);
      }
}

void check_online_softmax() {
  for (int trial = 0; trial < 200; ++trial) {
    const int n = int(rnd(1, 300));
    std::vector<float> x(static_cast<size_t>(n));
    for (float& v : x) v = rnd(0, 3) == 0 ? -INFINITY : float(rndu(-30, 30));
    if (rnd(0, 5) == 0)
      for (float& v : x) v = -INFINITY;
    // walk in random tiles, the lane's share of each tile summed on its own (quad sum at the end)
    ix::RowState s = ix::row_state_init();
    std::vector<double> weight(static_cast<size_t>(n), 0.0);  // accumulated 2^(x - m) with the rescales
    int at = 0;
    while (at < n) {
      const int len = int(std::min<int64_t>(n - at, rnd(1, 64)));
      float tile_max = -INFINITY;
      for (int j = at; j < at + len; ++j) tile_max = std::fmax(tile_max, x[size_t(j)]);
      const float alpha = ix::softmax_rescale(s, tile_max);
      CHECK(!std::isnan(alpha));
      for (int j = 0; j < at; ++j) weight[size_t(j)] *= alpha;
      for (int j = at; j < at + len; ++j) {
        const float p = ix::softmax_prob(x[size_t(j)], s);
        CHECK(!std::isnan(p) && p <= 1.0f);
        weight[size_t(j)] = p;
        s.l += p;
      }
      at += len;
    }
    double mx = -kInf;
    for (float v : x) mx = std::max(mx, double(v));
    const float inv = ix::softmax_out_scale(s.l);
    const float lse = ix::softmax_lse(s.m, s.l);
    if (mx == -kInf) {
      CHECK(inv == 0.f && lse == -INFINITY && s.l == 0.f);
      continue;
    }
    double sum = 0;
    for (float v : x) sum += std::exp2(double(v) - mx);
    const double lse_ref = (mx + std::log2(sum)) * std::log(2.0);
    CHECK(std::fabs(lse - lse_ref) <= 1e-5 * (1 + std::fabs(lse_ref)));
    for (int j = 0; j < n; ++j) {
      const double ref = std::exp2(double(x[size_t(j)]) - mx) / sum;
      CHECK(std::fabs(weight[size_t(j)] * inv - ref) <= 1e-5);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// (e) moba_select
// ---------------------------------------------------------------------------------------------
template <typename T>
void moba_case(int* stats) {
  using M = ix::MobaMma<T>;
  constexpr bool kSplitQ = ix::kMobaSplitQ<T>;
  const int B = int(rnd(1, 2)), Hk = int(rnd(1, 2)), Hq = Hk * int(rnd(1, 3));
  const int D = rnd(0, 5) == 0 ? int(rnd(129, 256))
                               : int(rnd(1, 3)) * 8 * int(rnd(1, 4)) + (rnd(0, 3) == 0 ? int(rnd(1, 7)) : 0);
  const int Sq = int(rnd(1, 150)), Sk = int(rnd(0, 300));
  const int bs = int(rnd(1, 40)), top_k = int(rnd(1, ix::kMaxMobaTopK));
  const bool causal = rnd(0, 1) == 1;
  const int blocks = ix::moba_blocks(Sk, bs);
  // keys: small integers / 4 (exact sums); some blocks copies of others (exact score ties)
  std::vector<float> k(size_t(B * Hk * std::max(Sk, 1) * D)), q(size_t(B * Hq * Sq * D));
  // fp32 queries with bits below bf16's 8 (the kernel's q lo term)
  for (float& x : q) x = to_float(from_float<T>(float(rnd(-8, 8)) / 4 + (kSplitQ ? float(rnd(-255, 255)) / 4096 : 0.f)));
  for (float& x : k) x = to_float(from_float<T>(float(rnd(-8, 8)) / 4));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hk; ++h)
      for (int j = 1; j < blocks; ++j)
        if (rnd(0, 3) == 0 && (j + 1) * bs <= Sk) {
          const int src = int(rnd(0, j - 1));
          for (int r = 0; r < bs; ++r)
            for (int d = 0; d < D; ++d)
              k[size_t(((b * Hk + h) * Sk + j * bs + r) * D + d)] =
                  k[size_t(((b * Hk + h) * Sk + src * bs + r) * D + d)];
        }
  // moba_pool_kernel (per thread d: key-order fp32 sum, one division, the hi / lo split)
  const int Dp = ix::moba_dim_padded(D);
  std::vector<uint16_t> pooled(size_t(B * Hk * 2 * std::max(blocks, 1) * Dp), 0xBEEF);
  std::vector<double> pooled_exact(size_t(B * Hk * std::max(blocks, 1) * D));
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hk; ++h)
      for (int blk = 0; blk < blocks; ++blk) {
        const int n = std::min(bs, Sk - blk * bs);
        for (int d = 0; d < Dp; ++d) {
          float mean = 0.f;
          double exact = 0;
          if (d < D) {
            for (int j = 0; j < n; ++j) {
              mean += k[size_t(((b * Hk + h) * Sk + blk * bs + j) * D + d)];
              exact += k[size_t(((b * Hk + h) * Sk + blk * bs + j) * D + d)];
            }
            mean /= float(n);
            pooled_exact[size_t(((b * Hk + h) * blocks + blk) * D + d)] = exact / n;
          }
          const auto split = ix::moba_split<M>(mean);
          CHECK(std::fabs(double(to_float(split.hi)) + double(to_float(split.lo)) - mean) <= std::ldexp(std::fabs(mean), -16));
          pooled[size_t(ix::moba_pooled_row(b, h, 0, blk, Hk, blocks, D) + d)] = split.hi.bits;
          pooled[size_t(ix::moba_pooled_row(b, h, 1, blk, Hk, blocks, D) + d)] = split.lo.bits;
        }
      }
  // moba_select_kernel: a CTA of 64 tokens, 4 warps x 16 (one m16 tile), lanes as arrays; shared
  // memory through the Smem model (cp.async groups, barriers), ldmatrix / mma from the PTX maps.
  std::vector<int32_t> out(size_t(B * Hq * Sq * top_k), -77);
  std::vector<int> writes(out.size(), 0);
  std::vector<float> kernel_score(size_t(B * Hq * Sq * std::max(blocks, 1)), NAN);
  std::vector<int> scored(kernel_score.size(), 0);
  const int warps = 1 << int(rnd(0, 2));  // the launcher's choice by the device's shared memory
  const int rows_per_cta = warps * ix::kMobaRowsPerWarp;
  const ix::MobaSmemLayout L = ix::moba_smem_layout(D, kSplitQ, warps);
  const int row_bytes = ix::moba_row_bytes(D);
  Smem sm;
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int64_t i0 = 0; i0 < Sq; i0 += rows_per_cta) {
        const int hk = h / (Hq / Hk);
        sm.reset(size_t(L.total));
        sm.barrier();  // kernel start
        for (int r = 0; r < rows_per_cta; ++r)
          for (int d = 0; d < Dp; ++d) {
            const float x = i0 + r < Sq && d < D ? q[size_t(((b * Hq + h) * Sq + i0 + r) * D + d)] : 0.f;
            const auto split = ix::moba_split<M>(x);
            sm.write(size_t(L.q_hi + r * row_bytes + 2 * d), reinterpret_cast<const uint8_t*>(&split.hi.bits), 2, false);
            if (kSplitQ) sm.write(size_t(L.q_lo + r * row_bytes + 2 * d), reinterpret_cast<const uint8_t*>(&split.lo.bits), 2, false);
          }
        constexpr int kMaxRows = ix::kMobaMaxWarps * ix::kMobaRowsPerWarp;
        float es[kMaxRows][32];
        int32_t ei[kMaxRows][32];
        ix::MobaRange range[kMaxRows];
        int warp_limit[ix::kMobaMaxWarps] = {};
        for (int r = 0; r < rows_per_cta; ++r) {
          const int64_t i = i0 + r;
          range[r] = i < Sq ? ix::moba_range(i, Sq, Sk, bs, top_k, causal) : ix::MobaRange{0, -1, 0};
          if (range[r].k > 0) warp_limit[r / ix::kMobaRowsPerWarp] = std::max(warp_limit[r / ix::kMobaRowsPerWarp], range[r].limit);
          for (int l = 0; l < 32; ++l) {
            es[r][l] = -INFINITY;
            ei[r][l] = ix::kMobaEmptyId;
          }
        }
        const int64_t last = std::min<int64_t>(i0 + rows_per_cta, Sq) - 1;
        const int cta_limit = ix::moba_range(last, Sq, Sk, bs, top_k, causal).limit;
        for (int r = 0; r < rows_per_cta; ++r) CHECK(range[r].limit <= cta_limit || range[r].k == 0);
        sm.barrier();  // the query rows are staged
        const int64_t pooled_base = ix::moba_pooled_row(b, hk, 0, 0, Hk, blocks, D);
        const int64_t part_stride = int64_t(blocks) * Dp;
        const auto load_stage = [&](int slot, int chunk) {
          const int c0 = chunk * ix::kMobaChunk;
          const int stage = L.stages + slot * L.stage_bytes;
          for (int id = 0; id < ix::moba_stage_copies(D); ++id) {
            const ix::MobaCopy c = ix::moba_copy(id, D);
            const bool ok = c0 + c.row < blocks;
            uint8_t buf[16] = {};
            if (ok) {
              const int64_t src = pooled_base + c.part * part_stride + int64_t(c0 + c.row) * Dp + 8 * c.chunk;
              CHECK(src % 8 == 0 && src + 8 <= int64_t(pooled.size()));
              CHECK(src + 8 <= ix::moba_pooled_row(b, hk, c.part, c0 + c.row, Hk, blocks, D) + Dp);
              memcpy(buf, &pooled[size_t(src)], 16);
            }
            sm.write(size_t(stage + ix::moba_smem_offset(c.part * ix::kMobaChunk + c.row, c.chunk, D)), buf, 16, true);
          }
        };
        const auto load_a = [&](int base, int warp, int ks) {
          int addr[32];
          for (int l = 0; l < 32; ++l)
            addr[l] = base + ix::moba_smem_offset(warp * ix::kMobaRowsPerWarp + ix::ldsm_a_row(l), ix::ldsm_a_chunk(ks, l), D);
          WA a;
          ldmatrix_x4(sm, addr, a, false);
          return a;
        };
        const auto merge_chunk = [&](int slot, int chunk) {
          const int c0 = chunk * ix::kMobaChunk;
          const int stage = L.stages + slot * L.stage_bytes;
          for (int warp = 0; warp < warps; ++warp) {
            if (c0 >= warp_limit[warp]) continue;
            WC acc[ix::kMobaChunk / 8];
            for (WC& c : acc) zero(c);
            for (int ks = 0; ks < Dp / 16; ++ks) {
              const WA a = load_a(L.q_hi, warp, ks);
              WB b_hi[ix::kMobaChunk / 8], b_lo[ix::kMobaChunk / 8];
              for (int nj = 0; nj < ix::kMobaChunk / 16; ++nj)
                for (int part = 0; part < 2; ++part) {
                  int addr[32];
                  for (int l = 0; l < 32; ++l)
                    addr[l] = stage + ix::moba_smem_offset(part * ix::kMobaChunk + 16 * nj + ix::ldsm_b_row(l),
                                                           ix::ldsm_b_chunk(ks, l), D);
                  WA r;
                  ldmatrix_x4(sm, addr, r, false);
                  (part == 0 ? b_hi : b_lo)[2 * nj] = b_half(r, 0);
                  (part == 0 ? b_hi : b_lo)[2 * nj + 1] = b_half(r, 1);
                }
              for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt) {
                mma<M>(acc[nt], a, b_hi[nt]);
                mma<M>(acc[nt], a, b_lo[nt]);
              }
              if (kSplitQ) {
                const WA a_lo = load_a(L.q_lo, warp, ks);
                for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt) mma<M>(acc[nt], a_lo, b_hi[nt]);
              }
            }
            // the score tile: float2 stores of (c0, c1) / (c2, c3), then lane j reads column j
            float tile[ix::kMobaRowsPerWarp * ix::kMobaScoreStride];
            int tile_writes[ix::kMobaRowsPerWarp * ix::kMobaScoreStride] = {};
            for (int nt = 0; nt < ix::kMobaChunk / 8; ++nt)
              for (int lane = 0; lane < 32; ++lane)
                for (int e = 0; e < 4; ++e) {
                  const int w = ix::moba_score_index(ix::acc_row(lane, e), 8 * nt + ix::acc_col(lane, e));
                  CHECK(w >= 0 && w < ix::kMobaRowsPerWarp * ix::kMobaScoreStride);
                  tile[w] = acc[nt].v[lane][e];
                  ++tile_writes[w];
                }
            for (int jr = 0; jr < ix::kMobaRowsPerWarp; ++jr) {
              const int r = warp * ix::kMobaRowsPerWarp + jr;
              const int64_t i = i0 + r;
              const int K = range[r].k;
              if (K == 0 || c0 >= range[r].limit) continue;
              float score[32];
              bool eligible[32];
              for (int l = 0; l < 32; ++l) {
                eligible[l] = c0 + l < range[r].limit;
                if (!eligible[l]) {
                  score[l] = -INFINITY;
                  continue;
                }
                const int w = ix::moba_score_index(jr, l);
                CHECK(tile_writes[w] == 1);
                score[l] = tile[w];
                const size_t at = size_t(((b * Hq + h) * Sq + i) * blocks + c0 + l);
                kernel_score[at] = score[l];
                ++scored[at];
              }
              const float kth_s = es[r][K - 1];
              const int32_t kth_i = ei[r][K - 1];
              uint32_t cand = 0;
              for (int l = 0; l < 32; ++l)
                if (eligible[l] && ix::moba_beats(score[l], c0 + l, kth_s, kth_i)) cand |= 1u << l;
              if (__builtin_popcount(cand) > ix::kMobaBatchMerge) {  // moba_exchange's network, lane by lane
                const auto exchange = [&](float* vs, int32_t* vi, int size, int stride) {
                  float ns[32];
                  int32_t ni[32];
                  for (int l = 0; l < 32; ++l) {
                    const int q = l ^ stride;
                    const bool take = ix::moba_beats(vs[q], vi[q], vs[l], vi[l]) == ix::moba_keep_better(l, size, stride);
                    ns[l] = take ? vs[q] : vs[l];
                    ni[l] = take ? vi[q] : vi[l];
                  }
                  std::copy(ns, ns + 32, vs);
                  std::copy(ni, ni + 32, vi);
                };
                float cs[32];
                int32_t ci[32];
                for (int l = 0; l < 32; ++l) {
                  const bool mine = (cand >> l) & 1u;
                  cs[l] = mine ? score[l] : -INFINITY;
                  ci[l] = mine ? c0 + l : ix::kMobaEmptyId;
                }
                for (int size = 2; size <= 32; size *= 2)
                  for (int stride = size / 2; stride > 0; stride /= 2) exchange(cs, ci, size, stride);
                for (int l = 1; l < 32; ++l) CHECK(!ix::moba_beats(cs[l], ci[l], cs[l - 1], ci[l - 1]));  // best first
                for (int l = 0; l < 32; ++l)
                  if (ix::moba_beats(cs[31 - l], ci[31 - l], es[r][l], ei[r][l])) {
                    es[r][l] = cs[31 - l];
                    ei[r][l] = ci[31 - l];
                  }
                for (int stride = 16; stride > 0; stride /= 2) exchange(es[r], ei[r], 32, stride);
                for (int l = 1; l < 32; ++l) CHECK(!ix::moba_beats(es[r][l], ei[r][l], es[r][l - 1], ei[r][l - 1]));
                ++g_batch_merges;
                cand = 0;
              }
              while (cand != 0) {
                const int src = __builtin_ctz(cand);
                cand &= cand - 1;
                const float cs = score[src];
                const int32_t ci = c0 + src;
                int pos = 0;
                for (int l = 0; l < 32; ++l) pos += l < K && ix::moba_beats(es[r][l], ei[r][l], cs, ci) ? 1 : 0;
                float ns[32];
                int32_t ni[32];
                for (int l = 0; l < 32; ++l) {
                  const float up_s = l > 0 ? es[r][l - 1] : es[r][l];  // shfl_up keeps lane 0's own value
                  const int32_t up_i = l > 0 ? ei[r][l - 1] : ei[r][l];
                  ns[l] = es[r][l];
                  ni[l] = ei[r][l];
                  if (pos < K && l < K) {
                    const int how = ix::moba_insert_source(l, pos);
                    if (how == 1) {
                      ns[l] = cs;
                      ni[l] = ci;
                    } else if (how == 2) {
                      CHECK(l > 0);
                      ns[l] = up_s;
                      ni[l] = up_i;
                    }
                  }
                }
                std::copy(ns, ns + 32, es[r]);
                std::copy(ni, ni + 32, ei[r]);
              }
            }
          }
        };
        // cp_async_pipeline<kMobaStages = 2>
        const int iters = int(ix::ceil_div(cta_limit, ix::kMobaChunk));
        CHECK(ix::kMobaStages == 2);
        if (iters > 0) load_stage(0, 0);
        sm.commit();
        for (int it = 0; it < iters; ++it) {
          sm.wait(0);
          sm.barrier();
          if (it + 1 < iters) load_stage((it + 1) % 2, it + 1);
          sm.commit();
          merge_chunk(it % 2, it);
        }
        // output
        for (int r = 0; r < rows_per_cta; ++r) {
          const int64_t i = i0 + r;
          if (i >= Sq) continue;
          const int K = range[r].k;
          int32_t id[32];
          for (int l = 0; l < 32; ++l) id[l] = l < K ? ei[r][l] : ix::kMobaEmptyId;
          int n_sel = 0;
          for (int l = 0; l < 32; ++l) n_sel += id[l] != ix::kMobaEmptyId ? 1 : 0;
          const size_t row = size_t(((b * Hq + h) * Sq + i) * top_k);
          for (int l = 0; l < 32; ++l) {
            if (id[l] == ix::kMobaEmptyId) continue;
            int rank = 0;
            for (int m = 0; m < 32; ++m) rank += id[m] < id[l] ? 1 : 0;
            const int slot = ix::moba_output_slot(rank);
            CHECK(slot < top_k);
            out[row + size_t(slot)] = id[l];
            ++writes[row + size_t(slot)];
          }
          const int n_total = n_sel + (range[r].forced >= 0 ? 1 : 0);
          if (range[r].forced >= 0) {
            out[row + size_t(n_sel)] = range[r].forced;
            ++writes[row + size_t(n_sel)];
          }
          for (int l = 0; l < 32; ++l)
            for (int slot = n_total + l; slot < top_k; slot += 32) {
              out[row + size_t(slot)] = -1;
              ++writes[row + size_t(slot)];
            }
        }
      }
  // Each eligible (token, block) scored once, within the split's bound of the exact dot product.
  const auto score_of = [&](int b, int h, int i, int blk) {
    const size_t at = size_t(((b * Hq + h) * Sq + i) * blocks + blk);
    CHECK(scored[at] == 1);
    const int hk = h / (Hq / Hk);
    double exact = 0, magnitude = 0;
    for (int d = 0; d < D; ++d) {
      const double qd = q[size_t(((b * Hq + h) * Sq + i) * D + d)], pd = pooled_exact[size_t(((b * Hk + hk) * blocks + blk) * D + d)];
      exact += qd * pd;
      magnitude += std::fabs(qd * pd);
    }
    CHECK(std::fabs(kernel_score[at] - exact) <= std::ldexp(magnitude, -13) + 1e-30);
    return kernel_score[at];
  };
  for (int w : writes) CHECK(w == 1);
  // reference: full sort of the eligible blocks' scores (desc, ties lower id), forced block added
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < Hq; ++h)
      for (int i = 0; i < Sq; ++i) {
        std::vector<int32_t> ids;
        int want = top_k, forced = -1;
        int limit = blocks;
        if (causal) {
          const int64_t pos = int64_t(i) + Sk - Sq;
          if (pos < 0) {
            limit = 0;
            want = 0;
          } else {
            forced = int(pos / bs);
            limit = forced;
            want = top_k - 1;
          }
        }
        std::vector<std::pair<float, int>> cand;
        for (int blk = 0; blk < (want > 0 ? limit : 0); ++blk) cand.push_back({score_of(b, h, i, blk), blk});  // K = 0: none scored
        std::sort(cand.begin(), cand.end(), [](const auto& x, const auto& y) {
          return x.first > y.first || (x.first == y.first && x.second < y.second);
        });
        for (int s = 0; s < std::min<int>(want, int(cand.size())); ++s) ids.push_back(cand[size_t(s)].second);
        if (forced >= 0) ids.push_back(forced);
        std::sort(ids.begin(), ids.end());
        const size_t row = size_t(((b * Hq + h) * Sq + i) * top_k);
        for (int s = 0; s < top_k; ++s) {
          const int32_t expect = s < int(ids.size()) ? ids[size_t(s)] : -1;
          if (out[row + size_t(s)] != expect) {
            fprintf(stderr, "moba mismatch b%d h%d i%d slot %d got %d want %d\n", b, h, i, s, out[row + size_t(s)],
                    expect);
            CHECK(false);
          }
        }
        // ties really happen: count rows whose chosen set was decided by a tie
        for (size_t s = 1; s < cand.size(); ++s)
          if (int(s) == want && cand[s].first == cand[s - 1].first) ++stats[2];
      }
  ++stats[3];
}

template <typename T>
void attention_any(int* stats) {
  const int D = rnd(0, 1) ? 64 : 128, bq = rnd(0, 1) ? 64 : 128;
  const int bkv = 16 << rnd(0, 3);
#define CASE(d, q, kv) \
  if (D == d && bq == q && bkv == kv) return attention_case<T, d, q, kv>(stats);
#define CASES(d, q) CASE(d, q, 16) CASE(d, q, 32) CASE(d, q, 64) CASE(d, q, 128)
  CASES(64, 64)
  CASES(64, 128)
  CASES(128, 64)
  CASES(128, 128)
#undef CASES
#undef CASE
}

// attention_smem_bytes (what the host checks against the device's opt-in limit) is the largest
// request of the launches: the traits' sizes, and the known cases past sm_86 / sm_89's 99 KB.
void check_attention_smem_bytes() {
  constexpr int kSm86Limit = 101376;
  for (int top_k : {0, 8, 64}) {
    const int forward = ix::RowTraits<128, 64, false>::smem_bytes(top_k);
    CHECK(ix::attention_smem_bytes(128, 64, 32, top_k, false) == forward);
    const int dq = ix::RowTraits<64, 128, true>::smem_bytes(top_k), dkdv = ix::DkdvTraits<64, 16>::kSmemBytes;
    CHECK(ix::attention_smem_bytes(64, 128, 16, top_k, true) == std::max(dq, dkdv));
  }
  CHECK(ix::attention_smem_bytes(128, 128, 128, 0, true) > kSm86Limit);  // hence the host check
  CHECK(ix::attention_smem_bytes(128, 64, 64, 0, true) <= kSm86Limit);
  CHECK(ix::attention_smem_bytes(64, 128, 128, 8, false) <= kSm86Limit);
}

// The Hopper forward's operands (ix section 10): the tile layout is a bijection onto whole 16-byte
// chunks of the tile, and every element each wgmma reads through the kernel's descriptors (the
// PTX addressing model of mma_spec) is the element the loads put there: Q rows of the warpgroup
// and K keys along D (K-major, k16 steps), V keys x D (MN-major); P's A registers are acc_to_a's.
template <int kD, int kBlockQ>
void check_wgmma_forward_operands() {
  using Tr = ix::RowTraits<kD, kBlockQ, false>;
  constexpr int kChunks = kD / 8;
  const auto tile_check = [&](auto rows_tag) {
    constexpr int kRows = decltype(rows_tag)::value;
    std::vector<int> hits(size_t(kRows * kD * 2 / 16), 0);
    for (int r = 0; r < kRows; ++r)
      for (int c = 0; c < kChunks; ++c) {
        const int off = ix::wgmma_tile_offset<kRows>(r, c);
        CHECK(off % 16 == 0 && off >= 0 && off < kRows * kD * 2);
        ++hits[size_t(off / 16)];
      }
    for (int h : hits) CHECK(h == 1);
  };
  tile_check(std::integral_constant<int, kBlockQ>{});
  tile_check(std::integral_constant<int, ix::kTileKv>{});
  // where element (row, col) of a tile with kRows rows lies (base 1024-aligned, as the kernel's)
  const uint32_t base = 1024u * uint32_t(rnd(1, 40));
  const auto elem = [&](uint32_t tile, int rows, int row, int col) {
    const int chunk_off = rows == kBlockQ ? ix::wgmma_tile_offset<kBlockQ>(row, col / 8)
                                          : ix::wgmma_tile_offset<ix::kTileKv>(row, col / 8);
    return tile + uint32_t(chunk_off + (col % 8) * 2);
  };
  const uint32_t q_tile = base + Tr::kQOffset, k_tile = base + Tr::kStageOffset + Tr::kStageBytes;
  const uint32_t v_tile = k_tile + Tr::kKvBytes;
  CHECK(q_tile % 1024 == 0 && k_tile % 1024 == 0 && v_tile % 1024 == 0);
  for (int g = 0; g < kBlockQ / ix::kWgmmaRows; ++g) {
    const uint32_t q_group = q_tile + uint32_t(g * ix::kWgmmaRows * kWgmmaSwizzleRowBytes);
    for (int k16 = 0; k16 < kD / 16; ++k16) {
      const uint64_t da = ix::wgmma_kmajor_desc<kBlockQ>(q_group, k16);
      const uint64_t db = ix::wgmma_kmajor_desc<ix::kTileKv>(k_tile, k16);
      for (int r = 0; r < 64; ++r)
        for (int kb = 0; kb < 32; ++kb) {  // byte kb of the k16 slice: column 16 k16 + kb / 2
          const int col = 16 * k16 + kb / 2;
          CHECK(mma_spec::wgmma_sw128_address(da, r, kb) == elem(q_tile, kBlockQ, 64 * g + r, col) + uint32_t(kb % 2));
          CHECK(mma_spec::wgmma_sw128_address(db, r, kb) == elem(k_tile, ix::kTileKv, r, col) + uint32_t(kb % 2));
        }
    }
  }
  for (int kk = 0; kk < ix::kTileKv / 16; ++kk) {
    const uint64_t dv = ix::wgmma_v_desc(v_tile, kk);
    for (int kr = 0; kr < 16; ++kr)
      for (int nb = 0; nb < 2 * kD; ++nb)  // byte nb of the N = D extent: column nb / 2
        CHECK(mma_spec::wgmma_sw128_mn_address(dv, kr, nb) == elem(v_tile, ix::kTileKv, 16 * kk + kr, nb / 2) +
                                                                 uint32_t(nb % 2));
  }
  // P: register r of k16 step kk (acc_to_a: C tile c2a_tile, elements c2a_elem) holds the A
  // elements 2 r, 2 r + 1 of the wgmma register fragment, i.e. the S accumulators of the same
  // row and of key columns 16 kk + a_col.
  for (int w = 0; w < 4; ++w)
    for (int lane = 0; lane < 32; ++lane)
      for (int kk = 0; kk < ix::kTileKv / 16; ++kk)
        for (int i = 0; i < 8; ++i) {
          const int r = i / 2, j = ix::c2a_tile(kk, r), e = ix::c2a_elem(r, i % 2);
          CHECK(16 * w + ix::acc_row(lane, e) == mma_spec::WgmmaA16::a_row(w, lane, i));
          CHECK(8 * j + ix::acc_col(lane, e) == 16 * kk + mma_spec::WgmmaA16::a_col(lane, i));
          CHECK(16 * w + ix::acc_row(lane, e) == mma_spec::Wgmma64::d_row(w, lane, 4 * j + e));
          CHECK(8 * j + ix::acc_col(lane, e) == mma_spec::Wgmma64::d_col(lane, 4 * j + e));
        }
  CHECK((ix::wgmma_forward_smem_bytes<kD, kBlockQ>(8) == Tr::smem_bytes(8) + 1024));
}

// The Hopper forward's pipeline (block_sparse_attention_wgmma.cu), step by step for every walk
// length: K two steps ahead and V one in two stage slots, copies landing at each step's barrier.
// Every wgmma reads a slot holding its step's tile (landed), no copy targets a slot a wgmma in
// flight still reads, and make_step_mask finds step t's segment table (written with K_t).
void check_wgmma_forward_schedule() {
  for (int tiles = 0; tiles <= 7; ++tiles) {
    int k_slot[2] = {-1, -1}, v_slot[2] = {-1, -1};             // landed contents
    int k_pending[2] = {-1, -1}, v_pending[2] = {-1, -1};       // copies in flight
    int pv_reading = -1;                                         // V slot of the P V in flight
    const auto load_k = [&](int step, int slot) { k_pending[slot] = step; };
    const auto load_v = [&](int step, int slot) {
      CHECK(pv_reading != slot);
      v_pending[slot] = step;
    };
    const auto barrier = [&] {
      for (int i = 0; i < 2; ++i) {
        if (k_pending[i] >= 0) k_slot[i] = k_pending[i];
        if (v_pending[i] >= 0) v_slot[i] = v_pending[i];
        k_pending[i] = v_pending[i] = -1;
      }
    };
    if (tiles > 0) {
      load_k(0, 0);
      load_v(0, 0);
    }
    if (tiles > 1) load_k(1, 1);
    barrier();
    if (tiles > 0) CHECK(k_slot[0] == 0);  // S_0
    for (int t = 0; t < tiles; ++t) {
      const bool last = t == tiles - 1;
      const int st = t % ix::kStages;
      CHECK(k_slot[st] == t);  // the segment table of step t (make_step_mask, before the barrier)
      pv_reading = -1;         // wgmma_wait<0>: P_{t-1} V_{t-1} done
      barrier();
      if (!last) {
        if (t + 2 < tiles) load_k(t + 2, st);
        load_v(t + 1, (t + 1) % ix::kStages);
        CHECK(k_slot[(t + 1) % ix::kStages] == t + 1);  // S_{t+1}
      }
      CHECK(v_slot[st] == t);  // P_t V_t
      pv_reading = st;
    }
  }
}

// The Hopper backward's operands (ix section 11), in the PTX addressing model as above.
// dK / dV: the A operands are warpgroup g's 64 key rows of the block_kv-row K and V tiles
// (K-major), the B operands of S^T = K Q^T and dP^T = V dO^T the 64-row Q / dO tiles (K-major),
// and of dV += P^T dO, dK += dS^T Q the same tiles read transposed (query rows along k, D along n);
// every stage starts on an atom, its tiles too, and lse / delta take float2 loads. dQ: dO like Q
// (K-major A, warpgroup rows), V like K (K-major B), K read transposed like V in the forward
// (the same tile layout and descriptor, checked by check_wgmma_forward_operands).
template <int kD, int kBlockKv>
void check_wgmma_dkdv_operands() {
  using Tr = ix::WgmmaDkdvTraits<kD, kBlockKv>;
  const uint32_t base = 1024u * uint32_t(rnd(1, 40));
  const auto elem = [&](uint32_t tile, int rows, int row, int col) {
    const int chunk_off = rows == kBlockKv ? ix::wgmma_tile_offset<kBlockKv>(row, col / 8)
                                           : ix::wgmma_tile_offset<ix::kBwdQTile>(row, col / 8);
    return tile + uint32_t(chunk_off + (col % 8) * 2);
  };
  for (int rows : {kBlockKv, ix::kBwdQTile}) {
    std::vector<int> hits(size_t(rows * kD * 2 / 16), 0);
    for (int r = 0; r < rows; ++r)
      for (int c = 0; c < kD / 8; ++c) {
        const int off = rows == kBlockKv ? ix::wgmma_tile_offset<kBlockKv>(r, c) : ix::wgmma_tile_offset<ix::kBwdQTile>(r, c);
        CHECK(off % 16 == 0 && off >= 0 && off < rows * kD * 2);
        ++hits[size_t(off / 16)];
      }
    for (int h : hits) CHECK(h == 1);
  }
  CHECK(Tr::kStageOffset % 1024 == 0 && Tr::kStageBytes % 1024 == 0 && Tr::kVOffset % 1024 == 0);
  CHECK(Tr::kLseOffset % 8 == 0 && Tr::kDeltaOffset % 8 == 0 && Tr::kQBaseOffset + 4 <= Tr::kStageBytes);
  CHECK(Tr::kSmemBytes <= 227 * 1024);
  CHECK(Tr::kThreads == 128 * (kBlockKv / 64));
  const uint32_t k_tile = base + Tr::kKOffset;
  for (int st = 0; st < ix::kStages; ++st) {
    const uint32_t q_tile = base + Tr::kStageOffset + st * Tr::kStageBytes, do_tile = q_tile + Tr::kTileBytes;
    CHECK(q_tile % 1024 == 0 && do_tile % 1024 == 0);
    for (int g = 0; g < kBlockKv / 64; ++g) {
      const uint32_t k_rows = k_tile + uint32_t(g * ix::kWgmmaRows * kWgmmaSwizzleRowBytes);
      for (int k16 = 0; k16 < kD / 16; ++k16) {
        const uint64_t da = ix::wgmma_kmajor_desc<kBlockKv>(k_rows, k16);
        const uint64_t db = ix::wgmma_kmajor_desc<ix::kTileKv>(q_tile, k16);
        for (int r = 0; r < 64; ++r)
          for (int kb = 0; kb < 32; ++kb) {
            const int col = 16 * k16 + kb / 2;
            CHECK(mma_spec::wgmma_sw128_address(da, r, kb) == elem(k_tile, kBlockKv, 64 * g + r, col) + uint32_t(kb % 2));
            CHECK(mma_spec::wgmma_sw128_address(db, r, kb) == elem(q_tile, ix::kBwdQTile, r, col) + uint32_t(kb % 2));
          }
      }
    }
    for (const uint32_t tile : {q_tile, do_tile})  // dK += dS^T Q, dV += P^T dO
      for (int kk = 0; kk < ix::kBwdQTile / 16; ++kk) {
        const uint64_t dt = ix::wgmma_v_desc(tile, kk);
        for (int kr = 0; kr < 16; ++kr)
          for (int nb = 0; nb < 2 * kD; ++nb)
            CHECK(mma_spec::wgmma_sw128_mn_address(dt, kr, nb) ==
                  elem(tile, ix::kBwdQTile, 16 * kk + kr, nb / 2) + uint32_t(nb % 2));
      }
  }
  // dQ: RowTraits' backward layout, every tile on an atom, within Hopper's 227 KB at top_k 64.
  for (int block_q : {64, 128}) {
    const bool atoms = block_q == 64
                           ? (ix::RowTraits<kD, 64, true>::kRowBytes % 1024 == 0 &&
                              ix::RowTraits<kD, 64, true>::kStageBytes % 1024 == 0 &&
                              ix::RowTraits<kD, 64, true>::kKvBytes % 1024 == 0)
                           : (ix::RowTraits<kD, 128, true>::kRowBytes % 1024 == 0 &&
                              ix::RowTraits<kD, 128, true>::kStageBytes % 1024 == 0 &&
                              ix::RowTraits<kD, 128, true>::kKvBytes % 1024 == 0);
    CHECK(atoms);
  }
  CHECK((ix::wgmma_dq_smem_bytes<kD, 128>(ix::kMaxSelectionTopK) <= 227 * 1024));
  CHECK((ix::wgmma_dq_smem_bytes<kD, 64>(0) == ix::RowTraits<kD, 64, true>::smem_bytes(0) + 1024));
}

// dkdv_step_hidden / dkdv_tile_full against key_visible over every (row, key) of the step.
void check_dkdv_step_predicates() {
  for (int rep = 0; rep < 4000; ++rep) {
    const int64_t seq_q = rnd(1, 400), seq_kv = rnd(1, 400);
    const bool causal = rnd(0, 1) == 1;
    const int block_kv = 64 << rnd(0, 1);
    const int64_t q0 = 64 * rnd(0, (seq_q + 63) / 64), k0 = block_kv * rnd(0, (seq_kv - 1) / block_kv);
    bool any = false;
    for (int64_t i = q0; i < q0 + ix::kBwdQTile && i < seq_q; ++i)
      for (int64_t j = k0; j < k0 + block_kv; ++j) any = any || ix::key_visible(i, j, seq_q, seq_kv, causal);
    CHECK(ix::dkdv_step_hidden(q0, k0, seq_q, seq_kv, causal) == !any);
    const int64_t k_last = k0 + 16 * rnd(0, block_kv / 16 - 1) + 15;
    bool all = q0 + ix::kBwdQTile <= seq_q;
    for (int64_t i = q0; i < q0 + ix::kBwdQTile; ++i)
      for (int64_t j = k_last - 15; j <= k_last; ++j) all = all && ix::key_visible(i, j, seq_q, seq_kv, causal);
    CHECK(ix::dkdv_tile_full(q0, k_last, seq_q, seq_kv, causal) == all);
    // step_hidden_from_rows for a warp's 16 rows and a warpgroup's 64 (the Hopper dQ kernel's
    // skip): no row sees the step's first listed key (visibility only shrinks for later keys).
    for (const int rows : {ix::kWarpRows, ix::kWgmmaRows}) {
      const int64_t first_q = rnd(0, seq_q + 8), first_key = rnd(-1, seq_kv + 8);
      bool seen = false;
      for (int64_t i = first_q; i < first_q + rows && i < seq_q; ++i)
        seen = seen || (first_key >= 0 && ix::key_visible(i, first_key, seq_q, seq_kv, causal));
      CHECK(ix::step_hidden_from_rows(first_key, first_q, seq_q, seq_kv, causal, rows) == !seen);
    }
  }
}

// moba_block_lists_kernel thread by thread: the bitmask, each thread's run of words, the scan of
// their counts and the writes give every query block's union in ascending order, each slot once.
void check_block_lists_kernel() {
  for (int rep = 0; rep < 40; ++rep) {
    const int nk = int(rnd(0, 3)) == 0 ? int(rnd(0, 40)) : int(rnd(1, 9000));
    const int block_q = rnd(0, 1) ? 64 : 128, top_k = int(rnd(1, 32)), seq_q = int(rnd(1, 300));
    const int max_blocks = std::min(nk, block_q * top_k);
    CHECK(ix::list_smem_bytes(nk) <= ix::kMaxListSmemBytes);
    std::vector<int32_t> chosen(size_t(seq_q * top_k));
    for (int32_t& id : chosen) id = int32_t(rnd(-1, nk + 2));  // ids past nk are ignored
    const int nq = int(ix::ceil_div(seq_q, block_q));
    for (int qb = 0; qb < nq; ++qb) {
      const int nwords = ix::list_mask_words(nk), per = ix::list_words_per_thread(nk);
      std::vector<uint32_t> words(size_t(nwords), 0u);
      std::set<int> want;
      const int rows = std::min(block_q, seq_q - qb * block_q);
      for (int i = 0; i < rows * top_k; ++i) {
        const int32_t id = chosen[size_t(qb * block_q * top_k + i)];
        if (id >= 0 && id < nk) {
          words[size_t(id / 32)] |= 1u << (id % 32);
          want.insert(id);
        }
      }
      // per thread: its run of words, the chosen (set) and other (clear, valid) bits in it
      std::vector<uint32_t> ones(ix::kListThreads, 0u), zeros(ix::kListThreads, 0u);
      const auto run = [&](int t) { return std::pair<int, int>{std::min(t * per, nwords), std::min(std::min(t * per, nwords) + per, nwords)}; };
      for (int t = 0; t < ix::kListThreads; ++t)
        for (int w = run(t).first; w < run(t).second; ++w) {
          ones[size_t(t)] += uint32_t(__builtin_popcount(words[size_t(w)]));
          zeros[size_t(t)] += uint32_t(__builtin_popcount(~words[size_t(w)] & ix::list_word_valid_bits(w, nk)));
        }
      uint32_t total = 0;
      for (uint32_t c : ones) total += c;
      std::vector<int32_t> out(size_t(max_blocks), -5);
      uint32_t ones_before = 0, zeros_before = 0;
      for (int t = 0; t < ix::kListThreads; ++t) {
        int64_t slot = ones_before;
        for (int w = run(t).first; w < run(t).second; ++w)
          for (uint32_t bits = words[size_t(w)]; bits != 0u; bits &= bits - 1u, ++slot) {
            CHECK(slot < max_blocks && out[size_t(slot)] == -5);
            out[size_t(slot)] = 32 * w + __builtin_ctz(bits);
          }
        slot = int64_t(total) + zeros_before;
        for (int w = run(t).first; w < run(t).second && slot < max_blocks; ++w)
          for (uint32_t bits = ~words[size_t(w)] & ix::list_word_valid_bits(w, nk); bits != 0u; bits &= bits - 1u, ++slot)
            if (slot < max_blocks) {
              CHECK(out[size_t(slot)] == -5);
              out[size_t(slot)] = 32 * w + __builtin_ctz(bits);
            }
        ones_before += ones[size_t(t)];
        zeros_before += zeros[size_t(t)];
      }
      CHECK(total == want.size() && int(total) <= max_blocks);
      // the CPU's contract: the chosen ids ascending, then the others ascending, max_blocks slots
      std::vector<int32_t> expect(want.begin(), want.end());
      for (int id = 0; id < nk && int(expect.size()) < max_blocks; ++id)
        if (!want.count(id)) expect.push_back(id);
      expect.resize(size_t(max_blocks));
      CHECK(out == expect);
    }
  }
}

// sort_choices + sorted_choices_hold against the linear scan, on lists of every length up to the
// limit with duplicates, -1 padding and any order.
void check_sorted_choice_lookup() {
  for (int top_k = 0; top_k <= ix::kMaxSelectionTopK; ++top_k)
    for (int rep = 0; rep < 20; ++rep) {
      const int blocks = int(rnd(1, 3 * ix::kMaxSelectionTopK));
      std::vector<int32_t> list(static_cast<size_t>(top_k));
      for (int32_t& v : list) v = int32_t(rnd(0, 4) == 0 ? -1 : rnd(0, blocks - 1));
      if (rep % 2 == 0) std::sort(list.begin(), list.end());  // as moba_select returns them
      std::vector<int32_t> sorted = list;
      ix::sort_choices(sorted.data(), top_k);
      CHECK(std::is_sorted(sorted.begin(), sorted.end()));
      for (int block = -1; block <= blocks; ++block)
        CHECK(ix::sorted_choices_hold(sorted.data(), top_k, block) == ix::block_selected(list.data(), top_k, block));
    }
}

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 20;
  const uint64_t seed = argc > 2 ? strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  check_fragment_maps();
  check_online_softmax();
  check_sorted_choice_lookup();
  check_block_lists_kernel();
  check_wgmma_forward_operands<64, 64>();
  check_wgmma_forward_operands<128, 64>();
  check_wgmma_forward_operands<64, 128>();
  check_wgmma_forward_operands<128, 128>();
  check_wgmma_forward_schedule();
  check_wgmma_dkdv_operands<64, 64>();
  check_wgmma_dkdv_operands<128, 64>();
  check_wgmma_dkdv_operands<64, 128>();
  check_wgmma_dkdv_operands<128, 128>();
  check_dkdv_step_predicates();
  CHECK(!ix::bhsd_vectorizable(16, 64, 64, 12));  // seq stride not a multiple of 8
  CHECK(!ix::bhsd_vectorizable(8, 0, 0, 64));     // base not 16-byte aligned
  // Block ids past the keys are empty segments, however large (the segment tables hold ints).
  CHECK(ix::segment_base((1 << 26) + 1, 0, 64, 1000) == -1 && ix::segment_base(15, 48, 64, 1000) == -1);
  CHECK(ix::segment_base(15, 16, 64, 1000) == 976 && ix::segment_base(-3, 0, 64, 1000) == -1);
  check_moba_smem_layout();
  check_attention_smem_bytes();
  int stats[4] = {0, 0, 0, 0};
  // attention cases are costly (mma models): one in 4 of the requested cases, at least 6
  const int attention_cases = std::max(6, cases / 4);
  for (int c = 0; c < attention_cases; ++c) {
    if (c % 2 == 0) attention_any<Half>(stats); else attention_any<BFloat16>(stats);
  }
  for (int c = 0; c < cases; ++c) {
    if (c % 3 == 0) {
      moba_case<float>(stats);
    } else if (c % 3 == 1) {
      moba_case<Half>(stats);
    } else {
      moba_case<BFloat16>(stats);
    }
  }
  printf("attention rows checked %d (empty %d), skipped warp steps %lld, dead n8 tiles %lld, moba cases %d "
         "(tie-decided rows %d, batch merges %lld)\n",
         stats[0], stats[1], static_cast<long long>(g_hidden_steps), static_cast<long long>(g_dead_slices), stats[3],
         stats[2], static_cast<long long>(g_batch_merges));
  printf("all ok\n");
  return 0;
}
