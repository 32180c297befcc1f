#include "common/cpu/amx.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "common/cpu/isa.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace torch_ext::cpu {
namespace {

struct AmxFeatures {
  bool int8 = false;
  bool bf16 = false;
};

#if defined(__x86_64__) || defined(_M_X64)
// XCR0 through xgetbv (only valid when CPUID reports OSXSAVE).
unsigned long long xcr0() {
  unsigned int eax = 0, edx = 0;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<unsigned long long>(edx) << 32) | eax;
}

// Linux keeps the 8 KB tile-data state off until a process asks for it; without the grant the
// first tile instruction faults. The grant is process-wide and covers threads started later.
bool tile_data_granted() {
#if defined(__linux__)
  constexpr long kArchReqXcompPerm = 0x1023;
  constexpr long kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;  // other systems: not wired up, so the AMX kernels stay off there
#endif
}

AmxFeatures detect() {
  AmxFeatures features;
  unsigned int eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))) return features;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return features;
  const bool tile = edx & (1u << 24), int8 = edx & (1u << 25), bf16 = edx & (1u << 22);
  // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS saves and restores the tile state.
  const unsigned long long kTileState = (1ull << 17) | (1ull << 18);
  if (!tile || (xcr0() & kTileState) != kTileState || !tile_data_granted()) return features;
  features.int8 = int8;
  features.bf16 = bf16;
  return features;
}
#else
AmxFeatures detect() { return {}; }
#endif

const AmxFeatures& features() {
  static const AmxFeatures detected = detect();
  return detected;
}

AmxMode initial_mode() {
  AmxMode mode = AmxMode::kOn;  // where the tiles are there (checked below)
  if (const char* env = std::getenv("TORCH_EXT_CPU_AMX")) parse_amx_mode(env, &mode);
  if (mode == AmxMode::kOn && !amx_int8_detected()) mode = AmxMode::kOff;
  return mode;
}

std::atomic<int>& mode_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_mode())};
  return slot;
}

}  // namespace

const char* amx_mode_name(AmxMode mode) {
  switch (mode) {
    case AmxMode::kOn:
      return "on";
    case AmxMode::kEmulate:
      return "emulate";
    case AmxMode::kOff:
      return "off";
  }
  return "unknown";
}

bool parse_amx_mode(const std::string& name, AmxMode* out) {
  if (name == "off" || name == "0") {
    *out = AmxMode::kOff;
  } else if (name == "on" || name == "1") {
    *out = AmxMode::kOn;
  } else if (name == "emulate") {
    *out = AmxMode::kEmulate;
  } else {
    return false;
  }
  return true;
}

bool amx_int8_detected() { return features().int8; }
bool amx_bf16_detected() { return features().bf16; }

AmxMode amx_mode() { return static_cast<AmxMode>(mode_slot().load(std::memory_order_relaxed)); }

AmxMode set_amx_mode(AmxMode mode) {
  if (mode == AmxMode::kOn && !amx_int8_detected()) {
    throw std::invalid_argument(
        "set_cpu_amx: this CPU (or OS) does not provide AMX-INT8 tiles; use 'emulate' to run the AMX "
        "kernels on emulated tiles");
  }
  mode_slot().store(static_cast<int>(mode), std::memory_order_relaxed);
  return mode;
}

namespace {
AmxMode kernel_mode(bool hardware_has_it) {
  const AmxMode mode = amx_mode();
  if (mode == AmxMode::kOff || active_cpu_isa() != CpuIsa::kAvx512) return AmxMode::kOff;
  if (mode == AmxMode::kOn && !hardware_has_it) return AmxMode::kOff;
  return mode;
}
}  // namespace

AmxMode amx_int8_kernel_mode() { return kernel_mode(amx_int8_detected()); }
AmxMode amx_bf16_kernel_mode() { return kernel_mode(amx_bf16_detected()); }

namespace {
std::atomic<int64_t>& emulated_dot_products() {
  static std::atomic<int64_t> count{0};
  return count;
}
}  // namespace

int64_t amx_emulated_dot_products() { return emulated_dot_products().load(std::memory_order_relaxed); }
void count_amx_emulated_dot_product() { emulated_dot_products().fetch_add(1, std::memory_order_relaxed); }

}  // namespace torch_ext::cpu
