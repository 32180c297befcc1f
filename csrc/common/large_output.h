// Allocation of outputs an op writes whole: on the CPU, large ones go on transparent huge pages
// (common/cpu/huge_pages.h says why and when that pays).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "common/cpu/huge_pages.h"

namespace torch_ext {

// at::empty(sizes, options), advised for huge pages on the CPU before anything touches it.
inline at::Tensor empty_large_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
  if (out.is_cpu()) cpu::advise_huge_pages(out.data_ptr(), out.nbytes());
  return out;
}

}  // namespace torch_ext
