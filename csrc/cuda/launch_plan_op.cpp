// rope::_launch_plan: the launcher's plan (launch_plan.h) as plain values, for the tests and the
// tuner. Needs no GPU: CPU tensors are planned as CUDA tensors of the same metadata would be.
#include "cuda/launch_plan.h"
#include "op_handles.h"
#include "rope_inputs.h"

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <vector>

namespace rope_kernels::cuda {
namespace {

// The order of the values returned; python/rope_kernels/launch_plan.py names them in this order.
std::vector<int64_t> plan_values(const LaunchPlan& plan) {
  const Variant& v = plan.variant;
  return {plan.arch,
          v.index(),
          kBlockD2Values[v.block_d2_index],
          v.aligned ? 1 : 0,
          v.even_d ? 1 : 0,
          v.narrow ? 1 : 0,
          plan.block_h,
          plan.image->num_warps,
          plan.grid.x,
          plan.grid.y,
          plan.grid.z,
          static_cast<int64_t>(plan.grid.order),
          plan.image->stride_bits,
          v.read_interleaved ? 1 : 0,
          v.write_interleaved ? 1 : 0,
          plan.args.pos_kind,
          plan.args.rotary_half,
          plan.args.copy_end,
          plan.ptx ? 1 : 0};
}

std::vector<int64_t> launch_plan_op(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                    const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                                    int64_t capability, bool inplace, std::optional<int64_t> block_h,
                                    std::optional<bool> heads_fastest, ROPE_OPTION_PARAMS) {
  const char* op = "rope::_launch_plan";
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS));
  TORCH_CHECK(capability > 0 && capability < 1000, op, ": capability must be 10 * major + minor; got ",
              capability);
  PlanOverrides overrides;
  if (block_h.has_value()) {
    overrides.block_h = static_cast<int>(*block_h);
  }
  overrides.heads_fastest = heads_fastest;
  // The outputs the op would write: the inputs themselves in place, else fresh ones laid out as
  // every backend lays them out.
  if (inplace) {
    return plan_values(plan_launch(op, in, in.q, in.k, +1, static_cast<int>(capability), overrides));
  }
  const auto [q_out, k_out] = allocate_outputs(q, k);
  return plan_values(plan_launch(op, in, as_bhsd(q_out, in.layout), as_bhsd(k_out, in.layout), +1,
                                 static_cast<int>(capability), overrides));
}

}  // namespace
}  // namespace rope_kernels::cuda

TORCH_LIBRARY_IMPL(rope, CPU, m) {
  m.impl("_launch_plan", &rope_kernels::cuda::launch_plan_op);
}

TORCH_LIBRARY_IMPL(rope, CUDA, m) {
  m.impl("_launch_plan", &rope_kernels::cuda::launch_plan_op);
}
