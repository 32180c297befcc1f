// CPU simulation of the barrier protocol of the Hopper GEMMs' TMA pipeline
// (csrc/common/wgmma_cluster_pipeline.h, used by csrc/quant/w8a8_wgmma_tma.cu). A wrong parity,
// arrival count or release point hangs the GPU or lets a copy overwrite a stage that wgmma is
// still reading; neither can be seen here on a GPU, so this program runs the protocol with a
// model of the hardware written from the PTX ISA:
//   - mbarrier: a phase completes when its pending arrivals reach zero and its transaction count
//     is zero (expect_tx adds, completed copies subtract, so the count may go negative while a
//     peer's multicast lands before the local expect_tx); try_wait.parity p succeeds once the
//     current phase's parity differs from p;
//   - TMA copies complete at random later times, each writing its region of a CTA's stage and
//     counting its bytes on that CTA's full barrier (multicast: one copy per destination);
//   - a wgmma batch reads its stage from its issue until the wgmma.wait_group that proves it
//     complete.
// Agents (per CTA: the producer thread and two consumer warpgroups of 4 warps, in the kernel's
// program order, int8's and fp8's) run in random interleavings. Checked: no deadlock; every batch
// reads A and both halves of B of its own iteration; no copy lands in a region while a batch of
// either CTA may read it or before the data there was read by both warpgroups; every wait
// returns on the phase it means (never one or two phases off); at the end no copy is in flight
// and each barrier completed exactly the phases the protocol implies. Also: cluster_tile maps
// the clusters' CTAs onto every tile once (odd m block counts: one CTA past M), and the B halves'
// rows land where the wgmma descriptors read B's rows.
// Usage: wgmma_cluster_pipeline_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <cstdio>
#include <random>
#include <set>
#include <vector>

#include "common/wgmma_cluster_pipeline.h"
#include "sim_common.h"

namespace cl = torch_ext::wgmma_cluster;
namespace wg = torch_ext::wgmma_gemm;

namespace {

std::mt19937_64 rng;

struct Mbarrier {
  int expected = 0, pending = 0;
  int64_t tx = 0;
  int completed = 0;  // phases completed so far
  void init(int arrivals) { expected = pending = arrivals; }
  void maybe_complete() {
    if (pending == 0 && tx == 0) {
      ++completed;
      pending = expected;
    }
  }
  void arrive() {
    CHECK(pending > 0);
    --pending;
    maybe_complete();
  }
  void expect_tx(int64_t bytes) { tx += bytes; }
  void complete_tx(int64_t bytes) {
    tx -= bytes;
    if (pending == 0) maybe_complete();  // (pending > 0: the phase waits for its arrivals)
  }
  // try_wait.parity: the phase of parity p has completed once the current phase's parity is not p.
  // `phase` is the phase the caller means: the wait must not succeed on another one.
  bool try_wait(uint32_t parity, int phase) const {
    const bool done = uint32_t(completed & 1) != parity;
    if (done) CHECK(completed == phase + 1);
    return done;
  }
};

// Regions of a stage: A (by the copy engine; gathered: the chunks of producer thread 0 and of
// the other 127, which publish separately), and B's two halves.
enum Region { kA = 0, kB0 = 1, kB1 = 2, kAOthers = 3, kRegions = 4 };

struct Copy {
  int cta, stage, region, iter;
  int64_t bytes;  // counted on the full barrier (0: a cp.async, published by arrivals instead)
  int agent;      // the producer agent that issued it
};

// One pipeline configuration on a cluster of 2: gather (fused_moe: A by producer cp.async,
// published kGatherLag stages later) or not (W8A8: A by the copy engine); share (B's halves
// multicast) or not (each CTA fetches its whole B and releases only its own stages).
template <class Tile, bool kGather>
struct Sim {
  using Pipe = cl::Pipeline<Tile, kGather>;
  static constexpr int S = Pipe::kStages;
  int k_iters;
  bool promote;  // fp8's program order
  bool share;
  Mbarrier full[2][S], empty[2][S];
  int data[2][S][kRegions];        // iteration whose data the region holds (-1: none)
  bool published[2][S][kRegions];  // gathered A: its writer has arrived for it
  int readers[2][S][kRegions];     // batches that may be reading it now
  int read_done[2][S];             // warpgroups done reading the stage's current data
  std::vector<Copy> in_flight;

