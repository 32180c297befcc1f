// The grouping of (token, slot) pairs by expert that both fused_moe kernels run on:
//
//   pair p = t * k + j   (token t, its j-th expert ids[t, j])
//   counts[e]            pairs routed to expert e
//   offsets[e]           start of expert e's rows in the grouped order, each expert's segment
//                        padded up to a multiple of `block` rows (offsets[E] = total rows)
//   sorted_pairs[r]      the pair in grouped row r, in increasing p within an expert (stable,
//                        hence deterministic); padding rows hold -1
//
// block = 1 gives the unpadded order the CPU kernel uses; the CUDA kernels pad to their M tile
// so that every tile belongs to one expert. Host and device compute the same plan: this file's
// functions are the specification the device version is tested against.
#pragma once

#include <cstdint>

#include "common/macros.h"


namespace torch_ext::moe {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {

// Rows expert segments occupy for `count` pairs padded to `block` rows.
TORCH_EXT_HOST_DEVICE int64_t padded_rows(int64_t count, int64_t block) {
  return (count + block - 1) / block * block;
}

// Upper bound of offsets[E] over every routing of `pairs` pairs to `experts` experts: each
// expert wastes at most block - 1 rows (static, so buffers can be sized without a host sync).
TORCH_EXT_HOST_DEVICE int64_t max_grouped_rows(int64_t pairs, int64_t experts, int64_t block) {
  const int64_t used = experts < pairs ? experts : pairs;  // experts that can receive a pair
  return padded_rows(pairs + used * (block - 1), block);
}

// Sequential reference of the plan: counts [E], offsets [E + 1], sorted_pairs [offsets[E]].
inline void build_expert_plan_host(const int32_t* ids, int64_t pairs, int32_t experts, int64_t block,
                                   int64_t* counts, int64_t* offsets, int32_t* sorted_pairs) {
  for (int32_t e = 0; e < experts; ++e) counts[e] = 0;
  for (int64_t p = 0; p < pairs; ++p) ++counts[ids[p]];
  offsets[0] = 0;
  for (int32_t e = 0; e < experts; ++e) offsets[e + 1] = offsets[e] + padded_rows(counts[e], block);
  for (int32_t e = 0; e < experts; ++e)
    for (int64_t r = offsets[e] + counts[e]; r < offsets[e + 1]; ++r) sorted_pairs[r] = -1;
  // Filling cursor per expert: reuse counts as "rows filled so far", restored at the end.
  for (int32_t e = 0; e < experts; ++e) counts[e] = 0;
  for (int64_t p = 0; p < pairs; ++p) {
    const int32_t e = ids[p];
    sorted_pairs[offsets[e] + counts[e]++] = int32_t(p);
  }
}

}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::moe
