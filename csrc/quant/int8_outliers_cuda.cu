// CUDA kernels of int8_linear's LLM.int8() decomposition around the W8A8 GEMM (declared in
// quant/w8a8_cuda.h; the selection rules and index maps are host+device functions of
// quant/int8_outliers_index.h, run thread by thread on the CPU by tests/cpp/w8a8_cuda_sim.cpp).
// No torch headers. With quantize_per_token's masked variant and scaled_int8_mm in between,
// int8_linear is five launches and no host synchronization:
//
// column_max_kernel<T>: partial[s, c] = max |x[r, c]| over split s of the rows; a thread per
//   16-byte chunk of a row (the quantizer's chunking and loads), no atomics.
// select_kernel: one CTA. Column maxima from the partial rows (written back into row 0), the
//   count above the threshold (a block scan), at most 4 radix rounds and a recount against the
//   found pivot when that count exceeds `slots`, then an ordered compaction of the kept columns
//   (at the offsets those block scans of per-thread counts over whole-word column runs give)
//   into `columns` and the zero mask.
// add_outliers_kernel<T, O>: out = y + x[:, kept] (w[:, kept] * w_scale)^T, fp32 fused
//   multiply-adds in ascending column order, one rounding to O.
#include <type_traits>

#include "common/cuda/block_scan.cuh"
#include "common/cuda/vec.cuh"
#include "quant/int8_outliers_index.h"
#include "quant/w8a8_cuda.h"
#include "quant/w8a8_cuda_index.h"

