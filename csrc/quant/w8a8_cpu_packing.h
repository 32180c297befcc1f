// Packed operands and the blocked driver of the CPU scaled_int8_mm, shared by the portable
// kernel (w8a8_cpu.cpp, every ISA level) and the AVX512-VNNI one (w8a8_cpu_vnni.cpp), each
// including it inside its own ISA namespace.
//
// Packed B (one buffer, built per call or cached per weight by the torch-facing code):
//   values:  int8 [n_blocks][k4][kBlockN][4]   (k4 = ceil(K / 4), zero-padded in N and K)
//   colsum:  int32 [n_blocks * kBlockN]         (sum_k b[n, k]) at packed_b_colsum_offset()
// A is repacked per call as uint8 a + 128, rows of 4 * k4 bytes (zero-padded), rows padded to
// a multiple of kRows with zeros.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "common/cpu/aligned_buffer.h"
#include "common/cpu/parallel.h"
#include "common/cpu/vec.h"
#include "common/float_bits.h"
#include "quant/w8a8.h"

namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::w8a8 {

constexpr int kBlockN = 16;  // columns per block: one 512-bit vector of int32 lanes
constexpr int kRows = 4;     // rows of A per micro-kernel call (6 measured no faster at M = 256; 4 wastes less at small M)
constexpr int kBlocks = 4;   // column blocks per micro-kernel call: 4 x 4 accumulators

inline int64_t k4_of(int64_t k) { return (k + 3) / 4; }
inline int64_t n_blocks_of(int64_t n) { return (n + kBlockN - 1) / kBlockN; }
// Where the column sums start (packed_int8_b_bytes in w8a8.h is the total).
inline int64_t colsum_offset(int64_t n, int64_t k) { return (n_blocks_of(n) * k4_of(k) * kBlockN * 4 + 63) / 64 * 64; }

#if defined(__AVX512F__)
// Column block nb of B into `out` (k4 x 16 x 4 bytes) and its 16 column sums: per 64 bytes of K, the
// 16 rows' 16 dwords transposed in registers (row c's dword j to lane c of vector j), the sums
// taken from the transposed vectors (each dword lane's four bytes). Measured on a Sapphire Rapids
// VM, a 14336 x 4096 B packed byte by byte took about 13 ms.
inline void pack_b_block(const ScaledInt8MmParams& p, int64_t nb, int8_t* out, int32_t* block_colsum) {
  const int64_t k4 = k4_of(p.k);
  const __m512i ones_u8 = _mm512_set1_epi8(1), ones_i16 = _mm512_set1_epi16(1);
  __m512i sums = _mm512_setzero_si512();
  for (int64_t j0 = 0; j0 < k4; j0 += 16) {
    const int64_t k0 = 4 * j0, bytes = std::min<int64_t>(64, p.k - k0);
    const __mmask64 valid = bytes >= 64 ? ~__mmask64(0) : (__mmask64(1) << bytes) - 1;
    VecF rows[16];
    for (int c = 0; c < kBlockN; ++c) {
      const int64_t n = nb * kBlockN + c;
      rows[c].v = n < p.n ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi8(valid, p.b + n * p.b_row_stride + k0))
                          : _mm512_setzero_ps();
    }
    transpose(rows);
    for (int j = 0; j < 16 && j0 + j < k4; ++j) {
      const __m512i v = _mm512_castps_si512(rows[j].v);
      _mm512_storeu_si512(out + (j0 + j) * kBlockN * 4, v);
      sums = _mm512_add_epi32(sums, _mm512_madd_epi16(_mm512_maddubs_epi16(ones_u8, v), ones_i16));
    }
  }
  _mm512_storeu_si512(block_colsum, sums);
}
#else
inline void pack_b_block(const ScaledInt8MmParams& p, int64_t nb, int8_t* out, int32_t* block_colsum) {
  const int64_t k4 = k4_of(p.k);
  std::memset(out, 0, size_t(k4 * kBlockN * 4));
  for (int c = 0; c < kBlockN; ++c) {
    const int64_t n = nb * kBlockN + c;
    int32_t sum = 0;
    if (n < p.n) {
      const int8_t* row = p.b + n * p.b_row_stride;
      for (int64_t k = 0; k < p.k; ++k) {
        out[((k / 4) * kBlockN + c) * 4 + k % 4] = row[k];
        sum += row[k];
      }
    }
    block_colsum[c] = sum;
  }
}
#endif

