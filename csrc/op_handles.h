// Typed dispatcher handles of the rope ops, for kernels that call another rope op (autograd,
// functionalization): looked up once, in one place, with the C++ signature of each schema.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

namespace rope_kernels {

// rope::fused_qk and rope::fused_qk_backward.
using RotateSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                             const at::Tensor&, const at::Tensor&,
                                                             const std::optional<at::Tensor>&);
// rope::fused_qk_ (in place).
using InplaceSignature = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, at::Tensor&, const at::Tensor&,
                                                               const at::Tensor&, const std::optional<at::Tensor>&);

const c10::TypedOperatorHandle<RotateSignature>& fused_qk_op();
const c10::TypedOperatorHandle<RotateSignature>& fused_qk_backward_op();
const c10::TypedOperatorHandle<InplaceSignature>& fused_qk_inplace_op();

}  // namespace rope_kernels
