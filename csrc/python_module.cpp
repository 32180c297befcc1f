// The Python module torch_ext._C: build facts, the CPU ISA switch, and test hooks for
// host-and-device helpers. Loading it also runs the op registrations in torch_bindings.cpp.
#include <ATen/core/dispatch/Dispatcher.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "common/cpu/amx.h"
#include "common/cpu/gemm_dtype.h"
#include "common/cpu/huge_pages.h"
#include "common/cpu/isa.h"
#include "common/float_bits.h"
#include "conv/packed_weight_cache.h"

#if defined(TORCH_EXT_WITH_CUDA)
#include <cuda_runtime_api.h>
#endif

namespace py = pybind11;

namespace torch_ext {
namespace {

std::vector<std::string> split_csv(const std::string& csv) {
  std::vector<std::string> parts;
  std::stringstream stream(csv);
  std::string part;
  while (std::getline(stream, part, ',')) {
    if (!part.empty()) parts.push_back(part);
  }
  return parts;
}

// {op name: {"cpu": bool, "cuda": bool}} for every torch_ext:: op, read from the dispatcher.
py::dict op_kernels() {
  py::dict ops;
  for (const c10::OperatorName& name : c10::Dispatcher::singleton().getAllOpNames()) {
    if (name.name.rfind("torch_ext::", 0) != 0) continue;
    auto handle = c10::Dispatcher::singleton().findOp(name);
    if (!handle) continue;
    py::dict kernels;
    kernels["cpu"] = handle->hasKernelForDispatchKey(c10::DispatchKey::CPU);
    kernels["cuda"] = handle->hasKernelForDispatchKey(c10::DispatchKey::CUDA);
    ops[py::str(name.name.substr(std::strlen("torch_ext::")))] = kernels;
  }
  return ops;
}

py::dict build_info() {
  py::dict info;
  info["version"] = TORCH_EXT_VERSION;
  info["torch_version"] = TORCH_EXT_TORCH_VERSION;
  #if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#else
  info["compiler"] = std::string("gcc ") + __VERSION__;
#endif
#if defined(TORCH_EXT_WITH_CUDA)
  info["cuda"] = true;
  info["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." + std::to_string(CUDART_VERSION % 1000 / 10);
  info["cuda_archs"] = split_csv(TORCH_EXT_CUDA_ARCHS);
#else
  info["cuda"] = false;
  info["cuda_version"] = py::none();
  info["cuda_archs"] = std::vector<std::string>{};
#endif
  std::vector<std::string> compiled;
  for (cpu::CpuIsa isa : cpu::compiled_cpu_isas()) compiled.push_back(cpu::cpu_isa_name(isa));
  info["cpu_isas_compiled"] = compiled;
  info["cpu_isa_detected"] = cpu::cpu_isa_name(cpu::detected_cpu_isa());
  info["cpu_isa_selected"] = cpu::cpu_isa_name(cpu::active_cpu_isa());
#if defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
  info["cpu_amx_compiled"] = true;
#else
  info["cpu_amx_compiled"] = false;
#endif
  info["cpu_avx512_bf16_active"] = cpu::avx512_bf16_active();
  info["cpu_amx_int8_detected"] = cpu::amx_int8_detected();
  info["cpu_amx_bf16_detected"] = cpu::amx_bf16_detected();
  info["cpu_avx512_vbmi_detected"] = cpu::avx512_vbmi_detected();
  info["cpu_amx_mode"] = cpu::amx_mode_name(cpu::amx_mode());
  info["ops"] = op_kernels();
  return info;
}

std::string set_cpu_isa(const std::string& name) {
  cpu::CpuIsa isa;
  if (!cpu::parse_cpu_isa(name, &isa)) {
    throw py::value_error("set_cpu_isa: expected 'scalar', 'avx2' or 'avx512', got '" + name + "'");
  }
  return cpu::cpu_isa_name(cpu::set_cpu_isa_limit(isa));
}

std::string set_cpu_amx(const std::string& name) {
  cpu::AmxMode mode;
  if (!cpu::parse_amx_mode(name, &mode)) {
    throw py::value_error("set_cpu_amx: expected 'off', 'on' or 'emulate', got '" + name + "'");
  }
#if !defined(TORCH_EXT_HAVE_CPU_AVX512_AMX)
  if (mode != cpu::AmxMode::kOff) throw py::value_error("set_cpu_amx: this build has no AMX kernels");
#endif
  return cpu::amx_mode_name(cpu::set_amx_mode(mode));
}

// Applies a scalar conversion to every element of a packed little-endian buffer.
template <typename In, typename Out, typename Fn>
py::bytes map_buffer(const py::bytes& input, Fn fn) {
  const std::string in = input;
  if (in.size() % sizeof(In) != 0) throw py::value_error("buffer size is not a multiple of the element size");
  const size_t n = in.size() / sizeof(In);
  std::string out(n * sizeof(Out), '\0');
  for (size_t i = 0; i < n; ++i) {
    In value;
    std::memcpy(&value, in.data() + i * sizeof(In), sizeof(In));
    const Out result = fn(value);
    std::memcpy(&out[i * sizeof(Out)], &result, sizeof(Out));
  }
  return py::bytes(out);
}

}  // namespace
}  // namespace torch_ext

PYBIND11_MODULE(_C, m) {
  using namespace torch_ext;
  m.doc() = "torch_ext compiled extension: ops are registered under torch.ops.torch_ext";
  m.def("build_info", &build_info, "What this build of torch_ext contains (versions, GPU archs, CPU ISAs, ops).");
  m.def("set_cpu_isa", &set_cpu_isa, py::arg("name"),
        "Caps the CPU ISA level kernels use ('scalar', 'avx2', 'avx512'); returns the level now active.");
  m.def("cpu_isa", [] { return std::string(cpu::cpu_isa_name(cpu::active_cpu_isa())); },
        "The CPU ISA level kernels currently use.");
  m.def("set_cpu_amx", &set_cpu_amx, py::arg("mode"),
        "Whether the CPU kernels with AMX paths (int8 and fp8 GEMMs, bf16 attention and fused_moe) run them: 'off', "
        "'on' (needs AMX tiles) or 'emulate' (on tiles emulated in scalar code, for tests); returns the mode now set.");
  m.def("amx_emulated_dot_products", &cpu::amx_emulated_dot_products,
        "Tile dot products the emulated AMX tiles have run in this process (for tests).");
  m.def("cpu_amx", [] { return std::string(cpu::amx_mode_name(cpu::amx_mode())); },
        "The AMX mode set (TORCH_EXT_CPU_AMX or set_cpu_amx).");

  m.def("cpu_bf16_gemm_native", [] { return cpu::fast_gemm_dtype(at::kBFloat16) == at::kBFloat16; },
        "Whether this CPU runs torch's bf16 GEMMs on bf16 instructions (AVX512_BF16 or AMX-BF16); "
        "where not, the backward GEMMs of 16-bit layers run in fp32.");
  m.def("set_cpu_huge_pages", &cpu::set_huge_page_advice, py::arg("on"),
        "Whether large CPU outputs are advised for transparent huge pages (default on unless "
        "TORCH_EXT_CPU_HUGE_PAGES=0); returns the setting now in force.");
  m.def("cpu_huge_pages", &cpu::huge_page_advice, "Whether large CPU outputs are advised for huge pages.");

  m.def("clear_conv_weight_cache", &clear_packed_weight_cache,
        "Frees the CPU convolution weights packed for inference reuse; returns the bytes released.");
  m.def("conv_weight_cache_bytes", &packed_weight_cache_bytes, "Bytes of packed convolution weights held now.");

  py::module_ testing = m.def_submodule("_testing", "Host-side copies of device helpers, for CPU tests.");
  testing.def("huge_page_span", [](uintptr_t address, size_t bytes) {
    const cpu::HugePageSpan span = cpu::huge_page_span(address, bytes);
    return py::make_tuple(span.begin, span.length);
  });
  testing.def("float_to_half", [](const py::bytes& b) {
    return map_buffer<float, uint16_t>(b, [](float f) { return to_half(f).bits; });
  });
  testing.def("float_to_bfloat16", [](const py::bytes& b) {
    return map_buffer<float, uint16_t>(b, [](float f) { return to_bfloat16(f).bits; });
  });
  testing.def("half_to_float", [](const py::bytes& b) {
    return map_buffer<uint16_t, float>(b, [](uint16_t h) { return to_float(Half{h}); });
  });
}
