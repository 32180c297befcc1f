// Index math of the CUDA block-sparse attention and MoBA kernels (attention/
// block_sparse_attention_cuda.cu), host+device so that tests/cpp/block_sparse_attention_cuda_sim.cpp
// runs on the CPU exactly what the GPU runs: the key-tile walk (several small key blocks gathered
// into one 64-key tile), global -> shared chunk maps with the XOR swizzle, ldmatrix addressing and
// the mma.m16n8k16 fragment maps (S / P / O, the accumulator -> A-operand reuse of P), the masking
// predicate (listed block, sequence tail, bottom-right causal, MoBA token selection), the fp32
// online-softmax recurrences and their finalization, the dK/dV kernel's walk over the transposed
// lists of a GQA group, the dK/dV split of a CTA's warps, and moba_select's eligibility and warp
// top-k insertion. Plain C++ apart from device intrinsics behind __CUDA_ARCH__.
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/dtype.h"
#include "common/float_bits.h"
#include "common/index_math.h"
#include "common/macros.h"
#include "common/wgmma_desc.h"

namespace torch_ext::attention {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace bsa_cuda {

using ::torch_ext::index_math::ceil_div;
using ::torch_ext::index_math::log2_pow2;
TORCH_EXT_HOST_DEVICE int min_int(int a, int b) { return a < b ? a : b; }
TORCH_EXT_HOST_DEVICE int max_int(int a, int b) { return a > b ? a : b; }

TORCH_EXT_HOST_DEVICE float neg_inf() { return -INFINITY; }
TORCH_EXT_HOST_DEVICE float fmax_f(float a, float b) { return a > b ? a : b; }
// 2^x: the SFU's ex2.approx on the GPU (2^-inf = +0), exp2f on the host.
TORCH_EXT_HOST_DEVICE float exp2_approx(float x) {
#if defined(__CUDA_ARCH__)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
#else
  return std::exp2(x);
#endif
}
TORCH_EXT_HOST_DEVICE float log_f(float x) {
#if defined(__CUDA_ARCH__)
  return __logf(x);
#else
  return std::log(x);
#endif
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// =============================================================================================
// 1. Tiling constants (16-bit elements: fp16 / bf16)
// =============================================================================================

// 16-byte chunks: the unit of cp.async, of ldmatrix rows and of the shared swizzle.
constexpr int kChunkBytes = 16;
constexpr int kChunkElems = 8;
// Query rows per warp: one mma m16 tile, so a row's softmax state lives in one lane quad.
constexpr int kWarpRows = 16;
// Keys per pipeline step: 8 n8 tiles of S per warp (32 fp32 registers), 4 k16 steps of P V; small
// key blocks (16, 32) are gathered 4 / 2 to a step so each ldmatrix feeds as many mmas as with
// 64-key blocks (FlashMoBA's point); 128-key blocks take 2 steps.
constexpr int kTileKv = 64;
// Key / value tiles in flight: tile t + 1 loads while tile t computes (one barrier per step).
constexpr int kStages = 2;
// Query rows per step of the dK / dV kernel: the 64-row sub-tiles of a listed query block.
constexpr int kBwdQTile = 64;
// MoBA token selection in the attention kernels: the CTA's [rows][top_k] choices sit in shared
// memory (33 KB at 128 rows x 64, rows padded to an odd stride); larger top_k is refused
// (cudaErrorInvalidValue).
constexpr int kMaxSelectionTopK = 64;
// moba_select keeps a token's top_k candidates one per lane of a warp.
constexpr int kMaxMobaTopK = 32;

// =============================================================================================
// 2. The key-tile walk of a query block: its `count` listed blocks of block_kv keys are cut into
//    segments of seg = min(block_kv, 64) keys; step t covers segments t*nseg .. t*nseg+nseg-1
//    (nseg = 64 / seg: 4 blocks of 16, 2 of 32, 1 of 64, half of a 128-block). block_kv is a
//    power of two (16 ... 128, checked on the host), so every split below is a shift or a mask:
//    the load of each step evaluates them per copy, where integer divisions by the run-time
//    block size cost ~20 instructions each.
// =============================================================================================

TORCH_EXT_HOST_DEVICE int segment_shift(int block_kv) { return log2_pow2(uint32_t(min_int(block_kv, kTileKv))); }
TORCH_EXT_HOST_DEVICE int segment_len(int block_kv) { return 1 << segment_shift(block_kv); }
TORCH_EXT_HOST_DEVICE int segments_per_tile(int block_kv) { return kTileKv >> segment_shift(block_kv); }
TORCH_EXT_HOST_DEVICE int segments_per_block(int block_kv) { return block_kv >> segment_shift(block_kv); }
TORCH_EXT_HOST_DEVICE int walk_tiles(int count, int block_kv) {
  return int(ceil_div(int64_t(count) * segments_per_block(block_kv), segments_per_tile(block_kv)));
}
// A list's stored count clamped to [0, max_blocks] (the walk never reads past the list).
TORCH_EXT_HOST_DEVICE int list_count(int raw, int max_blocks) { return raw < 0 ? 0 : min_int(raw, max_blocks); }
// Segment s (< nseg) of step t: which list slot and the first key offset inside the block.
struct Segment {
  int slot;    // index into the query block's list (>= count: past the end, empty)
  int offset;  // first key of the segment relative to the block start
};
TORCH_EXT_HOST_DEVICE Segment tile_segment(int tile, int s, int block_kv) {
  const int gs = tile * segments_per_tile(block_kv) + s;
  const int spb_shift = log2_pow2(uint32_t(segments_per_block(block_kv)));
  return Segment{gs >> spb_shift, (gs & ((1 << spb_shift) - 1)) << segment_shift(block_kv)};
}
// First key position of a segment, or -1 when it is empty: slot past the list, block id outside
// [0, nk) (ignored, as documented), or a segment starting past the keys. Always below seq_kv, so
// the int the segment tables store cannot wrap (an id of 2^26 with 64-key blocks did: its base
// became a small key position that the mask then counted, with zeros loaded for it).
TORCH_EXT_HOST_DEVICE int64_t segment_base(int block, int offset, int block_kv, int64_t seq_kv) {
  const int64_t base = int64_t(block) * block_kv + offset;
  return block < 0 || base >= seq_kv ? -1 : base;
}
// Key row r (< 64) of a step: its segment and the offset inside it.
TORCH_EXT_HOST_DEVICE int row_segment(int r, int block_kv) { return r >> segment_shift(block_kv); }
TORCH_EXT_HOST_DEVICE int row_in_segment(int r, int block_kv) { return r & (segment_len(block_kv) - 1); }

// =============================================================================================
// 3. Shared memory: [rows][D] 16-bit tiles, row = D / 8 chunks of 16 bytes, logical chunk c of
//    row r stored at chunk c ^ (r % 8). ldmatrix reads one logical chunk of 8 consecutive rows
//    (r % 8 all distinct): physical chunks then differ in their low 3 bits, so the 8 addresses
//    fall into the 8 distinct 16-byte bank groups of a 128-byte wavefront (conflict-free), for
//    D = 64 (128-byte rows) and D = 128 (256-byte rows) alike.
// =============================================================================================

TORCH_EXT_HOST_DEVICE int smem_offset(int row, int chunk, int head_dim) {
  return row * head_dim * 2 + ((chunk ^ (row & 7)) * kChunkBytes);
}
// Byte offset of element (row, col) (the output staging writes pairs of columns).
TORCH_EXT_HOST_DEVICE int smem_elem_offset(int row, int col, int head_dim) {
  return smem_offset(row, col / kChunkElems, head_dim) + (col % kChunkElems) * 2;
}
// Cooperative copy of a [rows][D] tile by `threads` threads: copy i of thread tid is chunk
// id = tid + threads * i: row id / (D / 8), chunk id % (D / 8) (consecutive threads read
// consecutive 16 bytes of a row: coalesced).
TORCH_EXT_HOST_DEVICE int copy_row(int tid, int i, int threads, int head_dim) {
  return (tid + threads * i) / (head_dim / kChunkElems);
}
TORCH_EXT_HOST_DEVICE int copy_chunk(int tid, int i, int threads, int head_dim) {
  return (tid + threads * i) % (head_dim / kChunkElems);
}
// cp.async needs 16-byte sources: the base 16-byte aligned and every stride a multiple of 8
// elements (contiguous [B, H, S, D] and the [B, S, H, D] transpose both qualify for D = 64 / 128).
TORCH_EXT_HOST_DEVICE bool bhsd_vectorizable(uint64_t address, int64_t batch_stride, int64_t head_stride,
                                            int64_t seq_stride) {
  return address % kChunkBytes == 0 && batch_stride % kChunkElems == 0 && head_stride % kChunkElems == 0 &&
         seq_stride % kChunkElems == 0;
}

// =============================================================================================
// 4. Fragments (PTX ISA, mma.m16n8k16 .f16 / .bf16, .f32 accumulators; g = lane / 4,
//    t = lane % 4):
//    A (16 x 16, row): reg 0: row g, k 2t, 2t+1; reg 1: row g+8; reg 2: row g, k 8+2t..;
//      reg 3: row g+8, k 8+2t.. (low half = lower k).
//    B (16 x 8, col): reg 0: column g, k 2t, 2t+1; reg 1: column g, k 8+2t, 8+2t+1.
//    C (16 x 8): c0, c1: row g, columns 2t, 2t+1; c2, c3: row g+8.
//    ldmatrix .x4: lane l gives the address of row l % 8 of matrix l / 8; register j of lane l
//    receives row l / 4, columns 2 (l % 4), +1 of matrix j (.trans: column l / 4, rows 2 (l % 4), +1).
// =============================================================================================

// A operand from a [m][k] tile (Q, dO, K, V as the left operand): matrices 0..3 = (rows 0-7,
// k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15) = registers 0..3.
// The same addresses, .trans, give the B operands of n8 tiles 2 nj, 2 nj + 1 from a [k][n] tile
// (V in P V, K in dS K, dO / Q in the dK / dV kernel): registers 0, 1 = tile 2 nj, 2, 3 = 2 nj + 1.
TORCH_EXT_HOST_DEVICE int ldsm_a_row(int lane) { return (lane % 8) + 8 * ((lane / 8) % 2); }
TORCH_EXT_HOST_DEVICE int ldsm_a_chunk(int k16, int lane) { return 2 * k16 + lane / 16; }
TORCH_EXT_HOST_DEVICE int ldsm_bt_row(int lane) { return ldsm_a_row(lane); }
TORCH_EXT_HOST_DEVICE int ldsm_bt_chunk(int nj, int lane) { return 2 * nj + lane / 16; }
// B operands of n8 tiles 2 nj, 2 nj + 1 from a [n][k] tile (K in Q K^T, V in dO V^T, Q / dO in
// the dK / dV kernel), not transposed: matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7),
// (n 8-15, k 8-15): registers 0, 1 = tile 2 nj, 2, 3 = tile 2 nj + 1.
TORCH_EXT_HOST_DEVICE int ldsm_b_row(int lane) { return (lane % 8) + 8 * (lane / 16); }
TORCH_EXT_HOST_DEVICE int ldsm_b_chunk(int k16, int lane) { return 2 * k16 + (lane / 8) % 2; }

// Accumulator element e (< 4) of an n8 tile: row inside the m16 tile and column inside the n8 tile.
TORCH_EXT_HOST_DEVICE int acc_row(int lane, int e) { return lane / 4 + 8 * (e / 2); }
TORCH_EXT_HOST_DEVICE int acc_col(int lane, int e) { return 2 * (lane % 4) + e % 2; }
// Accumulator -> A operand (P in P V, dS in dS K): the C tiles 2 kk, 2 kk + 1 of an m16 x 16k
// slab are exactly the A fragment of k16 step kk: A register r packs (low, high) = elements
// c2a_elem(r, 0), c2a_elem(r, 1) of C tile c2a_tile(kk, r).
TORCH_EXT_HOST_DEVICE int c2a_tile(int kk, int r) { return 2 * kk + r / 2; }
TORCH_EXT_HOST_DEVICE int c2a_elem(int r, int half) { return 2 * (r % 2) + half; }

// =============================================================================================
// 5. Masking: query position i (< Sq) sees key position j iff j is in a listed block (segment
//    base >= 0), j < Sk, causal -> j <= i + Sk - Sq, and with MoBA selection the key's block is
//    among i's choices.
// =============================================================================================

TORCH_EXT_HOST_DEVICE bool key_visible(int64_t q_pos, int64_t k_pos, int64_t seq_q, int64_t seq_kv, bool causal) {
  return k_pos >= 0 && k_pos < seq_kv && (!causal || k_pos <= q_pos + seq_kv - seq_q);
}
// Whether `block` is among the top_k choices of a token (row of the selection table).
TORCH_EXT_HOST_DEVICE bool block_selected(const int32_t* choices, int top_k, int block) {
  bool hit = false;
  for (int k = 0; k < top_k; ++k) hit |= choices[k] == block;
  return hit;
}
// The forward and dQ kernels keep each row's choices sorted ascending in shared memory (sorted
// once per CTA: moba_select's lists already are, so the sort is one pass), and look a step's
// blocks up by binary search: ceil(log2 top_k) + 1 shared loads per (row, block) instead of
// top_k (block 16 / top-k 32: 4 blocks a step, 2 rows a lane: 48 loads instead of 256).
// Words between two rows of that table: top_k rounded up to odd, so that the rows a warp looks
// up at once (8, one per lane quad) fall in distinct shared-memory banks.
TORCH_EXT_HOST_DEVICE constexpr int selection_row_stride(int top_k) { return top_k == 0 ? 0 : (top_k | 1); }
TORCH_EXT_HOST_DEVICE void sort_choices(int32_t* choices, int top_k) {
  for (int i = 1; i < top_k; ++i) {
    const int32_t v = choices[i];
    int j = i;
    for (; j > 0 && choices[j - 1] > v; --j) choices[j] = choices[j - 1];
    choices[j] = v;
  }
}
TORCH_EXT_HOST_DEVICE bool sorted_choices_hold(const int32_t* sorted, int top_k, int block) {
  int below = 0;  // sorted[0, below) < block
  for (int step = kMaxSelectionTopK; step > 0; step /= 2)
    if (below + step <= top_k && sorted[below + step - 1] < block) below += step;
  return below < top_k && sorted[below] == block;
}
// The first keys of a step's (at most 4) segments, -1 for an empty one, and a row's MoBA choice
// bits (bit s: segment s's block is among the row's choices; all set without selection).
constexpr int kMaxSegments = kTileKv / 16;
struct StepSegments {
  int base[kMaxSegments];
};
// Selects instead of indexing, so that a kernel keeps the 4 bases in registers.
TORCH_EXT_HOST_DEVICE int segment_base_of(const StepSegments& g, int s) {
  return s == 0 ? g.base[0] : (s == 1 ? g.base[1] : (s == 2 ? g.base[2] : g.base[3]));
}
// Whether column col (< 64) of a step is visible to query position q_pos with choice bits `allowed`.
TORCH_EXT_HOST_DEVICE bool step_element_visible(const StepSegments& g, unsigned allowed, int col, int block_kv,
                                               int64_t q_pos, int64_t seq_q, int64_t seq_kv, bool causal) {
  const int s = row_segment(col, block_kv);
  const int base = segment_base_of(g, s);
  const int64_t k_pos = base < 0 ? -1 : int64_t(base) + row_in_segment(col, block_kv);
  return ((allowed >> s) & 1u) && key_visible(q_pos, k_pos, seq_q, seq_kv, causal);
}
// A step none of whose keys a warp's 16 rows can see, MoBA choices aside: no listed segment
// (first_key, the smallest listed segment base, is -1) or only keys past Sk, the rows all past Sq,
// or (causal) the first key past the horizon of the warp's last row. The forward and dQ kernels
// skip such a step for the warp (it would add exactly nothing: a rescale by 1, P = 0), as they do
// when no row of the warp chose any of the step's blocks (a vote over the lanes' choice bits).
// rows: 64 for a warpgroup (the Hopper dQ kernel skips a step for a warpgroup all of whose rows
// it hides).
TORCH_EXT_HOST_DEVICE bool step_hidden_from_rows(int64_t first_key, int64_t first_q, int64_t seq_q, int64_t seq_kv,
                                                bool causal, int rows = kWarpRows) {
  if (first_key < 0 || first_key >= seq_kv || first_q >= seq_q) return true;
  const int64_t last_q = first_q + rows - 1 < seq_q ? first_q + rows - 1 : seq_q - 1;
  return causal && first_key > last_q + seq_kv - seq_q;
}
// The 16-key slices of a step a warp computes (bit j: keys 16 j .. 16 j + 15, an n8 pair of S and a
// k16 step of P V / dS K), from its live segments (bit s: segment s is listed and, with MoBA, some
// row of the warp chose its block). A slice of a dead segment holds no element visible to the
// warp's rows: S there would be masked to -inf and P be 0, so the mma.sync kernels skip its mmas.
// Slices are 16 keys and segments at least 16, so slice j lies in segment 16 j / segment length.
constexpr int kSlices = kTileKv / 16;
TORCH_EXT_HOST_DEVICE unsigned live_slices(unsigned live_segments, int block_kv) {
  unsigned bits = 0;
  for (int j = 0; j < kSlices; ++j)
    if ((live_segments >> ((16 * j) >> segment_shift(block_kv))) & 1u) bits |= 1u << j;
  return bits;
}
// A whole step needs no per-element mask when every segment is listed and full, no selection
// applies, and (causal) its last key is visible to the warp's first row.
TORCH_EXT_HOST_DEVICE bool tile_fully_visible(int64_t first_q, int64_t last_key, bool all_full, bool selection,
                                             int64_t seq_q, int64_t seq_kv, bool causal) {
  return all_full && !selection && (!causal || last_key <= first_q + seq_kv - seq_q);
}

// =============================================================================================
// 6. Online softmax (per query row, log2 domain: x = score * scale * log2(e)). A lane holds two
//    rows (g, g + 8) and a partial sum over its columns; the row max is reduced over the lane
//    quad each step, the sum only at the end (the rescale factor is the same for the 4 lanes).
// =============================================================================================

struct RowState {
  float m;  // running max of x over visible keys (-inf: none yet)
  float l;  // this lane's partial sum of 2^(x - m)
};
TORCH_EXT_HOST_DEVICE RowState row_state_init() { return RowState{neg_inf(), 0.0f}; }
// Reference point of the exponentials: the new max, or 0 while the row has seen nothing (so that
// masked x = -inf gives 2^-inf = 0, never -inf - -inf = NaN).
TORCH_EXT_HOST_DEVICE float softmax_ref(float m) { return m == neg_inf() ? 0.0f : m; }
// Step with tile maximum `tile_max` (quad-reduced, -inf when all masked): returns the factor that
// rescales l and the O accumulators, and moves m. The caller then adds 2^(x - softmax_ref(m)).
TORCH_EXT_HOST_DEVICE float softmax_rescale(RowState& s, float tile_max) {
  const float m_new = fmax_f(s.m, tile_max);
  const float alpha = exp2_approx(s.m - softmax_ref(m_new));  // -inf - ref: 0 (first visible step)
  s.m = m_new;
  s.l *= alpha;
  return alpha;
}
TORCH_EXT_HOST_DEVICE float softmax_prob(float x, const RowState& s) { return exp2_approx(x - softmax_ref(s.m)); }
// End of the walk, l the quad-reduced sum: 1 / l for O (0 when nothing was seen: O is 0) and the
// natural-log lse (-inf when nothing was seen).
TORCH_EXT_HOST_DEVICE float softmax_out_scale(float l) { return l > 0.0f ? 1.0f / l : 0.0f; }
TORCH_EXT_HOST_DEVICE float softmax_lse(float m, float l) {
  return l > 0.0f ? m * kLn2 + log_f(l) : neg_inf();
}
// Backward: P = 2^(x - lse * log2 e); a row whose lse is -inf saw no key (every element masked):
// +inf makes its P exactly 0 even if a caller's list disagreed.
TORCH_EXT_HOST_DEVICE float lse_log2(float lse) { return lse == neg_inf() ? INFINITY : lse * kLog2e; }

// =============================================================================================
// 7. Backward dK / dV: a CTA owns key block kb of kv head hk; its warps split as
//    kWarpsKey = block_kv / 16 along keys x kWarpsQ along the 64 query rows of a step (DkdvTraits),
//    and walk every query head of the group, each listed query block, each 64-row sub-tile.
// =============================================================================================

// Cursor over the steps of the transposed walk: group head g (query head hk * group + g), slot of
// (b, h, kb)'s list, 64-row sub-tile of the listed query block. counts: the group's heads'
// counts at (b, ., kb), head stride `head_stride`.
// (Counts clamped by list_count.)
struct TransposedCursor {
  int g, slot, sub;
  int count;  // count of head g
};
struct TransposedLists {
  const int32_t* counts;  // at (b, first head of the group, kb)
  int64_t head_stride;
  int group, max_blocks;
};
TORCH_EXT_HOST_DEVICE int group_count(const TransposedLists& t, int g) {
  return list_count(t.counts[g * t.head_stride], t.max_blocks);
}
TORCH_EXT_HOST_DEVICE void cursor_skip_empty(TransposedCursor& c, const TransposedLists& t) {
  while (c.g < t.group && c.slot >= c.count) {
    ++c.g;
    c.slot = 0;
    c.sub = 0;
    c.count = c.g < t.group ? group_count(t, c.g) : 0;
  }
}
TORCH_EXT_HOST_DEVICE TransposedCursor cursor_begin(const TransposedLists& t) {
  TransposedCursor c{0, 0, 0, t.group > 0 ? group_count(t, 0) : 0};
  cursor_skip_empty(c, t);
  return c;
}
TORCH_EXT_HOST_DEVICE bool cursor_valid(const TransposedCursor& c, const TransposedLists& t) { return c.g < t.group; }
TORCH_EXT_HOST_DEVICE void cursor_advance(TransposedCursor& c, const TransposedLists& t, int subs_per_block) {
  if (++c.sub == subs_per_block) {
    c.sub = 0;
    ++c.slot;
    cursor_skip_empty(c, t);
  }
}
// Steps of the whole walk.
TORCH_EXT_HOST_DEVICE int walk_steps(const TransposedLists& t, int subs_per_block) {
  int steps = 0;
  for (int g = 0; g < t.group; ++g) steps += group_count(t, g) * subs_per_block;
  return steps;
}

// =============================================================================================
// 8. moba_select. Block b of block_size keys is eligible for query i when it exists and, causal,
//    b < cur = (i + Sk - Sq) / block_size (cur itself is forced in; no block when i + Sk - Sq < 0).
//    Scores on tensor cores: a warp owns 16 query tokens (one m16 tile) and scores a staged chunk
//    of 32 pooled blocks (4 n8 tiles) with mma.m16n8k16, then hands block c0 + j of each row to
//    lane j through a shared score tile and keeps the best K (= top_k, or top_k - 1 next to the
//    forced block) as a sorted list, entry r in lane r.
// =============================================================================================

// Blocks a CTA stages per step: 4 n8 tiles of a warp's scores, one block per lane in the merge.
constexpr int kMobaChunk = 32;
// Warps of 16 query tokens per CTA share each staged chunk of pooled keys: 4 (64 tokens), or 2 / 1
// where the layout of 4 exceeds the device's shared memory per CTA (moba_warps_for).
constexpr int kMobaMaxWarps = 4;
constexpr int kMobaRowsPerWarp = 16;
// Pooled chunks in flight: chunk c + 1 loads while chunk c is scored and merged.
constexpr int kMobaStages = 2;
// Threads of the mean-pooling kernel (one per head-dim column, looping past 128).
constexpr int kPoolThreads = 128;

TORCH_EXT_HOST_DEVICE int moba_blocks(int64_t seq_kv, int block_size) { return int(ceil_div(seq_kv, block_size)); }
// Position of query i in key coordinates, and its current block (-1: none, it sees no key).
TORCH_EXT_HOST_DEVICE int moba_current_block(int64_t q_pos, int64_t seq_q, int64_t seq_kv, int block_size) {
  const int64_t pos = q_pos + seq_kv - seq_q;
  return pos < 0 ? -1 : int(pos / block_size);
}
// Blocks [0, limit) compete; `forced` (or -1) is kept besides; K = slots left for the competition.
struct MobaRange {
  int limit;
  int forced;
  int k;
};
TORCH_EXT_HOST_DEVICE MobaRange moba_range(int64_t q_pos, int64_t seq_q, int64_t seq_kv, int block_size,
                                          int top_k, bool causal) {
  const int blocks = moba_blocks(seq_kv, block_size);
  if (!causal) return MobaRange{blocks, -1, min_int(top_k, blocks)};
  const int cur = moba_current_block(q_pos, seq_q, seq_kv, block_size);
  if (cur < 0 || top_k <= 0) return MobaRange{0, -1, 0};
  return MobaRange{cur, cur, min_int(top_k - 1, cur)};
}
// Order of the top-k list: higher score first, then lower block id. An empty slot is (-inf,
// INT32_MAX), beaten by any candidate but a NaN score (never selected).
constexpr int32_t kMobaEmptyId = 0x7fffffff;
TORCH_EXT_HOST_DEVICE bool moba_beats(float sa, int32_t ia, float sb, int32_t ib) {
  return sa > sb || (sa == sb && ia < ib);
}
// Insertion of a candidate that `pos` entries beat (pos < K): lane r keeps its entry (r < pos),
// takes the candidate (r == pos) or its upper neighbour's entry (r > pos: shuffle up by 1).
// Returns 0: keep, 1: candidate, 2: from lane r - 1.
TORCH_EXT_HOST_DEVICE int moba_insert_source(int r, int pos) { return r < pos ? 0 : (r == pos ? 1 : 2); }
// Many candidates at once (the first chunks of a long row: with top_k = 32 about 32, 31, 16, 11
// ... in chunks 1, 2, 3, 4, K (1 + ln(n / K)) insertions over n blocks, ~20 instructions each)
// are merged instead: a bitonic sort of the chunk's candidates across the 32 lanes (best first),
// then each lane keeps the better of its list entry and the sorted candidates' entry 31 - lane
// (a bitonic sequence holding the best 32 of both), then a bitonic clean-up (~230 instructions
// in all). Lanes >= K then hold the next best entries, which no one reads: they rank below the
// K-th, which only improves, so later merges keep the best K. Above this many candidates.
constexpr int kMobaBatchMerge = 12;
// Compare-exchange of the bitonic network at (size, stride): the lane keeps the better of its
// entry and lane ^ stride's when this is true, else the worse; blocks of `size` lanes alternate
// best-first / worst-first, and size 32 leaves all 32 best-first.
TORCH_EXT_HOST_DEVICE bool moba_keep_better(int lane, int size, int stride) {
  return ((lane & size) == 0) == ((lane & stride) == 0);
}
// Output slot of a selected block: its rank among the selected ids (all distinct); the forced
// block (the largest id) follows them.
TORCH_EXT_HOST_DEVICE int moba_output_slot(int rank) { return rank; }
// moba_block_lists on the GPU: a CTA per (query block, head, batch) marks its rows' choices in a
// bitmask over key blocks in shared memory, then writes the set bits in ascending order: thread t
// owns words [t per, (t + 1) per) and a block-wide scan of their bit counts gives its first slot.
constexpr int kListThreads = 256;
// Shared memory above this takes the tensor-op path (a bitmask for ~370K key blocks).
constexpr int kMaxListSmemBytes = 48 * 1024;
TORCH_EXT_HOST_DEVICE int list_mask_words(int num_kv_blocks) { return int(ceil_div(num_kv_blocks, 32)); }
TORCH_EXT_HOST_DEVICE int list_words_per_thread(int num_kv_blocks) {
  return int(ceil_div(list_mask_words(num_kv_blocks), kListThreads));
}
// The bits of mask word w that stand for key blocks (all but past num_kv_blocks in the last).
TORCH_EXT_HOST_DEVICE uint32_t list_word_valid_bits(int w, int num_kv_blocks) {
  const int left = num_kv_blocks - 32 * w;
  return left >= 32 ? 0xffffffffu : (left <= 0 ? 0u : (1u << left) - 1u);
}
TORCH_EXT_HOST_DEVICE int64_t list_smem_bytes(int64_t num_kv_blocks) {
  return (ceil_div(num_kv_blocks, 32) + kListThreads / 32) * 4;  // the mask, the block scan's warp sums
}

// The 16-bit type the tensor cores score in: fp16 inputs in fp16, bf16 and fp32 inputs in bf16.
// Scores must rank blocks as fp32 dot products do (near ties aside), so the pooled means (fp32)
// go in as two 16-bit terms, hi = round(p) and lo = round(p - hi) (p - hi is exact in fp32):
// 22 significant bits in fp16, 16 in bf16, against 11 / 8 for hi alone. fp16 / bf16 queries are
// exact in their own type; fp32 queries are split the same way (kMobaSplitQ) and their lo term
// multiplies hi of the keys (the lo x lo product, below 2^-16 of the score, is left out).
template <typename T>
using MobaMma = std::conditional_t<std::is_same_v<T, Half>, Half, BFloat16>;
template <typename T>
constexpr bool kMobaSplitQ = std::is_same_v<T, float>;
template <typename M>
struct MobaSplit {
  M hi, lo;
};
template <typename M>
TORCH_EXT_HOST_DEVICE MobaSplit<M> moba_split(float x) {
  const M hi = from_float<M>(x);
  return MobaSplit<M>{hi, from_float<M>(x - to_float(hi))};
}

// Head dim padded to whole k16 steps (zero columns add nothing to a score).
TORCH_EXT_HOST_DEVICE int moba_dim_padded(int head_dim) { return int(ceil_div(head_dim, 16)) * 16; }
// Shared rows of 16-bit elements are the padded dim + 8: an odd number of 16-byte chunks, so the 8
// row addresses of each ldmatrix matrix (8 consecutive rows) fall into 8 distinct bank groups.
TORCH_EXT_HOST_DEVICE int moba_row_bytes(int head_dim) { return (moba_dim_padded(head_dim) + 8) * 2; }
// Byte offset of 16-byte chunk `chunk` of row `row` in a [rows][moba_row_bytes] tile.
TORCH_EXT_HOST_DEVICE int moba_smem_offset(int row, int chunk, int head_dim) {
  return row * moba_row_bytes(head_dim) + chunk * 16;
}
// A warp's scores pass through shared memory as [16][kMobaScoreStride] fp32 (row r, block c0 + j
// at r * stride + j): the accumulators go in as float2 (c0, c1 / c2, c3 of each n8 tile), and
// with a stride of 40 words the 16 lanes of each half-warp phase cover the 32 banks once; lane j
// then reads column j of a row (conflict-free).
constexpr int kMobaScoreStride = 40;
TORCH_EXT_HOST_DEVICE int moba_score_index(int row, int block) { return row * kMobaScoreStride + block; }

// moba_select_kernel's shared memory (bytes) for `warps` warps: the CTA's query rows (hi, then lo
// when split), then kMobaStages stages of pooled chunks (hi rows, then lo rows), then the warps'
// score tiles.
// Then the warps' top-k lists (per row of the warp, one fp32 score and one int32 id per lane) and
// the rows' competition ranges (limit, K): shared, not registers, so the kernel walks a warp's 16
// rows in a rolled loop (unrolled over 16 register lists it was 15-24K instructions, far more
// than the instruction cache holds, and the merge runs that code once per chunk).
struct MobaSmemLayout {
  int q_hi, q_lo, stages, stage_bytes, lo_in_stage, scores, list_scores, list_ids, ranges, total;
};
TORCH_EXT_HOST_DEVICE MobaSmemLayout moba_smem_layout(int head_dim, bool split_q, int warps) {
  const int row = moba_row_bytes(head_dim), rows = warps * kMobaRowsPerWarp;
  MobaSmemLayout l{};
  l.q_hi = 0;
  l.q_lo = rows * row;
  l.stages = l.q_lo + (split_q ? rows * row : 0);
  l.lo_in_stage = kMobaChunk * row;
  l.stage_bytes = 2 * kMobaChunk * row;
  l.scores = l.stages + kMobaStages * l.stage_bytes;
  l.list_scores = l.scores + rows * kMobaScoreStride * 4;
  l.list_ids = l.list_scores + rows * 32 * 4;
  l.ranges = l.list_ids + rows * 32 * 4;
  l.total = l.ranges + rows * 2 * 4;
  return l;
}
// Word offsets inside those regions: row r of the CTA (warp r / 16), lane `lane`'s list entry; the
// row's limit and K.
TORCH_EXT_HOST_DEVICE int moba_list_index(int row, int lane) { return row * 32 + lane; }
TORCH_EXT_HOST_DEVICE int moba_range_index(int row, int field) { return row * 2 + field; }
// The most warps (4, 2, 1) whose layout fits `smem_limit` bytes per CTA, 0 if none does. At
// head_dim 256 four warps take 129 KB (fp16 / bf16) or 162 KB (fp32, split queries): fine on
// sm_80 / sm_90 (163 / 227 KB), two or one on sm_86 / sm_89 (99 KB); one warp needs at most 92 KB.
TORCH_EXT_HOST_DEVICE int moba_warps_for(int head_dim, bool split_q, int64_t smem_limit) {
  for (int warps = kMobaMaxWarps; warps >= 1; warps /= 2)
    if (moba_smem_layout(head_dim, split_q, warps).total <= smem_limit) return warps;
  return 0;
}
// Pooled keys in the workspace: [B, Hk, 2 (hi, lo), blocks, padded dim] of MobaMma<T>, zero past
// head_dim. Element offset of row (b, hk, part, block).
TORCH_EXT_HOST_DEVICE int64_t moba_pooled_row(int64_t b, int64_t hk, int part, int64_t block, int64_t heads_kv,
                                              int64_t blocks, int head_dim) {
  return (((b * heads_kv + hk) * 2 + part) * blocks + block) * moba_dim_padded(head_dim);
}
// Pooled-chunk copy i of thread tid (16 bytes): part (hi / lo), row (block c0 + row) and chunk of
// the row; consecutive threads take consecutive chunks of a row (coalesced).
struct MobaCopy {
  int part, row, chunk;
};
TORCH_EXT_HOST_DEVICE int moba_chunks_per_row(int head_dim) { return moba_dim_padded(head_dim) / 8; }
TORCH_EXT_HOST_DEVICE int moba_stage_copies(int head_dim) { return 2 * kMobaChunk * moba_chunks_per_row(head_dim); }
TORCH_EXT_HOST_DEVICE MobaCopy moba_copy(int id, int head_dim) {
  const int per_row = moba_chunks_per_row(head_dim);
  const int row = id / per_row;
  return MobaCopy{row / kMobaChunk, row % kMobaChunk, id % per_row};
}

// =============================================================================================
// 9. Kernel traits: warps, fragment counts and the shared-memory layout of each kernel
// =============================================================================================

// Forward and dQ: kBlockQ / 16 warps, one m16 slab of query rows each.
template <int kD, int kBlockQ, bool kBackward>
struct RowTraits {
  static constexpr int kWarps = kBlockQ / kWarpRows;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = kD / kChunkElems;   // 16-byte chunks per row
  static constexpr int kK16 = kD / 16;                 // k16 steps of Q K^T
  static constexpr int kON = kD / 8;                   // n8 tiles of O / dQ
  static constexpr int kSN = kTileKv / 8;              // n8 tiles of S per step
  static constexpr int kRowBytes = kBlockQ * kD * 2;   // Q (and dO)
  static constexpr int kKvBytes = kTileKv * kD * 2;
  static constexpr int kStageBytes = 2 * kKvBytes;     // K, V
  static constexpr int kQOffset = 0;
  static constexpr int kStageOffset = (kBackward ? 2 : 1) * kRowBytes;  // Q (and dO at kRowBytes)
  // Per stage: segment bases (first key, -1 empty) and block ids of the step's <= kMaxSegments.
  static constexpr int kSegOffset = kStageOffset + kStages * kStageBytes;
  static constexpr int kSelOffset = kSegOffset + kStages * 2 * kMaxSegments * 4;
  static constexpr int kRowCopies = kBlockQ * kChunks / kThreads;
  static constexpr int kKvCopies = kTileKv * kChunks / kThreads;
  static_assert(kBlockQ * kChunks % kThreads == 0 && kTileKv * kChunks % kThreads == 0, "whole copies");
  static_assert(kTileKv / 16 <= kMaxSegments, "segments of >= 16 keys");
  static constexpr int smem_bytes(int top_k) { return kSelOffset + kBlockQ * selection_row_stride(top_k) * 4; }
};

// dK / dV: block_kv / 16 key warps (16 key rows each) x query warps splitting a step's 64 query
// rows, 4 warps at least: 1 x 4, 2 x 2, 4 x 1, 8 x 1 for block_kv 16, 32, 64, 128.
template <int kD, int kBlockKv>
struct DkdvTraits {
  static constexpr int kWarpsKey = kBlockKv / kWarpRows;
  static constexpr int kWarpsQ = kWarpsKey >= 4 ? 1 : 4 / kWarpsKey;
  static constexpr int kWarps = kWarpsKey * kWarpsQ;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kChunks = kD / kChunkElems;
  static constexpr int kK16 = kD / 16;
  static constexpr int kON = kD / 8;
  static constexpr int kQCols = kBwdQTile / kWarpsQ;  // query rows of a step per warp
  // Query columns per pass (a rolled loop, so K / V fragments are not hoisted across passes): S^T
  // and dP^T take 2 x kQInner / 2 registers next to the kD of dK and dV: 16 at D = 128, 32 at 64.
  static constexpr int kQInnerMax = kD == 128 ? 16 : 32;
  static constexpr int kQInner = kQCols < kQInnerMax ? kQCols : kQInnerMax;
  static constexpr int kNI = kQInner / 8;
  static constexpr int kKvBytes = kBlockKv * kD * 2;
  static constexpr int kTileBytes = kBwdQTile * kD * 2;
  static constexpr int kKOffset = 0, kVOffset = kKvBytes;
  static constexpr int kStageOffset = 2 * kKvBytes;
  // Per stage: Q, dO, lse[64], delta[64], pos[64] (each row's query position, -1 where the row
  // does not exist or, with MoBA, did not choose the block), the step's first query position.
  static constexpr int kLseOffset = 2 * kTileBytes;
  static constexpr int kDeltaOffset = kLseOffset + kBwdQTile * 4;
  static constexpr int kPosOffset = kDeltaOffset + kBwdQTile * 4;
  static constexpr int kQBaseOffset = kPosOffset + kBwdQTile * 4;
  static constexpr int kStageBytes = kQBaseOffset + 16;
  static constexpr int kSmemBytes = kStageOffset + kStages * kStageBytes;
  // End: the partial dK, dV (16 x D fp32 each) of query warps 1.. reuse the stage area.
  static constexpr int kPartialBytes = 2 * kWarpRows * kD * 4;
  static_assert((kWarpsQ - 1) * kWarpsKey * kPartialBytes <= kStages * kStageBytes, "partials fit");
  static constexpr int kKvCopies = kBlockKv * kChunks / kThreads;
  static constexpr int kTileCopies = kBwdQTile * kChunks / kThreads;
  static_assert(kBlockKv * kChunks % kThreads == 0 && kBwdQTile * kChunks % kThreads == 0, "whole copies");
  static_assert(kQCols % kQInner == 0 && kQInner % 16 == 0, "k16 steps of P^T");
};

// The most dynamic shared memory one launch of the forward (or of the backward's dQ and dK / dV
// kernels) asks for: head_dim 64 / 128, block_q 64 / 128, block_kv 16 ... 128, MoBA top_k (0:
// none). The host checks it against the device's opt-in limit (99 KB on sm_86 / sm_89, 163 KB on
// sm_80, 227 KB on sm_90) before launching.
template <int kD>
constexpr int attention_smem_bytes_for(int block_q, int block_kv, int top_k, bool backward) {
  const int rows = block_q == 64 ? (backward ? RowTraits<kD, 64, true>::smem_bytes(top_k)
                                             : RowTraits<kD, 64, false>::smem_bytes(top_k))
                                 : (backward ? RowTraits<kD, 128, true>::smem_bytes(top_k)
                                             : RowTraits<kD, 128, false>::smem_bytes(top_k));
  if (!backward) return rows;
  const int keys = block_kv == 16   ? DkdvTraits<kD, 16>::kSmemBytes
                   : block_kv == 32 ? DkdvTraits<kD, 32>::kSmemBytes
                   : block_kv == 64 ? DkdvTraits<kD, 64>::kSmemBytes
                                    : DkdvTraits<kD, 128>::kSmemBytes;
  return rows > keys ? rows : keys;
}
constexpr int attention_smem_bytes(int head_dim, int block_q, int block_kv, int top_k, bool backward) {
  return head_dim == 64 ? attention_smem_bytes_for<64>(block_q, block_kv, top_k, backward)
                        : attention_smem_bytes_for<128>(block_q, block_kv, top_k, backward);
}

// =============================================================================================
// 10. The Hopper forward (attention/block_sparse_attention_wgmma.cu, sm_90a: wgmma). Same CTA,
//     walk, masks and softmax as the mma.sync forward (RowTraits' sizes and offsets); warpgroup g
//     (warps 4 g .. 4 g + 3) owns query rows 64 g .. 64 g + 63, and the tensor cores read Q, K and
//     V from shared memory, so the tiles take wgmma's 128-byte-swizzled layout:
//     [D / 64 column blocks][rows][128 bytes], 16-byte chunk c of row r at
//     (c / 8) rows 128 + r 128 + 16 ((c % 8) ^ (r % 8)) (for D = 64 this is smem_offset's layout).
//     S = Q K^T, m64n64k16: Q (A) and K (B) K-major, 8-row groups 1024 bytes apart (SBO), the
//       leading offset unused; k16 step s starts 32 (s % 4) bytes into the rows of column block
//       s / 4.
//     O += P V, m64n<D>k16: P from registers (S's accumulators rounded to T: for 16-bit types
//       wgmma's register A fragment of a warp's 16 rows is mma.m16n8k16's, so acc_to_a serves
//       both), V (B) MN-major, read transposed: N = D in column blocks 64 rows x 128 bytes apart
//       (LBO), K = keys in 8-row groups 1024 bytes apart (SBO); k16 step kk starts 2048 kk bytes
//       into the tile.
//     Descriptors: common/wgmma_desc.h.
// =============================================================================================

constexpr int kWgmmaRows = 64;                                      // query rows per warpgroup
constexpr int kWgmmaVBlockBytes = kTileKv * kWgmmaSwizzleRowBytes;  // V's LBO

template <int kRows>
TORCH_EXT_HOST_DEVICE int wgmma_tile_offset(int row, int chunk) {
  return (chunk / 8) * kRows * kWgmmaSwizzleRowBytes + row * kWgmmaSwizzleRowBytes + ((chunk % 8) ^ (row % 8)) * kChunkBytes;
}
// K-major operand (Q, K) of a tile with kRows rows: descriptor of k16 step s.
template <int kRows>
TORCH_EXT_HOST_DEVICE uint64_t wgmma_kmajor_desc(uint32_t tile_address, int k16) {
  return wgmma_kmajor_sw128_desc(tile_address + uint32_t((k16 / 4) * kRows * kWgmmaSwizzleRowBytes + (k16 % 4) * 32));
}
// V (MN-major) of a 64-key tile: descriptor of k16 step kk (keys 16 kk .. 16 kk + 15).
TORCH_EXT_HOST_DEVICE uint64_t wgmma_v_desc(uint32_t tile_address, int kk) {
  return wgmma_sw128_desc(tile_address + uint32_t(kk * 16 * kWgmmaSwizzleRowBytes), kWgmmaVBlockBytes, kWgmmaAtomBytes);
}
// Dynamic shared memory of the Hopper forward: RowTraits' layout plus one atom, since the kernel
// aligns its base up to 1024 bytes (the swizzle works on absolute address bits).
template <int kD, int kBlockQ>
constexpr int wgmma_forward_smem_bytes(int top_k) {
  return RowTraits<kD, kBlockQ, false>::smem_bytes(top_k) + kWgmmaAtomBytes;
}
template <int kD, int kBlockQ>
constexpr bool wgmma_tiles_on_atoms() {
  using Tr = RowTraits<kD, kBlockQ, false>;
  return Tr::kQOffset % kWgmmaAtomBytes == 0 && Tr::kStageOffset % kWgmmaAtomBytes == 0 &&
         Tr::kStageBytes % kWgmmaAtomBytes == 0 && Tr::kKvBytes % kWgmmaAtomBytes == 0;
}
static_assert(wgmma_tiles_on_atoms<64, 64>() && wgmma_tiles_on_atoms<128, 64>() && wgmma_tiles_on_atoms<64, 128>() &&
                  wgmma_tiles_on_atoms<128, 128>(),
              "Q, K and V tiles start on swizzle atoms");

// =============================================================================================
// 11. The Hopper backward (attention/block_sparse_attention_wgmma_bwd.cu, sm_90a).
//     dQ: the dQ kernel's CTA (RowTraits<kD, kBlockQ, true>: Q and dO resident, K / V steps) with
//       its tiles in wgmma's layout; per step S = Q K^T and dP = dO V^T as m64n64k16 from shared
//       memory (Q, dO, K, V all K-major, as Q and K in the forward), dQ += dS K as m64n<D>k16 with
//       dS from registers and K read transposed (wgmma_v_desc, as V in the forward).
//     dK / dV: a CTA of block_kv / 64 warpgroups (block_kv 64, 128), warpgroup g owning keys
//       64 g .. 64 g + 63, warp w of the CTA key rows 16 w .. 16 w + 15 (the mma.sync kernel's
//       key warps); K and V resident (K-major A operands, rows 64 g.. of a block_kv-row tile), the
//       walk's 64-row Q / dO sub-tiles double-buffered in 64-row tiles. Per step S^T = K Q^T and
//       dP^T = V dO^T (m64n64k16, Q and dO K-major B), P^T and dS^T in registers, then
//       dV += P^T dO and dK += dS^T Q (m64n<D>k16, dO and Q read transposed: wgmma_v_desc).
//     Both need 1024-byte-aligned tiles: the stage of the dK / dV kernel is rounded up to atoms.
// =============================================================================================

// DkdvTraits' warps (block_kv / 16: whole warpgroups for 64 and 128), tiles and stage fields, with
// each stage rounded up to whole atoms so that every stage's Q / dO tiles start on one.
template <int kD, int kBlockKv>
struct WgmmaDkdvTraits : DkdvTraits<kD, kBlockKv> {
  using Base = DkdvTraits<kD, kBlockKv>;
  static_assert(kBlockKv == 64 || kBlockKv == 128, "whole warpgroups of 64 keys");
  static_assert(Base::kWarpsQ == 1 && Base::kWarpsKey == kBlockKv / kWarpRows, "warp w: key rows 16 w..");
  static_assert(Base::kKvBytes % kWgmmaAtomBytes == 0 && Base::kTileBytes % kWgmmaAtomBytes == 0, "tiles on atoms");
  static constexpr int kStageBytes = (Base::kStageBytes + kWgmmaAtomBytes - 1) / kWgmmaAtomBytes * kWgmmaAtomBytes;
  // plus one atom: the kernel aligns its base up to 1024 bytes
  static constexpr int kSmemBytes = Base::kStageOffset + kStages * kStageBytes + kWgmmaAtomBytes;
};

// Dynamic shared memory of the Hopper dQ kernel: RowTraits' layout plus one atom (alignment).
template <int kD, int kBlockQ>
constexpr int wgmma_dq_smem_bytes(int top_k) {
  return RowTraits<kD, kBlockQ, true>::smem_bytes(top_k) + kWgmmaAtomBytes;
}
static_assert(RowTraits<128, 128, true>::kStageOffset % kWgmmaAtomBytes == 0 &&
                  RowTraits<64, 64, true>::kStageOffset % kWgmmaAtomBytes == 0,
              "the dQ kernel's Q, dO and K / V tiles start on atoms");

// Whether no query row of a dK / dV step (rows q0 .. q0 + 63, below Sq) sees any key of the CTA's
// block (keys k0 .. k0 + block_kv - 1, below Sk): the step adds exact zeros and the kernel skips
// it (CTA-uniform). Causal (bottom-right): row i sees keys up to i + Sk - Sq.
TORCH_EXT_HOST_DEVICE bool dkdv_step_hidden(int64_t q0, int64_t k0, int64_t seq_q, int64_t seq_kv, bool causal) {
  if (q0 >= seq_q || k0 >= seq_kv) return true;
  const int64_t last_q = q0 + kBwdQTile - 1 < seq_q ? q0 + kBwdQTile - 1 : seq_q - 1;
  return causal && k0 > last_q + seq_kv - seq_q;
}
// Whether every (row, key) of a dK / dV step's 64 rows (from q0) and the keys up to k_last (the
// last key of a warp's 16) is visible, MoBA choices aside: all rows below Sq, all keys below Sk,
// and under causal masking the first row, the most restricted, sees k_last. Then P^T needs no
// per-element predicate.
TORCH_EXT_HOST_DEVICE bool dkdv_tile_full(int64_t q0, int64_t k_last, int64_t seq_q, int64_t seq_kv, bool causal) {
  return q0 + kBwdQTile <= seq_q && k_last < seq_kv && (!causal || k_last <= q0 + seq_kv - seq_q);
}

}  // namespace bsa_cuda
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::attention
