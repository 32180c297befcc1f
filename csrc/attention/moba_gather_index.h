// Index math of MoBA's key-block-major forward on CUDA (attention/moba_gather_cuda.cu),
// host+device so that tests/cpp/moba_gather_cuda_sim.cpp runs the same plan on the CPU.
//
// Why key-block-major: the union design (block_sparse_attention over moba_block_lists) gives a
// 64-row query block the union of its tokens' choices, and a warp computes every listed step some
// row of its 16 chose. With random queries at 32K a 16-row warp's union is ~12x the keys a token
// attends (an estimate; measured on the H100: 71.6 / 186.7 ms for block 64 / 16 at 32K against
// causal SDPA's 14.1). Here the work is exactly the chosen pairs: for every key block, the
// (token, slot) pairs that chose it are listed and cut into runs of at most 512 (8 tiles of 64
// rows); a CTA loads the block's keys and values once and attends the gathered query rows of its
// run to them tile by tile (the next tile's rows load while one computes), writing a partial
// result per pair (O / l in the input dtype and its lse); a merge pass combines each token's
// top_k partials in slot order. Cost beyond the union kernel's: the partials (2 D + 4 bytes per
// pair, written once and read once).
//
// Plan per (batch, head) of a chunk of heads ("lane" below), all on the device, no host sync:
//   count:  pair e = token * top_k + slot with a valid block j takes rank[e] = atomicAdd(count[j]);
//   plan:   offsets[j] = exclusive sum of counts; key block j gets ceil(count[j] / 512) run
//           records {j, first pair slot, rows}; records past the lane's total hold block -1;
//   fill:   entries[offsets[j] + rank[e]] = e.
// The order of pairs inside a block's list follows the atomics and varies between runs; the results
// do not: a row's products, mask and softmax depend on that row alone.
#pragma once

#include <cstdint>

#include "attention/block_sparse_attention_cuda_index.h"
#include "common/index_math.h"
#include "common/macros.h"

