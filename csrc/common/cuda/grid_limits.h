// CUDA's launch-grid limits, for the launchers' checks and clamps (plain C++, no CUDA headers).
#pragma once

#include <cstdint>

namespace torch_ext::cuda {

constexpr int64_t kMaxGridX = 2147483647;  // gridDim.x: 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;      // gridDim.y and gridDim.z

}  // namespace torch_ext::cuda
