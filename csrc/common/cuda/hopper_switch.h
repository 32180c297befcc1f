// Host-side choice of a Hopper-only (sm_90a, wgmma) kernel: the current device is compute
// capability 9.0 and the kernel's environment switch allows it. The switch is read at every call,
// so one process can time both paths: "1" turns the kernel on, "0" off, anything else (or unset)
// keeps its default (on once it has passed its tests on a GPU, off before). The callers compile
// the call only when the build has sm_90a code (TORCH_EXT_HAVE_SM90A_KERNELS). No torch headers.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

namespace torch_ext::cuda {

// The environment switch alone (for a kernel choice that is not Hopper-specific).
inline bool kernel_switch_on(const char* env_switch, bool default_on) {
  const char* const value = std::getenv(env_switch);
  return value == nullptr ? default_on
         : std::strcmp(value, "1") == 0 ? true
         : std::strcmp(value, "0") == 0 ? false
                                        : default_on;
}

inline bool hopper_kernel_enabled(const char* env_switch, bool default_on) {
  if (!kernel_switch_on(env_switch, default_on)) return false;
  int device = 0, major = 0, minor = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess) {
    return false;
  }
  return major == 9 && minor == 0;
}

}  // namespace torch_ext::cuda
