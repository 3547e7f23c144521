#pragma once
#include <string>

namespace forkattn {
// True when the CUDA kernels in kernels/ were compiled into this extension.
bool compiled_with_cuda();
// The torch version this extension was compiled against (TORCH_VERSION_* macros).
std::string compiled_torch_version();
}  // namespace forkattn