  // Producer agents of a CTA: 0 = the thread issuing B's (and A's) tensor copies; gathered A: it
  // also copies and publishes its own A chunks, and agent 1 stands for the other 127 threads.
  enum POp { kWaitEmptyIssue, kPublish };
  struct PStep {
    POp op;
    int iter;
  };
  struct Producer {
    std::vector<PStep> program;
    size_t pc = 0;
  } producer[2][2];
  static constexpr int kAgents = kGather ? 2 : 1;

  // The kernel's producer loop (w8a8_wgmma_tma.cu / fused_moe_wgmma_tma.cu).
  std::vector<PStep> producer_program() const {
    std::vector<PStep> p;
    for (int iter = 0; iter < k_iters; ++iter) {
      p.push_back({kWaitEmptyIssue, iter});
      if (kGather && Pipe::published_after(iter) >= 0) p.push_back({kPublish, Pipe::published_after(iter)});
    }
    if (kGather)
      for (int iter = std::max(0, k_iters - cl::kGatherLag); iter < k_iters; ++iter) p.push_back({kPublish, iter});
    return p;
  }

  // Consumer warpgroup: its program as a list of steps, and a cursor.
  enum Op { kWaitFullIssue, kWaitGroup0, kWaitGroup1, kRelease };
  struct Step {
    Op op;
    int iter;
  };
  struct Consumer {
    std::vector<Step> program;
    size_t pc = 0;
    std::vector<int> batches;  // iterations issued and not yet known complete, oldest first
  } consumer[2][2];

  // The consumer warpgroup's loop: k_loop of csrc/quant/w8a8_wgmma_ops.cuh with done = the
  // release of quant/w8a8_wgmma_tma.cu, int8 or fp8 (its issue waits for the full barrier);
  // fused_moe_wgmma_tma.cu's loop is the int8 order.
  std::vector<Step> consumer_program() const {
    static_assert(Tile::kBatchesInFlight == 1, "the kernels' wgmma.wait_group 1");
    std::vector<Step> p;
    if (!promote) {
      for (int iter = 0; iter < k_iters; ++iter) {
        p.push_back({kWaitFullIssue, iter});
        p.push_back({kWaitGroup1, iter});
        if (iter > 0) p.push_back({kRelease, iter - 1});
      }
      p.push_back({kWaitGroup0, k_iters - 1});
      p.push_back({kRelease, k_iters - 1});
    } else {
      int iter = 0;
      for (; iter + 2 <= k_iters; iter += 2) {
        p.push_back({kWaitFullIssue, iter});
        p.push_back({kWaitFullIssue, iter + 1});
        p.push_back({kWaitGroup1, iter + 1});
        p.push_back({kRelease, iter});
        p.push_back({kWaitGroup0, iter + 1});
        p.push_back({kRelease, iter + 1});
      }
      if (iter < k_iters) {
        p.push_back({kWaitFullIssue, iter});
        p.push_back({kWaitGroup0, iter});
        p.push_back({kRelease, iter});
      }
    }
    return p;
  }

  Sim(int k, bool fp8, bool share_b) : k_iters(k), promote(fp8), share(share_b) {
    for (int c = 0; c < 2; ++c)
      for (int s = 0; s < S; ++s) {
        full[c][s].init(Pipe::kFullArrivals);
        empty[c][s].init(cl::empty_arrivals(share));
        read_done[c][s] = 2;
        for (int r = 0; r < kRegions; ++r) data[c][s][r] = -1, readers[c][s][r] = 0, published[c][s][r] = false;
      }
    for (int c = 0; c < 2; ++c) {
      for (int a = 0; a < kAgents; ++a) producer[c][a].program = producer_program();
      for (auto& wg : consumer[c]) wg.program = consumer_program();
    }
  }

  static int a_region(int agent) { return agent == 0 ? kA : kAOthers; }
  bool region_used(int r) const { return r != kAOthers || kGather; }

