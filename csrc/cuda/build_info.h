// What the CUDA side of this build contains, for rope_kernels.build_info(). Reads only the
// generated kernel table: no driver, no GPU needed.
#pragma once

#include <string>

namespace rope_kernels::cuda {

// A JSON object:
//   {"architectures": [80, 86, 89, 90],          built archs, 10 * major + minor
//    "variants_per_architecture": 460,           kernels built for each arch (the smallest count
//                                                if archs differ, see variants_by_architecture)
//    "variants_by_architecture": {"80": 460, ...},
//    "variant_slots": 960,                       size of the variant table per arch
//    "kernels": 1840,                            cubins built in total
//    "max_head_dim": 512,                        the largest head_dim the kernels rotate
//    "dtypes": ["float16", "bfloat16", "float32"],  q/k dtypes the kernels are built for
//    "triton": "3.8.0"}                          Triton version that compiled them
std::string cuda_build_info_json();

}  // namespace rope_kernels::cuda
