// CPU simulation of the CUDA weight-only linear kernels (csrc/quant/weight_only_cuda.cu).
//
// No GPU here or in CI, so this program runs the kernels' logic on the CPU with the very
// host-device functions they call (csrc/quant/weight_only_cuda_index.h) and checks them against
// independent definitions (the PTX fragment layouts, the packed layout's tile_row / tile_col, a
// double reference):
//  (a) register dequantization: every lane of a warp dequantizes random packed tiles through
//      dequantize_a; the A fragments, assembled by the PTX mma.m16n8k16 A layout, must equal
//      (q - zero) * scale rounded once to fp16 / bf16, bit for bit (4- and 8-bit, random scales
//      including subnormal and huge ones);
//  (b) linear_kernel thread by thread on random small problems (odd M, N, K, partial last group,
//      both tile configs, split counts from 1 to dozens, unaligned x / scales, no workspace):
//      every cp.async / synchronous copy (bounds, alignment, zero fill, which bytes it reads), a
//      shared-memory model that checks each read against the pipeline's commit / wait /
//      barrier order (and poisons never-written bytes with NaN), ldmatrix and a float model of
//      mma.m16n8k16 assembled from the PTX fragment maps, the epilogue, the split-K partials and
//      the reduce kernel. y must equal the exactly rounded reference, every output written once;
//  (c) dequantize_kernel's maps (inverse tile map, groups, tails), and the split rule's
//      invariants on random and on the benchmark shapes;
//  (d) the Hopper batch GEMM's wgmma operands (x through its descriptors, A and D fragments).
// When a kernel's structure changes, its mirror here changes with it.
// Usage: weight_only_cuda_sim CASES SEED   (run by tests/test_cuda_index_sim.py)
#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "quant/weight_only_cuda_index.h"
#include "mma_spec.h"
#include "sim_common.h"

using namespace torch_ext;
namespace wq = torch_ext::quant;
namespace ix = torch_ext::quant::wo_cuda;


std::mt19937_64 rng;
int64_t rnd(int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); }

// ---------------------------------------------------------------------------------------------
// Independent definitions: PTX ISA "Matrix Fragments for mma.m16n8k16" (f16/bf16), mma_spec.h.
// ---------------------------------------------------------------------------------------------
using spec = mma_spec::M16n8k16;

template <typename T>
uint16_t round_bits(double v) {  // v must be exact in float (the callers' products are)
  CHECK(double(float(v)) == v || std::isinf(float(v)));
  if constexpr (std::is_same_v<T, Half>) {
    return to_half(float(v)).bits;
  } else {
    return to_bfloat16(float(v)).bits;
  }
}
template <typename T>
double value_of(uint16_t bits) {
  if constexpr (std::is_same_v<T, Half>) {
    return to_float(Half{bits});
  } else {
    return to_float(BFloat16{bits});
  }
}
template <typename T>
uint16_t nan_bits() {
  return std::is_same_v<T, Half> ? 0x7E00 : 0x7FC0;
}

// Packs q [n][k] (row-major, values < 2^bits) into [tiles_n][tiles_k][words] with the layout maps;
// padding positions get random values (kernels must not rely on them).
std::vector<uint32_t> pack(const std::vector<int>& q, int64_t n, int64_t k, int bits) {
  const int64_t nt = wq::tiles_for(n), kt = wq::tiles_for(k), words = wq::words_per_tile(bits);
  std::vector<uint32_t> out(nt * kt * words, 0);
  for (int64_t a = 0; a < nt; ++a)
    for (int64_t b = 0; b < kt; ++b)
      for (int w = 0; w < words; ++w)
        for (int s = 0; s < wq::values_per_word(bits); ++s) {
          const int64_t row = 16 * a + wq::tile_row(bits, w, s), col = 16 * b + wq::tile_col(bits, w, s);
          const uint32_t v = row < n && col < k ? uint32_t(q[row * k + col]) : uint32_t(rnd(0, (1 << bits) - 1));
          out[wq::tile_offset_words(bits, kt, a, b) + w] |= v << (bits * s);
        }
  return out;
}

// ---------------------------------------------------------------------------------------------
// (a) Register dequantization
// ---------------------------------------------------------------------------------------------
template <typename T>
uint16_t random_scale_bits() {
  for (;;) {
    uint16_t bits = uint16_t(rnd(0, 65535));
    const int kind = int(rnd(0, 9));
    if (kind == 0) bits &= 0x83FF;  // fp16 subnormal / bf16 tiny-exponent region
    const double v = value_of<T>(bits);
    if (std::isfinite(v)) return bits;
  }
}

template <typename T, int kBits>
void check_dequantize_tile() {
  int q[16][16];
  uint16_t scale[16], zero[16];
  const bool symmetric = rnd(0, 3) == 0;
  for (int r = 0; r < 16; ++r) {
    for (int c = 0; c < 16; ++c) q[r][c] = int(rnd(0, (1 << kBits) - 1));
    scale[r] = random_scale_bits<T>();
    zero[r] = symmetric ? ix::symmetric_zero_bits<T>(kBits) : round_bits<T>(double(rnd(0, (1 << kBits) - 1)));
  }
  std::vector<int> flat(256);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) flat[r * 16 + c] = q[r][c];
  const std::vector<uint32_t> tile = pack(flat, 16, 16, kBits);
  int seen[16][16] = {};
  for (int lane = 0; lane < 32; ++lane) {
    uint32_t words[kBits / 4];
    for (int h = 0; h < kBits / 4; ++h) words[h] = tile[lane + 32 * h];
    const uint16_t s[2] = {scale[ix::lane_row(lane, 0)], scale[ix::lane_row(lane, 1)]};
    const uint16_t z[2] = {zero[ix::lane_row(lane, 0)], zero[ix::lane_row(lane, 1)]};
    const ix::GroupParams<T, kBits> params = ix::make_group_params<T, kBits>(s, z);
    uint32_t a[4];
    ix::dequantize_a<T, kBits>(words, params, a);
    for (int e = 0; e < 8; ++e) {
      const int r = spec::a_row(lane, e), c = spec::a_col(lane, e);
      ++seen[r][c];
      const uint16_t got = uint16_t(a[e / 2] >> (16 * (e % 2)));
      const double exact = double(q[r][c] - int(value_of<T>(zero[r]))) * value_of<T>(scale[r]);
      const uint16_t want = round_bits<T>(exact);
      if (got != want) {
        fprintf(stderr, "dequantize %s %d-bit lane %d e %d (r %d c %d): q %d zero %g scale %a: got 0x%04x want 0x%04x\n",
                std::is_same_v<T, Half> ? "fp16" : "bf16", kBits, lane, e, r, c, q[r][c], value_of<T>(zero[r]),
                value_of<T>(scale[r]), got, want);
        abort();
      }
    }
  }
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) CHECK(seen[r][c] == 1);
}

