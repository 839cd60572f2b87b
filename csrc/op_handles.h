// Typed dispatcher handles of the rope ops, for kernels that call another rope op (autograd,
// functionalization): the public API's handles and signatures (rope_kernels/rope_kernels.h), so
// that the library and its C++ users share one definition of each op's C++ signature.
#pragma once

#include <rope_kernels/rope_kernels.h>

#include <type_traits>

namespace rope_kernels {

using RotateSignature = signatures::Rotate;
using InplaceSignature = signatures::RotateInplace;

inline const c10::TypedOperatorHandle<RotateSignature>& fused_qk_op() { return detail::fused_qk_handle(); }
inline const c10::TypedOperatorHandle<RotateSignature>& fused_qk_backward_op() {
  return detail::fused_qk_backward_handle();
}
inline const c10::TypedOperatorHandle<InplaceSignature>& fused_qk_inplace_op() {
  return detail::fused_qk_inplace_handle();
}

// A backend's kernel has exactly the op's signature: checked where the kernel is registered.
#define ROPE_CHECK_SIGNATURE(kernel, signature)                                                   \
  static_assert(std::is_same_v<decltype(kernel), ::rope_kernels::signatures::signature>,         \
                #kernel " must have the C++ signature rope_kernels::signatures::" #signature)

}  // namespace rope_kernels
