// Reading on/off environment switches. Plain C++ (no torch).
#pragma once

#include <cstring>

namespace torch_ext {

// Whether a switch's value turns it off: "0", "false", "off" or "no".
inline bool env_value_is_off(const char* value) {
  for (const char* off : {"0", "false", "off", "no"}) {
    if (std::strcmp(value, off) == 0) return true;
  }
  return false;
}

}  // namespace torch_ext