void check_register_helpers() {
  // PRMT semantics (CUDA __byte_perm): bytes 0-3 from a, 4-7 from b, selector nibble i picks byte i.
  CHECK(ix::byte_perm(0x03020100u, 0x07060504u, 0x7531u) == 0x07050301u);
  CHECK(ix::byte_perm(0x03020100u, 0x07060504u, 0x4240u) == 0x04020400u);
  for (int it = 0; it < 1000; ++it) {
    const uint32_t w = uint32_t(rng());
    for (int h = 0; h < 2; ++h) {
      CHECK(ix::byte_perm(w, 0x64646464u, ix::prmt_pair_selector(h)) == (((w >> (8 * h)) & 0x00FF00FFu) | 0x64006400u));
      for (int col = 0; col < 2; ++col)
        CHECK(ix::byte_perm(w, ix::kF32Magic >> 16, ix::prmt_f32_selector(h + 2 * col)) ==
              (((w >> (8 * (h + 2 * col))) & 0xFFu) | ix::kF32Magic));
    }
    const uint32_t m = uint32_t(rng()), b = uint32_t(rng());
    CHECK(ix::and_or(w, m, b) == ((w & m) | b));
  }
  // The exponent tricks: base + q exactly, for every q of the route.
  for (int q = 0; q < 256; ++q) {
    CHECK(value_of<Half>(uint16_t(ix::magic_bits<Half>() | q)) == 1024.0 + q);
    if (q < 16) CHECK(value_of<BFloat16>(uint16_t(ix::magic_bits<BFloat16>() | q)) == 128.0 + q);
    CHECK(double(ix::bits_to_f32(ix::kF32Magic | uint32_t(q))) == 8388608.0 + q);
  }
  CHECK(value_of<Half>(ix::symmetric_zero_bits<Half>(4)) == 8 && value_of<Half>(ix::symmetric_zero_bits<Half>(8)) == 128);
  CHECK(value_of<BFloat16>(ix::symmetric_zero_bits<BFloat16>(4)) == 8 &&
        value_of<BFloat16>(ix::symmetric_zero_bits<BFloat16>(8)) == 128);
}

// ---------------------------------------------------------------------------------------------
// (b) linear_kernel
// ---------------------------------------------------------------------------------------------
struct Problem {
  int bits;
  int64_t m, n, k, group;
  bool has_zeros, has_bias;
  std::vector<int> q;              // [n][k]
  std::vector<uint32_t> qweight;   // packed
  std::vector<uint16_t> scales;    // buffer; [groups][n] starts at scale_off
  std::vector<uint16_t> zeros;     // buffer; starts at scale_off
  int64_t scale_off;
  std::vector<uint16_t> x;         // buffer; (m, k) at x_off + m * x_stride + k
  int64_t x_off, x_stride;
  std::vector<uint16_t> bias;
  int64_t y_off, y_stride;
  int num_sms;
  bool allow_split;
  int64_t forced_splits;  // TORCH_EXT_WO_SPLITS (0: the cost rule)
  // Row experts (fused_moe_quantized): q, qweight, scales and zeros hold `experts` stacked
  // weights (q_words packed words, s_elems scales each). expert_rows = ix::kRowPerBlock (decode):
  // y row r uses expert row_experts[r] and x row r / divisor; 16 or 64 (grouped rows): y row r
  // uses the expert of its block's first row, none (zeros) where that is -1; x has x_rows rows.
  int64_t expert_rows = ix::kNoExperts;
  int64_t experts = 1, divisor = 1, x_rows = 0, q_words = 0, s_elems = 0;
  std::vector<int32_t> row_experts;
  bool row_mode() const { return expert_rows == ix::kRowPerBlock; }
};

// -1: the row belongs to an idle block (its y is the bias alone).
int64_t expert_of(const Problem& p, int64_t m) {
  if (p.expert_rows == ix::kNoExperts) return 0;
  return p.row_experts[size_t(m / p.expert_rows * p.expert_rows)];
}
int64_t x_row_of(const Problem& p, int64_t m) { return p.row_mode() ? m / p.divisor : m; }

int64_t groups_of(const Problem& p) { return ix::ceil_div(p.k, p.group); }


