// AMX (Intel Advanced Matrix Extensions: eight tile registers of up to 16 rows x 64 bytes and
// the TMUL dot-product unit) for the CPU kernels: whether this CPU and OS provide it, and which
// kind of tiles the kernels use. Plain C++ (no torch, no ISA flags).
//
// Kernels on AMX: scaled_int8_mm's packed path (AMX-INT8); scaled_fp8_mm, block_sparse_attention's
// bf16 products, fused_moe's bf16 panels and weight_only_linear's 4-bit batches of bf16 x
// (AMX-BF16). Modes (TORCH_EXT_CPU_AMX, or set_amx_mode()):
//   on        the AMX kernels on the hardware tiles, where amx_int8_detected() (else off). The
//             default there: on a 2-vCPU Sapphire Rapids VM (2026-11-27, docs/perf/amx.md) they
//             ran 1.1-8x faster than the AVX-512 kernels beside them and passed the same tests;
//   off       the AVX-512 / VNNI / AVX512_BF16 kernels (the default without AMX);
//   emulate   the same kernels on tiles emulated in scalar code (common/cpu/amx_tiles.h): every
//             tile configuration, load, dot product and store the hardware would run, checked
//             for the shapes the hardware requires, on any AVX-512 CPU. For tests; slow.
#pragma once

#include <cstdint>
#include <string>

namespace torch_ext::cpu {

enum class AmxMode : int { kOff = 0, kOn = 1, kEmulate = 2 };

const char* amx_mode_name(AmxMode mode);
// Parses "off" / "on" / "emulate" (also "0" / "1"); returns false for anything else.
bool parse_amx_mode(const std::string& name, AmxMode* out);

// AMX-TILE with AMX-INT8 (or AMX-BF16) on this CPU, tile data enabled by the OS (XCR0) and
// granted to this process (Linux asks for it with arch_prctl(ARCH_REQ_XCOMP_PERM); done once).
bool amx_int8_detected();
bool amx_bf16_detected();

// The mode set by the environment or set_amx_mode() ("on" where not detected reads as off).
AmxMode amx_mode();
// Sets the mode; "on" requires amx_int8_detected() (std::invalid_argument otherwise; every
// CPU with AMX so far has AMX-INT8 and AMX-BF16 both).
// Returns the mode now in effect.
AmxMode set_amx_mode(AmxMode mode);

// The mode an int8 kernel uses now: amx_mode(), but off unless the AVX-512 level is active
// (the AMX kernels are compiled at that level) and, for "on", the CPU has AMX-INT8.
AmxMode amx_int8_kernel_mode();
// The same for a bf16 kernel: "on" needs AMX-BF16.
AmxMode amx_bf16_kernel_mode();

// Dot-product instructions the emulated tiles have run in this process (the tests check with
// it that a call ran the AMX kernel, and how many tile products its blocking implies).
int64_t amx_emulated_dot_products();
void count_amx_emulated_dot_product();

}  // namespace torch_ext::cpu
