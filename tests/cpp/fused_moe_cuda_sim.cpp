// CPU simulation of the CUDA fused_moe kernels (csrc/moe/fused_moe_cuda.cu, fused_moe_wgmma.cu).
//
// No GPU here or in CI, so this program runs the kernels' logic on the CPU with the very
// host-device functions they call (csrc/moe/fused_moe_cuda_index.h) and checks them against
// independent definitions (moe::build_expert_plan_host, the PTX fragment layouts of
// mma.m16n8k16 and ldmatrix, a double reference):
//  (a) the device plan: plan_count / plan_scan / plan_scatter thread by thread (warps emulated:
//      __match_any_sync, shuffles, the 1024-thread block scan) on random routings (E = 1, 7, 60
//      and random; k up to 8; experts without tokens; every pair on one expert; T = 1; repeated
//      ids in a token), for plan 1 (key = expert) and plan 2 (key = rank * E + expert, the rank
//      from an independent sort): counts, offsets and sorted_pairs must equal
//      build_expert_plan_host (bit for bit, padding rows -1), row_of_pair its inverse, the active
//      list the experts with pairs in increasing id; segment_of_row against a linear search;
//  (b) the grouped GEMM path (T k > 64 or forced on small problems): grouped_gemm_kernel for
//      GEMM 1 and each rank of GEMM 2 thread by thread on every CTA of the static grid: every
//      cp.async / synchronous chunk (bounds, 16-byte alignment on the vector path, zero fill), a
//      shared-memory model checking each read against the commit / wait / barrier order,
//      ldmatrix (addresses, bank conflicts) and mma.m16n8k16 modelled from the PTX fragment
//      maps, the fused gate / up epilogue and the combine. Inputs are small integers, so every
//      GEMM 1 sum is exact: act must equal round(act(g, u)) bit for bit; out is compared with a
//      double reference (from the kernel's act) under an fp32 summation bound. Every act element
//      of a real pair is written once, every (t, n) exactly once per rank, nothing else touched;
//  (c) the decode kernels (T k <= 64) the same way: act and out against the references, each
//      written once;
//  (d) the workspace layout (disjoint aligned regions that hold every plan), the CTA order, the
//      swizzle, the tile maps' adjacency assumptions and the activation / combine arithmetic.
//  (e) the Hopper grouped GEMMs (moe/fused_moe_wgmma.cu; moe/fused_moe_wgmma_index.h): the (b)
//      checks with 128-row plans, every wgmma's operands read back through the kernel's
//      descriptors and the PTX swizzle model, the ring's slot reuse, and the epilogue's walk of
//      the m64n256 accumulator layout with gate register i paired with up register i + 64.
// Usage: fused_moe_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <numeric>
#include <random>
#include <vector>

#include "common/float_bits.h"
#include "moe/expert_plan.h"
#include "moe/fused_moe_cuda_index.h"
#include "moe/fused_moe_wgmma_index.h"
#include "mma_spec.h"
#include "sim_common.h"

using namespace torch_ext;
namespace ix = torch_ext::moe::fused_moe_cuda;
namespace wx = torch_ext::moe::fused_moe_wgmma;
using moe::Activation;

std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------
// 16-bit values
// ---------------------------------------------------------------------------------------------
bool g_bf16 = false;
float to_f(uint16_t bits) { return g_bf16 ? to_float(BFloat16{bits}) : to_float(Half{bits}); }
uint16_t from_f(float f) { return g_bf16 ? from_float<BFloat16>(f).bits : from_float<Half>(f).bits; }
constexpr uint16_t kPoison = 0x7E01;  // NaN in fp16, a huge bf16: marks never-written elements

// ---------------------------------------------------------------------------------------------
// (a) the plan
// ---------------------------------------------------------------------------------------------
struct DevPlan {
  std::vector<int32_t> cells, counts, offsets, active, sorted, row_of_pair;
};

// Warp emulation of __match_any_sync.
uint32_t match_any(const int32_t (&key)[32], int lane) {
  uint32_t m = 0;
  for (int l = 0; l < 32; ++l)
    if (key[l] == key[lane]) m |= 1u << l;
  return m;
}

void walk_chunk_sim(const std::vector<int32_t>& ids, int64_t pairs, int k, int32_t E, bool by_rank, int64_t chunks,
                    int64_t b, const auto& fn) {
  const int64_t begin = ix::chunk_begin(b, pairs, chunks), end = ix::chunk_begin(b + 1, pairs, chunks);
  CHECK(begin <= end && end <= pairs);
  for (int64_t base = begin; base < end; base += 32) {
    int32_t key[32];
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t p = base + lane;
      key[lane] = p < end ? ix::plan_key(ids.data(), p, k, E, by_rank) : -1;
    }
    uint32_t peers[32];
    for (int lane = 0; lane < 32; ++lane) peers[lane] = match_any(key, lane);
    fn(base, key, peers);
  }
}

// The three kernels, as the GPU runs them; `rows` = the sorted region's size.
void sim_plan(const std::vector<int32_t>& ids, int64_t pairs, int k, int32_t E, bool by_rank, int64_t block,
              int64_t chunks, int64_t rows, DevPlan& d) {
  const int32_t keys = by_rank ? k * E : E;
  d.cells.assign(size_t(chunks * keys), 0x5A5A5A5A);
  d.counts.assign(size_t(keys), -7);
  d.offsets.assign(size_t(keys + 1), -7);
  d.active.assign(size_t(E + 1), -7);
  d.sorted.assign(size_t(rows), -7);
  d.row_of_pair.assign(size_t(pairs), -7);
  const auto cell = [&](int64_t key, int64_t b) -> int32_t& {
    CHECK(key >= 0 && key < keys && b >= 0 && b < chunks);
    return d.cells[size_t(key * chunks + b)];
  };
  // count
  std::vector<int> covered(size_t(pairs), 0);
  for (int64_t b = 0; b < chunks; ++b) {
    for (int lane = 0; lane < 32; ++lane)
      for (int64_t key = lane; key < keys; key += 32) cell(key, b) = 0;
    walk_chunk_sim(ids, pairs, k, E, by_rank, chunks, b, [&](int64_t base, const int32_t(&key)[32], const uint32_t(&peers)[32]) {
      for (int lane = 0; lane < 32; ++lane) {
        if (key[lane] < 0) continue;
        ++covered[size_t(base + lane)];
        if (ix::group_leader(peers[lane], lane)) cell(key[lane], b) += ix::popc32(peers[lane]);
      }
    });
  }
  for (int c : covered) CHECK(c == 1);  // the chunks partition the pairs
  // scan (a)
  const int64_t span = ix::scan_span(chunks);
  for (int warp = 0; warp < ix::kScanThreads / 32; ++warp)
    for (int64_t key = warp; key < keys; key += ix::kScanThreads / 32) {
      int32_t sum[32], lo[32], hi[32];
      int64_t next = 0;
      for (int lane = 0; lane < 32; ++lane) {
        lo[lane] = int32_t(ix::min64(chunks, lane * span));
        hi[lane] = int32_t(ix::min64(chunks, lo[lane] + span));
        CHECK(lo[lane] == next || lo[lane] == hi[lane]);
        next = std::max<int64_t>(next, hi[lane]);
        sum[lane] = 0;
        for (int64_t c = lo[lane]; c < hi[lane]; ++c) sum[lane] += cell(key, c);
      }
      CHECK(next == chunks);
      int32_t incl[32];
      for (int lane = 0; lane < 32; ++lane) incl[lane] = sum[lane];
      for (int o = 1; o < 32; o *= 2) {  // shfl_up scan
        int32_t up[32];
        for (int lane = 0; lane < 32; ++lane) up[lane] = incl[lane >= o ? lane - o : lane];
        for (int lane = 0; lane < 32; ++lane)
          if (lane >= o) incl[lane] += up[lane];
      }
      for (int lane = 0; lane < 32; ++lane) {
        int32_t running = incl[lane] - sum[lane];
        for (int64_t c = lo[lane]; c < hi[lane]; ++c) {
          const int32_t v = cell(key, c);
          cell(key, c) = running;
          running += v;
        }
      }
      d.counts[size_t(key)] = incl[31];
    }
  // scan (b): rounds of 1024 threads, warps' inclusive sums, the block totals
  int32_t carry_rows = 0, carry_active = 0;
  for (int64_t base = 0; base < keys; base += ix::kScanThreads) {
    std::vector<int32_t> rows_v(ix::kScanThreads), act_v(ix::kScanThreads), rows_incl(ix::kScanThreads),
        act_incl(ix::kScanThreads);
    int32_t warp_rows[32], warp_active[32];
    for (int tid = 0; tid < ix::kScanThreads; ++tid) {
      const int64_t key = base + tid;
      const int32_t count = key < keys ? d.counts[size_t(key)] : 0;
      rows_v[size_t(tid)] = int32_t(moe::padded_rows(count, block));
      act_v[size_t(tid)] = count > 0;
    }
    for (int w = 0; w < 32; ++w) {
      int32_t r = 0, a = 0;
      for (int lane = 0; lane < 32; ++lane) {  // inclusive scan (any order gives the same integers)
        r += rows_v[size_t(32 * w + lane)];
        a += act_v[size_t(32 * w + lane)];
        rows_incl[size_t(32 * w + lane)] = r;
        act_incl[size_t(32 * w + lane)] = a;
      }
      warp_rows[w] = r;
      warp_active[w] = a;
    }
    int32_t rows_total = 0, active_total = 0;
    for (int w = 0; w < 32; ++w) {
      rows_total += warp_rows[w];
      active_total += warp_active[w];
    }
    for (int tid = 0; tid < ix::kScanThreads; ++tid) {
      const int warp = tid / 32;
      int32_t rows_before = carry_rows, active_before = carry_active;
      for (int w = 0; w < warp; ++w) {
        rows_before += warp_rows[w];
        active_before += warp_active[w];
      }
      const int64_t key = base + tid;
      if (key < keys) {
        d.offsets[size_t(key)] = rows_before + rows_incl[size_t(tid)] - rows_v[size_t(tid)];
        if (!by_rank && act_v[size_t(tid)]) d.active[size_t(active_before + act_incl[size_t(tid)] - 1)] = int32_t(key);
      }
    }
    carry_rows += rows_total;
    carry_active += active_total;
  }
  d.offsets[size_t(keys)] = carry_rows;
  if (!by_rank) d.active[size_t(E)] = carry_active;
  CHECK(carry_rows <= rows);
  // scan (c)
  if (block > 1)
    for (int64_t i = 0; i < int64_t(keys) * (block - 1); ++i) {
      const int64_t r = ix::padding_row(d.counts.data(), d.offsets.data(), i, block);
      if (r >= 0) {
        CHECK(r < rows);
        d.sorted[size_t(r)] = -1;
      }
    }
  // scatter
  for (int64_t b = 0; b < chunks; ++b)
    walk_chunk_sim(ids, pairs, k, E, by_rank, chunks, b, [&](int64_t base, const int32_t(&key)[32], const uint32_t(&peers)[32]) {
      for (int lane = 0; lane < 32; ++lane) {  // all lanes read the cursor first
        if (key[lane] < 0) continue;
        const int64_t row = d.offsets[size_t(key[lane])] + cell(key[lane], b) + ix::group_rank(peers[lane], lane);
        CHECK(row >= d.offsets[size_t(key[lane])] && row < d.offsets[size_t(key[lane])] + d.counts[size_t(key[lane])]);
        CHECK(d.sorted[size_t(row)] == -7);
        d.sorted[size_t(row)] = int32_t(base + lane);
        if (!by_rank) d.row_of_pair[size_t(base + lane)] = int32_t(row);
      }
      for (int lane = 0; lane < 32; ++lane)
        if (key[lane] >= 0 && ix::group_leader(peers[lane], lane)) cell(key[lane], b) += ix::popc32(peers[lane]);
    });
}