template <typename T, int kBits, int kBlockM>
void sim_linear(const Problem& p, std::vector<uint16_t>& y, std::vector<int>& y_count, int* splits_used) {
  using Cfg = ix::TileConfig<kBits, kBlockM>;
  using Params = ix::GroupParams<T, kBits>;
  constexpr int kStages = Cfg::kStages, kTileWords = Cfg::kTileWords, kBlocks = Cfg::kTokenBlocks;
  constexpr int kStageTiles = Cfg::kStageTiles;
  static_assert(Cfg::kSmemBytes <= ix::kSmemBudget, "budget");
  // make_linear_args
  const ix::LinearPlan plan =
      ix::plan_linear(p.m, p.n, p.k, p.bits, p.num_sms, p.allow_split, p.forced_splits, p.expert_rows);
  if (p.row_mode()) CHECK(plan.m_blocks == p.m);
  if (p.expert_rows > 1) CHECK(plan.block_m == p.expert_rows && plan.m_blocks * p.expert_rows == p.m);
  CHECK(plan.block_m == kBlockM && plan.stage_tiles == kStageTiles);
  *splits_used = int(plan.splits);
  const int M = int(p.m), N = int(p.n), K = int(p.k);
  const int n_tiles = int(wq::tiles_for(p.n)), k_tiles = int(plan.k_tiles);
  const int group_tiles = ix::group_tiles_for(p.group, plan.k_tiles);
  const bool x_vector = ix::x_vectorizable(uint64_t(p.x_off) * 2, p.x_stride, 2);
  const bool scale_vector =
      ix::scales_vectorizable(p.n, uint64_t(p.scale_off) * 2, p.has_zeros ? uint64_t(p.scale_off) * 2 : 0);
  std::vector<float> partial(plan.splits > 1 ? plan.splits * p.m * p.n : 0, NAN);
  CHECK(int64_t(partial.size()) * 4 == ix::partial_bytes(plan, p.m, p.n));

  Smem smem;
  static Params params[ix::kWarps][32][ix::kWarpTiles];
  static double acc[ix::kWarps][32][ix::kWarpTiles][kBlocks][4];
  for (int64_t bz = 0; bz < plan.splits; ++bz)
    for (int64_t by = 0; by < plan.n_blocks; ++by)
      for (int64_t bx = 0; bx < plan.m_blocks; ++bx) {
        smem.reset(Cfg::kSmemBytes);
        const ix::BlockRows rows = ix::block_rows(int(bx), kBlockM, p.m, p.row_mode(), p.divisor);
        const int m0 = rows.m0, m_end = rows.m_end;
        if (p.row_mode()) {
          CHECK(m0 == int(bx) && m_end == m0 + 1 && rows.x_row0 == x_row_of(p, m0) && rows.x_row0 < p.x_rows);
        } else {
          CHECK(m0 == int(bx) * kBlockM && m_end == M && rows.x_row0 == m0);
        }
        // as the kernel: the expert id read at m0 (only there), an idle block's k loop skipped
        const int32_t expert_id = p.expert_rows != ix::kNoExperts ? p.row_experts[size_t(m0)] : 0;
        const bool idle = ix::block_is_idle(expert_id);
        CHECK(idle == (expert_of(p, m0) < 0));
        const int64_t expert = idle ? 0 : expert_id;
        const int64_t q_base = expert * p.q_words, s_base = expert * p.s_elems;
        const int64_t q_end = p.expert_rows != ix::kNoExperts ? q_base + p.q_words : int64_t(p.qweight.size());
        const int tile_row0 = int(by) * ix::kBlockTiles;
        const int n0 = tile_row0 * ix::kTileRows;
        ix::SplitRange range = ix::split_range(int(bz), int(plan.iters_per_split), int(plan.k_iters), k_tiles, kStageTiles);
        CHECK(range.iters >= (k_tiles > 0 ? 1 : 0));
        if (idle) range.iters = 0;

        // the walkers against the plain definition of a stage's span
        const auto check_span = [&](const ix::StageSpan& span, int iter) {
          CHECK(span.kt0 == iter * kStageTiles && span.kt_stop == std::min(span.kt0 + kStageTiles, range.kt_end));
          CHECK(span.kt0 < span.kt_stop && span.groups >= 1 && span.groups <= Cfg::kSlots);
          CHECK(span.first_group == span.kt0 * 16 / p.group);
          CHECK(span.first_group + span.groups - 1 == (span.kt_stop * 16 - 1) / p.group);
        };
        ix::StageWalker load_walker = ix::stage_walker(range.iter_begin, kStageTiles, group_tiles);
        const auto load_stage = [&](int stage, int iter) {
          const size_t base = size_t(stage) * Cfg::kStageBytes;
          const ix::StageSpan span = ix::next_stage(load_walker, iter, kStageTiles, range.kt_end, group_tiles);
          check_span(span, iter);
          for (int tid = 0; tid < ix::kThreads; ++tid) {
            // weights
            const int q_row = ix::q_chunk_row<Cfg>(tid);
            const int q_tile = ix::q_chunk_tile<Cfg>(tid);
            const int64_t q_pass_words = int64_t(Cfg::kQRowsPerPass) * k_tiles * kTileWords;
            const int64_t q_src = q_base + (tile_row0 + q_row < n_tiles ? wq::tile_offset_words(kBits, k_tiles, tile_row0 + q_row, 0) +
                                                                                ix::q_chunk_word<Cfg>(tid)
                                                                          : 0);
            for (int i = 0; i < Cfg::kQChunksPerThread; ++i) {
              const int id = tid + i * ix::kThreads;
              CHECK(ix::q_chunk_row<Cfg>(id) == q_row + i * Cfg::kQRowsPerPass && ix::q_chunk_tile<Cfg>(id) == q_tile &&
                    ix::q_chunk_word<Cfg>(id) == ix::q_chunk_word<Cfg>(tid));
              const bool ok = ix::q_chunk_valid(tile_row0 + q_row + i * Cfg::kQRowsPerPass, n_tiles, span.kt0 + q_tile, span.kt_stop);
              uint32_t chunk[4] = {0, 0, 0, 0};
              if (ok) {
                const int64_t src = q_src + i * q_pass_words + int64_t(span.kt0) * kTileWords;
                CHECK(src % 4 == 0 && src >= q_base && src + 4 <= q_end);  // inside this row's expert
                // the chunk is part of tile (row, kt0 + q_tile) of the weight
                const int64_t tile_base =
                    q_base + wq::tile_offset_words(kBits, k_tiles, tile_row0 + ix::q_chunk_row<Cfg>(id), span.kt0 + q_tile);
                CHECK(src >= tile_base && src + 4 <= tile_base + kTileWords);
                memcpy(chunk, &p.qweight[src], 16);
              }
              smem.write(base + 16 * size_t(id), reinterpret_cast<uint8_t*>(chunk), 16, true);
              // the shared word of a lane matches the global word of its tile
              const int row = ix::q_chunk_row<Cfg>(id), word0 = ix::q_chunk_word<Cfg>(id) % kTileWords;
              CHECK(ix::q_smem_word<Cfg>(row, q_tile, word0) == 4 * id);
            }
            // x
            const int x_row = ix::x_chunk_row<Cfg>(tid), x_col = ix::x_chunk_col<Cfg>(tid);
            const int x_dst = ix::x_smem_offset<Cfg>(x_row, x_col);
            const int64_t x_pass_stride = int64_t(Cfg::kXRowsPerPass) * p.x_stride;
            const int64_t x_src =
                p.x_off + (m0 + x_row < m_end ? (rows.x_row0 + x_row) * p.x_stride + x_col * ix::kChunkValues : 0);
            const int k = span.kt0 * ix::kMmaK + x_col * ix::kChunkValues;
            const int bytes = ix::x_chunk_bytes(k, std::min(K, span.kt_stop * ix::kMmaK));
            for (int i = 0; i < Cfg::kXChunksPerThread; ++i) {
              const int row = x_row + i * Cfg::kXRowsPerPass;
              if (row >= kBlockM || !ix::x_row_exists(m0, row, m_end)) continue;
              const int id = tid + i * ix::kThreads;
              CHECK(id < Cfg::kXChunks && ix::x_chunk_row<Cfg>(id) == row && ix::x_chunk_col<Cfg>(id) == x_col);
              const int dst = x_dst + i * Cfg::kXRowsPerPass * Cfg::kBlockK;
              CHECK(dst == ix::x_smem_offset<Cfg>(row, x_col));
              const int64_t src = x_src + i * x_pass_stride + span.kt0 * ix::kMmaK;
              CHECK(src == p.x_off + (rows.x_row0 + row) * p.x_stride + k && rows.x_row0 + row < p.x_rows);
              uint16_t chunk[8] = {0, 0, 0, 0, 0, 0, 0, 0};
              CHECK(bytes % 2 == 0 && bytes >= 0 && bytes <= 16);
              if (x_vector && bytes > 0) CHECK((src * 2) % 16 == 0);  // cp.async source alignment
              for (int e = 0; e < bytes / 2; ++e) {
                CHECK(k + e < K && m0 + row < m_end);  // never read past K or the CTA's rows
                chunk[e] = p.x[src + e];
              }
              CHECK(dst % 8 == 0);
              smem.write(base + Cfg::kXOffset + 2 * size_t(dst), reinterpret_cast<uint8_t*>(chunk), 16, x_vector);
            }
            // scales and zero points
            const int tensors = p.has_zeros ? 2 : 1;
            const int scale_chunks = span.groups * Cfg::kSlotChunks * tensors;
            CHECK(scale_chunks <= 2 * ix::kThreads);
            for (int id = tid; id < scale_chunks; id += ix::kThreads) {
              const ix::ScaleChunk c = ix::scale_chunk(id, span.groups);
              CHECK(c.slot < span.groups && c.tensor < tensors);
              const std::vector<uint16_t>& source = c.tensor == 0 ? p.scales : p.zeros;
              const size_t dst = base + (c.tensor == 0 ? Cfg::kScaleOffset : Cfg::kZeroOffset) +
                                 2 * size_t(ix::scale_smem_index(c.slot, c.chunk * ix::kChunkValues));
              const int n = n0 + c.chunk * ix::kChunkValues;
              const int64_t src = p.scale_off + s_base + ix::scale_offset(span.first_group + c.slot, n, p.n);
              const int count = scale_vector ? (n < N ? 8 : 0) : std::max(0, std::min(ix::kChunkValues, N - n));
              if (scale_vector && count > 0) CHECK((src * 2) % 16 == 0);
              uint16_t chunk[8] = {0, 0, 0, 0, 0, 0, 0, 0};
              for (int e = 0; e < count; ++e) {
                CHECK(n + e < N && span.first_group + c.slot < groups_of(p));
                chunk[e] = source[src + e];
              }
              smem.write(dst, reinterpret_cast<uint8_t*>(chunk), 16, scale_vector);
            }
          }
        };

        // accumulators, warp state
        for (auto& w : acc)
          for (auto& l : w)
            for (auto& i : l)
              for (auto& j : i)
                for (double& e : j) e = 0;
        const int active_blocks = ix::active_token_blocks(m_end, m0, kBlockM);
        const int active_pairs = (active_blocks + 1) / 2;
        CHECK(active_blocks >= 1 && active_blocks <= kBlocks && (active_blocks - 1) * 8 < m_end - m0);
        const uint16_t symmetric_zero_bits = ix::symmetric_zero_bits<T>(kBits);
        int params_group[ix::kWarps];
        std::fill(params_group, params_group + ix::kWarps, -1);

        const auto load_params = [&](int warp, size_t base, int slot, int group) {
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < ix::kWarpTiles; ++i) {
              uint16_t scale[2], zero[2];
              for (int h = 0; h < 2; ++h) {
                const int nl = ix::warp_tile_row(warp, i) * ix::kTileRows + ix::lane_row(lane, h);
                const int index = ix::scale_smem_index(slot, nl);
                CHECK(smem.read(base + Cfg::kScaleOffset + 2 * size_t(index), &scale[h], 2));
                if (p.has_zeros) {
                  CHECK(smem.read(base + Cfg::kZeroOffset + 2 * size_t(index), &zero[h], 2));
                } else {
                  zero[h] = symmetric_zero_bits;
                }
                if (n0 + nl < N) {  // the slot holds this group's values
                  CHECK(scale[h] == p.scales[p.scale_off + s_base + group * p.n + n0 + nl]);
                  if (p.has_zeros) CHECK(zero[h] == p.zeros[p.scale_off + s_base + group * p.n + n0 + nl]);
                }
              }
              params[warp][lane][i] = ix::make_group_params<T, kBits>(scale, zero);
            }
        };

        // mma.m16n8k16 on doubles: A and B assembled from the lanes by the PTX maps.
        const auto mma = [&](int warp, int i, int j, const uint32_t (*a)[4], const uint32_t (*b)[2]) {
          double A[16][16], B[16][8];
          mma_spec::assemble_operands<spec>(
              A, B, [&](int lane, int e) { return value_of<T>(uint16_t(mma_spec::element_bits<spec>(a[lane], e))); },
              [&](int lane, int e) { return value_of<T>(uint16_t(mma_spec::element_bits<spec>(b[lane], e))); });
          for (int lane = 0; lane < 32; ++lane)
            for (int e = 0; e < 4; ++e) {
              CHECK(ix::acc_row(lane, e) == spec::c_row(lane, e) && ix::acc_token(lane, e) == spec::c_col(lane, e));
              acc[warp][lane][i][j][e] += mma_spec::accumulator_dot<spec>(A, B, lane, e, 0.0);
            }
        };

        const auto mma_step = [&](int warp, size_t base, int t, int kt, bool all_blocks) {
          CHECK(!all_blocks || active_blocks == kBlocks);
          CHECK(params_group[warp] == kt * 16 / p.group);  // the scales of this tile's group
          static uint32_t frag[ix::kWarpTiles][32][4];
          for (int i = 0; i < ix::kWarpTiles; ++i) {
            const int tile_row = ix::warp_tile_row(warp, i);
            for (int h = 0; h < Cfg::kLaneWords; ++h) {  // one conflict-free wavefront per word
              bool bank_used[32] = {};
              for (int lane = 0; lane < 32; ++lane) {
                const int bank = ix::q_smem_word<Cfg>(tile_row, t, lane + 32 * h) % 32;
                CHECK(!bank_used[bank]);
                bank_used[bank] = true;
              }
            }
            for (int lane = 0; lane < 32; ++lane) {
              uint32_t words[Cfg::kLaneWords];
              for (int h = 0; h < Cfg::kLaneWords; ++h)
                words[h] = smem.read_u32(base + 4 * size_t(ix::q_smem_word<Cfg>(tile_row, t, lane + 32 * h)));
              ix::dequantize_a<T, kBits>(words, params[warp][lane][i], frag[i][lane]);
            }
            // independent: the fragment is W's tile (tile_row0 + tile_row, kt)
            for (int lane = 0; lane < 32; ++lane)
              for (int e = 0; e < 8; ++e) {
                const int64_t n = n0 + tile_row * 16 + spec::a_row(lane, e), k = int64_t(kt) * 16 + spec::a_col(lane, e);
                const double got = value_of<T>(uint16_t(frag[i][lane][e / 2] >> (16 * (e % 2))));
                if (n < N && k < K) {
                  const int64_t g = k / p.group;
                  const int64_t s = p.scale_off + s_base + g * p.n + n;
                  const double zero = p.has_zeros ? value_of<T>(p.zeros[s]) : (1 << (kBits - 1));
                  CHECK(got == (p.q[(expert * N + n) * K + k] - zero) * value_of<T>(p.scales[s]));
                } else {
                  CHECK(std::isfinite(got));  // padding: finite, meets zero x or a discarded row
                }
              }
          }
          for (int pr = 0; pr < Cfg::kTokenPairs; ++pr) {
            if (!(all_blocks || pr == 0 || pr < active_pairs)) continue;
            CHECK(pr < active_pairs);
            // ldmatrix.x4: lanes 8j..8j+7 address the rows of matrix j; register j of lane l gets
            // row l / 4, columns 2 (l % 4), +1 of matrix j. Never-written bytes read as NaN.
            size_t row_address[32];
            for (int lane = 0; lane < 32; ++lane) {
              const int offset = ix::x_fragment_offset<Cfg>(pr, t, lane);
              CHECK(offset % 8 == 0 && offset >= 0 && offset + 8 <= kBlockM * Cfg::kBlockK);
              row_address[lane] = base + Cfg::kXOffset + 2 * size_t(offset);
            }
            mma_spec::check_ldmatrix_rows(row_address);  // 8 distinct 16-byte bank groups per matrix
            uint32_t b_even[32][2], b_odd[32][2];
            for (int lane = 0; lane < 32; ++lane)
              for (int j = 0; j < 4; ++j) {
                uint16_t v[2];
                for (int h = 0; h < 2; ++h)
                  if (!smem.read(row_address[8 * j + lane / 4] + 2 * (2 * (lane % 4) + h), &v[h], 2)) v[h] = nan_bits<T>();
                const uint32_t reg = uint32_t(v[0]) | (uint32_t(v[1]) << 16);
                (j < 2 ? b_even : b_odd)[lane][j % 2] = reg;
              }
            // independent: B of the even block is x^T (tokens m0 + 16 pr + col, k = 16 kt + row)
            for (int lane = 0; lane < 32; ++lane)
              for (int e = 0; e < 4; ++e)
                for (int odd = 0; odd < 2; ++odd) {
                  const int64_t m = m0 + 16 * pr + 8 * odd + spec::b_n(lane), k = int64_t(kt) * 16 + spec::b_k(lane, e);
                  const double got = value_of<T>(uint16_t((odd ? b_odd : b_even)[lane][e / 2] >> (16 * (e % 2))));
                  if (m < m_end)
                    CHECK(got == (k < K ? value_of<T>(p.x[p.x_off + (rows.x_row0 + m - m0) * p.x_stride + k]) : 0.0));
                }
            for (int i = 0; i < ix::kWarpTiles; ++i) {
              mma(warp, i, 2 * pr, frag[i], b_even);
              if (all_blocks || 2 * pr + 1 < active_blocks) mma(warp, i, 2 * pr + 1, frag[i], b_odd);
            }
          }
        };

        ix::StageWalker compute_walker = ix::stage_walker(range.iter_begin, kStageTiles, group_tiles);
        const auto compute_stage = [&](int stage, int iter) {
          const ix::StageSpan span = ix::next_stage(compute_walker, iter, kStageTiles, range.kt_end, group_tiles);  // every thread
          check_span(span, iter);
          for (int warp = 0; warp < ix::kWarps; ++warp) {
            const bool warp_active = tile_row0 + ix::warp_tile_row(warp, 0) < n_tiles;
            if (!warp_active) continue;
            const size_t base = size_t(stage) * Cfg::kStageBytes;
            if (ix::stage_is_uniform(span, kStageTiles)) {
              if (span.first_group != params_group[warp]) {
                load_params(warp, base, 0, span.first_group);
                params_group[warp] = span.first_group;
              }
              const bool all_blocks = active_blocks == Cfg::kTokenBlocks;
              for (int t = 0; t < kStageTiles; ++t) mma_step(warp, base, t, span.kt0 + t, all_blocks);
            } else {
              ix::GroupCursor cursor = ix::group_cursor(span, group_tiles);
              for (int t = 0; t < kStageTiles; ++t) {
                const int kt = span.kt0 + t;
                if (kt < span.kt_stop) {
                  ix::advance(cursor, kt, group_tiles);
                  CHECK(span.first_group + cursor.slot == kt * 16 / p.group);
                  if (span.first_group + cursor.slot != params_group[warp]) {
                    load_params(warp, base, cursor.slot, span.first_group + cursor.slot);
                    params_group[warp] = span.first_group + cursor.slot;
                  }
                  mma_step(warp, base, t, kt, false);
                }
              }
            }
          }
        };

        // pipeline, as in the kernel
        std::vector<int> stage_iter(kStages, -1);
        for (int s = 0; s < kStages - 1; ++s) {
          if (s < range.iters) {
            load_stage(s, range.iter_begin + s);
            stage_iter[s] = range.iter_begin + s;
          }
          smem.commit();
        }
        for (int it = 0; it < range.iters; ++it) {
          smem.wait(kStages - 2);
          smem.barrier();
          const int next = it + kStages - 1;
          if (next < range.iters) {
            CHECK(next % kStages != it % kStages);
            load_stage(next % kStages, range.iter_begin + next);
            stage_iter[next % kStages] = range.iter_begin + next;
          }
          smem.commit();
          CHECK(stage_iter[it % kStages] == range.iter_begin + it);
          compute_stage(it % kStages, range.iter_begin + it);
        }
        smem.wait(0);

        // epilogue
        for (int warp = 0; warp < ix::kWarps; ++warp) {
          if (!(tile_row0 + ix::warp_tile_row(warp, 0) < n_tiles)) continue;
          for (int lane = 0; lane < 32; ++lane)
            for (int i = 0; i < ix::kWarpTiles; ++i)
              for (int half = 0; half < 2; ++half) {
                const int n = n0 + ix::warp_tile_row(warp, i) * ix::kTileRows + ix::acc_row(lane, 2 * half);
                if (n >= N) continue;
                const double bias = plan.splits == 1 && p.has_bias ? value_of<T>(p.bias[n]) : 0.0;
                for (int j = 0; j < kBlocks; ++j)
                  for (int e = 2 * half; e < 2 * half + 2; ++e) {
                    const int m = m0 + j * ix::kMmaTokens + ix::acc_token(lane, e);
                    if (!ix::output_in_bounds(m, n, m_end, p.n)) continue;
                    CHECK(j < active_blocks);
                    const double v = acc[warp][lane][i][j][e];
                    if (plan.splits > 1) {
                      const int64_t off = ix::partial_offset(bz, m, n, p.m, p.n);
                      CHECK(std::isnan(partial[off]));
                      CHECK(double(float(v)) == v);
                      partial[off] = float(v);
                    } else {
                      const int64_t off = p.y_off + m * p.y_stride + n;
                      CHECK(off >= 0 && off < int64_t(y.size()));
                      y[off] = round_bits<T>(double(float(v + bias)));
                      ++y_count[off];
                    }
                  }
              }
        }
      }
  if (plan.splits == 1) return;
  // split_reduce_kernel
  const int64_t total = p.m * p.n;
  for (int64_t idx = 0; idx < total; ++idx) {
    const int64_t row = idx / p.n, col = idx - row * p.n;
    double sum = 0;
    for (int s = 0; s < plan.splits; ++s) {
      // neighbouring threads (n) read neighbouring floats
      if (col + 1 < p.n) CHECK(ix::partial_offset(s, row, col + 1, p.m, p.n) == ix::partial_offset(s, row, col, p.m, p.n) + 1);
      const float v = partial[ix::partial_offset(s, row, col, p.m, p.n)];
      CHECK(!std::isnan(v));
      sum += v;
    }
    const double bias = p.has_bias ? value_of<T>(p.bias[col]) : 0.0;
    const int64_t off = p.y_off + row * p.y_stride + col;
    y[off] = round_bits<T>(double(float(sum + bias)));
    ++y_count[off];
  }
}

