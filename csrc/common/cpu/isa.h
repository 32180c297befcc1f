// CPU instruction-set levels: what this CPU supports, what was compiled, what runs.
// Plain C++ (no torch), shared by the dispatcher and build_info().
#pragma once

#include <string>
#include <vector>

namespace torch_ext::cpu {

// Ordered: a level implies every level below it.
enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const char* cpu_isa_name(CpuIsa isa);
// Parses "scalar" / "avx2" / "avx512"; returns false for anything else.
bool parse_cpu_isa(const std::string& name, CpuIsa* out);

// The best level both this CPU and the OS support (AVX state enabled in XCR0).
CpuIsa detected_cpu_isa();
// The levels this binary holds kernels for (see TORCH_EXT_CPU_ISAS in CMakeLists.txt).
std::vector<CpuIsa> compiled_cpu_isas();
// The level kernels run at: the best compiled level not above the detected one, lowered by
// the environment variable TORCH_EXT_CPU_ISA or set_cpu_isa_limit() (used by the tests to
// exercise the AVX2 and scalar paths on an AVX-512 machine).
CpuIsa active_cpu_isa();
// Caps the active level; the request must not exceed detected_cpu_isa(). Returns the level
// now active.
CpuIsa set_cpu_isa_limit(CpuIsa limit);

// Whether this CPU has AVX512_BF16 (vdpbf16ps), whatever level runs.
bool avx512_bf16_detected();
// ... and the active level is AVX-512: kernels with a bf16 dot-product path check this before
// calling code compiled for that extension.
bool avx512_bf16_active();
// The same for AVX512_VNNI (vpdpbusd).
bool avx512_vnni_active();
// Whether this CPU has AVX512_VBMI (byte permutes, vpermt2b); the AVX-512 level does not assume it.
bool avx512_vbmi_detected();

}  // namespace torch_ext::cpu
