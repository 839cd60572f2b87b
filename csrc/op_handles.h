// Typed dispatcher handles of the rope ops, for kernels that call another rope op (autograd,
// functionalization): the public API's handles and signatures (rope_kernels/rope_kernels.h), so
// that the library and its C++ users share one definition of each op's C++ signature.
#pragma once

#include <rope_kernels/rope_kernels.h>

#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

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

// The keyword options of every rope op as a kernel's parameters and as the arguments of a call, in
// schema order (rope_kernels::Options names them): written once here, as the schema is written once
// in registration.cpp, so that no kernel can take them in another order.
#define ROPE_OPTION_PARAMS                                                                            \
  bool interleaved, std::optional<bool> interleaved_out, std::optional<int64_t> rotary_dim,          \
      c10::string_view layout, const std::optional<at::Tensor>&cu_seqlens,                            \
      const std::optional<at::Tensor>&seqlen_offsets
#define ROPE_OPTION_ARGS interleaved, interleaved_out, rotary_dim, layout, cu_seqlens, seqlen_offsets

// The options as one value, for the code below the kernels' entry points.
inline Options options_of(ROPE_OPTION_PARAMS) {
  return Options{interleaved, interleaved_out, rotary_dim, std::string(layout), cu_seqlens, seqlen_offsets};
}

// Calls a rope op with the options held in one value.
template <typename Handle, typename... Tensors>
std::tuple<at::Tensor, at::Tensor> call_with(const Handle& op, const Options& o, Tensors&&... tensors) {
  return op.call(std::forward<Tensors>(tensors)..., o.interleaved, o.interleaved_out, o.rotary_dim,
                 c10::string_view(o.layout), o.cu_seqlens, o.seqlen_offsets);
}

// A backend's kernel has exactly the op's signature: checked where the kernel is registered.
#define ROPE_CHECK_SIGNATURE(kernel, signature)                                                   \
  static_assert(std::is_same_v<decltype(kernel), ::rope_kernels::signatures::signature>,         \
                #kernel " must have the C++ signature rope_kernels::signatures::" #signature)

}  // namespace rope_kernels