namespace torch_ext::cuda {
namespace {

namespace ox = ::torch_ext::quant::int8_outliers;
namespace ix = ::torch_ext::quant::w8a8_cuda;

template <typename T>
__global__ void __launch_bounds__(ox::kColumnThreads) column_max_kernel(const OutlierSearchParams p, bool vector) {
  constexpr int V = Pack16<T>::kSize;
  const int64_t c = int64_t(blockIdx.x) * ox::kColumnThreads + threadIdx.x;
  if (c >= ix::ceil_div(p.k, V)) return;
  const int splits = ox::search_splits(p.rows);
  const int64_t per = ox::split_rows(p.rows, splits);
  const int64_t r0 = int64_t(blockIdx.y) * per, r1 = min(p.rows, r0 + per);
  const int len = ix::quant_chunk_len(c, V, p.k);
  float m[V];
#pragma unroll
  for (int e = 0; e < V; ++e) m[e] = 0.f;
  for (int64_t r = r0; r < r1; ++r) {
    const Pack16<T> pack = load_pack16_partial(static_cast<const T*>(p.x) + r * p.x_row_stride + c * V, len, vector);
#pragma unroll
    for (int e = 0; e < V; ++e) m[e] = fmaxf(m[e], fabsf(to_compute(pack.v[e])));
  }
  float* const dst = p.partial + int64_t(blockIdx.y) * p.k + c * V;
#pragma unroll
  for (int e = 0; e < V; ++e)
    if (e < len) dst[e] = m[e];
}

__global__ void __launch_bounds__(ox::kSelectThreads) select_kernel(const OutlierSearchParams p) {
  __shared__ uint32_t scratch[block_scan_words<ox::kSelectThreads>()];
  __shared__ uint32_t histogram[ox::kRadixBins];
  __shared__ uint32_t pivot_shared;
  __shared__ int64_t need_shared;
  const int tid = threadIdx.x;
  const int splits = ox::search_splits(p.rows);
  // Column maxima over the splits, into partial row 0 (each column read and written by one thread).
  for (int64_t c = tid; c < p.k; c += ox::kSelectThreads) {
    float m = p.partial[c];
    for (int s = 1; s < splits; ++s) m = fmaxf(m, p.partial[int64_t(s) * p.k + c]);
    p.partial[c] = m;
  }
  __syncthreads();  // global writes of the block are visible to the block after the barrier
  const float* const column_max = p.partial;
  const ox::ColumnRun run = ox::column_run(tid, p.k);
  const auto count_run = [&](auto&& predicate) {
    uint32_t n = 0;
    for (int64_t c = run.begin; c < run.end; ++c) n += predicate(ox::outlier_key(column_max[c])) ? 1u : 0u;
    return n;
  };
  uint32_t pivot = ox::outlier_key(p.threshold);
  int64_t ties = 0;  // no column equal to the pivot is kept unless the cap applies
  // This run's and the lower runs' counts of kept columns (key > pivot); below a full cap, those
  // above the threshold.
  uint32_t greater = count_run([&](uint32_t key) { return key > pivot; });
  uint32_t greater_total = 0;
  int64_t greater_before = block_inclusive_scan<ox::kSelectThreads>(greater, scratch, greater_total) - greater;
  int64_t equal_before = 0;  // read only when ties > 0
  if (greater_total > uint32_t(p.slots)) {
    // The slots-th largest key, digit by digit.
    uint32_t prefix = 0;
    int64_t need = p.slots;
    for (int round = 0; round < 32 / ox::kRadixBits; ++round) {
      for (int d = tid; d < ox::kRadixBins; d += ox::kSelectThreads) histogram[d] = 0u;
      __syncthreads();
      const uint32_t high = ox::radix_high_mask(round);
      const int shift = ox::radix_shift(round);
      for (int64_t c = run.begin; c < run.end; ++c) {
        const uint32_t key = ox::outlier_key(column_max[c]);
        if ((key & high) == prefix) atomicAdd(&histogram[(key >> shift) & (ox::kRadixBins - 1)], 1u);
      }
      __syncthreads();
      if (tid == 0) {
        const ox::RadixPick pick = ox::radix_pick(histogram, need);
        pivot_shared = prefix | (uint32_t(pick.digit) << shift);
        need_shared = pick.need;
      }
      __syncthreads();
      prefix = pivot_shared;
      need = need_shared;
      __syncthreads();  // pivot_shared / need_shared / histogram are rewritten next round
    }
    pivot = prefix;
    ties = need;
    // Recounted against the new pivot, with the columns equal to it (the lowest `ties` of them kept).
    greater = count_run([&](uint32_t key) { return key > pivot; });
    const uint32_t equal = count_run([&](uint32_t key) { return key == pivot; });
    greater_before = block_inclusive_scan<ox::kSelectThreads>(greater, scratch, greater_total) - greater;
    uint32_t equal_total = 0;
    equal_before = block_inclusive_scan<ox::kSelectThreads>(equal, scratch, equal_total) - equal;
    ties = ties < int64_t(equal_total) ? ties : int64_t(equal_total);
  }
  // Ordered compaction: this run's kept columns start after those of the lower runs.
  const int64_t kept_total = int64_t(greater_total) + ties;
  for (int64_t w = run.begin / 32; run.begin < run.end && 32 * w < run.end; ++w) {  // whole words (the run's)
    uint32_t word = 0;
    for (int64_t c = 32 * w; c < min(32 * w + 32, run.end); ++c) {
      const uint32_t key = ox::outlier_key(column_max[c]);
      if (ox::column_kept(key, pivot, equal_before, ties)) {
        p.columns[ox::column_slot(greater_before, equal_before, ties)] = int32_t(c);
        word |= 1u << (c % 32);
      }
      greater_before += key > pivot ? 1 : 0;
      equal_before += key == pivot ? 1 : 0;
    }
    p.zero_mask[w] = word;
  }
  for (int64_t s = kept_total + tid; s < p.slots; s += ox::kSelectThreads) p.columns[s] = -1;
}

template <typename T, typename O>
__global__ void __launch_bounds__(ox::kAddColumns) add_outliers_kernel(const OutlierAddParams p) {
  __shared__ int32_t columns[ox::kAddChunk];
  __shared__ float xs[ox::kAddRows][ox::kAddChunk];
  const int tid = threadIdx.x;
  const int64_t n = int64_t(blockIdx.y) * ox::kAddColumns + tid;
  const int64_t m0 = int64_t(blockIdx.x) * ox::kAddRows;  // rows on x: any count (y stops at 65535)
  const bool column_ok = n < p.n;
  float acc[ox::kAddRows];
#pragma unroll
  for (int r = 0; r < ox::kAddRows; ++r) acc[r] = column_ok && m0 + r < p.m ? p.y[(m0 + r) * p.n + n] : 0.f;
  const float w_scale = column_ok ? p.w_scale[p.w_scale_per_channel ? n : 0] : 0.f;
  const int8_t* const w_row = p.w + (column_ok ? n : 0) * p.w_row_stride;
  for (int base = 0; base < p.slots; base += ox::kAddChunk) {
    __syncthreads();  // the previous chunk is consumed
    if (tid < ox::kAddChunk) columns[tid] = base + tid < p.slots ? p.columns[base + tid] : -1;
    __syncthreads();
    if (columns[0] < 0) break;  // CTA-uniform: the list is packed, nothing follows
    for (int i = tid; i < ox::kAddRows * ox::kAddChunk; i += ox::kAddColumns) {
      const int r = i / ox::kAddChunk, j = i % ox::kAddChunk;
      const int32_t c = columns[j];
      xs[r][j] = c >= 0 && m0 + r < p.m ? to_compute(static_cast<const T*>(p.x)[(m0 + r) * p.x_row_stride + c]) : 0.f;
    }
    __syncthreads();
    for (int j = 0; j < ox::kAddChunk && columns[j] >= 0; ++j) {
      const float wv = float(w_row[columns[j]]) * w_scale;
#pragma unroll
      for (int r = 0; r < ox::kAddRows; ++r) acc[r] = fmaf(xs[r][j], wv, acc[r]);
    }
  }
  if (!column_ok) return;
#pragma unroll
  for (int r = 0; r < ox::kAddRows; ++r)
    if (m0 + r < p.m) static_cast<O*>(p.out)[(m0 + r) * p.n + n] = from_compute<O>(acc[r]);
}

}  // namespace

cudaError_t find_outlier_columns(const OutlierSearchParams& p, cudaStream_t stream) {
  if (p.rows < 1 || p.k < 1 || p.slots < 1 || p.slots > p.k || !(p.threshold >= 0.f) || p.x == nullptr ||
      p.partial == nullptr || p.columns == nullptr || p.zero_mask == nullptr ||
      ix::ceil_div(p.k, 4) > int64_t(ox::kColumnThreads) * 2147483647)
    return cudaErrorInvalidValue;
  cudaError_t status = cudaErrorInvalidValue;
  visit_storage_type(p.x_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) {
      const bool vector = ix::quant_x_vectorizable(reinterpret_cast<uintptr_t>(p.x), p.x_row_stride, int(sizeof(T)));
      const dim3 grid(unsigned(ix::ceil_div(ix::ceil_div(p.k, Pack16<T>::kSize), ox::kColumnThreads)),
                      unsigned(ox::search_splits(p.rows)));
      column_max_kernel<T><<<grid, ox::kColumnThreads, 0, stream>>>(p, vector);
      status = cudaGetLastError();
    }
  });
  if (status != cudaSuccess) return status;
  select_kernel<<<1, ox::kSelectThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t add_outlier_product(const OutlierAddParams& p, cudaStream_t stream) {
  if (p.m < 0 || p.n < 0 || p.slots < 0 || (p.slots > 0 && p.columns == nullptr) ||
      ix::ceil_div(p.m, ox::kAddRows) > 2147483647 || ix::ceil_div(p.n, ox::kAddColumns) > 65535)
    return cudaErrorInvalidValue;
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  cudaError_t status = cudaErrorInvalidValue;
  visit_storage_type(p.x_dtype, [&](auto x_tag) {
    using T = decltype(x_tag);
    visit_storage_type(p.out_dtype, [&](auto out_tag) {
      using O = decltype(out_tag);
      if constexpr (!std::is_same_v<T, double> && !std::is_same_v<O, double>) {
        const dim3 grid(unsigned(ix::ceil_div(p.m, ox::kAddRows)), unsigned(ix::ceil_div(p.n, ox::kAddColumns)));
        add_outliers_kernel<T, O><<<grid, ox::kAddColumns, 0, stream>>>(p);
        status = cudaGetLastError();
      }
    });
  });
  return status;
}

}  // namespace torch_ext::cuda