// Independent rank: sort the token's slots by (id, slot).
std::vector<int32_t> rank_keys(const std::vector<int32_t>& ids, int64_t T, int k, int32_t E) {
  std::vector<int32_t> keys(ids.size());
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int> order(static_cast<size_t>(k));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return ids[size_t(t * k + a)] < ids[size_t(t * k + b)]; });
    for (int r = 0; r < k; ++r) {
      const int j = order[size_t(r)];
      keys[size_t(t * k + j)] = r * E + ids[size_t(t * k + j)];
      CHECK(ix::combine_rank(ids.data() + t * k, k, j) == r);
      CHECK(ix::slot_of_rank(ids.data() + t * k, k, r) == j);
    }
  }
  return keys;
}

void check_plan_against_host(const DevPlan& d, const std::vector<int32_t>& keys_of_pair, int64_t pairs, int32_t keys,
                             int64_t block, bool check_active, int32_t E) {
  std::vector<int64_t> counts(static_cast<size_t>(keys)), offsets(static_cast<size_t>(keys + 1));
  std::vector<int32_t> sorted(size_t(moe::max_grouped_rows(pairs, keys, block)) + 1);
  moe::build_expert_plan_host(keys_of_pair.data(), pairs, keys, block, counts.data(), offsets.data(), sorted.data());
  CHECK(offsets[size_t(keys)] <= moe::max_grouped_rows(pairs, keys, block));
  for (int32_t e = 0; e < keys; ++e) CHECK(d.counts[size_t(e)] == counts[size_t(e)]);
  for (int32_t e = 0; e <= keys; ++e) CHECK(d.offsets[size_t(e)] == offsets[size_t(e)]);
  for (int64_t r = 0; r < offsets[size_t(keys)]; ++r) CHECK(d.sorted[size_t(r)] == sorted[size_t(r)]);
  for (int64_t r = offsets[size_t(keys)]; r < int64_t(d.sorted.size()); ++r) CHECK(d.sorted[size_t(r)] == -7);
  if (check_active) {
    int32_t n = 0;
    for (int32_t e = 0; e < E; ++e)
      if (counts[size_t(e)] > 0) CHECK(d.active[size_t(n++)] == e);
    CHECK(d.active[size_t(E)] == n);
    for (int64_t p = 0; p < pairs; ++p) CHECK(d.sorted[size_t(d.row_of_pair[size_t(p)])] == p);
  }
  // segment_of_row against a linear search, over a range of keys as GEMM 2 uses it
  const int32_t first = keys > 1 ? int32_t(rnd(0, keys - 1)) : 0, count = int32_t(rnd(1, keys - first));
  for (int64_t row = -1; row <= offsets[size_t(keys)] + 2; ++row) {
    int32_t want = -1;
    if (row >= offsets[size_t(first)])
      for (int32_t e = first; e < first + count; ++e)
        if (offsets[size_t(e)] <= row && row < offsets[size_t(e + 1)]) want = e;
    CHECK(ix::segment_of_row(d.offsets.data(), first, count, row) == want);
  }
}

struct Routing {
  int64_t T;
  int k;
  int32_t E;
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routing random_routing(int64_t T, int k, int32_t E) {
  Routing r{T, k, E, std::vector<int32_t>(size_t(T * k)), std::vector<float>(size_t(T * k))};
  const int kind = int(rnd(0, 4));
  const int32_t one = int32_t(rnd(0, E - 1));
  const int32_t hot = int32_t(rnd(1, E));  // only the first `hot` experts used
  for (int64_t t = 0; t < T; ++t) {
    std::vector<int32_t> perm(static_cast<size_t>(E));
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.begin() + (kind == 2 && hot >= k ? hot : E), rng);
    for (int j = 0; j < k; ++j) {
      int32_t id = perm[size_t(j)];
      if (kind == 1) id = j == 0 ? one : perm[size_t(j)];  // one expert in every token
      if (kind == 3) id = int32_t(rnd(0, E - 1));          // repeats allowed
      if (kind == 4 && k == 1) id = one;                   // all on one expert
      r.ids[size_t(t * k + j)] = id;
      r.weights[size_t(t * k + j)] = float(rnd(1, 8)) / 64.0f;  // sum <= 1: no fp16 overflow
    }
  }
  return r;
}

// fused_moe_quantized's grouped rows (plan_rows_kernel over plan 1): every row's expert and token
// from the plan's own segments, and what the weight-only GEMM relies on: a block of `block` rows
// lies in one segment and starts on a real pair, or lies past the rows (expert -1).
void check_grouped_rows(const DevPlan& d, const std::vector<int32_t>& ids, int64_t pairs, int k, int32_t E,
                        int64_t block) {
  const int64_t rows = moe::max_grouped_rows(pairs, E, block), used = d.offsets[size_t(E)];
  CHECK(used <= rows && rows % block == 0);
  for (int64_t r = 0; r < rows; ++r) {
    const ix::GroupedRow g = ix::grouped_row(d.offsets.data(), d.sorted.data(), E, k, r);
    const int32_t pair = r < used ? d.sorted[size_t(r)] : -1;
    if (r >= used) {
      CHECK(g.expert == -1 && g.token == 0);
      continue;
    }
    CHECK(g.expert >= 0 && g.expert < E && d.offsets[size_t(g.expert)] <= r && r < d.offsets[size_t(g.expert) + 1]);
    CHECK(pair >= 0 ? g.token == pair / k && ids[size_t(pair)] == g.expert : g.token == 0);
    if (r % block == 0) {
      CHECK(pair >= 0);  // a block starts on a real pair of its expert
      const ix::GroupedRow last = ix::grouped_row(d.offsets.data(), d.sorted.data(), E, k, r + block - 1);
      CHECK(last.expert == g.expert);
    }
  }
}