  bool producer_step(int c, int a) {
    Producer& pr = producer[c][a];
    if (pr.pc == pr.program.size()) return false;
    const PStep step = pr.program[pr.pc];
    const int stage = Tile::stage_of(step.iter);
    if (step.op == kWaitEmptyIssue) {
      if (Pipe::producer_waits(step.iter) &&
          !empty[c][stage].try_wait(Pipe::empty_parity(step.iter), step.iter / S - 1)) {
        return false;
      }
      if (a == 0) {
        full[c][stage].expect_tx(Pipe::kStageTxBytes);
        full[c][stage].arrive();
        if (!kGather) in_flight.push_back({c, stage, kA, step.iter, Pipe::kATxBytes, a});
        for (int h = 0; h < 2; ++h) {
          if (share && h != c) continue;  // the peer multicasts that half
          for (int d = 0; d < 2; ++d)
            if (share || d == c) in_flight.push_back({d, stage, kB0 + h, step.iter, Pipe::kBHalfTxBytes, a});
        }
      }
      if (kGather) in_flight.push_back({c, stage, a_region(a), step.iter, 0, a});
    } else {  // kPublish: cp.async.wait_group (every group up to this iteration landed), then arrive
      for (const Copy& copy : in_flight)
        if (copy.cta == c && copy.agent == a && copy.bytes == 0 && copy.iter <= step.iter) return false;
      CHECK(data[c][stage][a_region(a)] == step.iter);
      published[c][stage][a_region(a)] = true;
      const int arrivals = a == 0 ? 1 : cl::kWarpgroupThreads - 1;
      for (int i = 0; i < arrivals; ++i) full[c][stage].arrive();
    }
    ++pr.pc;
    return true;
  }

  void land(size_t index) {
    const Copy copy = in_flight[index];
    in_flight.erase(in_flight.begin() + index);
    CHECK(readers[copy.cta][copy.stage][copy.region] == 0);  // no batch may read it now
    CHECK(read_done[copy.cta][copy.stage] == 2);             // both warpgroups read the old data
    CHECK(data[copy.cta][copy.stage][copy.region] == (copy.iter >= S ? copy.iter - S : -1));  // its previous use
    data[copy.cta][copy.stage][copy.region] = copy.iter;
    published[copy.cta][copy.stage][copy.region] = copy.bytes > 0;  // tensor copies: by their bytes
    if (copy.bytes > 0) full[copy.cta][copy.stage].complete_tx(copy.bytes);
  }

  void finish_batches(int c, Consumer& w, size_t keep) {
    while (w.batches.size() > keep) {
      const int stage = Tile::stage_of(w.batches.front());
      for (int r = 0; r < kRegions; ++r) --readers[c][stage][r];
      ++read_done[c][stage];
      w.batches.erase(w.batches.begin());
    }
  }

  bool consumer_step(int c, int g) {
    Consumer& w = consumer[c][g];
    if (w.pc == w.program.size()) return false;
    const Step step = w.program[w.pc];
    const int stage = Tile::stage_of(step.iter);
    switch (step.op) {
      case kWaitFullIssue: {
        if (!full[c][stage].try_wait(Pipe::full_parity(step.iter), step.iter / S)) return false;
        for (int r = 0; r < kRegions; ++r) {
          if (region_used(r)) CHECK(data[c][stage][r] == step.iter && published[c][stage][r]);
          ++readers[c][stage][r];
        }
        // The first warpgroup to read the stage's new data starts its count.
        if (read_done[c][stage] == 2) read_done[c][stage] = 0;
        w.batches.push_back(step.iter);
        break;
      }
      case kWaitGroup1:
        finish_batches(c, w, 1);
        break;
      case kWaitGroup0:
        finish_batches(c, w, 0);
        break;
      case kRelease:
        for (int b : w.batches) CHECK(b != step.iter);  // released only once its batch is done
        if (Pipe::consumer_releases(step.iter, k_iters)) {
          for (int warp = 0; warp < cl::kConsumerWarps / cl::kConsumerWarpgroups; ++warp)
            for (int d = 0; d < 2; ++d)
              if (share || d == c) empty[d][stage].arrive();
        }
        break;
    }
    ++w.pc;
    return true;
  }

  bool done() const {
    for (int c = 0; c < 2; ++c) {
      for (int a = 0; a < kAgents; ++a)
        if (producer[c][a].pc != producer[c][a].program.size()) return false;
      for (const auto& w : consumer[c])
        if (w.pc != w.program.size()) return false;
    }
    return in_flight.empty();
  }

