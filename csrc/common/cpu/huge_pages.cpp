#include "common/cpu/huge_pages.h"

#include <atomic>
#include <cstdlib>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "common/env_switch.h"

namespace torch_ext::cpu {
namespace {

bool initial_advice() {
  const char* value = std::getenv("TORCH_EXT_CPU_HUGE_PAGES");
  return value == nullptr || !env_value_is_off(value);
}

std::atomic<bool>& advice_slot() {
  static std::atomic<bool> slot{initial_advice()};
  return slot;
}

}  // namespace

HugePageSpan huge_page_span(uintptr_t address, size_t bytes) {
  const uintptr_t mask = kHugePageBytes - 1;
  const uintptr_t begin = (address + mask) & ~mask;
  const uintptr_t end = (address + bytes) & ~mask;
  return end > begin ? HugePageSpan{begin, size_t(end - begin)} : HugePageSpan{};
}

void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (bytes < kMinHugePageAdviceBytes || !huge_page_advice()) return;
  const HugePageSpan span = huge_page_span(reinterpret_cast<uintptr_t>(data), bytes);
  if (span.length > 0) madvise(reinterpret_cast<void*>(span.begin), span.length, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

bool huge_page_advice() { return advice_slot().load(std::memory_order_relaxed); }

bool set_huge_page_advice(bool on) {
  advice_slot().store(on, std::memory_order_relaxed);
  return on;
}

}  // namespace torch_ext::cpu
