#include "build.h"

#include <torch/version.h>

namespace forkattn {

bool compiled_with_cuda() {
#ifdef FORKATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string compiled_torch_version() {
  return std::to_string(TORCH_VERSION_MAJOR) + "." + std::to_string(TORCH_VERSION_MINOR) + "." +
         std::to_string(TORCH_VERSION_PATCH);
}

}  // namespace forkattn
