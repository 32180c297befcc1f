// Transparent huge pages for large CPU outputs.
//
// A fresh output of hundreds of MB (fused_moe's weight gradients) is mapped by the kernel one
// 4 KiB page at a time as the op first writes it: about 1.6 us of system time per page on the
// VMs measured, which was half of fused_moe's fp32 forward + backward (docs/perf/moe.md). With
// the region advised for transparent huge pages (MADV_HUGEPAGE; effective where
// /sys/kernel/mm/transparent_hugepage/enabled is "madvise" or "always"), one fault maps 2 MiB.
// torch does the same for every allocation when THP_MEM_ALLOC_ENABLE=1 is set; this does it only
// for the outputs that gain, without the user setting anything. Plain C++ (no torch).
#pragma once

#include <cstddef>
#include <cstdint>

namespace torch_ext::cpu {

constexpr size_t kHugePageBytes = size_t(2) << 20;
// Outputs smaller than this are left alone. glibc's malloc serves requests above 32 MiB (its
// largest mmap threshold on 64-bit) with a fresh mapping every time, so they fault on first
// write; smaller ones are often recycled heap memory, already mapped, where the advice gains
// nothing and huge pages can cost: torch's THP_MEM_ALLOC_ENABLE=1 (which advises every allocation
// of 2 MiB or more) made im2win_conv2d on a 32 x 64 x 56 x 56 batch 33 -> 52 ms, its 26 MB output
// then zeroed by the kernel on every call instead of reused.
constexpr size_t kMinHugePageAdviceBytes = size_t(32) << 20;

// The whole 2 MiB pages inside [address, address + bytes): the only part a huge page can back
// without reaching memory the allocation does not own. length 0 when there is none.
struct HugePageSpan {
  uintptr_t begin = 0;
  size_t length = 0;
};
HugePageSpan huge_page_span(uintptr_t address, size_t bytes);

// Advises the whole huge pages of a not-yet-touched allocation of at least
// kMinHugePageAdviceBytes for transparent huge pages, when the advice is on. Never fails: the
// advice is only a hint (a kernel without THP ignores it).
void advise_huge_pages(void* data, size_t bytes);

// The switch: on unless TORCH_EXT_CPU_HUGE_PAGES=0 at start-up, or set_huge_page_advice(false)
// (the benchmarks time both sides in one process).
bool huge_page_advice();
bool set_huge_page_advice(bool on);

}  // namespace torch_ext::cpu
