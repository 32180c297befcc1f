// Pieces shared by the CUDA-kernel simulators in tests/cpp: the CHECK macro, a model of shared
// memory with the cp.async / barrier ordering rules of a multi-stage pipeline, and the CTA walk and
// main loop of the tiled GEMM kernels.
#pragma once

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#define CHECK(c)                                                              \
  do {                                                                        \
    if (!(c)) {                                                               \
      fprintf(stderr, "CHECK failed %s:%d: %s\n", __FILE__, __LINE__, #c);    \
      abort();                                                                \
    }                                                                         \
  } while (0)

// Shared memory with the pipeline's ordering rules: every byte remembers the barrier epoch and
// cp.async group of its last write and the epoch of its last read.
struct Smem {
  static constexpr int kNever = INT_MIN;
  std::vector<uint8_t> data;
  std::vector<int> write_epoch, write_group, read_epoch;
  int epoch = -1, committed = 0, complete = 0;
  void reset(size_t bytes) {
    data.assign(bytes, 0xCD);
    write_epoch.assign(bytes, kNever);
    write_group.assign(bytes, -1);
    read_epoch.assign(bytes, kNever);
    epoch = -1;
    committed = complete = 0;
  }
  // A write (async = cp.async of the group being built) must not race a read of this epoch.
  void write(size_t offset, const uint8_t* src, int bytes, bool async) {
    CHECK(offset + bytes <= data.size());
    for (int b = 0; b < bytes; ++b) {
      CHECK(read_epoch[offset + b] < epoch);
      data[offset + b] = src[b];
      write_epoch[offset + b] = epoch;
      write_group[offset + b] = async ? committed : -1;
    }
  }
  // False for bytes never written (garbage); written bytes must have landed and been published by
  // a barrier since.
  bool read(size_t offset, void* dst, int bytes) {
    CHECK(offset + bytes <= data.size());
    bool written = true;
    for (int b = 0; b < bytes; ++b) {
      if (write_epoch[offset + b] == kNever) {
        written = false;
        continue;
      }
      CHECK(write_epoch[offset + b] < epoch);
      CHECK(write_group[offset + b] < complete);
      read_epoch[offset + b] = epoch;
    }
    memcpy(dst, &data[offset], bytes);
    return written;
  }
  uint32_t read_u32(size_t offset) {
    uint32_t v;
    CHECK(read(offset, &v, 4));
    return v;
  }
  void commit() { ++committed; }
  void wait(int pending) { complete = std::max(complete, committed - pending); }
  void barrier() { ++epoch; }
};

// A CTA order tile_of(pid, m_blocks, n_blocks) -> {mb, nb} is a bijection of [0, m_blocks
// n_blocks) onto the tiles, on 20 random grids of up to 70 x 70 blocks (rnd(lo, hi): the
// simulator's generator).
template <class TileOf, class Rnd>
void check_tile_order(const TileOf& tile_of, const Rnd& rnd) {
  for (int it = 0; it < 20; ++it) {
    const int64_t mb = rnd(1, 70), nb = rnd(1, 70);
    std::vector<int> seen(size_t(mb * nb), 0);
    for (int64_t pid = 0; pid < mb * nb; ++pid) {
      const auto t = tile_of(pid, mb, nb);
      CHECK(t.mb >= 0 && t.mb < mb && t.nb >= 0 && t.nb < nb);
      ++seen[size_t(t.mb * nb + t.nb)];
    }
    for (int s : seen) CHECK(s == 1);
  }
}

// Zeroes every element of a (nested) array: accumulator fragments.
template <typename T, size_t N>
void zero_all(T (&a)[N]) {
  for (auto& x : a) {
    if constexpr (std::is_array_v<T>)
      zero_all(x);
    else
      x = T(0);
  }
}

// The CTA walk of a tiled GEMM kernel: CTA pid of the m_blocks x n_blocks grid computes tile
// tile_of(pid, m_blocks, n_blocks) (in range, every tile exactly once); cta(tile) simulates it.
template <class TileOf, class Cta>
void walk_ctas(int64_t m_blocks, int64_t n_blocks, const TileOf& tile_of, const Cta& cta) {
  std::vector<int> tile_seen(size_t(m_blocks * n_blocks), 0);
  for (int64_t pid = 0; pid < m_blocks * n_blocks; ++pid) {
    const auto tile = tile_of(pid, m_blocks, n_blocks);
    CHECK(tile.mb >= 0 && tile.mb < m_blocks && tile.nb >= 0 && tile.nb < n_blocks);
    ++tile_seen[size_t(tile.mb * n_blocks + tile.nb)];
    cta(tile);
  }
  for (int c : tile_seen) CHECK(c == 1);
}

// The main loop of the multi-stage cp.async GEMM kernels as every thread issues it: stages - 1
// k-iterations in flight; load_stage(slot, iter) issues iteration iter's copies into stage slot,
// compute_stage(slot) its mma. Ends with every group complete.
template <class Load, class Compute>
void run_pipeline(Smem& smem, int stages, int k_iters, const Load& load_stage, const Compute& compute_stage) {
  for (int s = 0; s < stages - 1; ++s) {
    if (s < k_iters) load_stage(s, s);
    smem.commit();
  }
  for (int it = 0; it < k_iters; ++it) {
    smem.wait(stages - 2);
    smem.barrier();
    const int next = it + stages - 1;
    if (next < k_iters) load_stage(next % stages, next);
    smem.commit();
    compute_stage(it % stages);
  }
  smem.wait(0);
}

// The k loop of the Hopper GEMMs on common/cuda/wgmma_ring.cuh without promotion, as every thread
// issues it: Tile::kLoadAhead stages of copies ahead; per iteration wait for its copies, barrier,
// refill, commit, then batch(iter, stage) reads the stage (its wgmma batch) and a wgmma wait leaves
// only that batch in flight. A slot may be refilled only once the batch that last read it is
// complete. load_stage(iter) issues iteration iter's copies.
template <class Tile, class Load, class Batch>
void run_wgmma_ring(Smem& smem, int k_iters, const Load& load_stage, const Batch& batch) {
  std::vector<int> slot_reader(Tile::kStages, -1);  // the iteration whose batch last read a slot
  int complete = -1;                                // every batch up to this iteration is done
  const auto load = [&](int iter) {
    CHECK(slot_reader[size_t(Tile::stage_of(iter))] <= complete);
    load_stage(iter);
  };
  for (int s = 0; s < Tile::kLoadAhead; ++s) {
    if (s < k_iters) load(s);
    smem.commit();
  }
  for (int iter = 0; iter < k_iters; ++iter) {
    smem.wait(Tile::kLoadAhead - 1);
    smem.barrier();
    if (Tile::refill_iter(iter) < k_iters) load(Tile::refill_iter(iter));
    smem.commit();
    batch(iter, Tile::stage_of(iter));
    slot_reader[size_t(Tile::stage_of(iter))] = iter;
    complete = iter - Tile::kBatchesInFlight;  // the kernels' wgmma.wait_group (its constant)
  }
  smem.wait(0);
}
