// Index math and selection rules of int8_linear's outlier passes on CUDA
// (quant/int8_outliers_cuda.cu), host+device so that tests/cpp/w8a8_cuda_sim.cpp runs them
// thread by thread on the CPU: the row splits of the column maxima, the select kernel's column
// runs, its radix select of the `slots`-th largest maximum and the ordered compaction (ties taken
// in column order), the zero-mask words the quantizer reads, and the outlier-add tiles.
#pragma once

#include <cstdint>

#include "common/float_bits.h"
#include "common/index_math.h"
#include "common/macros.h"

namespace torch_ext::quant {
inline namespace TORCH_EXT_ISA_LOCAL_NAMESPACE {
namespace int8_outliers {

using index_math::ceil_div;

// ---------------------------------------------------------------------------------------------
// 1. Column maxima of |x|: a thread per 16-byte chunk of a row, CTAs over (column chunks, row
//    splits); split s writes its maxima to partial[s, :] (no atomics, no memset). Up to 64 rows
//    per split and at most 32 splits: a decode batch is one split, a 4096-row prefill 32 (the
//    select kernel then reads 32 partial rows: 512 KB at K = 4096, from L2).
// ---------------------------------------------------------------------------------------------
constexpr int kColumnThreads = 256;
constexpr int kRowsPerSplit = 64;
constexpr int kMaxSplits = 32;

TORCH_EXT_HOST_DEVICE int search_splits(int64_t rows) {
  const int64_t splits = ceil_div(rows, kRowsPerSplit);
  return int(splits < 1 ? 1 : (splits > kMaxSplits ? kMaxSplits : splits));
}
TORCH_EXT_HOST_DEVICE int64_t split_rows(int64_t rows, int splits) { return ceil_div(rows, splits); }

// ---------------------------------------------------------------------------------------------
// 2. Selection (one CTA of kSelectThreads): thread t owns a run of whole 32-column words, so it
//    writes its words of the zero mask alone. A column's key is the bit pattern of its max |x|
//    (non-negative floats order as their bits; the maxima skip NaN). With at most `slots` keys above
//    the threshold's, those are the outliers; otherwise the `slots` largest: a radix select
//    (4 rounds of 8 bits, most significant first) finds the `slots`-th largest key (the pivot)
//    and how many keys equal to it are taken (the lowest columns first). Either way a column is
//    kept when key > pivot, or key == pivot and fewer than `ties` equal keys precede it, and its
//    slot is the number of kept columns before it: ascending column order, then -1 padding.
// ---------------------------------------------------------------------------------------------
constexpr int kSelectThreads = 1024;
constexpr int kRadixBits = 8;
constexpr int kRadixBins = 1 << kRadixBits;

struct ColumnRun {
  int64_t begin, end;
};
TORCH_EXT_HOST_DEVICE int64_t mask_words(int64_t k) { return ceil_div(k, 32); }
TORCH_EXT_HOST_DEVICE int64_t words_per_thread(int64_t k) { return ceil_div(mask_words(k), kSelectThreads); }
TORCH_EXT_HOST_DEVICE ColumnRun column_run(int t, int64_t k) {
  const int64_t per = 32 * words_per_thread(k);
  const int64_t begin = t * per < k ? t * per : k;
  return ColumnRun{begin, begin + per < k ? begin + per : k};
}

TORCH_EXT_HOST_DEVICE uint32_t outlier_key(float column_max) { return float_as_bits(column_max); }

// Round r (0 = the most significant 8 bits): keys whose higher digits equal the pivot's so far
// compete; the digit of the `need`-th largest among them (need >= 1) and how many keys of that
// digit are still needed.
TORCH_EXT_HOST_DEVICE int radix_shift(int round) { return 32 - kRadixBits * (round + 1); }
TORCH_EXT_HOST_DEVICE uint32_t radix_high_mask(int round) {
  return round == 0 ? 0u : ~0u << (32 - kRadixBits * round);
}
struct RadixPick {
  int digit;
  int64_t need;
};
TORCH_EXT_HOST_DEVICE RadixPick radix_pick(const uint32_t* histogram, int64_t need) {
  for (int d = kRadixBins - 1; d > 0; --d) {
    if (need <= int64_t(histogram[d])) return RadixPick{d, need};
    need -= histogram[d];
  }
  return RadixPick{0, need};
}

TORCH_EXT_HOST_DEVICE bool column_kept(uint32_t key, uint32_t pivot, int64_t equal_before, int64_t ties) {
  return key > pivot || (key == pivot && equal_before < ties);
}
TORCH_EXT_HOST_DEVICE int64_t column_slot(int64_t greater_before, int64_t equal_before, int64_t ties) {
  return greater_before + (equal_before < ties ? equal_before : ties);
}

// The quantizer's view of the mask: the bits of a 16-byte chunk's `values` columns starting at
// column `first` (a multiple of `values`, 4 or 8), bit e = column first + e.
TORCH_EXT_HOST_DEVICE uint32_t chunk_zero_bits(const uint32_t* mask, int64_t first, int values) {
  return (mask[first / 32] >> (first % 32)) & ((1u << values) - 1u);
}

// ---------------------------------------------------------------------------------------------
// 3. out = y + x[:, kept] (w[:, kept] * w_scale)^T in fp32, one rounding: a CTA per kAddRows rows
//    (grid x) x kAddColumns output columns (grid y, a thread each), the kept columns walked kAddChunk at a time
//    (their x values staged in shared memory), in ascending order like the CPU kernel.
// ---------------------------------------------------------------------------------------------
constexpr int kAddColumns = 256;
constexpr int kAddRows = 16;
constexpr int kAddChunk = 32;

}  // namespace int8_outliers
}  // namespace TORCH_EXT_ISA_LOCAL_NAMESPACE
}  // namespace torch_ext::quant
