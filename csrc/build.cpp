#include "build.h"

namespace forkattn {

bool compiled_with_cuda() {
#ifdef FORKATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace forkattn
