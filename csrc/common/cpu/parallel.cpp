#include "common/cpu/parallel.h"

#include <ATen/Parallel.h>

namespace torch_ext::cpu {

int max_threads() { return at::get_num_threads(); }

void parallel_for_range(int64_t begin, int64_t end, int64_t grain, RangeFunction fn, const void* context) {
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) { fn(context, b, e); });
}

}  // namespace torch_ext::cpu
