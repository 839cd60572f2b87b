#pragma once

#include <string>

namespace rope_kernels {

// JSON object describing this build: package version, the torch it was built against, and,
// when the CUDA path is compiled in, the CUDA version, Triton version, architectures and variants.
std::string build_info_json();

}  // namespace rope_kernels
