// CPU simulation of the barrier protocol of the Hopper GEMMs' TMA pipeline
// (csrc/common/wgmma_cluster_pipeline.h, used by csrc/quant/w8a8_wgmma_tma.cu and
// csrc/moe/fused_moe_wgmma_tma.cu). A wrong parity, arrival count or release point hangs the GPU
// or lets a copy overwrite a stage that wgmma is still reading; neither can be seen here on a
// GPU, so this program runs the protocol with a model of the hardware written from the PTX ISA:
//   - mbarrier: a phase completes when its pending arrivals reach zero and its transaction count
//     is zero (expect_tx adds, completed copies subtract, so the count may go negative while a
//     peer's multicast lands before the local expect_tx); try_wait.parity p succeeds once the
//     current phase's parity differs from p;
//   - TMA copies complete at random later times, each writing its region of a CTA's stage and
//     counting its bytes on that CTA's full barrier (multicast: one copy per destination);
//   - gathered A (fused_moe): each of the producer warpgroup's 128 threads is an agent of its
//     own with its own cp.async groups (one per k iteration, landing in any order), its own
//     wait_group and its own arrival on the full barrier;
//   - a wgmma batch reads its stage from its issue until the wgmma.wait_group that proves it
//     complete;
//   - the kernels' last statement, cluster_sync: a CTA exits once every thread of the cluster
//     reached it.
// Agents (per CTA: the producer threads, two consumer warpgroups of 4 warps in the kernel's
// program order, int8's and fp8's; every copy in flight) run in random interleavings, each agent
// with a random speed drawn per case (1 to 1/64), so that some gatherers run far ahead of others.
// The clusters are those the kernels can meet: W8A8's with a CTA past M (it still runs every k
// iteration), fused_moe's with both blocks in one expert (B shared), in two experts, the second
// block past the plan's rows (no k work beside a working peer) or both past it.
// Checked: no deadlock; every batch reads A and both halves of B of its own iteration, every
// chunk published by an arrival made after it landed; no copy lands in a region while a batch of
// either CTA may read it or before the data there was read by both warpgroups; every wait returns
// on the phase it means (never one or two phases off) and every arrival and every copy's bytes
// count on the phase they are meant for; no copy, arrival or byte count reaches a CTA that has
// exited, and no CTA exits while a copy it issued is in flight; at the end each barrier completed
// exactly the phases the protocol implies. Also: cluster_tile maps the clusters' CTAs onto every
// tile once (odd m block counts: one CTA past M), and the B halves' rows land where the wgmma
// descriptors read B's rows.
// Mutations: run with a third argument naming one (`list` prints them), the model deviates from
// the kernels in that one respect, and a check must fail (tests/test_cuda_index_sim.py runs each).
// Usage: wgmma_cluster_pipeline_sim CASES SEED [MUTATION | list]
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <set>
#include <vector>

#include "common/wgmma_cluster_pipeline.h"
#include "sim_common.h"

namespace cl = torch_ext::wgmma_cluster;
namespace wg = torch_ext::wgmma_gemm;