inline void pack_b(const ScaledInt8MmParams& p, uint8_t* packed) {
  const int64_t k4 = k4_of(p.k), blocks = n_blocks_of(p.n);
  int32_t* colsum = reinterpret_cast<int32_t*>(packed + colsum_offset(p.n, p.k));
  parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      pack_b_block(p, nb, reinterpret_cast<int8_t*>(packed) + nb * k4 * kBlockN * 4, colsum + nb * kBlockN);
  });
}

// a as the uint8 a + 128 that vpdpbusd multiplies: a's bits with the sign bit flipped.
inline uint8_t biased_u8(int8_t a) { return uint8_t(uint8_t(a) ^ 0x80u); }

// The epilogue's last steps for columns n0 .. n0 + cols - 1 of a row, v holding sum * a_scale:
// * b_scale[n0 + c or 0] (+ bias[n0 + c]), each step in fp32, then rounded to T into out. Shared
// with scaled_fp8_mm's CPU kernel (w8a8_cpu_fp8.cpp), whose contract has the same order.
template <typename T>
void finish_row(const float* b_scale, bool b_scale_per_channel, const float* bias, int64_t n0, float* v, int cols,
                T* out) {
  if (b_scale_per_channel) {
    for (int c = 0; c < cols; ++c) v[c] *= b_scale[n0 + c];
  } else {
    for (int c = 0; c < cols; ++c) v[c] *= b_scale[0];
  }
  if (bias)
    for (int c = 0; c < cols; ++c) v[c] += bias[n0 + c];
  int c = 0;
  for (; c + VecF::kWidth <= cols; c += VecF::kWidth) store(out + c, load(v + c));
  for (; c < cols; ++c) out[c] = from_float<T>(v[c]);
}

// Row m, columns n0 .. n0 + cols - 1 (cols <= kBlocks * kBlockN) of the output from exact int32
// sums: acc - 128 colsum when the sums were taken against A + 128 (colsum: B's column sums; null
// when acc is the plain dot product), then * a_scale, * b_scale (+ bias), each step rounded in
// fp32, then to T. Shared by the packed and the few-row paths. One step per loop over the
// columns: the loops vectorize (the scalar form with its branches per element took 15% of the
// GEMM at M = 256, K = 4096), and no multiply meets an add in one loop.
template <typename T>
void epilogue_row(const ScaledInt8MmParams& p, const int32_t* acc, const int32_t* colsum, int64_t m, int64_t n0,
                  int cols) {
  constexpr int kCols = kBlocks * kBlockN;
  float v[kCols];
  const float a_scale = p.a_scale[m];
  // Only the real columns: colsum (and b_scale, bias) end with the last real block.
  if (colsum != nullptr) {
    for (int c = 0; c < cols; ++c) v[c] = float(acc[c] - 128 * colsum[c]) * a_scale;
  } else {
    for (int c = 0; c < cols; ++c) v[c] = float(acc[c]) * a_scale;
  }
  finish_row(p.b_scale, p.b_scale_per_channel, p.bias, n0, v, cols, static_cast<T*>(p.out) + m * p.out_row_stride + n0);
}

// The 4 rows x 4 column blocks micro-kernel of both packed CPU GEMMs, whose B rows are 64 bytes
// of one block (int8: 4 k of 16 columns for vpdpbusd; fp8: one k pair of 16 columns for
// vdpbf16ps, w8a8_cpu_fp8.cpp). Per step: 4 loads of B (one per block), 4 broadcasts of a row's
// 32-bit A word, 16 dot products: each B vector feeds 4 rows and each broadcast 4 blocks, and
// the 16 independent chains hide the instruction's latency. a[i]: row i's words (step s at byte
// 4 s); block[j]: block j's first row. Dot: the vector types Acc and Operand, zero(), load(p),
// broadcast(word), dot(acc, a, b), store(out, acc). out[i][j * kBlockN + lane].
template <typename Dot, typename Out>
inline void micro_block(const uint8_t* const (&a)[kRows], const uint8_t* const (&block)[kBlocks], int64_t steps,
                        Out (&out)[kRows][kBlocks * kBlockN]) {
  typename Dot::Acc acc[kRows][kBlocks];
  for (auto& row : acc)
    for (auto& v : row) v = Dot::zero();
  for (int64_t s = 0; s < steps; ++s) {
    typename Dot::Operand bv[kBlocks];
#pragma GCC unroll 4
    for (int j = 0; j < kBlocks; ++j) bv[j] = Dot::load(block[j] + s * kBlockN * 4);
#pragma GCC unroll 8
    for (int i = 0; i < kRows; ++i) {
      int32_t word;
      std::memcpy(&word, a[i] + 4 * s, 4);
      const typename Dot::Operand av = Dot::broadcast(word);
#pragma GCC unroll 4
      for (int j = 0; j < kBlocks; ++j) acc[i][j] = Dot::dot(acc[i][j], av, bv[j]);
    }
  }
  for (int i = 0; i < kRows; ++i)
    for (int j = 0; j < kBlocks; ++j) Dot::store(out[i] + j * kBlockN, acc[i][j]);
}

