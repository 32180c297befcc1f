// Heap buffers that start on a cache line, for the CPU kernels' scratch operands. malloc (and so
// new[] and std::vector) aligns to 16 bytes only, and an AMX tile row or a zmm load at an
// address 16 bytes past a line touches two lines. Measured on a Sapphire Rapids VM (a 32 x 32
// block of TDPBF16PS products from L1, 2 to 16 steps of k): 44-61 cycles per product with both
// operands 16 or 32 bytes past a line, 14-20 cycles with them on lines.
#pragma once

#include <cstddef>
#include <memory>
#include <new>
#include <type_traits>
#include <vector>

namespace torch_ext::cpu {

constexpr std::align_val_t kLineAlignment{64};  // bytes

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), kLineAlignment));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, kLineAlignment); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const {
    return true;
  }
};

// A std::vector whose data starts on a cache line (value-initialized as std::vector's are).
template <typename T>
using LineAlignedVector = std::vector<T, CacheLineAllocator<T>>;

struct CacheLineDelete {
  void operator()(void* p) const { ::operator delete(p, kLineAlignment); }
};

// n uninitialized values of a trivial type starting on a cache line, for buffers the caller
// writes in full before reading (no zero-filling pass).
template <typename T>
std::unique_ptr<T[], CacheLineDelete> uninitialized_line_aligned(std::size_t n) {
  static_assert(std::is_trivially_default_constructible_v<T> && std::is_trivially_destructible_v<T>);
  return std::unique_ptr<T[], CacheLineDelete>(
      static_cast<T*>(::operator new(n * sizeof(T), kLineAlignment)));
}

// Scratch of n values kept by the calling thread between calls, one buffer per Tag type: a large
// buffer allocated per call comes back from the OS as fresh pages, faulted in and zeroed on every
// call (measured: 12% of a 10 ms AMX GEMM on a Sapphire Rapids VM). Requests above
// kKeptScratchBytes are not kept: they are allocated into `fallback` for the call.
constexpr std::size_t kKeptScratchBytes = std::size_t(16) << 20;

template <typename T, typename Tag>
T* kept_scratch(std::size_t n, std::unique_ptr<T[], CacheLineDelete>& fallback) {
  if (n * sizeof(T) > kKeptScratchBytes) {
    fallback = uninitialized_line_aligned<T>(n);
    return fallback.get();
  }
  thread_local LineAlignedVector<T> kept;
  if (kept.size() < n) kept.resize(n);
  return kept.data();
}

}  // namespace torch_ext::cpu
