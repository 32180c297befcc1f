#include "common/cpu/isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace torch_ext::cpu {
namespace {

CpuIsa detect() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  // __builtin_cpu_supports consults XCR0 for the AVX levels, so an OS that has not
  // enabled the wide register state reports them as unsupported.
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return CpuIsa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return CpuIsa::kAvx2;
  }
#endif
  return CpuIsa::kScalar;
}

CpuIsa best_compiled_at_most(CpuIsa cap) {
  CpuIsa best = CpuIsa::kScalar;
  for (CpuIsa isa : compiled_cpu_isas()) {
    if (isa <= cap && isa > best) best = isa;
  }
  return best;
}

CpuIsa initial_active() {
  CpuIsa cap = detect();
  if (const char* env = std::getenv("TORCH_EXT_CPU_ISA")) {
    CpuIsa requested;
    if (parse_cpu_isa(env, &requested) && requested < cap) cap = requested;
  }
  return best_compiled_at_most(cap);
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_active())};
  return slot;
}

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512:
      return "avx512";
    case CpuIsa::kAvx2:
      return "avx2";
    case CpuIsa::kScalar:
      return "scalar";
  }
  return "unknown";
}

bool parse_cpu_isa(const std::string& name, CpuIsa* out) {
  for (CpuIsa isa : {CpuIsa::kScalar, CpuIsa::kAvx2, CpuIsa::kAvx512}) {
    if (name == cpu_isa_name(isa)) {
      *out = isa;
      return true;
    }
  }
  return false;
}

CpuIsa detected_cpu_isa() {
  static const CpuIsa detected = detect();
  return detected;
}

std::vector<CpuIsa> compiled_cpu_isas() {
  std::vector<CpuIsa> isas{CpuIsa::kScalar};
#if defined(TORCH_EXT_HAVE_CPU_AVX2)
  isas.push_back(CpuIsa::kAvx2);
#endif
#if defined(TORCH_EXT_HAVE_CPU_AVX512)
  isas.push_back(CpuIsa::kAvx512);
#endif
  return isas;
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(active_slot().load(std::memory_order_relaxed)); }

CpuIsa set_cpu_isa_limit(CpuIsa limit) {
  if (limit > detected_cpu_isa()) {
    throw std::invalid_argument(std::string("set_cpu_isa: this CPU supports up to '") +
                                cpu_isa_name(detected_cpu_isa()) + "', requested '" +
                                cpu_isa_name(limit) + "'");
  }
  const CpuIsa active = best_compiled_at_most(limit);
  active_slot().store(static_cast<int>(active), std::memory_order_relaxed);
  return active;
}

namespace {
// TORCH_EXT_CPU_AVX512_EXTENSIONS=0 keeps the AVX-512 level's kernels off VNNI and BF16: what a
// CPU without them runs (the tests run it in a subprocess; a user can rule out an extension).
bool avx512_extensions_allowed() {
  static const bool allowed = [] {
    const char* value = std::getenv("TORCH_EXT_CPU_AVX512_EXTENSIONS");
    return value == nullptr || std::string(value) != "0";
  }();
  return allowed;
}
// Whether the CPU has `feature` (a __builtin_cpu_supports name) and AVX-512 kernels run.
bool avx512_extension_active(bool has_feature) {
  return has_feature && avx512_extensions_allowed() && active_cpu_isa() == CpuIsa::kAvx512;
}
}  // namespace

bool avx512_bf16_detected() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512bf16"));
  }();
  return has;
#else
  return false;
#endif
}

bool avx512_bf16_active() { return avx512_extension_active(avx512_bf16_detected()); }

bool avx512_vnni_active() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512vnni"));
  }();
  return avx512_extension_active(has);
#else
  return false;
#endif
}

bool avx512_vbmi_detected() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool has = [] {
    __builtin_cpu_init();
    return bool(__builtin_cpu_supports("avx512vbmi"));
  }();
  return has;
#else
  return false;
#endif
}

}  // namespace torch_ext::cpu