struct TaskPackedBTag;

// Calls micro(a_rows, b_blocks, k4, acc) for every block of kRows rows x kBlocks column blocks
// (b_blocks: the first block; the next ones follow every k4 * kBlockN * 4 bytes; acc [kRows]
// [kBlocks * kBlockN] int32, zeroed; `blocks` of them are real), then applies the epilogue
// (T: the output's storage type). packed_b null: each task packs its column blocks and their
// sums into the thread's buffer (a weight the packed-weight cache has no room for).
template <typename T, typename Micro>
void gemm_typed(const ScaledInt8MmParams& p, const uint8_t* packed_b, const Micro& micro) {
  const int64_t k4 = k4_of(p.k), blocks = n_blocks_of(p.n);
  const int64_t rows = (p.m + kRows - 1) / kRows * kRows;
  // Written in full below (rows, then their zero padding): no zero-filling pass first.
  const auto a_buffer = uninitialized_line_aligned<uint8_t>(size_t(rows * k4 * 4));
  uint8_t* const a = a_buffer.get();
  parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      uint8_t* const dst = a + m * k4 * 4;
      const int64_t real = m < p.m ? p.k : 0;
      const int8_t* const src = p.a + (m < p.m ? m : 0) * p.a_row_stride;
      for (int64_t k = 0; k < real; ++k) dst[k] = biased_u8(src[k]);  // vectorizes
      std::memset(dst + real, 0, size_t(k4 * 4 - real));
    }
  });
  const int64_t block_bytes = k4 * kBlockN * 4;
  const int32_t* colsum =
      packed_b ? reinterpret_cast<const int32_t*>(packed_b + colsum_offset(p.n, p.k)) : nullptr;
  const int64_t column_tasks = (blocks + kBlocks - 1) / kBlocks;
  parallel_for(0, column_tasks, 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<uint8_t[], CacheLineDelete> fallback;
    int8_t* const task_b = packed_b ? nullptr
                                    : reinterpret_cast<int8_t*>(kept_scratch<uint8_t, TaskPackedBTag>(
                                          size_t(kBlocks * block_bytes), fallback));
    int32_t task_colsum[kBlocks * kBlockN];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t nb0 = task * kBlocks;
      const int cols = int(std::min<int64_t>(kBlocks * kBlockN, p.n - nb0 * kBlockN));
      const int8_t* b = reinterpret_cast<const int8_t*>(packed_b) + nb0 * block_bytes;
      const int32_t* sums = colsum ? colsum + nb0 * kBlockN : task_colsum;
      if (!packed_b) {
        for (int64_t j = 0; j < std::min<int64_t>(kBlocks, blocks - nb0); ++j)
          pack_b_block(p, nb0 + j, task_b + j * block_bytes, task_colsum + j * kBlockN);
        b = task_b;
      }
      for (int64_t m0 = 0; m0 < rows; m0 += kRows) {
        const uint8_t* a_rows[kRows];
        for (int i = 0; i < kRows; ++i) a_rows[i] = a + (m0 + i) * k4 * 4;
        int32_t acc[kRows][kBlocks * kBlockN] = {};
        micro(a_rows, b, std::min<int64_t>(kBlocks, blocks - nb0), k4, acc);
        for (int i = 0; i < kRows && m0 + i < p.m; ++i)
          epilogue_row<T>(p, acc[i], sums, m0 + i, nb0 * kBlockN, cols);
      }
    }
  });
}

// A's m rows for an unpacked path's dot products: each value converted (to int16, or to u8 as
// a + 128), rows of `stride` (K rounded up to kAlign) values with a zero tail.
template <typename E, int kAlign>
struct PreparedA {
  const ScaledInt8MmParams* p;
  int64_t stride;
  std::vector<E> a;

  template <typename Convert>
  PreparedA(const ScaledInt8MmParams& params, Convert convert)
      : p(&params), stride((params.k + kAlign - 1) / kAlign * kAlign), a(size_t(params.m * stride), E(0)) {
    for (int64_t i = 0; i < params.m; ++i)
      for (int64_t j = 0; j < params.k; ++j) a[size_t(i * stride + j)] = convert(params.a[i * params.a_row_stride + j]);
  }
};

