// CPU simulation of MoBA's key-block-major forward (csrc/attention/moba_gather_cuda.cu) with the
// host+device functions it uses (csrc/attention/moba_gather_index.h and the segment / mask /
// softmax functions of block_sparse_attention_cuda_index.h).
//
// On random problems (odd Sq / Sk, Sq != Sk, causal or not, block_kv 16..128, top_k 1..40 with
// unused, out-of-range and repeated slots, up to ~190 key blocks, several lanes in one workspace):
//  (a) the plan: pair_count_kernel with the atomics' arrival order shuffled, plan_kernel's chunked
//      scans (a CTA of 32..128 threads, so that several chunks carry), pair_fill_kernel: every pair lands
//      in exactly one run of its block (runs of <= 512 rows, walked in 64-row tiles), runs stay
//      within max_lane_runs, records past the total
//      are -1, the workspace regions do not overlap;
//  (b) each run's tiles as gather_attention_kernel walks them: the gathered positions, the one-block key
//      walk (load_kv_step's segments from a one-entry list), the live 16-key slices (a skipped
//      slice must hold no key visible to a real row), the steps a warp skips (none of their keys
//      visible to any row), the element mask and the online softmax
//      per row in the log2 domain, the partials (O / l rounded to 16 bits, lse);
//  (c) merge_kernel's combination in slot order, against token-level MoBA attention in double
//      (a token's choices as a set)
//      (out within the 16-bit rounding of the partials, lse within fp32 bounds; a token without a
//      valid slot: out 0, lse -inf);
//  (d) the backward's decomposition: dQ partials per run row summed over a token's slots, dK / dV
//      per key block over the group walk's tiles, against the gradients in double; the group walk
//      over several lanes visits every pair of the block once.
// Usage: moba_gather_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "attention/moba_gather_index.h"
#include "sim_common.h"

namespace ix = ::torch_ext::attention::bsa_cuda;
namespace mg = ::torch_ext::attention::moba_gather;

namespace {

std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }
double rndu(double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); }

// bf16-like rounding of the partials (8 significant bits: the coarser of the two 16-bit types).
float round16(float x) {
  if (!std::isfinite(x) || x == 0.0f) return x;
  int e;
  const double m = std::frexp(double(x), &e);
  return float(std::ldexp(std::nearbyint(m * 256.0) / 256.0, e));
}

struct Problem {
  int lanes, seq_q, seq_kv, block_kv, top_k, head_dim;
  bool causal;
  float scale;
  int64_t nk;
};

// plan_kernel on one lane with a CTA of `threads` threads: chunked inclusive scans with carries.
void plan_lane(const Problem& P, const int32_t* counts, int32_t* offsets, mg::RunRecord* runs, int64_t lane_runs,
               int threads) {
  uint32_t pair_base = 0, tile_base = 0;
  for (int64_t j0 = 0; j0 < P.nk; j0 += threads) {
    std::vector<uint32_t> c(static_cast<size_t>(threads)), t(static_cast<size_t>(threads));
    for (int i = 0; i < threads; ++i) {
      const int64_t j = j0 + i;
      c[size_t(i)] = j < P.nk ? uint32_t(counts[j]) : 0u;
      t[size_t(i)] = uint32_t(mg::block_runs(int32_t(c[size_t(i)])));
    }
    std::vector<uint32_t> ci(c), ti(t);
    std::partial_sum(ci.begin(), ci.end(), ci.begin());
    std::partial_sum(ti.begin(), ti.end(), ti.begin());
    for (int i = 0; i < threads; ++i) {
      const int64_t j = j0 + i;
      if (j >= P.nk) continue;
      const int32_t offset = int32_t(pair_base + ci[size_t(i)] - c[size_t(i)]);
      offsets[j] = offset;
      const uint32_t first_tile = tile_base + ti[size_t(i)] - t[size_t(i)];
      for (int32_t q = 0; q < int32_t(t[size_t(i)]); ++q) {
        CHECK(int64_t(first_tile) + q < lane_runs);
        runs[first_tile + q] = mg::run_record(int32_t(j), offset, int32_t(c[size_t(i)]), q);
      }
    }
    pair_base += ci.back();
    tile_base += ti.back();
  }
  CHECK(int64_t(tile_base) <= lane_runs);
  for (int64_t t = tile_base; t < lane_runs; ++t) runs[t] = mg::RunRecord{-1, 0, 0, 0};
}