template <typename T>
void run_linear_case(int it, bool verbose, int64_t* split_hist) {
  Problem p;
  p.bits = rnd(0, 1) ? 4 : 8;
  const int shape = int(rnd(0, 9));
  p.m = shape < 5 ? rnd(1, 16) : (shape < 9 ? rnd(17, 70) : rnd(65, 140));
  p.n = rnd(0, 4) == 0 ? rnd(257, 600) : rnd(1, 300);
  p.k = rnd(0, 6) == 0 ? 0 : (rnd(0, 3) == 0 ? rnd(300, 700) : rnd(1, 300));
  if (rnd(0, 3) == 0) {  // deep and narrow: what the split rule splits
    p.m = rnd(1, 24);
    p.n = rnd(1, 260);
    p.k = rnd(700, 3000);
  }
  const int group_kind = int(rnd(0, 4));
  const int64_t k_padded = 16 * wq::tiles_for(std::max<int64_t>(p.k, 1));
  switch (group_kind) {  // small, odd multiples of 16, per channel, multiples of the stages
    case 0: p.group = 16 * rnd(1, 4); break;
    case 1: p.group = 16 * rnd(1, 12); break;
    case 2: p.group = k_padded; break;
    default: p.group = 64 * rnd(1, 4);
  }
  if (rnd(0, 9) == 0) p.group = k_padded + 16 * rnd(0, 8);  // one group, larger than K
  p.has_zeros = rnd(0, 1);
  p.has_bias = rnd(0, 1);
  p.num_sms = rnd(0, 2) == 0 ? int(rnd(1, 8)) : int(rnd(8, 200));
  p.allow_split = rnd(0, 5) != 0;
  p.forced_splits = rnd(0, 4) == 0 ? rnd(1, 12) : 0;
  const int64_t mode = rnd(0, 9);
  if (mode < 2) {  // (token, slot) pairs of a MoE decode step, each with its own expert
    p.expert_rows = ix::kRowPerBlock;
    p.experts = rnd(1, 5);
    p.divisor = rnd(1, 3);
    p.m = rnd(1, 20);
    p.row_experts.resize(size_t(p.m));
    for (int32_t& e : p.row_experts) e = int32_t(rnd(0, p.experts - 1));
  } else if (mode < 4) {  // pairs grouped by expert, as cuda::expert_row_plan lays them out
    p.expert_rows = rnd(0, 1) ? ix::kDecodeBlockM : ix::kBatchBlockM;
    p.experts = rnd(1, 5);
    p.m = 0;
    for (int64_t e = 0; e < p.experts; ++e) {  // a segment per expert with rows, in increasing id
      const int64_t count = rnd(0, 2) == 0 ? 0 : rnd(1, 2 * p.expert_rows + 3);
      const int64_t padded = ix::ceil_div(count, p.expert_rows) * p.expert_rows;
      // only a block's first row is read: the others get ids that would be wrong
      for (int64_t r = 0; r < padded; ++r) p.row_experts.push_back(r % p.expert_rows == 0 ? int32_t(e) : -1 - int32_t(r % 3));
      p.m += padded;
    }
    const int64_t idle_blocks = rnd(0, 2);  // the grid's rows past the grouped ones
    for (int64_t r = 0; r < idle_blocks * p.expert_rows; ++r) p.row_experts.push_back(r % p.expert_rows == 0 ? -1 : int32_t(rnd(0, p.experts - 1)));
    p.m += idle_blocks * p.expert_rows;
    if (p.m == 0) {  // at least one block
      p.row_experts.assign(size_t(p.expert_rows), -1);
      p.m = p.expert_rows;
    }
  }
  p.x_rows = p.row_mode() ? ix::ceil_div(p.m, p.divisor) : p.m;
  const int64_t groups = groups_of(p);
  // weights, scales (powers of two: every product and sum is exact, so y compares exactly)
  p.q.resize(p.experts * p.n * p.k);
  for (int& v : p.q) v = int(rnd(0, (1 << p.bits) - 1));
  for (int64_t e = 0; e < p.experts; ++e) {
    const std::vector<int> one(p.q.begin() + e * p.n * p.k, p.q.begin() + (e + 1) * p.n * p.k);
    const std::vector<uint32_t> packed = pack(one, p.n, p.k, p.bits);
    p.q_words = int64_t(packed.size());
    p.qweight.insert(p.qweight.end(), packed.begin(), packed.end());
  }
  const bool scales_aligned = rnd(0, 3) != 0;
  p.scale_off = scales_aligned ? 8 * rnd(0, 2) : rnd(1, 7);
  p.s_elems = groups * p.n;
  p.scales.assign(p.scale_off + p.experts * groups * p.n + 9, nan_bits<T>());
  p.zeros.assign(p.scale_off + p.experts * groups * p.n + 9, nan_bits<T>());
  static const double kScales[] = {0.25, 0.5, 1, 2, -0.5, -1};
  for (int64_t e = 0; e < p.experts * groups * p.n; ++e) {
    p.scales[p.scale_off + e] = round_bits<T>(kScales[rnd(0, 5)]);
    p.zeros[p.scale_off + e] = round_bits<T>(double(rnd(0, (1 << p.bits) - 1)));
  }
  // x with a random row stride and start (aligned for the cp.async path or not)
  const bool x_aligned = rnd(0, 3) != 0;
  p.x_stride = p.k + (x_aligned ? 0 : rnd(0, 3));
  if (x_aligned) p.x_stride = 8 * ix::ceil_div(std::max<int64_t>(p.x_stride, 1), 8) + 8 * rnd(0, 1);
  p.x_off = x_aligned ? 8 * rnd(0, 2) : rnd(0, 9);
  p.x.assign(p.x_off + (p.x_rows - 1) * p.x_stride + p.k + 9, nan_bits<T>());  // NaN around x: reads outside show
  for (int64_t m = 0; m < p.x_rows; ++m)
    for (int64_t k = 0; k < p.k; ++k) p.x[p.x_off + m * p.x_stride + k] = round_bits<T>(double(rnd(-3, 3)));
  p.bias.resize(p.n);
  for (auto& b : p.bias) b = round_bits<T>(double(rnd(-4, 4)));
  p.y_stride = p.n + rnd(0, 5);
  p.y_off = rnd(0, 5);
  std::vector<uint16_t> y(p.y_off + (p.m - 1) * p.y_stride + p.n + 7, 0xABCD);
  std::vector<int> y_count(y.size(), 0);

  int splits = 0;
  const int block_m = ix::plan_linear(p.m, p.n, p.k, p.bits, p.num_sms, p.allow_split, 0, p.expert_rows).block_m;
  if (p.bits == 4) {
    block_m == ix::kDecodeBlockM ? sim_linear<T, 4, ix::kDecodeBlockM>(p, y, y_count, &splits)
                                 : sim_linear<T, 4, ix::kBatchBlockM>(p, y, y_count, &splits);
  } else {
    block_m == ix::kDecodeBlockM ? sim_linear<T, 8, ix::kDecodeBlockM>(p, y, y_count, &splits)
                                 : sim_linear<T, 8, ix::kBatchBlockM>(p, y, y_count, &splits);
  }
  ++split_hist[std::min(splits, 63)];
  // reference
  for (int64_t m = 0; m < p.m; ++m)
    for (int64_t n = 0; n < p.n; ++n) {
      double s = 0;
      const int64_t e = expert_of(p, m), xm = x_row_of(p, m);
      for (int64_t k = 0; k < p.k && e >= 0; ++k) {
        const int64_t at = p.scale_off + e * p.s_elems + k / p.group * p.n + n;
        const double zero = p.has_zeros ? value_of<T>(p.zeros[at]) : (1 << (p.bits - 1));
        const double w = (p.q[(e * p.n + n) * p.k + k] - zero) * value_of<T>(p.scales[at]);
        s += value_of<T>(p.x[p.x_off + xm * p.x_stride + k]) * w;
      }
      const uint16_t want = round_bits<T>(double(float(s + (p.has_bias ? value_of<T>(p.bias[n]) : 0.0))));
      const int64_t off = p.y_off + m * p.y_stride + n;
      if (y_count[off] != 1 || y[off] != want) {
        fprintf(stderr, "case %d: y[%ld][%ld] written %d times, got 0x%04x want 0x%04x (M%ld N%ld K%ld G%ld bits %d splits %d)\n",
                it, m, n, y_count[off], y[off], want, p.m, p.n, p.k, p.group, p.bits, splits);
        abort();
      }
      y_count[off] = -1;
    }
  for (size_t e = 0; e < y.size(); ++e)
    if (y_count[e] != -1) CHECK(y_count[e] == 0 && y[e] == 0xABCD);  // nothing outside y's [M, N]
  if (verbose)
    printf("case %d ok: %s %d-bit M%ld N%ld K%ld G%ld zeros %d bias %d sms %d splits %d experts %ld x%s scales%s\n",
           it, std::is_same_v<T, Half> ? "fp16" : "bf16", p.bits, p.m, p.n, p.k, p.group, p.has_zeros, p.has_bias,
           p.num_sms, splits, p.expert_rows != ix::kNoExperts ? p.experts : 0, ix::x_vectorizable(uint64_t(p.x_off) * 2, p.x_stride, 2) ? " vec" : " sync",
           ix::scales_vectorizable(p.n, uint64_t(p.scale_off) * 2, 0) ? " vec" : " sync");
}

