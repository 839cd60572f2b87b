#include "cuda/build_info.h"

#include "cuda/kernel_table.h"
#include "cuda/launch_plan.h"

#include <algorithm>
#include <cstdio>
#include <string>

namespace rope_kernels::cuda {
namespace {

int built_variant_count(const ArchKernels& arch) {
  int count = 0;
  for (int v = 0; v < kNumVariants; ++v) {
    count += arch.kernels[v].image != nullptr ? 1 : 0;
  }
  return count;
}

// A JSON string literal; the version string is plain ASCII in practice, but it comes from
// outside this code, so quotes, backslashes and control characters are escaped anyway.
std::string json_string(const char* text) {
  std::string out = "\"";
  for (const char* c = text != nullptr ? text : ""; *c != '\0'; ++c) {
    const auto byte = static_cast<unsigned char>(*c);
    if (byte == '"' || byte == '\\') {
      out += '\\';
      out += *c;
    } else if (byte < 0x20) {
      char escaped[8];
      std::snprintf(escaped, sizeof(escaped), "\\u%04x", byte);
      out += escaped;
    } else {
      out += *c;
    }
  }
  return out + "\"";
}

}  // namespace

std::string cuda_build_info_json() {
  std::string architectures;
  std::string by_architecture;
  int total = 0;
  int per_architecture = 0;
  std::string dtypes;
  for (int i = 0; i < kNumQkDtypes; ++i) {
    dtypes += (i == 0 ? "\"" : ", \"") + std::string(kQkDtypeNames[i]) + "\"";
  }
  for (int i = 0; i < kNumBuiltArchs; ++i) {
    const ArchKernels& arch = kBuiltArchs[i];
    const int count = built_variant_count(arch);
    const std::string separator = i == 0 ? "" : ", ";
    architectures += separator + std::to_string(arch.arch);
    by_architecture += separator + "\"" + std::to_string(arch.arch) + "\": " + std::to_string(count);
    per_architecture = i == 0 ? count : std::min(per_architecture, count);
    total += count;
  }
  return "{\"architectures\": [" + architectures + "], \"skipped_architectures\": " + kSkippedArchsJson +
         ", \"variants_per_architecture\": " +
         std::to_string(per_architecture) + ", \"variants_by_architecture\": {" + by_architecture +
         "}, \"variant_slots\": " + std::to_string(kNumVariants) + ", \"kernels\": " + std::to_string(total) +
         ", \"max_head_dim\": " + std::to_string(kMaxHeadDim) +
         ", \"dtypes\": [" + dtypes + "]" +
         ", \"ptx_architecture\": " +
         (kPtxKernels.kernels != nullptr ? std::to_string(kPtxKernels.arch) : std::string("null")) +
         ", \"ptx_forced\": " + (ptx_forced() ? "true" : "false") +
         ", \"triton\": " + json_string(kTritonVersion) + "}";
}

}  // namespace rope_kernels::cuda
