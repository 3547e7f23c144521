#pragma once

namespace forkattn {
// True when the CUDA kernels in kernels/ were compiled into this extension.
bool compiled_with_cuda();
}  // namespace forkattn