// ---------------------------------------------------------------------------------------------
// (c) dequantize_kernel maps and the split rule
// ---------------------------------------------------------------------------------------------
void check_tile_inverse() {
  for (int bits : {4, 8}) {
    int seen[16][16] = {};
    for (int w = 0; w < wq::words_per_tile(bits); ++w)
      for (int s = 0; s < wq::values_per_word(bits); ++s) {
        const int i = wq::tile_row(bits, w, s), j = wq::tile_col(bits, w, s);
        CHECK(ix::tile_word_of(bits, i, j) == w && ix::tile_slot_of(bits, i, j) == s);
        ++seen[i][j];
      }
    for (auto& r : seen)
      for (int c : r) CHECK(c == 1);
  }
  // fp32 holds (q - zero) * scale exactly for 16-bit scales (so one rounding to the output).
  for (int it = 0; it < 20000; ++it) {
    const double d = double(rnd(-255, 255));
    const double s16 = value_of<Half>(random_scale_bits<Half>()), b16 = value_of<BFloat16>(random_scale_bits<BFloat16>());
    CHECK(double(float(d) * float(s16)) == d * s16);
    if (std::isfinite(float(d * b16))) CHECK(double(float(d) * float(b16)) == d * b16);
  }
  CHECK(ix::dequant_needs_fp64(ScalarKind::kFloat32, ScalarKind::kFloat16) &&
        ix::dequant_needs_fp64(ScalarKind::kFloat32, ScalarKind::kBFloat16) &&
        !ix::dequant_needs_fp64(ScalarKind::kFloat32, ScalarKind::kFloat32) &&
        !ix::dequant_needs_fp64(ScalarKind::kFloat16, ScalarKind::kBFloat16));
}

