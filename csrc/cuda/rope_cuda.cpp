// The CUDA kernels of rope::fused_qk and rope::fused_qk_backward: validate, allocate, launch.
// Backward is the same rotation with sin negated, so both ops share one path.
#include "cuda/launch_plan.h"
#include "cuda/rope_launch.h"
#include "rope_inplace.h"
#include "op_handles.h"
#include "rope_inputs.h"

#include <ATen/EmptyTensor.h>
#include <ATen/core/Tensor.h>
#include <c10/core/Allocator.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

namespace rope_kernels::cuda {
namespace {

// A fresh output with output_strides(t), taken straight from the allocator torch registers for
// CUDA (its caching allocator, on the current device: the caller's guard set it). That is where
// at::empty_strided ends up too; going there directly skips its dispatch, options parsing and
// second device guard, host time paid on every call, and decoding is bound by host time.
at::Tensor cuda_output_like(const at::Tensor& t) {
  const c10::SmallVector<c10::SymInt, 4> sym_strides = output_strides(t);
  c10::SmallVector<int64_t, 4> strides;
  for (const c10::SymInt& stride : sym_strides) {
    strides.push_back(stride.expect_int());  // real CUDA tensors have concrete sizes
  }
  return at::detail::empty_strided_generic(t.sizes(), strides, c10::GetAllocator(c10::DeviceType::CUDA),
                                           c10::DispatchKeySet(c10::DispatchKey::CUDA), t.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> rotate_on_cuda(const char* op, const at::Tensor& q, const at::Tensor& k,
                                                  const at::Tensor& cos, const at::Tensor& sin,
                                                  const std::optional<at::Tensor>& positions, const Options& options,
                                                  Direction direction) {
  // Validation first: it also establishes that every tensor is on q's device, which the guard
  // below relies on.
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options, direction);
  check_grid_limits(op, in);
  // c10::DeviceGuard on a CUDA device is c10::cuda::CUDAGuard reached through the guard
  // implementation torch registers; unlike CUDAGuard's inline code it references no CUDA runtime
  // symbol, so this library needs neither c10_cuda nor cudart at link time.
  const c10::DeviceGuard device_guard(in.q.device());
  // From the caller's q and k (not their normalized views), as on every other backend.
  at::Tensor q_out = cuda_output_like(q);
  at::Tensor k_out = cuda_output_like(k);
  launch_rope(op, in, as_bhsd(q_out, in.layout), as_bhsd(k_out, in.layout),
              direction == Direction::kBackward ? -1 : +1);
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> fused_qk_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                                                 const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                                                 ROPE_OPTION_PARAMS) {
  return rotate_on_cuda("rope::fused_qk", q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS),
                        Direction::kForward);
}

std::tuple<at::Tensor, at::Tensor> fused_qk_backward_cuda(const at::Tensor& grad_q_out, const at::Tensor& grad_k_out,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          const std::optional<at::Tensor>& positions,
                                                          ROPE_OPTION_PARAMS) {
  // The gradient of a rotation is the rotation by the opposite angle.
  return rotate_on_cuda("rope::fused_qk_backward", grad_q_out, grad_k_out, cos, sin, positions,
                        options_of(ROPE_OPTION_ARGS), Direction::kBackward);
}

// In place, by the same kernel with the outputs being the inputs. That is a valid launch: each
// program rotates its own block of head vectors of one token, and every element it stores is
// computed from both halves of its own head vector, loaded before (a data dependency), by the same
// program; no two programs touch the same element, and the checks below rule out q, k and the
// tables sharing memory.
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_cuda(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                          const at::Tensor& sin,
                                                          const std::optional<at::Tensor>& positions,
                                                          ROPE_OPTION_PARAMS) {
  const char* op = "rope::fused_qk_";
  const Options options = options_of(ROPE_OPTION_ARGS);
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options);
  check_grid_limits(op, in);
  check_inplace_targets(op, q, k);
  check_inplace_apart(op, q, k, cos, sin, positions, options);
  const c10::DeviceGuard device_guard(in.q.device());
  launch_rope(op, in, in.q, in.k, +1);
  // check_and_normalize copies only a q or k whose last dimension is not contiguous (every other
  // normalization is a view, at the caller's address); such a copy was rotated instead of the
  // caller's tensor, so its result is written back.
  if (in.q.data_ptr() != q.data_ptr()) {
    as_bhsd(q, in.layout).copy_(in.q);
  }
  if (in.k.data_ptr() != k.data_ptr()) {
    as_bhsd(k, in.layout).copy_(in.k);
  }
  return {q, k};
}

}  // namespace
}  // namespace rope_kernels::cuda

ROPE_CHECK_SIGNATURE(rope_kernels::cuda::fused_qk_cuda, Rotate);
ROPE_CHECK_SIGNATURE(rope_kernels::cuda::fused_qk_backward_cuda, Rotate);
ROPE_CHECK_SIGNATURE(rope_kernels::cuda::fused_qk_inplace_cuda, RotateInplace);

TORCH_LIBRARY_IMPL(rope, CUDA, m) {
  m.impl("fused_qk", &rope_kernels::cuda::fused_qk_cuda);
  m.impl("fused_qk_backward", &rope_kernels::cuda::fused_qk_backward_cuda);
  m.impl("fused_qk_", &rope_kernels::cuda::fused_qk_inplace_cuda);
}