// Calls f(std::integral_constant<int, rows>{}) for 1 <= rows <= kMax.
template <int kMax, typename F>
void with_row_count(int rows, const F& f) {
  if constexpr (kMax >= 1) {
    if (rows == kMax) {
      f(std::integral_constant<int, kMax>{});
    } else {
      with_row_count<kMax - 1>(rows, f);
    }
  }
}

// The m rows of A in passes of kPass rows (the last one shorter): pass(rows, first, i0) with
// `rows` and `first` (the pass at i0 == 0) as compile-time constants, so that a pass's
// accumulator array is indexed by constants only and stays in registers (with a run-time row
// bound GCC kept it on the stack: a load and a store around every vpdpbusd).
template <int kPass, typename Pass>
void for_row_passes(int64_t m, const Pass& pass) {
  const auto tail = [&](int64_t i0, auto first) {
    with_row_count<kPass - 1>(int(m - i0), [&](auto rows) { pass(rows, first, i0); });
  };
  if (m < kPass) {
    if (m > 0) tail(0, std::true_type{});
    return;
  }
  pass(std::integral_constant<int, kPass>{}, std::true_type{}, int64_t(0));
  int64_t i0 = kPass;
  for (; i0 + kPass <= m; i0 += kPass) pass(std::integral_constant<int, kPass>{}, std::false_type{}, i0);
  if (i0 < m) tail(i0, std::false_type{});
}

// The unpacked path (m <= kUnpackedInt8MaxRows, B read as it is): tasks of `rows_b` rows of B
// over the threads; dot(b_rows, count, acc) sets acc[i][r] = sum_k a[i, k] * b_rows[r][k]
// exactly for the m rows of A (the Dot prepared A its own way), r < count; the epilogue is the
// packed path's, term for term (its acc - 128 colsum is this acc).
template <typename T, int kRowsPerTask, typename Dot>
void unpacked_gemm_typed(const ScaledInt8MmParams& p, const Dot& dot) {
  static_assert(kRowsPerTask <= kBlocks * kBlockN, "a task's columns fit epilogue_row");
  const int64_t tasks = (p.n + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(0, tasks, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, p.k)), [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n0 = task * kRowsPerTask;
      const int count = int(std::min<int64_t>(kRowsPerTask, p.n - n0));
      const int8_t* b_rows[kRowsPerTask];
      for (int r = 0; r < kRowsPerTask; ++r) b_rows[r] = p.b + (n0 + (r < count ? r : 0)) * p.b_row_stride;
      int32_t acc[kUnpackedInt8MaxRows][kRowsPerTask] = {};
      dot(b_rows, count, acc);
      for (int64_t i = 0; i < p.m; ++i) epilogue_row<T>(p, acc[i], nullptr, i, n0, count);
    }
  });
}

// unpacked_gemm_typed for every output type, in chunks of kUnpackedInt8MaxRows rows of A;
// make_dot(chunk) returns the Dot for a chunk's params.
template <int kRowsPerTask, typename MakeDot>
void unpacked_gemm(const ScaledInt8MmParams& p, const MakeDot& make_dot) {
  const int64_t element = p.out_dtype == ScalarKind::kFloat32 ? 4 : 2;
  for (int64_t i0 = 0; i0 < p.m; i0 += kUnpackedInt8MaxRows) {
    ScaledInt8MmParams rows = p;
    rows.m = std::min<int64_t>(kUnpackedInt8MaxRows, p.m - i0);
    rows.a = p.a + i0 * p.a_row_stride;
    rows.a_scale = p.a_scale + i0;
    rows.out = static_cast<uint8_t*>(p.out) + i0 * p.out_row_stride * element;
    const auto dot = make_dot(rows);
    visit_storage_type(p.out_dtype, [&](auto tag) {
      using T = decltype(tag);
      if constexpr (!std::is_same_v<T, double>) unpacked_gemm_typed<T, kRowsPerTask>(rows, dot);
    });
  }
}

template <typename Micro>
void gemm(const ScaledInt8MmParams& p, const uint8_t* packed_b, const Micro& micro) {
  visit_storage_type(p.out_dtype, [&](auto tag) {
    using T = decltype(tag);
    if constexpr (!std::is_same_v<T, double>) gemm_typed<T>(p, packed_b, micro);
  });
}

}  // namespace torch_ext::cpu::TORCH_EXT_CPU_ISA::w8a8
