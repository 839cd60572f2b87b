// The CUDA launch of the RoPE kernel: the plan (launch_plan.h) carried out on the device's
// current stream.
#pragma once

#include "rope_inputs.h"

#include <ATen/core/Tensor.h>

namespace rope_kernels::cuda {

// Writes the rotation of in.q and in.k (sin multiplied by sin_sign: +1 forward, -1 backward)
// into q_out and k_out, fresh tensors of the same shapes on the same device. Enqueued on the
// device's current stream; no allocation, no synchronization. Launches nothing for empty work.
// The caller has run check_grid_limits on `in` and holds a device guard for its device.
void launch_rope(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                 int sin_sign);

}  // namespace rope_kernels::cuda