void sim_dequantize_case() {
  const int bits = rnd(0, 1) ? 4 : 8;
  const int64_t n = rnd(1, 100), k = rnd(1, 700), group = 16 * rnd(1, 20);
  const bool has_zeros = rnd(0, 1);
  std::vector<int> q(n * k);
  for (int& v : q) v = int(rnd(0, (1 << bits) - 1));
  const std::vector<uint32_t> qweight = pack(q, n, k, bits);
  const int64_t groups = ix::ceil_div(k, group);
  std::vector<double> scales(groups * n), zeros(groups * n);
  for (auto& s : scales) s = double(rnd(-100, 100)) / 8;
  for (auto& z : zeros) z = double(rnd(0, (1 << bits) - 1));
  std::vector<double> out(n * k, NAN);
  const int64_t n_tiles = wq::tiles_for(n), k_tiles = wq::tiles_for(k);
  const int words = wq::words_per_tile(bits);
  const int64_t grid_x = ix::ceil_div(k_tiles, ix::kDqTiles), grid_y = std::min<int64_t>(n_tiles, rnd(1, 3));
  std::vector<uint32_t> tiles(ix::kDqTiles * wq::words_per_tile(8));
  for (int64_t bx = 0; bx < grid_x; ++bx)
    for (int64_t by = 0; by < grid_y; ++by) {
      const int64_t kt0 = bx * ix::kDqTiles;
      const int tiles_here = int(std::min<int64_t>(ix::kDqTiles, k_tiles - kt0));
      CHECK(tiles_here >= 1);
      for (int64_t nt = by; nt < n_tiles; nt += grid_y) {
        std::fill(tiles.begin(), tiles.end(), 0xDEADBEEFu);
        const int64_t src = wq::tile_offset_words(bits, k_tiles, nt, kt0);
        for (int c = 0; c < tiles_here * words / 4; ++c) {
          CHECK(src % 4 == 0 && src + 4 * c + 4 <= int64_t(qweight.size()));
          for (int e = 0; e < 4; ++e) tiles[4 * c + e] = qweight[src + 4 * c + e];
        }
        for (int tid = 0; tid < ix::kDqThreads; ++tid)
          for (int pass = 0; pass < ix::kDqPasses; ++pass) {
            const int i = ix::dq_chunk_row(tid, pass), col = ix::dq_chunk_col(tid, pass);
            CHECK(i < ix::kTileRows && col % ix::kDqChunkValues == 0 && col < ix::kDqTiles * ix::kMmaK);
            const int64_t nn = nt * ix::kTileRows + i, k0 = kt0 * ix::kMmaK + col;
            if (nn >= n || k0 >= k) continue;
            CHECK(col / ix::kMmaK < tiles_here);
            const int64_t offset = ix::scale_offset(k0 / group, nn, n);  // one group for the 8 values
            const double zero = has_zeros ? zeros[offset] : wq::symmetric_zero(bits);
            for (int e = 0; e < ix::kDqChunkValues && k0 + e < k; ++e) {
              const int64_t kk = k0 + e;
              CHECK(kk / group == k0 / group);
              const uint32_t value =
                  ix::tile_value(tiles.data() + (col / ix::kMmaK) * words, bits, i, col % ix::kMmaK + e);
              CHECK(int(value) == q[nn * k + kk]);
              CHECK(std::isnan(out[nn * k + kk]));
              out[nn * k + kk] = (value - zero) * scales[offset];
            }
          }
      }
    }
  for (int64_t nn = 0; nn < n; ++nn)
    for (int64_t kk = 0; kk < k; ++kk) {
      const int64_t g = kk / group;
      const double zero = has_zeros ? zeros[g * n + nn] : wq::symmetric_zero(bits);
      CHECK(out[nn * k + kk] == (q[nn * k + kk] - zero) * scales[g * n + nn]);
    }
}