namespace {

std::mt19937_64 rng;

// Errors the checks must catch, each one line of a kernel written otherwise.
enum class Mutation {
  kNone,
  kPublishUnlanded,        // fused_moe: cp_async_wait<kGatherLag + 1> before a gatherer's arrival
  kFullArrivalsOneShort,   // gathered A: full barriers initialized for 128 arrivals, not 129
  kDrainSkipsOne,          // fused_moe: after the loop only the last iteration is published
  kOnlyThread0WaitsEmpty,  // fused_moe: the other gatherers skip the empty-barrier wait
  kReleaseEveryStage,      // consumers release every stage, also one that nothing refills
  kFullParityFlipped,      // consumers wait for the other parity of the full barrier
  kEmptyParityFlipped,     // producers wait for the other parity of the empty barrier
  kPastMSkipsKLoop,        // W8A8: a CTA past M runs no k iteration (multicasts no half of B)
  kShareWithIdlePeer,      // fused_moe: a block past the plan counts as in its peer's expert
  kNoClusterSync,          // a CTA exits once its own threads are done
  kCount
};
constexpr const char* kMutationNames[] = {"none",
                                          "publish_unlanded",
                                          "full_arrivals_one_short",
                                          "drain_skips_one",
                                          "only_thread0_waits_empty",
                                          "release_every_stage",
                                          "full_parity_flipped",
                                          "empty_parity_flipped",
                                          "past_m_skips_k_loop",
                                          "share_with_idle_peer",
                                          "no_cluster_sync"};
static_assert(sizeof(kMutationNames) / sizeof(kMutationNames[0]) == size_t(Mutation::kCount));

Mutation mutation = Mutation::kNone;
bool mutated(Mutation m) { return mutation == m; }

// Scheduling weight of an agent for one case: 1, 1/4, 1/16 or 1/64.
double draw_speed() { return std::ldexp(1.0, -2 * int(rng() % 4)); }

struct Mbarrier {
  int expected = 0, pending = 0;
  int64_t tx = 0;
  int completed = 0;   // phases completed so far
  bool freed = false;  // its CTA has exited: a signal would reach shared memory no longer its
  void init(int arrivals) { expected = pending = arrivals; }
  void maybe_complete() {
    if (pending == 0 && tx == 0) {
      ++completed;
      pending = expected;
    }
  }
  // Every signal names the phase it is meant for (the iteration's use of the stage): it must
  // count on that one, not on a phase still incomplete before it or already completed.
  void check_signal(int phase) const {
    CHECK(!freed);
    CHECK(completed == phase);
  }
  void arrive(int phase) {
    check_signal(phase);
    CHECK(pending > 0);
    --pending;
    maybe_complete();
  }
  void expect_tx(int64_t bytes, int phase) {
    check_signal(phase);
    tx += bytes;
  }
  void complete_tx(int64_t bytes, int phase) {
    check_signal(phase);
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

// What the kernel decides per CTA of a cluster: its k iterations and whether it shares B with
// its peer (each half multicast into both, stages released to both producers).
struct ClusterPlan {
  int k_iters[cl::kClusterCtas];
  bool share[cl::kClusterCtas];
};

// W8A8 (w8a8_wgmma_tma.cu:60 and :90): every CTA runs all p.k_iters, >= 1 (the launcher takes the
// copy-engine kernel only for K > 0, w8a8_cuda.cu:480), a CTA whose m block lies past M (rank 1
// of the last cluster for an odd number of m blocks) too: it reads zeros for A, multicasts its
// half of B, which its peer waits for, and stores nothing. B is always shared.
ClusterPlan w8a8_cluster(int k_iters, bool rank1_past_m) {
  const int rank1_iters = mutated(Mutation::kPastMSkipsKLoop) && rank1_past_m ? 0 : k_iters;
  return {{k_iters, rank1_iters}, {true, true}};
}

// fused_moe (fused_moe_wgmma_tma.cu:59-62): expert[r] is the expert of rank r's 128-row block, -1
// past the plan's rows (or past m_blocks); such a block has no k work. A CTA shares B when its
// block and its peer's lie in one expert: both CTAs decide alike.
ClusterPlan gathered_cluster(int k_iters, const int (&expert)[cl::kClusterCtas]) {
  ClusterPlan plan{};
  for (int c = 0; c < cl::kClusterCtas; ++c) {
    const int own = expert[c], peer = expert[c ^ 1];
    plan.k_iters[c] = own >= 0 ? k_iters : 0;
    plan.share[c] = own >= 0 && (own == peer || (mutated(Mutation::kShareWithIdlePeer) && peer < 0));
  }
  return plan;
}

// The experts of a fused_moe cluster's two blocks as a plan lays them out: consecutive blocks of
// the plan's rows, so only the second can lie past them beside a working first one.
void draw_experts(int (&expert)[cl::kClusterCtas]) {
  static constexpr int kLayouts[][cl::kClusterCtas] = {{0, 0}, {0, 1}, {0, -1}, {-1, -1}};
  const auto& layout = kLayouts[rng() % 4];
  expert[0] = layout[0];
  expert[1] = layout[1];
}

// One pipeline configuration on a cluster of 2: gather (fused_moe: A by producer cp.async,
// published kGatherLag stages later) or not (W8A8: A by the copy engine).
template <class Tile, bool kGather>
struct Sim {
  using Pipe = cl::Pipeline<Tile, kGather>;
  static constexpr int S = Pipe::kStages;
  static constexpr int kCtas = cl::kClusterCtas;
  // Producer threads that take part: W8A8 thread 0 alone; gathered A the whole warpgroup
  // (thread 0 also issues B's tensor copies).
  static constexpr int kProducers = kGather ? cl::kWarpgroupThreads : 1;
  // Regions of a stage: B's two halves, then A (by the copy engine; gathered: the chunks of
  // each producer thread, which publishes them on its own).
  static constexpr int kB0 = 0, kAFirst = kCtas, kRegions = kAFirst + kProducers;
  static int a_region(int thread) { return kAFirst + thread; }

  struct Copy {  // a tensor copy in flight (multicast: one per destination)
    int issuer, cta, stage, region, iter;
    int64_t bytes;
    double speed;
  };

  // A producer thread's program: the kernel's producer loop, as a list of steps.
  enum POp { kWaitEmptyIssue, kPublish };
  struct PStep {
    POp op;
    int iter;
    int groups_left;  // kPublish: the cp.async.wait_group count before the arrival
  };
  struct ProducerThread {
    size_t pc = 0;
    int issued = 0;              // cp.async groups committed (one per k iteration)
    std::vector<int> in_flight;  // iterations whose group has not landed yet
    double speed = 1, copy_speed = 1;
    // cp.async.wait_group n: every group but the n newest has landed.
    bool landed_all_but(int n) const {
      for (int iter : in_flight)
        if (iter < issued - n) return false;
      return true;
    }
  };

  // A consumer warpgroup: its program as a list of steps, and a cursor.
  enum Op { kWaitFullIssue, kWaitGroup0, kWaitGroup1, kRelease };
  struct Step {
    Op op;
    int iter;
  };
  struct Consumer {
    size_t pc = 0;
    std::vector<int> batches;  // iterations issued and not yet known complete, oldest first
    double speed = 1;
  };

  struct Cta {
    int k_iters = 0;
    bool share = false;
    Mbarrier full[S], empty[S];
    int data[S][kRegions];        // iteration whose data the region holds (-1: none)
    bool published[S][kRegions];  // the data there is visible to the batches that wait for it
    int readers[S];               // batches that may be reading the stage now
    int read_done[S];             // warpgroups done reading the stage's current data
    std::vector<PStep> producer_program;
    std::vector<Step> consumer_program;
    ProducerThread producer[kProducers];
    Consumer consumer[2];
    bool exited = false;
  };

  bool promote;  // fp8's program order
  Cta cta[kCtas];
  std::vector<Copy> in_flight;
  int gatherer_spread = 0;  // the most k iterations one gatherer was ahead of another

  int full_arrivals() const {
    return Pipe::kFullArrivals - (kGather && mutated(Mutation::kFullArrivalsOneShort) ? 1 : 0);
  }
  static uint32_t full_parity(int iter) { return Pipe::full_parity(iter) ^ mutated(Mutation::kFullParityFlipped); }
  static uint32_t empty_parity(int iter) { return Pipe::empty_parity(iter) ^ mutated(Mutation::kEmptyParityFlipped); }
  // Whether producer thread `thread` waits for the release of the stage's previous use.
  static bool waits_for_release(int thread, int iter) {
    return Pipe::producer_waits(iter) && (thread == 0 || !mutated(Mutation::kOnlyThread0WaitsEmpty));
  }

  // The kernel's producer loop (w8a8_wgmma_tma.cu:60-68 / fused_moe_wgmma_tma.cu:76-113): wait
  // for the release, issue; gathered A also publishes kGatherLag iterations back, then every one
  // still unpublished after cp_async_wait<0>.
  static std::vector<PStep> producer_program(int k_iters) {
    const int lag_groups = cl::kGatherLag + (mutated(Mutation::kPublishUnlanded) ? 1 : 0);
    std::vector<PStep> p;
    for (int iter = 0; iter < k_iters; ++iter) {
      p.push_back({kWaitEmptyIssue, iter, 0});
      if (kGather && Pipe::published_after(iter) >= 0) p.push_back({kPublish, Pipe::published_after(iter), lag_groups});
    }
    if (kGather) {
      const int unpublished = mutated(Mutation::kDrainSkipsOne) ? 1 : cl::kGatherLag;
      for (int iter = std::max(0, k_iters - unpublished); iter < k_iters; ++iter) p.push_back({kPublish, iter, 0});
    }
    return p;
  }

  // The consumer warpgroup's loop: k_loop of csrc/quant/w8a8_wgmma_ops.cuh with done = the
  // release of quant/w8a8_wgmma_tma.cu, int8 or fp8 (its issue waits for the full barrier);
  // fused_moe_wgmma_tma.cu's loop is the int8 order. No k iterations: nothing (k_loop returns at
  // once; fused_moe's loop is empty and its last release guarded, fused_moe_wgmma_tma.cu:136).
  std::vector<Step> consumer_program(int k_iters) const {
    static_assert(Tile::kBatchesInFlight == 1, "the kernels' wgmma.wait_group 1");
    std::vector<Step> p;
    if (k_iters == 0) return p;
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

  Sim(const ClusterPlan& plan, bool fp8) : promote(fp8) {
    for (int c = 0; c < kCtas; ++c) {
      Cta& x = cta[c];
      x.k_iters = plan.k_iters[c];
      x.share = plan.share[c];
      for (int s = 0; s < S; ++s) {
        x.full[s].init(full_arrivals());
        x.empty[s].init(cl::empty_arrivals(x.share));
        x.readers[s] = 0;
        x.read_done[s] = 2;
        for (int r = 0; r < kRegions; ++r) x.data[s][r] = -1, x.published[s][r] = false;
      }
      x.producer_program = producer_program(x.k_iters);
      x.consumer_program = consumer_program(x.k_iters);
      for (ProducerThread& t : x.producer) t.speed = draw_speed(), t.copy_speed = draw_speed();
      for (Consumer& w : x.consumer) w.speed = draw_speed();
    }
  }

  // Thread 0's arrive.expect_tx and tensor copies of iteration iter (w8a8_wgmma_tma.cu:63-67,
  // fused_moe_wgmma_tma.cu:80-93).
  void issue_tensor_copies(int c, int iter) {
    const int stage = Tile::stage_of(iter), phase = iter / S;
    const bool share = cta[c].share;
    cta[c].full[stage].expect_tx(Pipe::kStageTxBytes, phase);
    cta[c].full[stage].arrive(phase);
    if (!kGather) in_flight.push_back({c, c, stage, a_region(0), iter, Pipe::kATxBytes, draw_speed()});
    for (int h = 0; h < kCtas; ++h) {
      if (share && h != c) continue;  // the peer multicasts that half
      for (int d = 0; d < kCtas; ++d)
        if (share || d == c) in_flight.push_back({c, d, stage, kB0 + h, iter, Pipe::kBHalfTxBytes, draw_speed()});
    }
  }

  bool producer_ready(int c, int t) const {
    const Cta& x = cta[c];
    const ProducerThread& th = x.producer[t];
    if (th.pc == x.producer_program.size()) return false;
    const PStep& step = x.producer_program[th.pc];
    if (step.op == kPublish) return th.landed_all_but(step.groups_left);
    return !waits_for_release(t, step.iter) ||
           x.empty[Tile::stage_of(step.iter)].try_wait(empty_parity(step.iter), step.iter / S - 1);
  }

  void producer_step(int c, int t) {
    Cta& x = cta[c];
    ProducerThread& th = x.producer[t];
    const PStep step = x.producer_program[th.pc++];
    const int stage = Tile::stage_of(step.iter);
    if (step.op == kWaitEmptyIssue) {
      if (t == 0) issue_tensor_copies(c, step.iter);
      if (kGather) {
        th.in_flight.push_back(step.iter);
        ++th.issued;
        note_gatherer_spread(x);
      }
    } else {  // fence.proxy.async, arrive: publishes what has landed of this thread's chunks
      x.published[stage][a_region(t)] = x.data[stage][a_region(t)] == step.iter;
      x.full[stage].arrive(step.iter / S);
    }
  }

  // How far apart the gatherers of a CTA are (the protocol allows up to kStages: a gatherer
  // issues iteration i >= kStages only after the release of i - kStages, which waits for every
  // gatherer's arrival for i - kStages + 1; the first kStages iterations wait for nothing).
  void note_gatherer_spread(const Cta& x) {
    int lo = x.k_iters, hi = 0;
    for (const ProducerThread& t : x.producer) lo = std::min(lo, t.issued), hi = std::max(hi, t.issued);
    gatherer_spread = std::max(gatherer_spread, hi - lo);
  }

  // Data of iteration iter lands in a region of CTA c's stage.
  void write_region(int c, int stage, int region, int iter) {
    Cta& x = cta[c];
    CHECK(!x.exited);
    CHECK(x.readers[stage] == 0);     // no batch may read it now
    CHECK(x.read_done[stage] == 2);   // both warpgroups read the old data
    CHECK(x.data[stage][region] == (iter >= S ? iter - S : -1));  // its previous use
    x.data[stage][region] = iter;
  }

  void land_tensor_copy(size_t index) {
    const Copy copy = in_flight[index];
    in_flight.erase(in_flight.begin() + std::ptrdiff_t(index));
    write_region(copy.cta, copy.stage, copy.region, copy.iter);
    cta[copy.cta].published[copy.stage][copy.region] = true;  // by its bytes on the full barrier
    cta[copy.cta].full[copy.stage].complete_tx(copy.bytes, copy.iter / S);
  }

  // One of thread t's cp.async groups lands (in any order: nothing orders them but wait_group).
  void land_gathered_chunks(int c, int t) {
    std::vector<int>& groups = cta[c].producer[t].in_flight;
    const size_t pick = rng() % groups.size();
    const int iter = groups[pick];
    groups.erase(groups.begin() + std::ptrdiff_t(pick));
    write_region(c, Tile::stage_of(iter), a_region(t), iter);
    cta[c].published[Tile::stage_of(iter)][a_region(t)] = false;  // until its thread arrives
  }

  void finish_batches(int c, Consumer& w, size_t keep) {
    while (w.batches.size() > keep) {
      const int stage = Tile::stage_of(w.batches.front());
      --cta[c].readers[stage];
      ++cta[c].read_done[stage];
      w.batches.erase(w.batches.begin());
    }
  }

  bool consumer_ready(int c, int g) const {
    const Cta& x = cta[c];
    const Consumer& w = x.consumer[g];
    if (w.pc == x.consumer_program.size()) return false;
    const Step& step = x.consumer_program[w.pc];
    if (step.op != kWaitFullIssue) return true;
    return x.full[Tile::stage_of(step.iter)].try_wait(full_parity(step.iter), step.iter / S);
  }

  // Iteration iter's stage back to the producers that write it: one arrival per consumer warp on
  // this CTA's empty barrier and, sharing B, on the peer's.
  void release(int c, int iter) {
    if (!Pipe::consumer_releases(iter, cta[c].k_iters) && !mutated(Mutation::kReleaseEveryStage)) return;
    for (int warp = 0; warp < cl::kConsumerWarps / cl::kConsumerWarpgroups; ++warp)
      for (int d = 0; d < kCtas; ++d)
        if (d == c || cta[c].share) cta[d].empty[Tile::stage_of(iter)].arrive(iter / S);
  }

  void consumer_step(int c, int g) {
    Cta& x = cta[c];
    Consumer& w = x.consumer[g];
    const Step step = x.consumer_program[w.pc++];
    const int stage = Tile::stage_of(step.iter);
    switch (step.op) {
      case kWaitFullIssue:
        for (int r = 0; r < kRegions; ++r) CHECK(x.data[stage][r] == step.iter && x.published[stage][r]);
        ++x.readers[stage];
        // The first warpgroup to read the stage's new data starts its count.
        if (x.read_done[stage] == 2) x.read_done[stage] = 0;
        w.batches.push_back(step.iter);
        break;
      case kWaitGroup1:
        finish_batches(c, w, 1);
        break;
      case kWaitGroup0:
        finish_batches(c, w, 0);
        break;
      case kRelease:
        for (int b : w.batches) CHECK(b != step.iter);  // released only once its batch is done
        release(c, step.iter);
        break;
    }
  }

  bool threads_done(int c) const {
    const Cta& x = cta[c];
    for (const ProducerThread& t : x.producer)
      if (t.pc != x.producer_program.size()) return false;
    for (const Consumer& w : x.consumer)
      if (w.pc != x.consumer_program.size()) return false;
    return true;
  }

  // A CTA leaves its shared memory and barriers behind: nothing may still reach them, and no
  // copy it issued may still be on its way (the PTX ISA promises nothing about the bulk copies
  // of a CTA that has left).
  void exit_cta(int c) {
    Cta& x = cta[c];
    for (const Copy& copy : in_flight) CHECK(copy.issuer != c && copy.cta != c);
    for (const ProducerThread& t : x.producer) CHECK(t.in_flight.empty());
    x.exited = true;
    for (int s = 0; s < S; ++s) x.full[s].freed = x.empty[s].freed = true;
  }

  // cluster_sync, the last statement of every thread (w8a8_wgmma_tma.cu:70 and :93,
  // fused_moe_wgmma_tma.cu:114 and :141): a CTA exits once all threads of both CTAs reached it.
  void exit_finished_ctas() {
    const bool done[kCtas] = {threads_done(0), threads_done(1)};
    for (int c = 0; c < kCtas; ++c)
      if (!cta[c].exited && done[c] && (done[c ^ 1] || mutated(Mutation::kNoClusterSync))) exit_cta(c);
  }

  // An agent that can take a step now: a producer thread, a thread's cp.async groups, a consumer
  // warpgroup or a tensor copy (index: into in_flight).
  enum Kind { kProducerThread, kGatheredChunks, kConsumerWarpgroup, kTensorCopy };
  struct Agent {
    Kind kind;
    int cta, index;
    double speed;
  };

  void collect_ready(std::vector<Agent>& ready) const {
    ready.clear();
    for (int c = 0; c < kCtas; ++c) {
      for (int t = 0; t < kProducers; ++t) {
        const ProducerThread& th = cta[c].producer[t];
        if (producer_ready(c, t)) ready.push_back({kProducerThread, c, t, th.speed});
        if (!th.in_flight.empty()) ready.push_back({kGatheredChunks, c, t, th.copy_speed});
      }
      for (int g = 0; g < 2; ++g)
        if (consumer_ready(c, g)) ready.push_back({kConsumerWarpgroup, c, g, cta[c].consumer[g].speed});
    }
    for (size_t i = 0; i < in_flight.size(); ++i)
      ready.push_back({kTensorCopy, in_flight[i].cta, int(i), in_flight[i].speed});
  }

  // One of them, chosen with probability proportional to its speed.
  static const Agent& pick(const std::vector<Agent>& ready) {
    double total = 0;
    for (const Agent& a : ready) total += a.speed;
    double x = std::uniform_real_distribution<double>(0, total)(rng);
    for (const Agent& a : ready) {
      x -= a.speed;
      if (x < 0) return a;
    }
    return ready.back();
  }

  void step(const Agent& a) {
    switch (a.kind) {
      case kProducerThread:
        producer_step(a.cta, a.index);
        break;
      case kGatheredChunks:
        land_gathered_chunks(a.cta, a.index);
        break;
      case kConsumerWarpgroup:
        consumer_step(a.cta, a.index);
        break;
      case kTensorCopy:
        land_tensor_copy(size_t(a.index));
        break;
    }
  }

  void run() {
    std::vector<Agent> ready;
    for (long steps = 0;; ++steps) {
      CHECK(steps < 10000000);
      exit_finished_ctas();
      if (cta[0].exited && cta[1].exited) break;
      collect_ready(ready);
      CHECK(!ready.empty());  // else: deadlock
      step(pick(ready));
    }
    check_phase_counts();
  }

  // Every barrier completed exactly the phases the protocol implies: full once per use of the
  // stage, empty once per refill (a release nobody waits for could reach an exited peer).
  void check_phase_counts() const {
    for (int c = 0; c < kCtas; ++c)
      for (int s = 0; s < S; ++s) {
        const Cta& x = cta[c];
        int uses = 0, releases = 0;
        for (int iter = s; iter < x.k_iters; iter += S) {
          ++uses;
          releases += iter + S < x.k_iters;
        }
        CHECK(x.full[s].completed == uses && x.full[s].tx == 0 && x.full[s].pending == full_arrivals());
        CHECK(x.empty[s].completed == releases && x.empty[s].pending == cl::empty_arrivals(x.share));
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

// Selects the mutation of this name; false if there is none.
bool select_mutation(const char* name) {
  for (int m = 0; m < int(Mutation::kCount); ++m)
    if (strcmp(name, kMutationNames[m]) == 0) {
      mutation = Mutation(m);
      return true;
    }
  return false;
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 100;
  rng.seed(argc > 2 ? strtoull(argv[2], nullptr, 10) : 1);
  if (argc > 3 && strcmp(argv[3], "list") == 0) {
    for (int m = 1; m < int(Mutation::kCount); ++m) printf("%s\n", kMutationNames[m]);
    return 0;
  }
  if (argc > 3 && !select_mutation(argv[3])) {
    fprintf(stderr, "unknown mutation %s\n", argv[3]);
    return 2;
  }
  using Int8Tile = wg::WgmmaTile<256, false>;
  using Fp8Tile = wg::WgmmaTile<128, true>;
  check_layout<Int8Tile>();
  check_layout<Fp8Tile>();
  int gatherer_spread = 0;
  for (int i = 0; i < cases; ++i) {
    const int k_iters = 1 + int(rng() % 24);
    const ClusterPlan w8a8 = w8a8_cluster(k_iters, rng() % 2 == 0);
    Sim<Int8Tile, false>(w8a8, false).run();  // W8A8 int8
    Sim<Fp8Tile, false>(w8a8, true).run();    // W8A8 e4m3
    int experts[cl::kClusterCtas];
    draw_experts(experts);
    Sim<Int8Tile, true> moe(gathered_cluster(k_iters, experts), false);  // fused_moe (bf16: the same tile)
    moe.run();
    gatherer_spread = std::max(gatherer_spread, moe.gatherer_spread);
    check_cluster_tiles(1 + int64_t(rng() % 40), 1 + int64_t(rng() % 40), 1 + int64_t(rng() % 6));
  }
  printf("all ok (gatherers of a CTA up to %d k iterations apart)\n", gatherer_spread);
  return 0;
}