namespace torch_ext::attention {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace moba_gather {

using ::torch_ext::index_math::ceil_div;
using ::torch_ext::index_math::round_up;

// Gathered query rows per tile: one CTA of 4 warps, 16 rows each (the forward's 64-row CTA).
constexpr int kTileRows = 64;
// Tiles per run (one CTA): the block's K / V load is shared by up to 8 tiles, and a block that
// many tokens chose (an attention sink, the first blocks under causal masking) still spreads
// over CTAs in runs of 512 rows instead of serializing in one.
constexpr int kRunTiles = 8;
constexpr int kRunRows = kRunTiles * kTileRows;
// Threads of the plan kernel (one CTA per lane scans the lane's key blocks in chunks of this many).
constexpr int kPlanThreads = 1024;
// Threads of the count / fill kernels (one pair each) and of the merge kernel (a warp per token).
constexpr int kPairThreads = 256;
constexpr int kMergeThreads = 128;

// A run: `rows` (1..512) pairs entries[first ..] of key block `block`; block -1: past the lane's
// runs (the CTA exits).
struct alignas(16) RunRecord {
  int32_t block;
  int32_t first;
  int32_t rows;
  int32_t unused;  // 16 bytes: one vector load
};

// Slot s of a token's choices (row of token_blocks) is a pair: its id is a key block ([0, nk):
// others are ignored, as moba_block_lists does on CUDA) that no earlier slot names (a token's
// choices are a set, as in the union lists' mask and the backward; moba_select never repeats).
TORCH_EXT_HOST_DEVICE bool slot_is_pair(const int32_t* choices, int slot, int64_t num_kv_blocks) {
  const int32_t block = choices[slot];
  if (block < 0 || block >= num_kv_blocks) return false;
  for (int s = 0; s < slot; ++s)
    if (choices[s] == block) return false;
  return true;
}
// Pair id e = token * top_k + slot indexes entries' values, rank and the partials; its token:
TORCH_EXT_HOST_DEVICE int32_t pair_token(int32_t pair, int top_k) { return pair / top_k; }

// Runs of a key block with `count` pairs, and an upper bound on a lane's runs: sum_j
// ceil(c_j / 512) <= sum_j (c_j + 511) / 512 over the (at most min(nk, pairs)) non-empty blocks.
TORCH_EXT_HOST_DEVICE int32_t block_runs(int32_t count) { return int32_t(ceil_div(count, kRunRows)); }
TORCH_EXT_HOST_DEVICE int64_t max_lane_runs(int64_t seq_q, int top_k, int64_t num_kv_blocks) {
  const int64_t pairs = seq_q * top_k;
  const int64_t nonempty = pairs < num_kv_blocks ? pairs : num_kv_blocks;
  return nonempty + ceil_div(pairs, kRunRows);
}
// Run q (< block_runs(count)) of a block whose list starts at `offset`.
TORCH_EXT_HOST_DEVICE RunRecord run_record(int32_t block, int32_t offset, int32_t count, int32_t q) {
  const int32_t rows = count - q * kRunRows;
  return RunRecord{block, offset + q * kRunRows, rows < kRunRows ? rows : kRunRows, 0};
}
// The 64-row tiles of a run, and the rows of tile t; a row's query position (padding rows, pair
// -1: the last position, so that they see every key a real row may and stay finite; never stored).
TORCH_EXT_HOST_DEVICE int run_tiles(int32_t rows) { return int(ceil_div(rows, kTileRows)); }
TORCH_EXT_HOST_DEVICE int tile_rows(int32_t rows, int tile) {
  const int32_t left = rows - tile * kTileRows;
  return left < kTileRows ? int(left) : kTileRows;
}
TORCH_EXT_HOST_DEVICE int32_t row_position(int32_t pair, int top_k, int32_t seq_q) {
  return pair >= 0 ? pair_token(pair, top_k) : seq_q - 1;
}

// Merge of a token's partials (o_s = O_s / l_s, lse_s natural log): with M = max lse_s,
// w_s = e^(lse_s - M): out = sum w_s o_s / sum w_s, lse = M + ln sum w_s; no valid slot (or all
// lse -inf): out 0, lse -inf (the attention convention for a row that sees no key).
TORCH_EXT_HOST_DEVICE float merge_weight(float lse_s, float lse_max) {
  return lse_s == bsa_cuda::neg_inf() ? 0.0f : bsa_cuda::exp2_approx((lse_s - lse_max) * bsa_cuda::kLog2e);
}
TORCH_EXT_HOST_DEVICE float merge_out_scale(float weight_sum) { return weight_sum > 0.0f ? 1.0f / weight_sum : 0.0f; }
TORCH_EXT_HOST_DEVICE float merge_lse(float lse_max, float weight_sum) {
  return weight_sum > 0.0f ? lse_max + bsa_cuda::log_f(weight_sum) : bsa_cuda::neg_inf();
}

// Shared memory of the attention CTA (RowTraits of a 64-row block for the fragment counts and
// copies): two Q tiles (tile t + 1's rows load while tile t computes), the block's K / V as
// kKvSteps 64-key steps that stay resident for the whole run (1, or 2 for 128-key blocks), their
// segment tables, and the run's pair ids (read from global memory once, so that a tile's loads
// do not wait on them). D = 128: 66 KB (98 KB with 128-key blocks, under sm_86's 99): 3 CTAs an
// SM on sm_90 for one step, 2 with two steps.
// No MoBA choice table (the rows chose the block by construction): kSelOffset points past the
// layout and make_step_mask is called without selection.
template <int kD, int kKvSteps>
struct GatherTraits : bsa_cuda::RowTraits<kD, kTileRows, false> {
  using Base = bsa_cuda::RowTraits<kD, kTileRows, false>;
  static constexpr int kQStages = 2;
  static constexpr int kStageOffset = kQStages * Base::kRowBytes;  // K / V step t at + t * kStageBytes
  static constexpr int kSegOffset = kStageOffset + kKvSteps * Base::kStageBytes;
  static constexpr int kRunOffset = kSegOffset + kKvSteps * 2 * bsa_cuda::kMaxSegments * 4;  // [512]
  static constexpr int kSmemBytes = kRunOffset + kRunRows * 4;
  static constexpr int kSelOffset = kSmemBytes;
  // sm_86 / sm_89's opt-in limit per block (101376 bytes): the largest layout, D = 128 with two
  // steps, is 100416.
  static_assert(kSmemBytes <= 99 * 1024, "fits sm_86 / sm_89");
};

// The backward (attention/moba_gather_backward_cuda.cu) runs on the same plan.
// dQ: a CTA per run as in the forward, 64-row tiles of gathered Q and dO rows double-buffered
// (block_kv <= 64: one K / V step; D = 128: 98 KB, under sm_86's 99); each pair's partial dQ
// (dS K times the scale, in the input dtype) goes to the forward's part_o, summed per token in
// slot order by a merge pass.
template <int kD>
struct GatherBackwardTraits : bsa_cuda::RowTraits<kD, kTileRows, true> {
  using Base = bsa_cuda::RowTraits<kD, kTileRows, true>;
  static constexpr int kQStages = 2;
  static constexpr int kTileStageBytes = 2 * Base::kRowBytes;  // Q rows, then dO rows
  static constexpr int kStageOffset = kQStages * kTileStageBytes;
  static constexpr int kSegOffset = kStageOffset + Base::kStageBytes;
  static constexpr int kRunOffset = kSegOffset + 2 * bsa_cuda::kMaxSegments * 4;
  static constexpr int kSmemBytes = kRunOffset + kRunRows * 4;
  static constexpr int kSelOffset = kSmemBytes;
  static_assert(kSmemBytes <= 99 * 1024, "fits sm_86 / sm_89");
};

// dK / dV: a CTA per (kv head, key block) walks the block's list of every query head of its GQA
// group (lanes lane0 .. lane0 + group - 1 of the chunk: a chunk holds whole groups), each list in
// 64-row tiles of gathered rows; dK and dV are written once, no partials. counts: the group's
// counts of this block, `stride` apart (nk: one lane's counts after another's).
struct GroupCursor {
  int g, tile;
};
TORCH_EXT_HOST_DEVICE int group_tiles(const int32_t* counts, int64_t stride, int g) {
  return int(ceil_div(counts[g * stride], kTileRows));
}
TORCH_EXT_HOST_DEVICE int group_walk_steps(const int32_t* counts, int64_t stride, int group) {
  int steps = 0;
  for (int g = 0; g < group; ++g) steps += group_tiles(counts, stride, g);
  return steps;
}
// The first tile at or after (g, tile) that exists (g == group past the end).
TORCH_EXT_HOST_DEVICE void group_cursor_settle(GroupCursor& c, const int32_t* counts, int64_t stride, int group) {
  while (c.g < group && c.tile >= group_tiles(counts, stride, c.g)) {
    ++c.g;
    c.tile = 0;
  }
}
TORCH_EXT_HOST_DEVICE GroupCursor group_cursor_begin(const int32_t* counts, int64_t stride, int group) {
  GroupCursor c{0, 0};
  group_cursor_settle(c, counts, stride, group);
  return c;
}
TORCH_EXT_HOST_DEVICE void group_cursor_advance(GroupCursor& c, const int32_t* counts, int64_t stride, int group) {
  ++c.tile;
  group_cursor_settle(c, counts, stride, group);
}

// The backward's lists in a fixed order (dK / dV sum a block's rows in list order, and the atomics'
// ranks vary between runs): a stable radix sort of every pair of the chunk by key
// lane * (nk + 1) + (block, or nk for a slot that is not a pair) with the pair ids as values puts
// lane l's pairs at [l * pairs, (l + 1) * pairs), block j's from offset[j] on, in pair-id order:
// the fill's layout, deterministic.
TORCH_EXT_HOST_DEVICE int64_t sort_key(int64_t lane, int64_t num_kv_blocks, bool pair, int32_t block) {
  return lane * (num_kv_blocks + 1) + (pair ? block : num_kv_blocks);
}
// Bits of the largest key of a chunk of `lanes` lanes (the sort's end bit).
TORCH_EXT_HOST_DEVICE int sort_key_bits(int64_t lanes, int64_t num_kv_blocks) {
  const int64_t largest = lanes * (num_kv_blocks + 1) - 1;
  int bits = 1;
  while (bits < 62 && (int64_t(1) << bits) <= largest) ++bits;
  return bits;
}

// Workspace of one chunk of `lanes` (batch x heads of the chunk), byte offsets 256-aligned. With
// sort_temp_bytes > 0 (the backward): the sort's keys (in, out), values in and its temporary
// storage after the forward's regions.
struct Workspace {
  int64_t counts, offsets, rank, entries, runs, part_o, part_lse;
  int64_t sort_keys, sort_keys_out, sort_values, sort_temp;
  int64_t bytes;
  int64_t lane_runs;  // run records per lane
};
TORCH_EXT_HOST_DEVICE Workspace workspace_layout(int64_t lanes, int64_t seq_q, int top_k, int64_t num_kv_blocks,
                                                 int head_dim, int64_t sort_temp_bytes = 0) {
  const int64_t pairs = lanes * seq_q * top_k;
  Workspace w{};
  w.lane_runs = max_lane_runs(seq_q, top_k, num_kv_blocks);
  int64_t at = 0;
  const auto take = [&at](int64_t bytes) {
    const int64_t start = at;
    at = round_up(at + bytes, 256);
    return start;
  };
  w.counts = take(lanes * num_kv_blocks * 4);
  w.offsets = take(lanes * num_kv_blocks * 4);
  w.rank = take(pairs * 4);
  w.entries = take(pairs * 4);
  w.runs = take(lanes * w.lane_runs * int64_t(sizeof(RunRecord)));
  w.part_o = take(pairs * head_dim * 2);
  w.part_lse = take(pairs * 4);
  if (sort_temp_bytes > 0) {
    w.sort_keys = take(pairs * 4);
    w.sort_keys_out = take(pairs * 4);
    w.sort_values = take(pairs * 4);
    w.sort_temp = take(sort_temp_bytes);
  }
  w.bytes = at;
  return w;
}

}  // namespace moba_gather
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::attention