void check_split_rule() {
  for (int it = 0; it < 20000; ++it) {
    const int64_t m = rnd(1, 300), n = rnd(1, 40000), k = rnd(0, 30000), sms = rnd(1, 200);
    const int bits = rnd(0, 1) ? 4 : 8;
    const bool allow = rnd(0, 4) != 0;
    const ix::LinearPlan p = ix::plan_linear(m, n, k, bits, sms, allow);
    CHECK(p.splits >= 1 && p.block_m == (m <= 16 ? 16 : 64));
    CHECK(p.m_blocks * p.block_m >= m && (p.m_blocks - 1) * p.block_m < m);
    CHECK(p.n_blocks * ix::kBlockN >= n && p.n_blocks <= ix::kMaxGridYZ && p.splits <= ix::kMaxGridYZ);
    CHECK(p.stage_tiles == ix::config_facts(bits, p.block_m).stage_tiles && (p.stage_tiles == 4 || p.stage_tiles == 8));
    CHECK(p.k_tiles == wq::tiles_for(k) && p.k_iters == ix::ceil_div(p.k_tiles, p.stage_tiles));
    if (!allow) CHECK(p.splits == 1);
    if (p.splits > 1) {
      CHECK(p.splits <= p.k_iters && p.m_blocks * p.n_blocks * p.splits <= sms * ix::config_facts(bits, p.block_m).ctas_per_sm);
      CHECK(ix::partial_bytes(p, m, n) <= sms * 128 * 1024);  // the bound weight_only_cuda.h states
    }
    // the splits partition the stages, none empty
    int covered = 0;
    for (int s = 0; s < p.splits; ++s) {
      const ix::SplitRange r = ix::split_range(s, int(p.iters_per_split), int(p.k_iters), int(p.k_tiles), p.stage_tiles);
      CHECK(r.iter_begin == covered && (r.iters >= 1 || p.k_iters == 0));
      covered += r.iters;
      CHECK(r.kt_end == std::min<int64_t>((r.iter_begin + r.iters) * int64_t(p.stage_tiles), p.k_tiles));
    }
    CHECK(covered == p.k_iters);
    // a forced count (the TORCH_EXT_WO_SPLITS knob): clamped and normalized, ranges still partition
    const int64_t forced = rnd(1, 40);
    const ix::LinearPlan f = ix::plan_linear(m, n, k, bits, sms, allow, forced);
    if (!allow || f.k_iters < 2) {
      CHECK(f.splits == 1);
    } else {
      CHECK(f.splits >= 1 && f.splits <= std::min<int64_t>(forced, f.k_iters));
      CHECK(f.iters_per_split == ix::ceil_div(f.k_iters, std::min<int64_t>(forced, f.k_iters)));
      CHECK((f.splits - 1) * f.iters_per_split < f.k_iters && f.splits * f.iters_per_split >= f.k_iters);
    }
  }
}

