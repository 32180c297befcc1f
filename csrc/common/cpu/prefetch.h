// Software prefetch for the CPU kernels that stream weights from DRAM a few rows at a time (more
// streams than the hardware prefetchers keep ahead of on some cores: measured on a Sapphire Rapids
// VM, docs/perf/quant.md and moe.md). Plain C++, any ISA level.
#pragma once

#include <cstdint>

namespace torch_ext::cpu {

constexpr int64_t kCacheLineBytes = 64;

// Asks for the cache lines of [at, at + bytes) to be read into every cache level; never faults,
// so `at` may lie past the end of a tensor.
inline void prefetch_lines(const void* at, int64_t bytes) {
  const char* const first = static_cast<const char*>(at);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLineBytes) __builtin_prefetch(first + offset, 0, 3);
}

// The same into the L2 and the last level only (prefetcht1): for streams the kernel reaches many
// lines later, whose lines would only crowd the L1 meanwhile.
inline void prefetch_lines_to_l2(const void* at, int64_t bytes) {
  const char* const first = static_cast<const char*>(at);
  for (int64_t offset = 0; offset < bytes; offset += kCacheLineBytes) __builtin_prefetch(first + offset, 0, 2);
}

}  // namespace torch_ext::cpu
