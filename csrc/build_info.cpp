#include "build_info.h"

#include <sstream>

#ifdef ROPE_WITH_CUDA
#include "cuda/build_info.h"
#endif

// ROPE_VERSION, ROPE_TORCH_VERSION and ROPE_CUDA_VERSION come from the build (CMakeLists.txt),
// so that the library describes itself without Python.
#ifndef ROPE_VERSION
#error "ROPE_VERSION must be defined by the build"
#endif

namespace rope_kernels {

std::string build_info_json() {
  std::ostringstream out;
  out << "{\"version\": \"" << ROPE_VERSION << "\", \"torch\": \"" << ROPE_TORCH_VERSION << "\"";
#ifdef ROPE_WITH_CUDA
  out << ", \"cuda\": \"" << ROPE_CUDA_VERSION << "\", \"cuda_kernels\": " << cuda::cuda_build_info_json();
#else
  out << ", \"cuda\": null, \"cuda_kernels\": null";
#endif
  out << "}";
  return out.str();
}

}  // namespace rope_kernels
