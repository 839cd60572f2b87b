// The C++ API of the rope operator library: typed calls of the registered ops.
//
// Each function calls its op through the PyTorch dispatcher, as torch.ops.rope.* does in Python:
// the kernel is chosen by the inputs' device (CPU or CUDA), and autograd records the call, so
// gradients flow to q and k. The ops are registered when the library is loaded; linking the CMake
// target RopeKernels::rope_kernels is all it takes.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

namespace rope_kernels {

namespace detail {

using RotateSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&);

// The typed handle of a registered op. Not finding it means the library is not in the program,
// which deserves a better message than the dispatcher's.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name,
              ": the op is not registered in this program; link the CMake target "
              "RopeKernels::rope_kernels (or load librope_kernels_ops before the first call)");
  return handle->typed<Signature>();
}

}  // namespace detail

// Rotates q (B, Hq, S, D) and k (B, Hk, S, D), any strides, by the angles in the cos/sin tables:
// (S_max, D/2), or the full-width (S_max, D) table of which the first half is used, leading
// size-1 dims allowed, float32 or q's dtype; or one such table per sequence, (B, S_max, D/2 or D).
// positions: optional int32/int64 (B, S) or (S,) table rows; without it token s uses row s. A
// position outside the table gives NaN for that token.
// Returns new tensors laid out like q and k. Bad arguments raise c10::Error ("rope::fused_qk: ...").
inline std::tuple<at::Tensor, at::Tensor> fused_qk(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::optional<at::Tensor>& positions = std::nullopt) {
  static const auto op = detail::find_op<detail::RotateSignature>("rope::fused_qk");
  return op.call(q, k, cos, sin, positions);
}

// The gradient of fused_qk with respect to q and k: the same rotation by the negated angles.
inline std::tuple<at::Tensor, at::Tensor> fused_qk_backward(const at::Tensor& grad_q_out,
                                                            const at::Tensor& grad_k_out,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            const std::optional<at::Tensor>& positions =
                                                                std::nullopt) {
  static const auto op = detail::find_op<detail::RotateSignature>("rope::fused_qk_backward");
  return op.call(grad_q_out, grad_k_out, cos, sin, positions);
}

// A JSON object describing the library in the program: its version, the torch it was built
// against and, for a CUDA build, the CUDA and Triton versions, architectures and kernel variants.
inline std::string build_info() {
  static const auto op = detail::find_op<std::string()>("rope::build_info");
  return op.call();
}

}  // namespace rope_kernels
