// Multithreading for CPU kernel files without including ATen in them.
//
// CPU kernel files are compiled once per ISA level; ATen's inline code compiled with
// AVX-512 flags could be merged into the AVX2 copy by the linker (see macros.h). So the
// kernels call this non-inline function, which runs at::parallel_for (torch's thread pool,
// honouring torch.set_num_threads) in a translation unit compiled without ISA flags.
#pragma once

#include <cstdint>

namespace torch_ext::cpu {

// Threads torch's intra-op pool uses (torch.get_num_threads()).
int max_threads();

using RangeFunction = void (*)(const void* context, int64_t begin, int64_t end);

// Splits [begin, end) into chunks of at least `grain` and calls fn(context, b, e) on them
// from torch's intra-op thread pool.
void parallel_for_range(int64_t begin, int64_t end, int64_t grain, RangeFunction fn, const void* context);

// Convenience wrapper for a callable `body(begin, end)`.
template <typename Body>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const Body& body) {
  parallel_for_range(
      begin, end, grain,
      [](const void* context, int64_t b, int64_t e) { (*static_cast<const Body*>(context))(b, e); }, &body);
}

}  // namespace torch_ext::cpu