void check_plan_case() {
  static const int32_t kEs[] = {1, 7, 60};
  const int32_t E = rnd(0, 3) < 3 ? kEs[rnd(0, 2)] : int32_t(rnd(1, 300));
  const int k = int(rnd(1, std::min<int64_t>(8, E)));
  const int64_t T = rnd(0, 3) == 0 ? 1 : (rnd(0, 1) ? rnd(1, 60) : rnd(1, 3000));
  const Routing r = random_routing(T, k, E);
  static const int64_t kBlocks[] = {ix::kBM, 16};  // fused_moe's GEMM tile, fused_moe_quantized's small block
  const int64_t pairs = T * k, block = rnd(0, 3) == 0 ? rnd(1, 5) : kBlocks[rnd(0, 1)];
  const int num_sms = int(rnd(0, 1) ? 132 : rnd(1, 8));
  // plan 1
  {
    const int64_t chunks = rnd(0, 2) ? ix::plan_chunks(pairs, E, num_sms) : rnd(1, 40);
    DevPlan d;
    sim_plan(r.ids, pairs, k, E, false, block, chunks, moe::max_grouped_rows(pairs, E, block), d);
    check_plan_against_host(d, r.ids, pairs, E, block, true, E);
    check_grouped_rows(d, r.ids, pairs, k, E, block);
  }
  // plan 2
  {
    const int32_t keys = k * E;
    const int64_t chunks = rnd(0, 2) ? ix::plan_chunks(pairs, keys, num_sms) : rnd(1, 40);
    DevPlan d;
    sim_plan(r.ids, pairs, k, E, true, block, chunks, moe::max_grouped_rows(pairs, keys, block), d);
    const std::vector<int32_t> keys_of_pair = rank_keys(r.ids, T, k, E);
    check_plan_against_host(d, keys_of_pair, pairs, keys, block, false, E);
    // every rank's rows: T pairs, each token once, within the per-rank grid bound
    for (int rank = 0; rank < k; ++rank) {
      const int64_t lo = d.offsets[size_t(rank * E)], hi = d.offsets[size_t((rank + 1) * E)];
      CHECK(hi - lo <= moe::max_grouped_rows(T, E, block) && lo % block == 0);
      std::vector<int> seen(static_cast<size_t>(T), 0);
      for (int64_t row = lo; row < hi; ++row)
        if (d.sorted[size_t(row)] >= 0) ++seen[size_t(d.sorted[size_t(row)] / k)];
      for (int s : seen) CHECK(s == 1);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// PTX mma.m16n8k16 (.f16 / .bf16) and ldmatrix, independent of the index header (mma_spec.h)
// ---------------------------------------------------------------------------------------------
using spec = mma_spec::M16n8k16;
using mma_spec::ldmatrix_x4;

// d = c + sum of the 16 products (exact in double), one fp32 rounding.
void mma(float (&c)[32][4], const uint32_t (&a)[32][4], const uint32_t (&b)[32][2]) {
  double A[16][16], B[16][8];
  mma_spec::assemble_operands<spec>(
      A, B, [&](int lane, int i) { return double(to_f(uint16_t(mma_spec::element_bits<spec>(a[lane], i)))); },
      [&](int lane, int i) { return double(to_f(uint16_t(mma_spec::element_bits<spec>(b[lane], i)))); });
  mma_spec::mma_round_once<spec>(c, A, B);
}

// ---------------------------------------------------------------------------------------------
// Problems and references
// ---------------------------------------------------------------------------------------------
struct Problem {
  Routing r;
  int64_t H, I;
  Activation act;
  std::vector<uint16_t> hidden, w13, w2;  // small integers (exact GEMM 1 sums)
  bool aligned_rows;                      // the kernels' vector flags (only when H, I % 8 == 0)
};

Problem random_problem(int64_t T, int k, int32_t E, int64_t H, int64_t I) {
  Problem p{random_routing(T, k, E), H, I, rnd(0, 1) ? Activation::kSilu : Activation::kGelu, {}, {}, {}, false};
  // |g|, |u| <= 2 H <= 200, |act| <= 40000, |out| <= I / 64 * 40000 < 65504 (fp16 range).
  const auto fill = [&](std::vector<uint16_t>& v, size_t n, int lim, float scale) {
    v.resize(n);
    for (uint16_t& x : v) x = from_f(float(rnd(-lim, lim)) * scale);
  };
  fill(p.hidden, size_t(T * H), 2, 1.f);
  fill(p.w13, size_t(E * 2 * I * H), 1, 1.f);
  fill(p.w2, size_t(int64_t(E) * H * I), 1, 1.f / 64);
  p.aligned_rows = rnd(0, 3) != 0;
  return p;
}

// g, u of (pair, j): exact (integers, |sum| < 2^24).
void ref_gate_up(const Problem& p, int64_t pair, int64_t j, double& g, double& u) {
  const int64_t t = pair / p.r.k, e = p.r.ids[size_t(pair)];
  g = u = 0;
  for (int64_t h = 0; h < p.H; ++h) {
    const double x = to_f(p.hidden[size_t(t * p.H + h)]);
    g += x * to_f(p.w13[size_t((e * 2 * p.I + j) * p.H + h)]);
    u += x * to_f(p.w13[size_t((e * 2 * p.I + p.I + j) * p.H + h)]);
  }
}

// out[t, n] from the kernel's act values (act_of(pair, i)), in rank order, checked within the
// fp32 bound: each dot's error <= (I + 1) u sum |products|; the combine's roundings.
template <typename ActOf>
void check_out(const Problem& p, const std::vector<uint16_t>& out, const ActOf& act_of, const char* what) {
  const int k = p.r.k;
  const double u = std::ldexp(1.0, -24), u_o = g_bf16 ? std::ldexp(1.0, -8) : std::ldexp(1.0, -11);
  for (int64_t t = 0; t < p.r.T; ++t)
    for (int64_t n = 0; n < p.H; ++n) {
      double ref = 0, tol = 0;
      for (int rank = 0; rank < k; ++rank) {
        const int j = ix::slot_of_rank(p.r.ids.data() + t * k, k, rank);
        const int64_t pair = t * k + j, e = p.r.ids[size_t(pair)];
        double y = 0, abs = 0;
        for (int64_t i = 0; i < p.I; ++i) {
          const double prod = double(to_f(p.w2[size_t((e * p.H + n) * p.I + i)])) * act_of(pair, i);
          y += prod;
          abs += std::fabs(prod);
        }
        const double w = p.r.weights[size_t(pair)];
        ref += w * y;
        tol += w * (double(p.I + 2) * u * abs) + 2 * u * std::fabs(ref);
      }
      tol += u_o * (std::fabs(ref) + tol) + std::ldexp(1.0, -24);
      const float got = to_f(out[size_t(t * p.H + n)]);
      if (!(std::fabs(double(got) - ref) <= tol)) {
        fprintf(stderr, "%s out[%lld, %lld] = %.9g want %.9g tol %.3g\n", what, (long long)t, (long long)n, got, ref, tol);
        abort();
      }
    }
}

// ---------------------------------------------------------------------------------------------
// (b) the grouped GEMM kernel
// ---------------------------------------------------------------------------------------------
struct GemmSim {
  bool gate_up;
  const std::vector<uint16_t>* a;  // hidden or act
  int64_t a_stride;
  const std::vector<uint8_t>* a_written;  // act: which elements GEMM 1 wrote (nullptr: all)
  const std::vector<uint16_t>* w;
  int64_t w_expert_stride, k_total, n_total;
  const DevPlan* plan;
  int32_t first_key, keys, experts;
  const std::vector<int32_t>* row_of_pair;
  int top_k;
  int64_t m_blocks, n_blocks, k_iters;
  bool vector;
  // epilogues
  std::vector<uint16_t>* act;
  std::vector<int>* act_count;
  int64_t act_stride;
  Activation activation;
  const std::vector<float>* weights;
  std::vector<float>* acc32;
  std::vector<uint16_t>* out;
  std::vector<int>* out_count;
  bool first, last;
};

// A CTA's tile in the plan, as grouped_tile (moe/fused_moe_cuda_gemm.cuh): row0 and the expert of
// the segment holding it (-1 past the plan's rows); the whole tile must lie in that segment.
struct SimTile {
  int64_t row0;
  int32_t expert;
};
SimTile sim_tile_start(const GemmSim& p, int64_t m_block, int bm) {
  const int64_t row0 = int64_t(p.plan->offsets[size_t(p.first_key)]) + m_block * bm;
  const int32_t key = ix::segment_of_row(p.plan->offsets.data(), p.first_key, p.keys, row0);
  if (key < 0) return {row0, -1};
  CHECK(row0 + bm <= p.plan->offsets[size_t(key + 1)]);
  return {row0, key % p.experts};
}
// The A row of a grouped row (-1: padding, zero-filled), as a_row_source.
int64_t sim_a_row(const GemmSim& p, int64_t grouped_row) {
  const int32_t pair = p.plan->sorted[size_t(grouped_row)];
  if (pair < 0) return -1;
  return p.gate_up ? pair / p.top_k : (*p.row_of_pair)[size_t(pair)];
}
// The 8 values one chunk copy brings (zeros past K and for src_row -1), every source element
// checked in bounds (and, for act, written by GEMM 1); `aligned`: a 16-byte cp.async source.
void sim_read_chunk(const GemmSim& p, bool a_operand, int64_t src_row, int64_t k, int32_t expert, bool aligned,
                    uint16_t (&chunk)[8]) {
  const int elems = ix::chunk_elems(k, p.k_total, src_row >= 0);
  std::fill(chunk, chunk + 8, uint16_t(0));
  if (elems == 0) return;
  const std::vector<uint16_t>& buf = a_operand ? *p.a : *p.w;
  const int64_t src =
      a_operand ? src_row * p.a_stride + k : int64_t(expert) * p.w_expert_stride + src_row * p.k_total + k;
  if (aligned) CHECK(src % 8 == 0);
  for (int e = 0; e < elems; ++e) {
    CHECK(k + e < p.k_total && src + e < int64_t(buf.size()));
    if (a_operand && p.a_written != nullptr) CHECK((*p.a_written)[size_t(src + e)]);
    chunk[e] = buf[size_t(src + e)];
  }
}

// The epilogues' effects, as the kernels' store_act_pair / CombineRow (moe/fused_moe_cuda_gemm.cuh)
// make them, with each element's write counted: act of grouped row r, column col (< I) from its
// gate and up sums; GEMM 2's rank sum for the token of `pair`, column n (< H), from y.
void epilogue_act(const GemmSim& p, int64_t r, int64_t col, float g, float u) {
  const size_t at = size_t(r * p.act_stride + col);
  CHECK(col < p.act_stride && at < p.act->size());
  (*p.act)[at] = from_f(ix::act_value(p.activation, g, u));
  ++(*p.act_count)[at];
}
void epilogue_combine(const GemmSim& p, int32_t pair, int64_t n, float y) {
  const size_t at = size_t(pair / p.top_k * p.n_total + n);
  const float prev = p.first ? 0.f : (*p.acc32)[at];
  const float s = ix::combine_value(p.first, prev, (*p.weights)[size_t(pair)], y);
  if (p.last) {
    (*p.out)[at] = from_f(s);
  } else {
    (*p.acc32)[at] = s;
  }
  ++(*p.out_count)[at];
}

void sim_gemm(const GemmSim& p) {
  Smem smem;
  static float acc[ix::kWarps][ix::kMI][ix::kNI][32][4];
  walk_ctas(p.m_blocks, p.n_blocks, ix::tile_of, [&](const ix::TileCoord& tile) {
    const auto [row0, expert] = sim_tile_start(p, tile.mb, ix::kBM);
    if (expert < 0) return;
    const int64_t n0 = tile.nb * (p.gate_up ? ix::kGateCols : ix::kBN);
    smem.reset(ix::kSmemBytes);

    // source rows per thread, as the kernel precomputes them (-1: zero row)
    std::vector<int64_t> a_row(size_t(ix::kThreads * ix::kAChunksPerThread)), b_row(size_t(ix::kThreads * ix::kBChunksPerThread));
    for (int tid = 0; tid < ix::kThreads; ++tid) {
      const int crow = ix::chunk_row(tid);
      for (int i = 0; i < ix::kAChunksPerThread; ++i)
        a_row[size_t(tid * ix::kAChunksPerThread + i)] = sim_a_row(p, row0 + crow + i * ix::kRowsPerPass);
      for (int i = 0; i < ix::kBChunksPerThread; ++i) {
        const int b = crow + i * ix::kRowsPerPass;
        const int64_t wr = p.gate_up ? ix::gemm1_weight_row(b, n0, p.n_total) : (n0 + b < p.n_total ? n0 + b : -1);
        // independent: gate rows j, up rows I + j of the tile's 64 columns
        if (p.gate_up) {
          const int64_t j = n0 + b % ix::kGateCols;
          CHECK(wr == (j < p.n_total ? (b < ix::kGateCols ? j : p.n_total + j) : -1));
        }
        b_row[size_t(tid * ix::kBChunksPerThread + i)] = wr;
      }
    }
    const auto load_stage = [&](int stage, int iter) {
      const size_t sa = size_t(stage) * ix::kStageBytes, sb = sa + ix::kABytes;
      for (int tid = 0; tid < ix::kThreads; ++tid) {
        const int crow = ix::chunk_row(tid), ccol = ix::chunk_col(tid);
        const int64_t k = int64_t(iter) * ix::kBK + ccol * ix::kChunkElems;
        for (int operand = 0; operand < 2; ++operand) {
          const int per = operand == 0 ? ix::kAChunksPerThread : ix::kBChunksPerThread;
          for (int i = 0; i < per; ++i) {
            const int row = crow + i * ix::kRowsPerPass;
            CHECK(row < (operand == 0 ? ix::kBM : ix::kBN));
            const int64_t src_row = operand == 0 ? a_row[size_t(tid * per + i)] : b_row[size_t(tid * per + i)];
            uint16_t chunk[8];
            sim_read_chunk(p, operand == 0, src_row, k, expert, p.vector, chunk);
            const int dst = ix::smem_offset(row, ccol);
            CHECK(dst % 16 == 0 && dst + 16 <= (operand == 0 ? ix::kABytes : ix::kBBytes));
            smem.write((operand == 0 ? sa : sb) + size_t(dst), reinterpret_cast<const uint8_t*>(chunk), 16, p.vector);
          }
        }
      }
    };
    zero_all(acc);
    const auto compute_stage = [&](int stage) {
      const size_t sa = size_t(stage) * ix::kStageBytes, sb = sa + ix::kABytes;
      for (int warp = 0; warp < ix::kWarps; ++warp) {
        const int wm = ix::warp_m_of(warp), wn = ix::warp_n_of(warp);
        for (int ks = 0; ks < ix::kKSteps; ++ks) {
          static uint32_t af[ix::kMI][32][4], bf[ix::kNI][32][2];
          for (int i = 0; i < ix::kMI; ++i) {
            int address[32];
            for (int lane = 0; lane < 32; ++lane) {
              // independent: matrix j = rows 8 (j % 2), k chunk 2 ks + j / 2 of the m16 x k16 tile
              const int j = lane / 8;
              CHECK(ix::a_ldsm_row(wm, i, lane) == wm * ix::kWM + 16 * i + 8 * (j % 2) + lane % 8);
              CHECK(ix::a_ldsm_chunk(ks, lane) == 2 * ks + j / 2);
              address[lane] = int(sa) + ix::smem_offset(ix::a_ldsm_row(wm, i, lane), ix::a_ldsm_chunk(ks, lane));
            }
            ldmatrix_x4(smem, address, af[i]);
          }
          for (int j = 0; j < ix::kNI / 2; ++j) {
            int address[32];
            for (int lane = 0; lane < 32; ++lane) {
              // independent: matrices (tile 2j, chunk 2ks), (2j, 2ks+1), (2j+1, 2ks), (2j+1, 2ks+1)
              const int m = lane / 8;
              CHECK(ix::b_ldsm_row(p.gate_up, wn, j, lane) == ix::b_tile_row(p.gate_up, wn, 2 * j + m / 2) + lane % 8);
              CHECK(ix::b_ldsm_chunk(ks, lane) == 2 * ks + m % 2);
              address[lane] = int(sb) + ix::smem_offset(ix::b_ldsm_row(p.gate_up, wn, j, lane), ix::b_ldsm_chunk(ks, lane));
            }
            mma_spec::ldmatrix_x4_b_pair(smem, address, bf[2 * j], bf[2 * j + 1]);
          }
          for (int i = 0; i < ix::kMI; ++i)
            for (int j = 0; j < ix::kNI; ++j) mma(acc[warp][i][j], af[i], bf[j]);
        }
      }
    };
    run_pipeline(smem, ix::kStages, int(p.k_iters), load_stage, compute_stage);

    // epilogue
    for (int warp = 0; warp < ix::kWarps; ++warp) {
      const int wm = ix::warp_m_of(warp), wn = ix::warp_n_of(warp);
      for (int lane = 0; lane < 32; ++lane)
        for (int i = 0; i < ix::kMI; ++i)
          for (int half = 0; half < 2; ++half) {
            const int trow = ix::acc_row(wm, i, lane, 2 * half);
            CHECK(trow == wm * ix::kWM + 16 * i + spec::c_row(lane, 2 * half));
            const int64_t r = row0 + trow;
            const int32_t pair = p.plan->sorted[size_t(r)];
            if (pair < 0) continue;
            if (p.gate_up) {
              for (int j = 0; j < ix::kNI / 2; ++j)
                for (int e = 0; e < 2; ++e) {
                  const int64_t col = ix::gate_col(n0, wn, j, lane, e);
                  // independent: gate tile j and up tile j + 4 hold the same column
                  CHECK(col == n0 + wn * 32 + 8 * j + spec::c_col(lane, 2 * half + e));
                  CHECK(ix::b_tile_row(true, wn, j + ix::kNI / 2) == ix::b_tile_row(true, wn, j) + ix::kGateCols);
                  CHECK(col == ix::gate_col(n0, wn, j, lane, 0) + e);
                  if (col >= p.n_total) continue;
                  epilogue_act(p, r, col, acc[warp][i][j][lane][2 * half + e],
                               acc[warp][i][j + ix::kNI / 2][lane][2 * half + e]);
                }
            } else {
              for (int j = 0; j < ix::kNI; ++j)
                for (int e = 0; e < 2; ++e) {
                  const int64_t n = ix::out_col(n0, wn, j, lane, e);
                  CHECK(n == n0 + wn * ix::kWN + 8 * j + spec::c_col(lane, 2 * half + e));
                  if (n < p.n_total) epilogue_combine(p, pair, n, acc[warp][i][j][lane][2 * half + e]);
                }
            }
          }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// (e) the Hopper grouped GEMM kernel (moe/fused_moe_wgmma.cu, sm_90a)
// ---------------------------------------------------------------------------------------------
// grouped_wgmma_kernel on every CTA of the grid: the chunk sources (gathered A rows, the tile's
// gate / up or W2 rows, checked against an independent map), every cp.async into the swizzled
// stages (bounds, alignment, zero fill), the ring's order (shared-memory model, slot reuse only
// after the reading batch completed), each wgmma's operands read back through the kernel's
// descriptors with the PTX swizzle model (mma_spec::wgmma_sw128_address), and the epilogue's
// register walk against the PTX accumulator layout, with the gate / up pairing.
void sim_wgmma_gemm(const GemmSim& p) {
  using Tile = wx::Tile;
  CHECK(p.vector);
  // The dynamic shared memory's address as the kernel sees it, then aligned up to an atom.
  const uint32_t raw = uint32_t(16 * rnd(0, 200));
  const uint32_t base = (raw + wx::kSwizzleAtomBytes - 1) & ~uint32_t(wx::kSwizzleAtomBytes - 1);
  CHECK(base - raw + uint32_t(Tile::kStages * Tile::kStageBytes) <= uint32_t(Tile::kSmemBytes));
  Smem smem;
  static float acc[wx::kBM][Tile::kBN];
  walk_ctas(p.m_blocks, p.n_blocks, ix::tile_of, [&](const ix::TileCoord& tile) {
    const auto [row0, expert] = sim_tile_start(p, tile.mb, wx::kBM);
    if (expert < 0) return;
    const int64_t n0 = tile.nb * (p.gate_up ? wx::kGateCols : Tile::kBN);
    smem.reset(size_t(Tile::kStages) * Tile::kStageBytes);

    const auto load_stage = [&](int iter) {
      const int stage = Tile::stage_of(iter);
      for (int tid = 0; tid < wx::kThreads; ++tid) {
        const int col = wx::chunk_col(tid);
        const int64_t k = int64_t(iter) * wx::kBKElems + col * ix::kChunkElems;
        for (int operand = 0; operand < 2; ++operand) {
          const int per = operand == 0 ? wx::kAChunksPerThread : Tile::kBChunksPerThread;
          for (int i = 0; i < per; ++i) {
            const int row = wx::chunk_row(tid, i);
            CHECK(row < (operand == 0 ? wx::kBM : Tile::kBN));
            int64_t src_row = -1;
            if (operand == 0) {
              src_row = sim_a_row(p, row0 + row);
            } else {
              src_row = wx::weight_row(p.gate_up, row, n0, p.n_total);
              // independent: gate rows j, up rows I + j of the tile's 128 columns; W2 rows n0 + row
              const int64_t j = n0 + (p.gate_up ? row % wx::kGateCols : row);
              CHECK(src_row == (j < p.n_total ? (p.gate_up && row >= wx::kGateCols ? p.n_total + j : j) : -1));
            }
            uint16_t chunk[8];
            sim_read_chunk(p, operand == 0, src_row, k, expert, true, chunk);
            const int dst = (operand == 0 ? Tile::a_tile_offset(stage) : Tile::b_tile_offset(stage)) +
                            wx::swizzled_offset(row, col);
            const int end = operand == 0 ? Tile::b_tile_offset(stage) : (stage + 1) * Tile::kStageBytes;
            CHECK(dst % 16 == 0 && dst + 16 <= end);
            smem.write(size_t(dst), reinterpret_cast<const uint8_t*>(chunk), 16, true);
          }
        }
      }
    };
    zero_all(acc);
    const auto batch = [&](int iter, int stage) {
      for (int g = 0; g < wx::kWarpgroups; ++g) {
        const uint64_t desc_a = wx::make_smem_desc(base + uint32_t(Tile::a_warpgroup_offset(stage, g)));
        const uint64_t desc_b = wx::make_smem_desc(base + uint32_t(Tile::b_tile_offset(stage)));
        for (int ks = 0; ks < wx::kKSteps; ++ks) {
          // m64n256k16: 64 A rows and 256 B rows of 16 values (32 bytes) each
          static float A[64][16], B[Tile::kBN][16];
          const uint64_t da = wx::desc_at_k_step(desc_a, ks), db = wx::desc_at_k_step(desc_b, ks);
          const auto read = [&](uint64_t desc, int r, int v) {
            uint16_t bits = 0;
            for (int b = 0; b < 2; ++b) {
              uint8_t byte;
              CHECK(smem.read(mma_spec::wgmma_sw128_address(desc, r, 2 * v + b) - base, &byte, 1));
              bits = uint16_t(bits | (uint16_t(byte) << (8 * b)));
            }
            return to_f(bits);
          };
          for (int r = 0; r < 64; ++r)
            for (int v = 0; v < 16; ++v) A[r][v] = read(da, r, v);
          for (int r = 0; r < Tile::kBN; ++r)
            for (int v = 0; v < 16; ++v) B[r][v] = read(db, r, v);
          for (int r = 0; r < 64; ++r)
            for (int n = 0; n < Tile::kBN; ++n) {
              double sum = 0;  // small integers: exact, as is acc
              for (int v = 0; v < 16; ++v) sum += double(A[r][v]) * B[n][v];
              acc[64 * g + r][n] += float(sum);
            }
          // the operands are the stage's rows at K values iter * 64 + 16 ks ..
          const int64_t kv = int64_t(iter) * wx::kBKElems + 16 * ks;
          for (int v = 0; v < 16; ++v) {
            const int r = int(rnd(0, 63));
            const int64_t a_row = sim_a_row(p, row0 + 64 * g + r);
            const bool inside = a_row >= 0 && kv + v < p.k_total;
            const float want = inside ? to_f((*p.a)[size_t(a_row * p.a_stride + kv + v)]) : 0.f;
            CHECK(A[r][v] == want);
          }
        }
      }
    };
    run_wgmma_ring<Tile>(smem, int(p.k_iters), load_stage, batch);

    // epilogue, register by register as the kernel walks them
    for (int warp = 0; warp < wx::kThreads / 32; ++warp) {
      const int g = warp / 4, w = warp % 4;
      for (int lane = 0; lane < 32; ++lane)
        for (int h = 0; h < 2; ++h) {
          const int trow = wx::acc_row(g, w, lane, 2 * h);
          CHECK(trow == 64 * g + mma_spec::Wgmma64::d_row(w, lane, 2 * h));
          const int64_t r = row0 + trow;
          const int32_t pair = p.plan->sorted[size_t(r)];
          if (pair < 0) continue;
          if (p.gate_up) {
            for (int j = 0; j < wx::kGateCols / 8; ++j)
              for (int e = 0; e < 2; ++e) {
                const int i = 4 * j + 2 * h + e;
                const int64_t col = wx::gate_col(n0, lane, 4 * j + 2 * h) + e;
                const int c = mma_spec::Wgmma64::d_col(lane, i);
                // independent: register i holds gate column c, register i + 64 the up row of it
                CHECK(col == n0 + c && mma_spec::Wgmma64::d_col(lane, i + wx::kUpRegOffset) == c + wx::kGateCols);
                CHECK(mma_spec::Wgmma64::d_row(w, lane, i) == trow - 64 * g);
                if (col < p.n_total) epilogue_act(p, r, col, acc[trow][c], acc[trow][c + wx::kGateCols]);
              }
          } else {
            for (int j = 0; j < Tile::kBN / 8; ++j)
              for (int e = 0; e < 2; ++e) {
                const int i = 4 * j + 2 * h + e;
                const int c = mma_spec::Wgmma64::d_col(lane, i);
                const int64_t n = n0 + wx::acc_col(lane, i);
                CHECK(n == n0 + c && mma_spec::Wgmma64::d_row(w, lane, i) == trow - 64 * g);
                if (n < p.n_total) epilogue_combine(p, pair, n, acc[trow][c]);
              }
          }
        }
    }
  });
}

// The kernels' params of a problem: its sizes (what make_layout reads).
moe::FusedMoeParams problem_params(const Problem& p) {
  moe::FusedMoeParams fp{};
  fp.tokens = p.r.T;
  fp.hidden_size = p.H;
  fp.intermediate_size = p.I;
  fp.experts = p.r.E;
  fp.top_k = p.r.k;
  return fp;
}

// The GEMM path on the mma.sync kernels or (wgmma) on the Hopper ones with their 128-row plan
// padding; the same checks of act and out either way.
void run_gemm_path(const Problem& p, int num_sms, bool wgmma) {
  const int64_t T = p.r.T, H = p.H, I = p.I;
  const int k = p.r.k;
  const int32_t E = p.r.E;
  const int64_t pairs = T * k;
  const moe::FusedMoeParams fp = problem_params(p);
  const bool decode = ix::use_decode(pairs);
  const int64_t block = wgmma ? wx::kBM : ix::kBM;
  const ix::Layout l = ix::make_layout(fp, num_sms, block, 2);
  // plans (plan 2 sized here when the layout is the decode one: the GEMM path forced on small
  // problems for coverage)
  DevPlan plan1, plan2;
  sim_plan(p.r.ids, pairs, k, E, false, block, l.chunks1, l.rows1, plan1);
  const int64_t rows2 = moe::max_grouped_rows(pairs, int64_t(k) * E, block);
  if (!decode) CHECK(rows2 == l.rows2 && l.keys2 == int64_t(k) * E);
  sim_plan(p.r.ids, pairs, k, E, true, block, ix::plan_chunks(pairs, int64_t(k) * E, num_sms), rows2, plan2);
  check_plan_against_host(plan1, p.r.ids, pairs, E, block, true, E);

  const int64_t act_stride = ix::act_stride(I);
  std::vector<uint16_t> act(size_t(l.rows1 * act_stride), kPoison);
  std::vector<int> act_count(act.size(), 0);
  const bool vector1 = p.aligned_rows && H % 8 == 0, vector2 = p.aligned_rows && I % 8 == 0;
  CHECK(ix::rows_vectorizable(p.aligned_rows ? 0 : 2, H) == vector1);

  GemmSim g1{};
  g1.gate_up = true;
  g1.a = &p.hidden;
  g1.a_stride = H;
  g1.w = &p.w13;
  g1.w_expert_stride = 2 * I * H;
  g1.k_total = H;
  g1.n_total = I;
  g1.plan = &plan1;
  g1.first_key = 0;
  g1.keys = E;
  g1.experts = E;
  g1.top_k = k;
  g1.m_blocks = l.rows1 / block;
  g1.n_blocks = wgmma ? wx::gemm1_n_blocks(I) : ix::gemm1_n_blocks(I);
  g1.k_iters = wgmma ? wx::k_iters(H) : ix::ceil_div(H, ix::kBK);
  g1.vector = vector1;
  g1.act = &act;
  g1.act_count = &act_count;
  g1.act_stride = act_stride;
  g1.activation = p.act;
  CHECK(l.rows1 % block == 0);
  const auto gemm = wgmma ? sim_wgmma_gemm : sim_gemm;
  gemm(g1);
  // act: every element of a real pair's row written once, bit for bit round(act(g, u))
  std::vector<uint8_t> act_written(act.size(), 0);
  for (int64_t r = 0; r < l.rows1; ++r)
    for (int64_t j = 0; j < act_stride; ++j) {
      const size_t at = size_t(r * act_stride + j);
      const bool real = r < plan1.offsets[size_t(E)] && plan1.sorted[size_t(r)] >= 0 && j < I;
      CHECK(act_count[at] == (real ? 1 : 0));
      act_written[at] = real;
      if (!real) continue;
      double g, u;
      ref_gate_up(p, plan1.sorted[size_t(r)], j, g, u);
      CHECK(float(g) == g && float(u) == u);
      const uint16_t want = from_f(ix::act_value(p.act, float(g), float(u)));
      if (act[at] != want) {
        fprintf(stderr, "act row %lld col %lld: 0x%x want 0x%x (g %g u %g)\n", (long long)r, (long long)j, act[at], want, g, u);
        abort();
      }
    }

  std::vector<uint16_t> out(size_t(T * H), kPoison);
  std::vector<float> acc32(size_t(T * H), NAN);
  GemmSim g2{};
  g2.gate_up = false;
  g2.a = &act;
  g2.a_stride = act_stride;
  g2.a_written = &act_written;
  g2.w = &p.w2;
  g2.w_expert_stride = H * I;
  g2.k_total = I;
  g2.n_total = H;
  g2.plan = &plan2;
  g2.keys = E;
  g2.experts = E;
  g2.row_of_pair = &plan1.row_of_pair;
  g2.top_k = k;
  g2.m_blocks = moe::max_grouped_rows(T, E, block) / block;
  g2.n_blocks = wgmma ? wx::gemm2_n_blocks(H) : ix::gemm2_n_blocks(H);
  g2.k_iters = wgmma ? wx::k_iters(I) : ix::ceil_div(I, ix::kBK);
  g2.vector = vector2;
  g2.weights = &p.r.weights;
  g2.acc32 = &acc32;
  g2.out = &out;
  for (int rank = 0; rank < k; ++rank) {
    std::vector<int> count(out.size(), 0);
    g2.out_count = &count;
    g2.first_key = rank * E;
    g2.first = rank == 0;
    g2.last = rank == k - 1;
    gemm(g2);
    for (int c : count) CHECK(c == 1);  // each (t, n) once per rank
  }
  check_out(p, out, [&](int64_t pair, int64_t i) { return double(to_f(act[size_t(plan1.row_of_pair[size_t(pair)] * act_stride + i)])); },
            wgmma ? "wgmma gemm path" : "gemm path");
}

// ---------------------------------------------------------------------------------------------
// (c) decode kernels
// ---------------------------------------------------------------------------------------------
// The decode kernels' walk over lane's chunks of a row of row_elems: decode_unrolled_iters
// iterations (kDecodeUnroll at a time in the kernels, every chunk there whole), then the rest
// until one is past the end.
template <class Fn>
void decode_walk(int lane, int64_t row_elems, Fn&& fn) {
  const int64_t chunks = ix::ceil_div(row_elems, ix::kChunkElems);
  const int64_t unrolled = ix::decode_unrolled_iters(row_elems);
  CHECK(unrolled % ix::kDecodeUnroll == 0 && unrolled >= 0);
  for (int64_t i = 0; i < unrolled; ++i) {
    const int64_t c = ix::decode_chunk(lane, i);
    CHECK(ix::chunk_elems(c * ix::kChunkElems, row_elems, true) == ix::kChunkElems);
    fn(c);
  }
  for (int64_t i = unrolled;; ++i) {
    const int64_t c = ix::decode_chunk(lane, i);
    if (c >= chunks) break;
    fn(c);
  }
}

void run_decode_path(const Problem& p, int num_sms) {
  const int64_t T = p.r.T, H = p.H, I = p.I;
  const int k = p.r.k;
  const int32_t E = p.r.E;
  const int64_t pairs = T * k;
  CHECK(ix::use_decode(pairs));
  const moe::FusedMoeParams fp = problem_params(p);
  const ix::Layout l = ix::make_layout(fp, num_sms, ix::kBM, 2);
  DevPlan plan;
  sim_plan(p.r.ids, pairs, k, E, false, ix::kBM, l.chunks1, l.rows1, plan);
  const int64_t act_stride = ix::act_stride(I);
  CHECK(l.rows2 == 0 && l.acc32 == l.bytes);
  std::vector<uint16_t> act(size_t(pairs * act_stride), kPoison);
  std::vector<int> act_count(act.size(), 0);
  const bool vector1 = p.aligned_rows && H % 8 == 0, vector2 = p.aligned_rows && I % 8 == 0;
  const int64_t chunks_h = ix::ceil_div(H, ix::kChunkElems), chunks_i = ix::ceil_div(I, ix::kChunkElems);
  const auto load = [&](const std::vector<uint16_t>& buf, int64_t row_start, int64_t k0, int len, int64_t row_len,
                        bool vector, float (&v)[8]) {
    CHECK(len >= 1 && len <= 8 && k0 + len <= row_len);
    if (vector && len == 8) CHECK((row_start + k0) % 8 == 0);
    for (int e = 0; e < 8; ++e) {
      if (e < len) CHECK(row_start + k0 + e < int64_t(buf.size()));
      v[e] = e < len ? to_f(buf[size_t(row_start + k0 + e)]) : 0.f;
    }
  };
  // decode_gemm1: grid (ceil(I / 8), min(E, pairs))
  const int64_t grid1_x = ix::ceil_div(I, ix::kDecodeWarps), slots = ix::min64(E, pairs);
  CHECK(plan.active[size_t(E)] <= slots);
  for (int64_t by = 0; by < slots; ++by) {
    if (by >= plan.active[size_t(E)]) continue;
    const int32_t e = plan.active[size_t(by)];
    for (int64_t bx = 0; bx < grid1_x; ++bx)
      for (int warp = 0; warp < ix::kDecodeWarps; ++warp) {
        const int64_t j = bx * ix::kDecodeWarps + warp;
        if (j >= I) continue;
        const int64_t gate = (int64_t(e) * 2 * I + j) * H, up = gate + I * H;
        const int32_t begin = plan.offsets[size_t(e)], count = plan.counts[size_t(e)];
        for (int32_t b0 = 0; b0 < count; b0 += ix::kDecodeBatch) {
          int32_t pair[ix::kDecodeBatch];
          for (int q = 0; q < ix::kDecodeBatch; ++q) pair[q] = b0 + q < count ? plan.sorted[size_t(begin + b0 + q)] : -1;
          float g[ix::kDecodeBatch][32] = {}, u[ix::kDecodeBatch][32] = {};
          std::vector<int> seen(size_t(chunks_h), 0);
          for (int lane = 0; lane < 32; ++lane)
            decode_walk(lane, H, [&](int64_t c) {
              ++seen[size_t(c)];
              const int64_t k0 = c * ix::kChunkElems;
              const int len = ix::chunk_elems(k0, H, true);
              float wg[8], wu[8];
              load(p.w13, gate, k0, len, H, vector1, wg);
              load(p.w13, up, k0, len, H, vector1, wu);
              for (int q = 0; q < ix::kDecodeBatch; ++q) {
                if (pair[q] < 0) continue;
                float xv[8];
                load(p.hidden, int64_t(pair[q] / k) * H, k0, len, H, vector1, xv);
                for (int e2 = 0; e2 < 8; ++e2) {
                  g[q][lane] = std::fma(wg[e2], xv[e2], g[q][lane]);
                  u[q][lane] = std::fma(wu[e2], xv[e2], u[q][lane]);
                }
              }
            });
          for (int s : seen) CHECK(s == 1);
          for (int q = 0; q < ix::kDecodeBatch; ++q) {
            if (pair[q] < 0) continue;
            float gs = 0, us = 0;
            for (int lane = 0; lane < 32; ++lane) {
              gs += g[q][lane];
              us += u[q][lane];
            }
            const size_t at = size_t(int64_t(pair[q]) * act_stride + j);
            act[at] = from_f(ix::act_value(p.act, gs, us));  // integer sums: exact in any order
            ++act_count[at];
          }
        }
      }
  }
  for (int64_t pair = 0; pair < pairs; ++pair)
    for (int64_t j = 0; j < act_stride; ++j) {
      const size_t at = size_t(pair * act_stride + j);
      CHECK(act_count[at] == (j < I ? 1 : 0));
      if (j >= I) continue;
      double g, u;
      ref_gate_up(p, pair, j, g, u);
      CHECK(act[at] == from_f(ix::act_value(p.act, float(g), float(u))));
    }
  // decode_gemm2: grid (ceil(H / 8), T)
  std::vector<uint16_t> out(size_t(T * H), kPoison);
  std::vector<int> out_count(out.size(), 0);
  for (int64_t t = 0; t < T; ++t)
    for (int64_t bx = 0; bx < ix::ceil_div(H, ix::kDecodeWarps); ++bx)
      for (int warp = 0; warp < ix::kDecodeWarps; ++warp) {
        const int64_t n = bx * ix::kDecodeWarps + warp;
        if (n >= H) continue;
        const int32_t* ids_row = p.r.ids.data() + t * k;
        float s = 0.f;
        for (int rank = 0; rank < k; ++rank) {
          const int j = ix::slot_of_rank(ids_row, k, rank);
          CHECK(j < k);
          const int64_t pair = t * k + j;
          float y[32] = {};
          std::vector<int> seen(size_t(chunks_i), 0);
          for (int lane = 0; lane < 32; ++lane)
            decode_walk(lane, I, [&](int64_t c) {
              ++seen[size_t(c)];
              const int64_t k0 = c * ix::kChunkElems;
              const int len = ix::chunk_elems(k0, I, true);
              float wv[8], av[8];
              load(p.w2, (int64_t(ids_row[j]) * H + n) * I, k0, len, I, vector2, wv);
              load(act, pair * act_stride, k0, len, I, true, av);
              for (int e2 = 0; e2 < 8; ++e2) y[lane] = std::fma(wv[e2], av[e2], y[lane]);
            });
          for (int s : seen) CHECK(s == 1);
          for (int o = 16; o > 0; o /= 2) {  // xor butterfly
            float next[32];
            for (int lane = 0; lane < 32; ++lane) next[lane] = y[lane] + y[lane ^ o];
            std::copy(next, next + 32, y);
          }
          for (int lane = 1; lane < 32; ++lane) CHECK(float_as_bits(y[lane]) == float_as_bits(y[0]));
          s = ix::combine_value(rank == 0, s, p.r.weights[size_t(pair)], y[0]);
        }
        out[size_t(t * H + n)] = from_f(s);
        ++out_count[size_t(t * H + n)];
      }
  for (int c : out_count) CHECK(c == 1);
  check_out(p, out, [&](int64_t pair, int64_t i) { return double(to_f(act[size_t(pair * act_stride + i)])); }, "decode");
}

// The Hopper path: 16-byte rows, sizes past one 128-column gate tile, one 256-column W2 tile and
// one 64-value K stage.
void check_wgmma_case() {
  g_bf16 = rnd(0, 1) != 0;
  const int32_t E = rnd(0, 2) == 0 ? 1 : int32_t(rnd(2, 12));
  const int k = int(rnd(1, std::min<int64_t>(4, E)));
  const int64_t T = ix::kDecodeMaxPairs / k + rnd(1, 40);
  const int64_t H = 8 * rnd(1, 70), I = 8 * rnd(1, 40);
  Problem p = random_problem(T, k, E, H, I);
  p.aligned_rows = true;
  CHECK(wx::usable(T * k, true) && !wx::usable(T * k, false) && !wx::usable(ix::kDecodeMaxPairs, true));
  run_gemm_path(p, int(rnd(1, 132)), true);
}

void check_fused_case(bool decode) {
  static const int32_t kEs[] = {1, 7, 60};
  g_bf16 = rnd(0, 1) != 0;
  const int32_t E = rnd(0, 3) < 3 ? kEs[rnd(0, 2)] : int32_t(rnd(1, 20));
  const int k = int(rnd(1, std::min<int64_t>(8, E)));
  const int64_t max_t = decode ? ix::kDecodeMaxPairs / k : 40;
  int64_t T = rnd(0, 3) == 0 ? 1 : rnd(1, std::max<int64_t>(1, max_t));
  if (!decode && rnd(0, 2) == 0) T = ix::kDecodeMaxPairs / k + rnd(1, 6);  // the real GEMM path
  int64_t H = rnd(0, 1) ? 8 * rnd(1, 12) : rnd(1, 100), I = rnd(0, 1) ? 8 * rnd(1, 12) : rnd(1, 90);
  if (decode && rnd(0, 3) == 0) {  // past 32 x kDecodeUnroll chunks: the unrolled walk
    (rnd(0, 1) ? H : I) = rnd(0, 1) ? 8 * rnd(128, 170) : rnd(1020, 1400);
  }
  const Problem p = random_problem(T, k, E, H, I);
  const int num_sms = int(rnd(1, 132));
  if (decode) {
    run_decode_path(p, num_sms);
  } else {
    run_gemm_path(p, num_sms, false);
  }
}

// ---------------------------------------------------------------------------------------------
// (d) static facts
// ---------------------------------------------------------------------------------------------
void check_layout_case() {
  moe::FusedMoeParams fp{};
  fp.tokens = rnd(0, 3) == 0 ? rnd(1, 70) : rnd(1, 100000);
  fp.experts = int32_t(rnd(1, 300));
  fp.top_k = int32_t(rnd(1, std::min<int64_t>(8, fp.experts)));
  fp.hidden_size = rnd(1, 8192);
  fp.intermediate_size = rnd(1, 4096);
  const int num_sms = int(rnd(1, 200));
  const ix::Layout l = ix::make_layout(fp, num_sms, ix::kBM, 2);
  const int64_t pairs = fp.tokens * fp.top_k;
  const bool decode = ix::use_decode(pairs);
  struct R {
    int64_t at, bytes;
  };
  const int64_t E = fp.experts, K2 = l.keys2;
  const R regions[] = {{l.cells1, 4 * l.chunks1 * E},
                       {l.counts1, 4 * E},
                       {l.offsets1, 4 * (E + 1)},
                       {l.active1, 4 * (E + 1)},
                       {l.sorted1, 4 * l.rows1},
                       {l.row_of_pair, 4 * pairs},
                       {l.cells2, 4 * l.chunks2 * K2},
                       {l.counts2, 4 * K2},
                       {l.offsets2, decode ? 0 : 4 * (K2 + 1)},
                       {l.sorted2, 4 * l.rows2},
                       {l.act, 2 * (decode ? pairs : l.rows1) * ix::act_stride(fp.intermediate_size)},
                       {l.acc32, (!decode && fp.top_k > 1) ? 4 * fp.tokens * fp.hidden_size : 0}};
  int64_t end = 0;
  for (const R& r : regions) {
    CHECK(r.at % ix::kRegionAlign == 0 && r.at >= end && r.at + r.bytes <= l.bytes);
    end = r.at + r.bytes;
  }
  CHECK(l.chunks1 >= 1 && l.chunks1 * E <= std::max<int64_t>(ix::kPlanMaxCells, E));
  if (!decode) {
    CHECK(K2 == fp.top_k * E && l.chunks2 >= 1);
    CHECK(moe::max_grouped_rows(fp.tokens, E, ix::kBM) * fp.top_k <= l.rows2 + fp.top_k * ix::kBM);
  }
}

void check_static() {
  static_assert(ix::kThreads == 128 && ix::kSmemBytes == 48 * 1024, "tile config");
  static_assert(ix::kMinCtas * ix::kSmemBytes <= 227 * 1024, "smem per SM");
  static_assert(ix::kAChunksPerThread * ix::kThreads == ix::kBM * ix::kChunksPerRow, "A chunks");
  static_assert(ix::kBChunksPerThread * ix::kThreads == ix::kBN * ix::kChunksPerRow, "B chunks");
  static_assert(ix::kNI % 2 == 0 && ix::kWN / 2 * ix::kWarpsN == ix::kGateCols, "gate / up split");
  for (int row = 0; row < ix::kBN; ++row) {
    int seen = 0;
    for (int c = 0; c < ix::kChunksPerRow; ++c) {
      const int off = ix::smem_offset(row, c);
      CHECK(off / ix::kRowBytes == row);
      seen |= 1 << ((off % ix::kRowBytes) / 16);
    }
    CHECK(seen == 15);
  }
  check_tile_order(ix::tile_of, rnd);
  // b tiles: every B row of the tile belongs to exactly one (warp_n, n8 tile, row in tile)
  for (int gu = 0; gu < 2; ++gu) {
    std::vector<int> seen(ix::kBN, 0);
    for (int wn = 0; wn < ix::kWarpsN; ++wn)
      for (int ni = 0; ni < ix::kNI; ++ni)
        for (int r = 0; r < 8; ++r) ++seen[size_t(ix::b_tile_row(gu, wn, ni) + r)];
    for (int s : seen) CHECK(s == 1);
  }
  // activation and combine against double definitions
  for (int it = 0; it < 2000; ++it) {
    const float g = float(std::uniform_real_distribution<double>(-12, 12)(rng)), u = float(rnd(-5, 5)) / 2;
    const double silu = double(g) / (1 + std::exp(-double(g))) * u;
    const double gelu = 0.5 * g * std::erfc(-g / std::sqrt(2.0)) * u;  // 1 + erf, no cancellation
    CHECK(std::fabs(ix::act_value(Activation::kSilu, g, u) - silu) <= 1e-6 * (std::fabs(silu) + 1e-30) + 1e-37);
    // erfc's tail: the fp32 rounding of g / sqrt 2 moves erfc by 2 x^2 u relative
    const double gelu_rel = 1e-6 + double(g) * g * 1.2e-7;
    CHECK(std::fabs(ix::act_value(Activation::kGelu, g, u) - gelu) <= gelu_rel * (std::fabs(gelu) + 1e-30) + 1e-37);
  }
  CHECK(ix::act_value(Activation::kSilu, -200.f, 1.f) == 0.f && ix::act_value(Activation::kSilu, 200.f, 1.f) == 200.f);
  CHECK(ix::act_value(Activation::kGelu, -200.f, 1.f) == 0.f && ix::act_value(Activation::kGelu, 200.f, 1.f) == 200.f);
  CHECK(ix::combine_value(true, 123.f, 0.5f, 3.f) == 1.5f && ix::combine_value(false, 1.f, 0.5f, 3.f) == 2.5f);
  CHECK(ix::use_decode(ix::kDecodeMaxPairs) && !ix::use_decode(ix::kDecodeMaxPairs + 1));
  // The decode walk visits every chunk once, each lane's in increasing order.
  for (int64_t elems = 0; elems <= 9000; elems += rnd(1, 9)) {
    std::vector<int> seen(size_t(ix::ceil_div(elems, ix::kChunkElems)), 0);
    for (int lane = 0; lane < 32; ++lane) {
      int64_t last = -1;
      decode_walk(lane, elems, [&](int64_t c) {
        CHECK(c > last && c % 32 == lane);
        last = c;
        ++seen[size_t(c)];
      });
    }
    for (int s : seen) CHECK(s == 1);
  }
  const int64_t group = 32 * ix::kDecodeUnroll * ix::kChunkElems;  // elements of one unrolled step
  CHECK(ix::decode_unrolled_iters(group - 1) == 0 && ix::decode_unrolled_iters(group) == ix::kDecodeUnroll);
}

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 100;
  const uint64_t seed = argc > 2 ? strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  check_static();
  for (int c = 0; c < cases; ++c) check_layout_case();
  printf("layout ok\n");
  for (int c = 0; c < cases; ++c) check_plan_case();
  printf("plan ok\n");
  for (int c = 0; c < std::max(1, cases / 2); ++c) check_fused_case(true);
  printf("decode ok\n");
  for (int c = 0; c < std::max(1, cases / 2); ++c) check_fused_case(false);
  printf("grouped gemm ok\n");
  for (int c = 0; c < std::max(1, cases / 8); ++c) check_wgmma_case();
  printf("hopper grouped gemm ok\n");
  printf("all ok\n");
  return 0;
}
