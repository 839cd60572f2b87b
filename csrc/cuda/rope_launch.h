// The CUDA launch of the RoPE kernel: which cubin (arch and variant), its argument array,
// the launch on the current stream.
#pragma once

#include "cuda/kernel_table.h"
#include "rope_inputs.h"

#include <ATen/core/Tensor.h>

#include <string>

namespace rope_kernels::cuda {

// What only the CUDA backend cannot do (float64, head_dim above 256, more tokens or heads than
// the grid and the kernel's 32-bit indices take): checked before the outputs are allocated, so
// the error comes before any work.
void check_supported_on_cuda(const char* op, const RopeInputs& in);

// Writes the rotation of in.q and in.k (sin multiplied by sin_sign: +1 forward, -1 backward)
// into q_out and k_out, fresh tensors of the same shapes on the same device. Enqueued on the
// device's current stream; no allocation, no synchronization. Launches nothing for empty work.
// The caller has run check_supported_on_cuda on `in` and holds a device guard for its device.
void launch_rope(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                 int sin_sign);

// The built cubins that run on a device of this capability (10 * major + minor), or nullptr:
// an exact match, else for 8.x the largest built 8.y with y <= the device's minor (sm_90 and
// later cubins are "a" targets, which run only on exactly their capability).
const ArchKernels* select_arch(int capability);

// "sm_80, sm_86, sm_89, sm_90": the architectures of this build, for error messages.
std::string built_arch_list();

}  // namespace rope_kernels::cuda
