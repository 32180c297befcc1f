// Index math of the CUDA fused_moe kernels (moe/fused_moe_cuda.cu), host+device so that
// tests/cpp/fused_moe_cuda_sim.cpp runs on the CPU exactly what the GPU runs: the device plan's
// steps (keys, chunking, warp groups, scans, segment search), the workspace layout, the grouped
// GEMM tiles (global -> shared chunk maps with the swizzle, ldmatrix addressing, mma.m16n8k16
// fragment maps, the gate / up pairing of GEMM 1), the epilogues (activation, combine) and the
// decode kernels' maps. Plain C++ apart from a few device intrinsics behind __CUDA_ARCH__.
#pragma once

#include <cmath>
#include <cstdint>

#include "common/exact_float.h"
#include "common/index_math.h"
#include "common/macros.h"
#include "moe/expert_plan.h"
#include "moe/fused_moe.h"

namespace torch_ext::moe {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace fused_moe_cuda {

using index_math::ceil_div;
using index_math::max64;
using index_math::min64;
using index_math::popc32;
using index_math::round_up;

// 16-byte chunks (8 fp16 / bf16 values): the unit of every vector load, cp.async and shared row
// segment.
constexpr int kChunkElems = 8;
// Every pair index, grouped row and element offset inside one row fits int32 below this.
constexpr int64_t kMaxPairs = (int64_t(1) << 30);

// =============================================================================================
// 1. The plan on the device (moe/expert_plan.h's build_expert_plan_host, computed in parallel).
//
//    Two plans are built by the same three kernels, on different keys:
//    - plan 1 (GEMM 1, decode): key(p) = ids[p] over E keys: exactly build_expert_plan_host.
//    - plan 2 (GEMM 2): key(p) = rank(p) * E + ids[p] over k E keys, rank(p) the position of
//      pair p among its token's pairs ordered by (expert id, slot). Its segments are ordered by
//      (rank, expert): the rows of rank L are contiguous and hold every token exactly once, so
//      GEMM 2 runs one launch per rank with plain read-modify-writes of each output row (no
//      atomics), and every output element is summed in increasing expert id, the order of the
//      CPU kernel. It is build_expert_plan_host of the key array (tested as such).
//
//    count kernel:   one warp per chunk of consecutive pairs; per group of 32 pairs,
//                    __match_any_sync finds the lanes of one key, the lowest (the leader) adds
//                    their number to cells[key][chunk] (owned by this warp: no atomics).
//    scan kernel:    one CTA. (a) per key, a warp turns cells[key][0..B) into exclusive prefixes
//                    (the key's rows before the chunk) and writes counts[key]; (b) a block scan
//                    over keys of padded_rows(counts) gives offsets, and (plan 1) the list of
//                    experts with pairs; (c) padding rows get -1.
//    scatter kernel: the count kernel's walk again; lane rank = pairs of its key in lower lanes,
//                    row = offsets[key] + cells[key][chunk] + rank; the leader then advances the
//                    cursor cells[key][chunk]. Chunks are consecutive and walked in order, so the
//                    order inside a key is increasing p: stable, the host plan bit for bit.
// =============================================================================================

// Pairs one warp handles at least (fewer chunks for small problems: one chunk below this).
constexpr int64_t kPlanMinChunkPairs = 256;
// Cap on chunks x keys (the scan CTA reads them all twice): ~16K x 4 B = 64 KB of L2 traffic.
constexpr int64_t kPlanMaxCells = 16384;
// The scan CTA: 32 warps (one per key at a time in step a; 1024-wide block scan in step b).
constexpr int kScanThreads = 1024;
// Warps per CTA of the count / scatter kernels (each warp its own chunk).
constexpr int kPlanWarps = 4;

TORCH_EXT_HOST_DEVICE int64_t plan_chunks(int64_t pairs, int64_t keys, int num_sms) {
  const int64_t by_work = max64(1, ceil_div(pairs, kPlanMinChunkPairs));
  const int64_t by_cells = max64(1, kPlanMaxCells / max64(1, keys));
  const int64_t by_sms = max64(1, int64_t(num_sms) * 2);
  return min64(by_work, min64(by_cells, by_sms));
}
// Chunk b covers pairs [chunk_begin(b), chunk_begin(b + 1)).
TORCH_EXT_HOST_DEVICE int64_t chunk_begin(int64_t b, int64_t pairs, int64_t chunks) {
  return min64(pairs, b * ceil_div(pairs, chunks));
}

// Position of slot j among the token's slots ordered by (expert id, slot).
TORCH_EXT_HOST_DEVICE int32_t combine_rank(const int32_t* ids_row, int k, int j) {
  const int32_t e = ids_row[j];
  int32_t rank = 0;
  for (int i = 0; i < k; ++i) rank += (ids_row[i] < e || (ids_row[i] == e && i < j)) ? 1 : 0;
  return rank;
}
// The slot of rank L (inverse of combine_rank over j; k if none).
TORCH_EXT_HOST_DEVICE int slot_of_rank(const int32_t* ids_row, int k, int32_t rank) {
  for (int j = 0; j < k; ++j)
    if (combine_rank(ids_row, k, j) == rank) return j;
  return k;
}
TORCH_EXT_HOST_DEVICE int32_t plan_key(const int32_t* ids, int64_t p, int k, int32_t experts, bool by_rank) {
  const int32_t e = ids[p];
  if (!by_rank) return e;
  const int64_t t = p / k;
  return combine_rank(ids + t * k, k, int(p - t * k)) * experts + e;
}

// Warp groups of one key (peers = __match_any_sync mask of the lane's key).
TORCH_EXT_HOST_DEVICE int group_rank(uint32_t peers, int lane) { return popc32(peers & ((1u << lane) - 1u)); }
TORCH_EXT_HOST_DEVICE bool group_leader(uint32_t peers, int lane) { return (peers & ((1u << lane) - 1u)) == 0; }

// Scan step (a): lane l of the key's warp owns cells [l span, min(B, (l + 1) span)).
TORCH_EXT_HOST_DEVICE int64_t scan_span(int64_t chunks) { return ceil_div(chunks, 32); }

// Scan step (c): padding element i in [0, keys (block - 1)): key i / (block - 1), the
// (i % (block - 1))-th row after the key's pairs, -1 if that is past the padded segment.
TORCH_EXT_HOST_DEVICE int64_t padding_row(const int32_t* counts, const int32_t* offsets, int64_t i, int64_t block) {
  const int64_t key = i / (block - 1), r = offsets[key] + counts[key] + i % (block - 1);
  return r < offsets[key + 1] ? r : -1;
}

// The key whose segment holds `row`: the largest key in [first, first + keys) with
// offsets[key] <= row (empty segments share their successor's offset), or -1 when row is at or
// past offsets[first + keys] (an empty tile of the static grid).
TORCH_EXT_HOST_DEVICE int32_t segment_of_row(const int32_t* offsets, int32_t first, int32_t keys, int64_t row) {
  if (row < offsets[first] || row >= offsets[first + keys]) return -1;
  int32_t lo = first, hi = first + keys - 1;  // offsets[lo] <= row; answer in [lo, hi]
  while (lo < hi) {
    const int32_t mid = lo + (hi - lo + 1) / 2;
    if (offsets[mid] <= row) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// fused_moe_quantized's grouped rows (cuda::expert_row_plan): row r of plan 1 as the weight-only
// GEMM reads it: the expert of its segment (-1 at and past offsets[E]) and the token whose hidden
// row it multiplies (its pair's; 0 on padding rows, whose products nobody reads).
struct GroupedRow {
  int32_t expert, token;
};
TORCH_EXT_HOST_DEVICE GroupedRow grouped_row(const int32_t* offsets, const int32_t* sorted, int32_t experts, int k,
                                             int64_t r) {
  const int32_t expert = segment_of_row(offsets, 0, experts, r);
  const int32_t pair = expert >= 0 ? sorted[r] : -1;
  return {expert, pair >= 0 ? int32_t(pair / k) : 0};
}

// =============================================================================================
// 2. Paths and workspace
// =============================================================================================

// Decode path up to this many pairs. The grouped GEMM's M tile is 64 rows: at <= 64 pairs each
// active expert fills at most one mostly-padded tile, so the tensor cores bring nothing and the
// grid (<= 64 tiles x n blocks) leaves SMs idle, while the decode kernels split N over >= I / 8
// and H / 8 CTAs and read each active expert's weights once per 4 of its pairs (fp32 FMA: 2 x 4
// FLOP per 2-byte weight, below H100's ~20 FLOP/B balance of CUDA cores to HBM).
constexpr int64_t kDecodeMaxPairs = 64;
TORCH_EXT_HOST_DEVICE bool use_decode(int64_t pairs) { return pairs <= kDecodeMaxPairs; }

// act rows are padded to 8 elements so that GEMM 2's A operand is always 16-byte aligned.
TORCH_EXT_HOST_DEVICE int64_t act_stride(int64_t inter) { return round_up(inter, kChunkElems); }

// Byte offsets into the workspace (each region 256-byte aligned); 0-size regions are unused.
struct Layout {
  int64_t pairs, rows1, rows2, chunks1, chunks2, keys2;
  int64_t cells1, counts1, offsets1, active1, sorted1, row_of_pair;  // plan 1
  int64_t cells2, counts2, offsets2, sorted2;                        // plan 2 (GEMM path)
  int64_t act, acc32;                                                // [rows, act_stride] T, [T, H] fp32
  int64_t bytes;
};
constexpr int64_t kRegionAlign = 256;
TORCH_EXT_HOST_DEVICE int64_t layout_take(int64_t& at, int64_t bytes) {
  const int64_t start = at;
  at = round_up(at + bytes, kRegionAlign);
  return start;
}
// block: the GEMM's M tile (plan padding); elem_bytes: 2 (fp16 / bf16).
TORCH_EXT_HOST_DEVICE Layout make_layout(const FusedMoeParams& p, int num_sms, int64_t block, int64_t elem_bytes) {
  Layout l{};
  const int64_t E = p.experts, k = p.top_k;
  l.pairs = p.tokens * k;
  const bool decode = use_decode(l.pairs);
  l.rows1 = max_grouped_rows(l.pairs, E, block);
  l.chunks1 = plan_chunks(l.pairs, E, num_sms);
  l.keys2 = decode ? 0 : k * E;
  l.rows2 = decode ? 0 : max_grouped_rows(l.pairs, l.keys2, block);
  l.chunks2 = decode ? 0 : plan_chunks(l.pairs, l.keys2, num_sms);
  int64_t at = 0;
  l.cells1 = layout_take(at, 4 * l.chunks1 * E);
  l.counts1 = layout_take(at, 4 * E);
  l.offsets1 = layout_take(at, 4 * (E + 1));
  l.active1 = layout_take(at, 4 * (E + 1));  // the active experts, then their number
  l.sorted1 = layout_take(at, 4 * l.rows1);
  l.row_of_pair = layout_take(at, 4 * l.pairs);
  l.cells2 = layout_take(at, 4 * l.chunks2 * l.keys2);
  l.counts2 = layout_take(at, 4 * l.keys2);
  l.offsets2 = layout_take(at, decode ? 0 : 4 * (l.keys2 + 1));
  l.sorted2 = layout_take(at, 4 * l.rows2);
  l.act = layout_take(at, elem_bytes * (decode ? l.pairs : l.rows1) * act_stride(p.intermediate_size));
  l.acc32 = layout_take(at, (!decode && k > 1) ? 4 * p.tokens * p.hidden_size : 0);
  l.bytes = at;
  return l;
}

// cuda::expert_row_plan's workspace: plan 1's regions without the active list.
struct RowPlanLayout {
  int64_t rows, chunks;
  int64_t cells, counts, offsets, sorted;
  int64_t bytes;
};
TORCH_EXT_HOST_DEVICE RowPlanLayout make_row_plan_layout(int64_t pairs, int32_t experts, int64_t block,
                                                         int num_sms) {
  RowPlanLayout l{};
  l.rows = max_grouped_rows(pairs, experts, block);
  l.chunks = plan_chunks(pairs, experts, num_sms);
  int64_t at = 0;
  l.cells = layout_take(at, 4 * l.chunks * experts);
  l.counts = layout_take(at, 4 * int64_t(experts));
  l.offsets = layout_take(at, 4 * (int64_t(experts) + 1));
  l.sorted = layout_take(at, 4 * l.rows);
  l.bytes = at;
  return l;
}

// =============================================================================================
// 3. Grouped GEMM tiles (mma.sync.m16n8k16, fp16 / bf16 in, fp32 accumulate).
//    A = gathered rows (GEMM 1: hidden[token]; GEMM 2: act[row of the pair]), B = the segment's
//    expert weights as [n][k] rows (the "col" operand). One CTA: kBM rows x kBN B rows, K in
//    kBK-element stages through a kStages-deep cp.async ring.
//    GEMM 1: the kBN B rows are 64 gate rows j0..j0+63 and the 64 up rows I+j0..; warp (wm, wn)
//    holds gate columns wn*32 + [0, 32) in n8 tiles 0..3 and the same up columns in tiles 4..7,
//    so each thread owns g and u of the same (row, column): act is computed in registers and
//    only act [rows, I] (io dtype) is stored. GEMM 2: the kBN B rows are W2 rows n0..n0+127.
// =============================================================================================

// 64 grouped rows: the segment padding (<= 63 rows per expert, i.e. per active key) stays small
// for fine-grained MoE (E = 256) while each weight byte is reused by 64 rows from shared memory.
constexpr int kBM = 64;
// 128 B rows (GEMM 1: 64 columns x gate/up; GEMM 2: 128 output columns): 4 KB + 8 KB per stage.
constexpr int kBN = 128;
// Intermediate columns per GEMM 1 tile (gate and up halves of the kBN rows).
constexpr int kGateCols = kBN / 2;
// 32 elements (64 bytes, 4 chunks) per stage row: 2 mma k16 steps; the 64-byte row swizzle below.
constexpr int kBK = 32;
constexpr int kChunksPerRow = kBK / kChunkElems;  // 4
constexpr int kKSteps = kBK / 16;                 // 2
// 4 stages x 12 KB = 48 KB of shared memory (no opt-in needed; 4 CTAs fit an H100 SM): three
// stages in flight hide L2 / HBM latency for a 128-thread CTA.
constexpr int kStages = 4;
// 2 x 2 warps of 32 rows x 64 B rows: 2 m16 x 8 n8 tiles = 64 fp32 accumulators per thread.
constexpr int kWarpsM = 2, kWarpsN = 2;
constexpr int kWarps = kWarpsM * kWarpsN;
constexpr int kThreads = 32 * kWarps;  // 128
// __launch_bounds__ minimum CTAs per SM: 3 x 48 KB shared memory and <= 168 registers per thread
// (64 accumulators + 24 fragment registers + addresses fit without spills).
constexpr int kMinCtas = 3;
constexpr int kWM = kBM / kWarpsM, kWN = kBN / kWarpsN;  // 32, 64
constexpr int kMI = kWM / 16, kNI = kWN / 8;               // 2, 8
constexpr int kElemBytes = 2;
constexpr int kRowBytes = kBK * kElemBytes;  // 64
constexpr int kABytes = kBM * kRowBytes, kBBytes = kBN * kRowBytes;
constexpr int kStageBytes = kABytes + kBBytes;
constexpr int kSmemBytes = kStages * kStageBytes;
constexpr int kRowsPerPass = kThreads / kChunksPerRow;  // 32
constexpr int kAChunksPerThread = kBM / kRowsPerPass;   // 2
constexpr int kBChunksPerThread = kBN / kRowsPerPass;   // 4
// CTAs of kGroupM consecutive m tiles run next to each other along n: the weight n-blocks they
// share stay in L2 while the group's A rows are reused across n.
constexpr int kGroupM = 8;

using index_math::TileCoord;
TORCH_EXT_HOST_DEVICE TileCoord tile_of(int64_t pid, int64_t m_blocks, int64_t n_blocks) {
  return index_math::grouped_tile(pid, m_blocks, n_blocks, kGroupM);
}
// n blocks: GEMM 1 over I (64 columns, gate + up), GEMM 2 over H (128 columns).
TORCH_EXT_HOST_DEVICE int64_t gemm1_n_blocks(int64_t inter) { return ceil_div(inter, kGateCols); }
TORCH_EXT_HOST_DEVICE int64_t gemm2_n_blocks(int64_t hidden) { return ceil_div(hidden, kBN); }

// Thread tid copies chunk chunk_col(tid) of tile rows chunk_row(tid) + i * kRowsPerPass.
TORCH_EXT_HOST_DEVICE int chunk_row(int tid) { return tid / kChunksPerRow; }
TORCH_EXT_HOST_DEVICE int chunk_col(int tid) { return tid % kChunksPerRow; }
// [rows][64 bytes], logical chunk c of row r at chunk c ^ ((r / 2) % 4): the 8 rows one ldmatrix
// phase reads (64 B apart) land in 8 distinct 16-byte bank groups.
TORCH_EXT_HOST_DEVICE int smem_offset(int row, int chunk) {
  return row * kRowBytes + ((chunk ^ ((row >> 1) & 3)) * 16);
}
// Elements of the chunk starting at k that exist (0..8); the rest is zero-filled.
TORCH_EXT_HOST_DEVICE int chunk_elems(int64_t k, int64_t k_total, bool row_exists) {
  if (!row_exists) return 0;
  const int64_t rest = k_total - k;
  return rest <= 0 ? 0 : (rest >= kChunkElems ? kChunkElems : int(rest));
}
// 16-byte cp.async needs 16-byte aligned row starts: base and row length (elements) of each.
TORCH_EXT_HOST_DEVICE bool rows_vectorizable(uint64_t address, int64_t row_elems) {
  return address % 16 == 0 && row_elems % kChunkElems == 0;
}

// B tile row of GEMM 1 tile row b (< kBN): the weight row of W13[e] (gate j or up I + j), or -1
// past I.
TORCH_EXT_HOST_DEVICE int64_t gemm1_weight_row(int b, int64_t n0, int64_t inter) {
  const int64_t j = n0 + (b < kGateCols ? b : b - kGateCols);
  if (j >= inter) return -1;
  return b < kGateCols ? j : inter + j;
}

// Warp w owns (warp_m, warp_n) = (w / kWarpsN, w % kWarpsN).
TORCH_EXT_HOST_DEVICE int warp_m_of(int warp) { return warp / kWarpsN; }
TORCH_EXT_HOST_DEVICE int warp_n_of(int warp) { return warp % kWarpsN; }

// B tile row of n8 tile ni (< kNI) of warp_n. GEMM 1: tiles 0..3 gate columns wn*32 + 8 ni,
// tiles 4..7 the same up columns (+ kGateCols). GEMM 2: wn*64 + 8 ni.
TORCH_EXT_HOST_DEVICE int b_tile_row(bool gate_up, int warp_n, int ni) {
  if (!gate_up) return warp_n * kWN + 8 * ni;
  constexpr int kHalf = kNI / 2;
  return (ni < kHalf ? 0 : kGateCols) + warp_n * (kWN / 2) + 8 * (ni % kHalf);
}

// PTX mma.m16n8k16 (.f16 / .bf16; g = lane / 4, t = lane % 4):
//   A (16 x 16, row): a0 row g k 2t..2t+1; a1 row g+8; a2 row g k 8+2t..; a3 row g+8 k 8+2t..
//   B (16 x 8, col):  b0 k 2t..2t+1 column g; b1 k 8+2t.. column g.
//   C (16 x 8): c0, c1 row g columns 2t, 2t+1; c2, c3 row g+8.
//   ldmatrix.x4: lanes 8j..8j+7 address the rows of matrix j, register j of lane l = row l / 4,
//   elements 2 (l % 4), +1 of matrix j. So for A (rows m, 8-element chunks k) matrix j = (rows
//   8 (j % 2), chunk 2 ks + j / 2) gives a0..a3, and for B ([n][k]) matrices (tile 2 nj, chunk
//   2 ks), (tile 2 nj, chunk 2 ks + 1), (tile 2 nj + 1, ...) give b0, b1 of two n8 tiles.
TORCH_EXT_HOST_DEVICE int a_ldsm_row(int warp_m, int mi, int lane) {
  return warp_m * kWM + 16 * mi + (lane % 8) + 8 * ((lane / 8) % 2);
}
TORCH_EXT_HOST_DEVICE int a_ldsm_chunk(int ks, int lane) { return 2 * ks + lane / 16; }
// Tiles 2 nj and 2 nj + 1 are 8 B rows apart (b_tile_row) for both GEMMs.
TORCH_EXT_HOST_DEVICE int b_ldsm_row(bool gate_up, int warp_n, int nj, int lane) {
  return b_tile_row(gate_up, warp_n, 2 * nj) + (lane % 8) + 8 * (lane / 16);
}
TORCH_EXT_HOST_DEVICE int b_ldsm_chunk(int ks, int lane) { return 2 * ks + (lane / 8) % 2; }

// Accumulator e of (mi, ni): tile row (grouped row - row0) and column inside the n8 tile.
TORCH_EXT_HOST_DEVICE int acc_row(int warp_m, int mi, int lane, int e) {
  return warp_m * kWM + 16 * mi + lane / 4 + 8 * (e / 2);
}
TORCH_EXT_HOST_DEVICE int acc_col_in_tile(int lane, int e) { return 2 * (lane % 4) + e % 2; }
// GEMM 1: intermediate column of gate tile ni (< kNI / 2); up tile ni + kNI / 2 holds the same.
TORCH_EXT_HOST_DEVICE int64_t gate_col(int64_t n0, int warp_n, int ni, int lane, int e) {
  return n0 + b_tile_row(true, warp_n, ni) + acc_col_in_tile(lane, e);
}
// GEMM 2: output column.
TORCH_EXT_HOST_DEVICE int64_t out_col(int64_t n0, int warp_n, int ni, int lane, int e) {
  return n0 + b_tile_row(false, warp_n, ni) + acc_col_in_tile(lane, e);
}

// =============================================================================================
// 4. Epilogues
// =============================================================================================

// act(g, u) in fp32: silu(g) u = g / (1 + e^-g) * u, or gelu(g) u = g / 2 erfc(-g / sqrt 2) u
// (= g / 2 (1 + erf(g / sqrt 2)) u).
// The result is rounded to the io dtype (the CPU kernel keeps it in fp32: GPU and CPU differ by
// that rounding, within the op's bf16 / fp16 tolerance).
TORCH_EXT_HOST_DEVICE float act_value(Activation act, float g, float u) {
  if (act == Activation::kGelu) {
    // 1 + erf(x) = erfc(-x): no cancellation for negative g (relative accuracy in the tail).
#if defined(__CUDA_ARCH__)
    const float e = erfcf(f32_mul(g, -0.70710678118654752f));
#else
    const float e = std::erfc(f32_mul(g, -0.70710678118654752f));
#endif
    return f32_mul(f32_mul(f32_mul(0.5f, g), e), u);
  }
#if defined(__CUDA_ARCH__)
  const float d = f32_add(1.0f, expf(-g));
#else
  const float d = f32_add(1.0f, std::exp(-g));
#endif
  return f32_mul(f32_div(g, d), u);
}

// Output accumulation of rank L: s = w y (L = 0), else s_prev + w y; fp32, one rounding each.
TORCH_EXT_HOST_DEVICE float combine_value(bool first, float prev, float w, float y) {
  const float c = f32_mul(w, y);
  return first ? c : f32_add(prev, c);
}

// =============================================================================================
// 5. Decode kernels (pairs <= kDecodeMaxPairs): CUDA-core dot products, a warp per column.
//    decode_gemm1: CTA (column block, active expert a): warp w computes gate and up column
//      j = block * kDecodeWarps + w for the expert's pairs, kDecodeBatch at a time; each lane
//      walks chunks lane, lane + 32, ... of H (16-byte loads of both weight rows and of the
//      batch's hidden rows), then a xor butterfly sums the lanes (fixed order: deterministic).
//    decode_gemm2: CTA (column block, token t): warp w computes out[t, n] for
//      n = block * kDecodeWarps + w, over the token's pairs in rank order (increasing expert id,
//      like GEMM 2), one dot per pair, then out rounded once: one launch, no atomics.
// =============================================================================================

// 8 warps x one column: 16 weight rows per GEMM 1 CTA; I / 8 CTAs per active expert fill the SMs
// (I = 1408 -> 176 per expert) and H / 8 per token for GEMM 2.
constexpr int kDecodeWarps = 8;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
// Pairs sharing one pass over the weights (2 x 4 fp32 accumulators per lane; hidden rows of 4
// tokens stay in L1).
constexpr int kDecodeBatch = 4;
// Chunk i of lane: elements [8 c, 8 c + 8) with c = lane + 32 i.
TORCH_EXT_HOST_DEVICE int64_t decode_chunk(int lane, int64_t i) { return lane + 32 * i; }
// A warp streams its weight rows with kDecodeUnroll 16-byte loads per lane in flight: a loop of
// one load and its FMAs leaves one load per lane outstanding (1 KB per warp), too little to keep
// HBM busy when a decode grid has few warps (GEMM 2 at T = 1: H / 8 CTAs, a third of the SMs'
// warp slots on an H100). The first decode_unrolled_iters(row_elems) iterations, in which every
// lane's chunk is a whole one (8 elements), go kDecodeUnroll at a time (loads first, then the
// FMAs in chunk order); the rest one by one. Each lane still sums its chunks in increasing
// order: the same results. Cost on sm_90a: GEMM 1 122 registers (was 64; two 8-warp CTAs per SM,
// eight 16-byte weight loads per lane in flight), GEMM 2 39 (was 32), no spills.
constexpr int kDecodeUnroll = 4;
TORCH_EXT_HOST_DEVICE int64_t decode_unrolled_iters(int64_t row_elems) {
  return row_elems / kChunkElems / 32 / kDecodeUnroll * kDecodeUnroll;
}

}  // namespace fused_moe_cuda
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