void print_benchmark_plans() {
  for (int bits : {4, 8})
    for (int64_t m : {1, 4, 16, 64, 256}) {
      const ix::LinearPlan p = ix::plan_linear(m, 8192, 8192, bits, 132, true);
      printf("plan 8192x8192 %d-bit M%ld on 132 SMs: block_m %d grid %ldx%ldx%ld, %ld stages per split, workspace %ld KB\n",
             bits, m, p.block_m, p.m_blocks, p.n_blocks, p.splits, p.iters_per_split,
             ix::partial_bytes(p, m, 8192) / 1024);
    }
}

// (d) The Hopper batch GEMM's B operand: every byte wgmma reads of x (token n, k byte kb of k16
// step t) through ix::x_wgmma_desc and the PTX descriptor / swizzle model is where the loads put
// x value (n, 16 t + kb / 2) (x_smem_offset), in every stage slot of both batch configs.
template <class Cfg>
void check_x_wgmma_operand() {
  static_assert(ix::wgmma_config_ok<Cfg>());
  const uint32_t base = 1024u * uint32_t(rnd(1, 60));
  for (int stage = 0; stage < Cfg::kStages; ++stage) {
    const uint32_t x_tile = base + uint32_t(stage * Cfg::kStageBytes + Cfg::kXOffset);
    CHECK(x_tile % 1024 == 0);
    for (int t = 0; t < Cfg::kStageTiles; ++t) {
      const uint64_t desc = ix::x_wgmma_desc<Cfg>(x_tile, t);
      for (int n = 0; n < Cfg::kBlockM; ++n)
        for (int kb = 0; kb < 32; ++kb) {
          const int col = ix::kMmaK * t + kb / 2;
          const uint32_t want = x_tile + uint32_t(2 * ix::x_smem_offset<Cfg>(n, col / ix::kChunkValues) +
                                                  2 * (col % ix::kChunkValues) + kb % 2);
          CHECK(mma_spec::wgmma_sw128_address(desc, n, kb) == want);
        }
    }
  }
  // A: each warp's mma.m16n8k16 A fragment is wgmma's register A fragment of the warp's 16 rows
  // (the features of its tile), and the accumulators keep the epilogue's (feature, token) map.
  for (int w = 0; w < 4; ++w)
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 8; ++i) {
        CHECK(mma_spec::WgmmaA16::a_row(w, lane, i) == 16 * w + mma_spec::M16n8k16::a_row(lane, i));
        CHECK(mma_spec::WgmmaA16::a_col(lane, i) == mma_spec::M16n8k16::a_col(lane, i));
      }
      for (int r = 0; r < 4 * Cfg::kTokenBlocks; ++r) {
        CHECK(mma_spec::Wgmma64::d_row(w, lane, r) == 16 * w + ix::acc_row(lane, r % 4));
        CHECK(mma_spec::Wgmma64::d_col(lane, r) == ix::kMmaTokens * (r / 4) + ix::acc_token(lane, r % 4));
      }
    }
}

int main(int argc, char** argv) {
  const int cases = argc > 1 ? atoi(argv[1]) : 200;
  rng.seed(argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 12345);
  check_register_helpers();
  for (int it = 0; it < 2000; ++it) {
    check_dequantize_tile<Half, 4>();
    check_dequantize_tile<Half, 8>();
    check_dequantize_tile<BFloat16, 4>();
    check_dequantize_tile<BFloat16, 8>();
  }
  printf("register dequantization ok (fp16/bf16 x 4/8-bit, 2000 tiles each)\n");
  check_tile_inverse();
  check_split_rule();
  for (int it = 0; it < 50; ++it) sim_dequantize_case();
  check_x_wgmma_operand<ix::TileConfig<4, ix::kBatchBlockM>>();
  check_x_wgmma_operand<ix::TileConfig<8, ix::kBatchBlockM>>();
  printf("dequantize_kernel maps and split rule ok\n");
  print_benchmark_plans();
  int64_t split_hist[64] = {};
  for (int it = 0; it < cases; ++it) {
    if (it % 2 == 0) {
      run_linear_case<Half>(it, it % 25 == 0, split_hist);
    } else {
      run_linear_case<BFloat16>(it, it % 25 == 1, split_hist);
    }
  }
  printf("split counts:");
  for (int s = 1; s < 64; ++s)
    if (split_hist[s]) printf(" %d:%ld", s, split_hist[s]);
  printf("\nall ok\n");
}