  void run() {
    for (long steps = 0;; ++steps) {
      CHECK(steps < 10000000);
      if (done()) break;
      // Candidates: the producer agents, 4 consumers, every copy in flight.
      constexpr int kFixed = 2 * kAgents + 4;
      std::vector<int> order(kFixed + in_flight.size());
      for (size_t i = 0; i < order.size(); ++i) order[i] = int(i);
      std::shuffle(order.begin(), order.end(), rng);
      bool progressed = false;
      for (int pick : order) {
        if (pick < 2 * kAgents) progressed = producer_step(pick / kAgents, pick % kAgents);
        else if (pick < kFixed) progressed = consumer_step((pick - 2 * kAgents) / 2, (pick - 2 * kAgents) % 2);
        else {
          land(size_t(pick - kFixed));
          progressed = true;
        }
        if (progressed) break;
      }
      CHECK(progressed);  // else: deadlock
    }
    // Every barrier completed exactly the phases the protocol implies: full once per use of the
    // stage, empty once per refill (a release nobody waits for could reach an exited peer).
    for (int c = 0; c < 2; ++c)
      for (int s = 0; s < S; ++s) {
        int uses = 0, releases = 0;
        for (int iter = s; iter < k_iters; iter += S) {
          ++uses;
          releases += iter + S < k_iters;
        }
        CHECK(full[c][s].completed == uses && full[c][s].tx == 0 && full[c][s].pending == Pipe::kFullArrivals);
        CHECK(empty[c][s].completed == releases && empty[c][s].pending == cl::empty_arrivals(share));
      }
  }
};

template <class Tile>
void check_layout() {
  using Pipe = cl::Pipeline<Tile>;
  // The copy engine's 128-byte swizzle (CUDA driver API, CU_TENSOR_MAP_SWIZZLE_128B, box rows of
  // 128 bytes, 1024-byte aligned destination): 16-byte chunk c of box row r lands at
  // r * 128 + 16 (c ^ (r % 8)). Row r of B (what the descriptors read at b_tile_offset +
  // swizzled_offset(r, c)) comes from half r / kBHalfRows, its row r % kBHalfRows.
  for (int stage = 0; stage < Pipe::kStages; ++stage)
    for (int r = 0; r < Tile::kBN; ++r)
      for (int c = 0; c < 8; ++c) {
        const int half = r / Pipe::kBHalfRows, box_row = r % Pipe::kBHalfRows;
        const int tma = Pipe::b_half_offset(stage, half) + box_row * 128 + 16 * (c ^ (box_row % 8));
        CHECK(tma == Tile::b_tile_offset(stage) + wg::swizzled_offset(r, c));
        CHECK(Pipe::b_half_offset(stage, half) % wg::kSwizzleAtomBytes == 0);
      }
  for (int stage = 0; stage < Pipe::kStages; ++stage) CHECK(Tile::a_tile_offset(stage) % wg::kSwizzleAtomBytes == 0);
}

void check_cluster_tiles(int64_t m_blocks, int64_t n_blocks, int64_t group_m) {
  std::set<std::pair<int64_t, int64_t>> seen;
  const int64_t clusters = cl::cluster_count(m_blocks, n_blocks);
  int64_t past_m = 0;
  for (int64_t cluster = 0; cluster < clusters; ++cluster) {
    const auto first = cl::cluster_tile(cluster, 0, m_blocks, n_blocks, group_m);
    for (int rank = 0; rank < cl::kClusterCtas; ++rank) {
      const auto t = cl::cluster_tile(cluster, rank, m_blocks, n_blocks, group_m);
      CHECK(t.nb == first.nb && t.mb == first.mb + rank && t.nb >= 0 && t.nb < n_blocks);
      if (t.mb >= m_blocks) {
        ++past_m;
        continue;
      }
      CHECK(seen.insert({t.mb, t.nb}).second);
    }
  }
  CHECK(int64_t(seen.size()) == m_blocks * n_blocks);
  CHECK(past_m == (m_blocks % 2) * n_blocks);
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 100;
  rng.seed(argc > 2 ? strtoull(argv[2], nullptr, 10) : 1);
  using Int8Tile = wg::WgmmaTile<256, false>;
  using Fp8Tile = wg::WgmmaTile<128, true>;
  check_layout<Int8Tile>();
  check_layout<Fp8Tile>();
  for (int i = 0; i < cases; ++i) {
    const int k_iters = 1 + int(rng() % 24);
    Sim<Int8Tile, false>(k_iters, false, true).run();  // W8A8 int8
    Sim<Fp8Tile, false>(k_iters, true, true).run();    // W8A8 e4m3
    Sim<Int8Tile, true>(k_iters, false, rng() % 2 == 0).run();  // fused_moe (bf16: the same tile)
    check_cluster_tiles(1 + int64_t(rng() % 40), 1 + int64_t(rng() % 40), 1 + int64_t(rng() % 6));
  }
  printf("all ok\n");
  return 0;
}
