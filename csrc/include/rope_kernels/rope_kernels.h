// The C++ API of the rope operator library: typed calls of the registered ops.
//
// Each function calls its op through the PyTorch dispatcher, as torch.ops.rope.* does in Python:
// the kernel is chosen by the inputs' device (CPU or CUDA), and autograd records the call, so
// gradients flow to q and k. The ops are registered when the library is loaded; linking the CMake
// target RopeKernels::rope_kernels is all it takes.
//
// The C++ signature of each op is written once, in rope_kernels::signatures: these calls, the
// library's own kernels (which static_assert that they match) and its internal handles use it, and
// the dispatcher checks it against the registered schema when a handle is first looked up.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <optional>
#include <string>
#include <tuple>

namespace rope_kernels {

namespace signatures {

// rope::fused_qk and rope::fused_qk_backward: (q, k, cos, sin, positions) -> (q_out, k_out).
using Rotate = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const std::optional<at::Tensor>&);
// rope::fused_qk_: q and k rotated where they lie, and returned.
using RotateInplace = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const std::optional<at::Tensor>&);
// rope::build_info.
using BuildInfo = std::string();

}  // namespace signatures

namespace detail {

// The typed handle of a registered op, looked up once. Not finding it means the library is not in
// the program, which deserves a better message than the dispatcher's.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name,
              ": the op is not registered in this program; link the CMake target "
              "RopeKernels::rope_kernels (or load librope_kernels_ops before the first call)");
  return handle->typed<Signature>();
}

inline const c10::TypedOperatorHandle<signatures::Rotate>& fused_qk_handle() {
  static const auto op = find_op<signatures::Rotate>("rope::fused_qk");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::Rotate>& fused_qk_backward_handle() {
  static const auto op = find_op<signatures::Rotate>("rope::fused_qk_backward");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::RotateInplace>& fused_qk_inplace_handle() {
  static const auto op = find_op<signatures::RotateInplace>("rope::fused_qk_");
  return op;
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
  return detail::fused_qk_handle().call(q, k, cos, sin, positions);
}

// The gradient of fused_qk with respect to q and k: the same rotation by the negated angles.
inline std::tuple<at::Tensor, at::Tensor> fused_qk_backward(const at::Tensor& grad_q_out,
                                                            const at::Tensor& grad_k_out,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            const std::optional<at::Tensor>& positions =
                                                                std::nullopt) {
  return detail::fused_qk_backward_handle().call(grad_q_out, grad_k_out, cos, sin, positions);
}

// fused_qk writing into q and k themselves (same arguments and math), for callers that own them;
// returns q and k. The mutation is declared in the schema, so autograd records it (a q or k that
// requires grad must not be a leaf) and torch.compile sees it. q, k and the tables must not share
// memory ("rope::fused_qk_: ..." otherwise).
inline std::tuple<at::Tensor, at::Tensor> fused_qk_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin,
                                                    const std::optional<at::Tensor>& positions = std::nullopt) {
  return detail::fused_qk_inplace_handle().call(q, k, cos, sin, positions);
}

// A JSON object describing the library in the program: its version, the torch it was built
// against and, for a CUDA build, the CUDA and Triton versions, architectures, kernel variants and
// limits (largest head_dim, dtypes).
inline std::string build_info() {
  static const auto op = detail::find_op<signatures::BuildInfo>("rope::build_info");
  return op.call();
}

}  // namespace rope_kernels