// The keys a tile's step t covers, as load_kv_step computes them from the one-entry list {block}.
ix::StepSegments step_segments(const Problem& P, int block, int t) {
  ix::StepSegments g{};
  const int nseg = ix::segments_per_tile(P.block_kv);
  for (int s = 0; s < ix::kMaxSegments; ++s) {
    if (s >= nseg) {
      g.base[s] = -1;
      continue;
    }
    const ix::Segment sg = ix::tile_segment(t, s, P.block_kv);
    g.base[s] = int(ix::segment_base(sg.slot < 1 ? block : -1, sg.offset, P.block_kv, P.seq_kv));
  }
  return g;
}

// Key position of column col (< 64) of a step (valid where its segment is).
int step_key(const ix::StepSegments& g, int col, int block_kv) {
  return ix::segment_base_of(g, ix::row_segment(col, block_kv)) + ix::row_in_segment(col, block_kv);
}

void gather_case(int* stats) {
  Problem P;
  P.lanes = int(rnd(1, 3));
  P.seq_q = int(rnd(1, rnd(0, 4) == 0 ? 800 : 300));  // up to 800: blocks with several 512-row runs
  P.seq_kv = rnd(0, 3) == 0 ? P.seq_q : int(rnd(1, rnd(0, 3) == 0 ? 3000 : 300));
  P.block_kv = 16 << rnd(0, 3);
  P.top_k = int(rnd(1, 40));
  P.head_dim = 16;  // the math per row does not depend on D; small keeps the reference cheap
  P.causal = rnd(0, 1) == 1;
  P.scale = float(rndu(0.05, 0.5));
  P.nk = mg::ceil_div(P.seq_kv, P.block_kv);
  const int64_t pairs = int64_t(P.seq_q) * P.top_k;

  // Workspace layout: regions in order, disjoint, 256-aligned.
  const mg::Workspace w = mg::workspace_layout(P.lanes, P.seq_q, P.top_k, P.nk, 128);
  const int64_t starts[] = {w.counts, w.offsets, w.rank, w.entries, w.runs, w.part_o, w.part_lse, w.bytes};
  for (int i = 0; i + 1 < 8; ++i) CHECK(starts[i] % 256 == 0 && starts[i] <= starts[i + 1]);
  CHECK(w.offsets - w.counts >= P.lanes * P.nk * 4 && w.part_o - w.runs >= P.lanes * w.lane_runs * 16);
  CHECK(w.part_lse - w.part_o >= P.lanes * pairs * 128 * 2 && w.bytes - w.part_lse >= P.lanes * pairs * 4);

  // Token choices as moba_select would give them (causal: the own block always, later never), then
  // some slots unused (-1) or out of range (ignored by every kernel).
  std::vector<int32_t> choices(size_t(P.lanes * pairs), -1);
  for (int l = 0; l < P.lanes; ++l)
    for (int i = 0; i < P.seq_q; ++i) {
      const int64_t horizon = int64_t(i) + P.seq_kv - P.seq_q;  // last visible key (causal)
      if (P.causal && horizon < 0) continue;                    // sees nothing: all slots -1
      const int64_t last = P.causal ? horizon / P.block_kv : P.nk - 1;
      std::vector<int32_t> ids(size_t(last + 1));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      if (P.causal) std::swap(*std::find(ids.begin(), ids.end(), int32_t(last)), ids[0]);
      const int n = int(std::min<int64_t>(P.top_k, last + 1));
      std::sort(ids.begin(), ids.begin() + n);
      for (int s = 0; s < n; ++s) choices[size_t(l * pairs + int64_t(i) * P.top_k + s)] = ids[size_t(s)];
      int32_t* const row = &choices[size_t(l * pairs + int64_t(i) * P.top_k)];
      if (rnd(0, 7) == 0) row[rnd(0, P.top_k - 1)] = int32_t(P.nk + rnd(0, 3));  // ignored
      if (rnd(0, 7) == 0 && P.top_k > 1) row[rnd(1, P.top_k - 1)] = row[0];       // a repeat: one pair
    }

  // Q, K, V per lane in double.
  const int D = P.head_dim;
  std::vector<double> q(size_t(P.lanes) * P.seq_q * D), k(size_t(P.lanes) * P.seq_kv * D), v(k.size());
  for (auto* t : {&q, &k, &v})
    for (double& x : *t) x = rndu(-1.0, 1.0);

  // (a) the plan, lane by lane; the atomics' arrival order shuffled.
  std::vector<int32_t> counts(size_t(P.lanes * P.nk), 0), offsets(counts.size()), rank(size_t(P.lanes * pairs), -7);
  std::vector<int32_t> entries(size_t(P.lanes * pairs), -7);
  std::vector<mg::RunRecord> runs(size_t(P.lanes * w.lane_runs), mg::RunRecord{-9, 0, 0, 0});
  for (int l = 0; l < P.lanes; ++l) {
    std::vector<int64_t> order(static_cast<size_t>(pairs));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), rng);
    for (int64_t e : order) {
      const int32_t* const row = &choices[size_t(l * pairs + e - e % P.top_k)];
      const int slot = int(e % P.top_k);
      rank[size_t(l * pairs + e)] = mg::slot_is_pair(row, slot, P.nk) ? counts[size_t(l * P.nk + row[slot])]++ : -1;
    }
    plan_lane(P, &counts[size_t(l * P.nk)], &offsets[size_t(l * P.nk)], &runs[size_t(l * w.lane_runs)], w.lane_runs,
              int(32 << rnd(0, 2)));
    for (int64_t e = 0; e < pairs; ++e) {
      const int32_t r = rank[size_t(l * pairs + e)];
      if (r < 0) continue;
      const int32_t block = choices[size_t(l * pairs + e)];
      const int64_t at = l * pairs + offsets[size_t(l * P.nk + block)] + r;
      CHECK(entries[size_t(at)] == -7);
      entries[size_t(at)] = int32_t(e);
    }
  }

  // The backward's lists: a stable sort of every (key, pair id) of the chunk by mg::sort_key lands
  // lane l's pairs at [l * pairs, (l + 1) * pairs), block j's at offsets[j], in pair-id order: the
  // fill's lists, each sorted.
  {
    std::vector<std::pair<int64_t, int32_t>> items;
    for (int l = 0; l < P.lanes; ++l)
      for (int64_t e = 0; e < pairs; ++e) {
        const bool pair = rank[size_t(l * pairs + e)] >= 0;
        items.emplace_back(mg::sort_key(l, P.nk, pair, pair ? choices[size_t(l * pairs + e)] : 0), int32_t(e));
      }
    for (const auto& item : items) CHECK((item.first >> mg::sort_key_bits(P.lanes, P.nk)) == 0);
    std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    for (int l = 0; l < P.lanes; ++l)
      for (int64_t j = 0; j < P.nk; ++j) {
        const int64_t begin = l * pairs + offsets[size_t(l * P.nk + j)], end = begin + counts[size_t(l * P.nk + j)];
        std::vector<int32_t> filled(entries.begin() + begin, entries.begin() + end);
        std::sort(filled.begin(), filled.end());
        for (int64_t x = begin; x < end; ++x) CHECK(items[size_t(x)].second == filled[size_t(x - begin)]);
      }
  }

  // (b) every run as its CTA walks it, tile by tile; partials per pair.
  std::vector<float> part_o(size_t(P.lanes * pairs * D), NAN), part_lse(size_t(P.lanes * pairs), NAN);
  std::vector<int> written(size_t(P.lanes * pairs), 0);
  for (int l = 0; l < P.lanes; ++l)
    for (int64_t x = 0; x < w.lane_runs; ++x) {
      const mg::RunRecord run = runs[size_t(l * w.lane_runs + x)];
      CHECK(run.block != -9);
      if (run.block < 0) continue;
      CHECK(run.rows >= 1 && run.rows <= mg::kRunRows && run.block < P.nk);
      if (run.rows == mg::kRunRows) ++stats[4];  // a block split into several runs
      // The kernel's shared table of the run's pair ids: -1 past its rows.
      std::vector<int32_t> run_pairs(mg::kRunRows);
      for (int r = 0; r < mg::kRunRows; ++r)
        run_pairs[size_t(r)] = r < run.rows ? entries[size_t(l * pairs + run.first + r)] : -1;
      const int steps = ix::walk_tiles(1, P.block_kv);
      for (int tile_id = 0; tile_id < mg::run_tiles(run.rows); ++tile_id) {
        const mg::RunRecord tile{run.block, run.first + tile_id * mg::kTileRows, mg::tile_rows(run.rows, tile_id), 0};
        CHECK(tile.rows >= 1 && tile.rows <= mg::kTileRows);
        for (int warp = 0; warp < mg::kTileRows / ix::kWarpRows; ++warp) {
          const int warp_row0 = warp * ix::kWarpRows;
          if (warp_row0 >= tile.rows) continue;  // idle warp
          int pos[ix::kWarpRows], pair[ix::kWarpRows], first_q = INT32_MAX, last_q = -1;
          for (int r = 0; r < ix::kWarpRows; ++r) {
            const int row = warp_row0 + r;
            pair[r] = run_pairs[size_t(tile_id * mg::kTileRows + row)];
            CHECK((row < tile.rows) == (pair[r] >= 0));
            CHECK(row >= tile.rows || (pair[r] >= 0 && choices[size_t(l * pairs + pair[r])] == tile.block));
            pos[r] = mg::row_position(pair[r], P.top_k, P.seq_q);
            first_q = std::min(first_q, pos[r]);
            last_q = std::max(last_q, pos[r]);
          }
          ix::RowState rs[ix::kWarpRows];
          std::vector<double> o(size_t(ix::kWarpRows * D), 0.0);
          for (int r = 0; r < ix::kWarpRows; ++r) rs[r] = ix::row_state_init();
          for (int t = 0; t < steps; ++t) {
            const ix::StepSegments g = step_segments(P, tile.block, t);
            unsigned live_segments = 0;
            bool all_full = true;
            int64_t last_key = -1;
            for (int s = 0; s < ix::segments_per_tile(P.block_kv); ++s) {
              if (g.base[s] >= 0) live_segments |= 1u << s;
              all_full = all_full && g.base[s] >= 0 && g.base[s] + ix::segment_len(P.block_kv) <= P.seq_kv;
              last_key = std::max<int64_t>(last_key, int64_t(g.base[s]) + ix::segment_len(P.block_kv) - 1);
            }
            const unsigned live = ix::live_slices(live_segments, P.block_kv);
            const bool full = ix::tile_fully_visible(first_q, last_key, all_full, false, P.seq_q, P.seq_kv, P.causal);
            const int first_key = g.base[0];  // the kernel's hidden-step test
            const bool hidden = live == 0u || first_key >= P.seq_kv ||
                                (P.causal && int64_t(first_key) > int64_t(last_q) + P.seq_kv - P.seq_q);
            if (hidden) {
              for (int r = 0; r < ix::kWarpRows; ++r)
                for (int col = 0; col < ix::kTileKv; ++col)
                  CHECK(!ix::step_element_visible(g, 0xfu, col, P.block_kv, pos[r], P.seq_q, P.seq_kv, P.causal));
              ++stats[3];
              continue;
            }
            for (int r = 0; r < ix::kWarpRows; ++r) {
              float x[ix::kTileKv];
              float tile_max = ix::neg_inf();
              for (int col = 0; col < ix::kTileKv; ++col) {
                const bool visible =
                    ix::step_element_visible(g, 0xfu, col, P.block_kv, pos[r], P.seq_q, P.seq_kv, P.causal);
                if (full) CHECK(visible);
                if (!((live >> (col / 16)) & 1u)) {
                  CHECK(!visible);  // a skipped slice must hide every key from every row
                  x[col] = ix::neg_inf();
                  continue;
                }
                const int key = step_key(g, col, P.block_kv);
                double dot = 0.0;
                if (visible)
                  for (int d = 0; d < D; ++d)
                    dot += q[size_t((int64_t(l) * P.seq_q + pos[r]) * D + d)] *
                           k[size_t((int64_t(l) * P.seq_kv + key) * D + d)];
                x[col] = visible ? float(dot) * P.scale * ix::kLog2e : ix::neg_inf();
                tile_max = std::max(tile_max, x[col]);
              }
              const float alpha = ix::softmax_rescale(rs[r], tile_max);
              for (int d = 0; d < D; ++d) o[size_t(r * D + d)] *= alpha;
              for (int col = 0; col < ix::kTileKv; ++col) {
                const float p = ix::softmax_prob(x[col], rs[r]);
                rs[r].l += p;
                if (p == 0.0f) continue;
                const int key = step_key(g, col, P.block_kv);
                for (int d = 0; d < D; ++d)
                  o[size_t(r * D + d)] += p * v[size_t((int64_t(l) * P.seq_kv + key) * D + d)];
              }
            }
          }
          for (int r = 0; r < ix::kWarpRows; ++r) {
            if (pair[r] < 0) continue;
            const int64_t at = l * pairs + pair[r];
            ++written[size_t(at)];
            const float inv = ix::softmax_out_scale(rs[r].l);
            part_lse[size_t(at)] = ix::softmax_lse(rs[r].m, rs[r].l);
            CHECK(std::isfinite(part_lse[size_t(at)]));  // a chosen block shows the token at least one key
            for (int d = 0; d < D; ++d) part_o[size_t(at * D + d)] = round16(float(o[size_t(r * D + d)]) * inv);
          }
        }
      }
    }
  for (int l = 0; l < P.lanes; ++l)
    for (int64_t e = 0; e < pairs; ++e) {
      const int32_t* const row = &choices[size_t(l * pairs + e - e % P.top_k)];
      CHECK(written[size_t(l * pairs + e)] == (mg::slot_is_pair(row, int(e % P.top_k), P.nk) ? 1 : 0));
    }

  // (c) the merge against token-level MoBA in double.
  for (int l = 0; l < P.lanes; ++l)
    for (int i = 0; i < P.seq_q; ++i) {
      const int64_t base = l * pairs + int64_t(i) * P.top_k;
      float lse_max = ix::neg_inf();
      for (int s = 0; s < P.top_k; ++s)  // the merge's pair test: the count kernel's rank
        if (rank[size_t(base + s)] >= 0) lse_max = std::max(lse_max, part_lse[size_t(base + s)]);
      std::vector<float> acc(size_t(D), 0.0f);
      float weight_sum = 0.0f;
      for (int s = 0; s < P.top_k; ++s) {
        if (rank[size_t(base + s)] < 0) continue;
        const float weight = mg::merge_weight(part_lse[size_t(base + s)], lse_max);
        weight_sum += weight;
        for (int d = 0; d < D; ++d) acc[size_t(d)] += weight * part_o[size_t((base + s) * D + d)];
      }
      const float inv = mg::merge_out_scale(weight_sum), lse = mg::merge_lse(lse_max, weight_sum);

      // Reference: softmax over the keys of the set of the token's chosen blocks (causal-masked).
      std::vector<double> scores;
      std::vector<int> keys;
      std::vector<int32_t> blocks(&choices[size_t(base)], &choices[size_t(base)] + P.top_k);
      std::sort(blocks.begin(), blocks.end());
      blocks.erase(std::unique(blocks.begin(), blocks.end()), blocks.end());
      for (const int32_t block : blocks) {
        if (block < 0 || block >= P.nk) continue;
        for (int key = block * P.block_kv; key < std::min<int64_t>(int64_t(block + 1) * P.block_kv, P.seq_kv); ++key) {
          if (!ix::key_visible(i, key, P.seq_q, P.seq_kv, P.causal)) continue;
          double dot = 0.0;
          for (int d = 0; d < D; ++d)
            dot += q[size_t((int64_t(l) * P.seq_q + i) * D + d)] * k[size_t((int64_t(l) * P.seq_kv + key) * D + d)];
          scores.push_back(dot * P.scale);
          keys.push_back(key);
        }
      }
      if (scores.empty()) {
        CHECK(lse == ix::neg_inf());
        for (int d = 0; d < D; ++d) CHECK(acc[size_t(d)] * inv == 0.0f);
        ++stats[1];
        continue;
      }
      const double m = *std::max_element(scores.begin(), scores.end());
      double sum = 0.0;
      for (double sc : scores) sum += std::exp(sc - m);
      CHECK(std::fabs(double(lse) - (m + std::log(sum))) <= 1e-4 * (1.0 + std::fabs(m)));
      for (int d = 0; d < D; ++d) {
        double ref = 0.0;
        for (size_t n = 0; n < scores.size(); ++n)
          ref += std::exp(scores[n] - m) / sum * v[size_t((int64_t(l) * P.seq_kv + keys[n]) * D + d)];
        CHECK(std::fabs(double(acc[size_t(d)] * inv) - ref) <= 1.0 / 128);  // 16-bit partials of |v| <= 1
      }
      ++stats[0];
    }

  // (d) the backward's decomposition (moba_gather_backward_cuda.cu) against token-level MoBA's
  // gradients in double: dQ as per-pair partials of each run's tiles (rounded to 16 bits) summed
  // per token over the slots with a rank, dK / dV per key block over the tiles of the group walk
  // (here each lane its own kv head; the walk over all lanes as one group is enumerated too).
  std::vector<double> dout(q.size());
  for (double& x : dout) x = rndu(-1.0, 1.0);
  for (int l = 0; l < P.lanes; ++l) {
    const auto at_q = [&](int i, int d) { return size_t((int64_t(l) * P.seq_q + i) * D + d); };
    const auto at_k = [&](int j, int d) { return size_t((int64_t(l) * P.seq_kv + j) * D + d); };
    // Reference: per token its visible keys (the set of its valid choices), p, delta, dS.
    std::vector<double> lse(size_t(P.seq_q), -INFINITY), delta(size_t(P.seq_q), 0.0);
    std::vector<std::vector<int>> keys_of(size_t(P.seq_q));
    const auto score = [&](int i, int j) {
      double dot = 0.0;
      for (int d = 0; d < D; ++d) dot += q[at_q(i, d)] * k[at_k(j, d)];
      return dot * P.scale;
    };
    for (int i = 0; i < P.seq_q; ++i) {
      const int64_t base = l * pairs + int64_t(i) * P.top_k;
      for (int s2 = 0; s2 < P.top_k; ++s2) {
        if (rank[size_t(base + s2)] < 0) continue;
        const int32_t block = choices[size_t(base + s2)];
        for (int j = block * P.block_kv; j < std::min<int64_t>(int64_t(block + 1) * P.block_kv, P.seq_kv); ++j)
          if (ix::key_visible(i, j, P.seq_q, P.seq_kv, P.causal)) keys_of[size_t(i)].push_back(j);
      }
      if (keys_of[size_t(i)].empty()) continue;
      double m = -INFINITY, sum = 0.0;
      for (int j : keys_of[size_t(i)]) m = std::max(m, score(i, j));
      for (int j : keys_of[size_t(i)]) sum += std::exp(score(i, j) - m);
      lse[size_t(i)] = m + std::log(sum);
      for (int d = 0; d < D; ++d) {
        double o = 0.0;
        for (int j : keys_of[size_t(i)]) o += std::exp(score(i, j) - lse[size_t(i)]) * v[at_k(j, d)];
        delta[size_t(i)] += dout[at_q(i, d)] * o;
      }
    }
    // p and dS of every visible (token, key), dense (0 elsewhere).
    std::vector<double> p_mat(size_t(P.seq_q) * P.seq_kv, 0.0), ds_mat(p_mat.size(), 0.0);
    for (int i = 0; i < P.seq_q; ++i)
      for (int j : keys_of[size_t(i)]) {
        double dp = 0.0;
        for (int d = 0; d < D; ++d) dp += dout[at_q(i, d)] * v[at_k(j, d)];
        const size_t at = size_t(i) * P.seq_kv + j;
        p_mat[at] = std::exp(score(i, j) - lse[size_t(i)]);
        ds_mat[at] = p_mat[at] * (dp - delta[size_t(i)]);
      }
    const auto prob = [&](int i, int j) { return p_mat[size_t(i) * P.seq_kv + j]; };
    const auto ds = [&](int i, int j) { return ds_mat[size_t(i) * P.seq_kv + j]; };
    std::vector<double> dq_ref(size_t(P.seq_q * D), 0.0), dk_ref(size_t(P.seq_kv * D), 0.0), dv_ref(dk_ref.size(), 0.0);
    for (int i = 0; i < P.seq_q; ++i)
      for (int j : keys_of[size_t(i)])
        for (int d = 0; d < D; ++d) {
          dq_ref[size_t(i * D + d)] += P.scale * ds(i, j) * k[at_k(j, d)];
          dk_ref[size_t(j * D + d)] += P.scale * ds(i, j) * q[at_q(i, d)];
          dv_ref[size_t(j * D + d)] += prob(i, j) * dout[at_q(i, d)];
        }

    // dQ: each run's rows (its tiles' pair ids) against their block, then the merge.
    std::vector<float> part(size_t(pairs * D), NAN);
    for (int64_t x = 0; x < w.lane_runs; ++x) {
      const mg::RunRecord run = runs[size_t(l * w.lane_runs + x)];
      if (run.block < 0) continue;
      for (int r = 0; r < run.rows; ++r) {
        const int32_t e = entries[size_t(l * pairs + run.first + r)];
        const int i = mg::pair_token(e, P.top_k);
        for (int d = 0; d < D; ++d) {
          double acc = 0.0;
          for (int j = run.block * P.block_kv; j < std::min<int64_t>(int64_t(run.block + 1) * P.block_kv, P.seq_kv); ++j)
            if (ix::key_visible(i, j, P.seq_q, P.seq_kv, P.causal)) acc += P.scale * ds(i, j) * k[at_k(j, d)];
          part[size_t(e * D + d)] = round16(float(acc));
        }
      }
    }
    for (int i = 0; i < P.seq_q; ++i)
      for (int d = 0; d < D; ++d) {
        float sum = 0.0f, mag = 0.0f;
        for (int s2 = 0; s2 < P.top_k; ++s2) {
          const int64_t e = int64_t(i) * P.top_k + s2;
          if (rank[size_t(l * pairs + e)] < 0) continue;
          CHECK(!std::isnan(part[size_t(e * D + d)]));  // every pair's partial written
          sum += part[size_t(e * D + d)];
          mag += std::fabs(part[size_t(e * D + d)]);
        }
        CHECK(std::fabs(double(sum) - dq_ref[size_t(i * D + d)]) <= mag / 128 + 1e-5);
      }

    // dK / dV: per key block the walk's tiles of the lane's list (a group of one).
    const int32_t* const lane_counts = &counts[size_t(l * P.nk)];
    for (int64_t kb = 0; kb < P.nk; ++kb) {
      const int steps = mg::group_walk_steps(lane_counts + kb, P.nk, 1);
      std::vector<double> dk(size_t(P.block_kv * D), 0.0), dv(dk.size(), 0.0);
      mg::GroupCursor cur = mg::group_cursor_begin(lane_counts + kb, P.nk, 1);
      for (int t = 0; t < steps; ++t, mg::group_cursor_advance(cur, lane_counts + kb, P.nk, 1)) {
        CHECK(cur.g == 0);
        for (int r = 0; r < mg::kTileRows; ++r) {
          const int idx = cur.tile * mg::kTileRows + r;
          if (idx >= lane_counts[kb]) continue;  // pos -1
          const int32_t e = entries[size_t(l * pairs + offsets[size_t(l * P.nk + kb)] + idx)];
          CHECK(choices[size_t(l * pairs + e)] == kb);
          const int i = mg::pair_token(e, P.top_k);
          for (int jj = 0; jj < P.block_kv; ++jj) {
            const int j = int(kb) * P.block_kv + jj;
            if (!ix::key_visible(i, j, P.seq_q, P.seq_kv, P.causal)) continue;
            for (int d = 0; d < D; ++d) {
              dk[size_t(jj * D + d)] += P.scale * ds(i, j) * q[at_q(i, d)];
              dv[size_t(jj * D + d)] += prob(i, j) * dout[at_q(i, d)];
            }
          }
        }
      }
      CHECK(cur.g == 1);  // the walk ended
      for (int jj = 0; jj < P.block_kv && kb * P.block_kv + jj < P.seq_kv; ++jj)
        for (int d = 0; d < D; ++d) {
          const size_t at = size_t((kb * P.block_kv + jj) * D + d);
          CHECK(std::fabs(dk[size_t(jj * D + d)] - dk_ref[at]) <= 1e-9 * (1.0 + std::fabs(dk_ref[at])));
          CHECK(std::fabs(dv[size_t(jj * D + d)] - dv_ref[at]) <= 1e-9 * (1.0 + std::fabs(dv_ref[at])));
        }
    }
  }
  // The group walk over all lanes as one GQA group: every pair of block kb once, group by group.
  for (int64_t kb = 0; kb < P.nk; ++kb) {
    std::vector<int> seen(size_t(P.lanes * pairs), 0);
    const int steps = mg::group_walk_steps(&counts[size_t(kb)], P.nk, P.lanes);
    mg::GroupCursor cur = mg::group_cursor_begin(&counts[size_t(kb)], P.nk, P.lanes);
    int last_g = 0;
    for (int t = 0; t < steps; ++t, mg::group_cursor_advance(cur, &counts[size_t(kb)], P.nk, P.lanes)) {
      CHECK(cur.g >= last_g && cur.g < P.lanes);
      last_g = cur.g;
      for (int r = 0; r < mg::kTileRows; ++r) {
        const int idx = cur.tile * mg::kTileRows + r;
        if (idx < counts[size_t(cur.g * P.nk + kb)])
          ++seen[size_t(cur.g * pairs + entries[size_t(cur.g * pairs + offsets[size_t(cur.g * P.nk + kb)] + idx)])];
      }
    }
    CHECK(cur.g == P.lanes);
    for (int l = 0; l < P.lanes; ++l)
      for (int64_t e = 0; e < pairs; ++e)
        CHECK(seen[size_t(l * pairs + e)] == (rank[size_t(l * pairs + e)] >= 0 && choices[size_t(l * pairs + e)] == kb));
  }
  ++stats[2];
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 20;
  const uint64_t seed = argc > 2 ? strtoull(argv[2], nullptr, 10) : 1;
  rng.seed(seed);
  // The tile bound: one record per non-empty block plus a full tile per 64 pairs.
  CHECK(mg::max_lane_runs(1, 1, 100) == 2 && mg::max_lane_runs(100, 8, 3) == 3 + 2);
  CHECK(mg::run_tiles(512) == 8 && mg::tile_rows(512, 7) == 64 && mg::run_tiles(65) == 2 && mg::tile_rows(65, 1) == 1);
  CHECK(sizeof(mg::RunRecord) == 16);
  int stats[5] = {0, 0, 0, 0, 0};
  for (int c = 0; c < cases; ++c) gather_case(stats);
  printf("moba gather cases %d, tokens checked %d (seeing nothing %d), hidden warp steps %d, full runs %d\n",
         stats[2], stats[0], stats[1], stats[3], stats[4]);
  CHECK(cases < 50 || stats[4] > 0);
  printf("all ok\n");
  return 0;
}
