// rope::fused, rope::fused_backward and rope::fused_: one tensor rotated as the pair ops rotate q,
// with a k of no heads (an empty view of the same tensor: no allocation, no launch work). Composite
// kernels: the dispatcher runs them above autograd, so autograd, functionalization, the Meta kernel
// and the DTensor rule of the pair ops serve these too, and a compiled or exported graph holds the
// pair op.
#include <torch/library.h>

#include "op_handles.h"
#include "rope_inputs.h"

namespace rope_kernels {
namespace {

// A view of x with no heads, in x's layout: the pair op's k.
at::Tensor no_heads(const at::Tensor& x, c10::string_view layout) {
  return x.narrow(heads_dim(parse_layout("rope::fused", std::string(layout))), 0, 0);
}

at::Tensor fused_single(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  return std::get<0>(fused_qk_op().call(x, no_heads(x, layout), cos, sin, positions, ROPE_OPTION_ARGS));
}

at::Tensor fused_single_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin,
                                 const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  return std::get<0>(
      fused_qk_backward_op().call(grad_out, no_heads(grad_out, layout), cos, sin, positions, ROPE_OPTION_ARGS));
}

at::Tensor& fused_single_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                 const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  at::Tensor k = no_heads(x, layout);
  fused_qk_inplace_op().call(x, k, cos, sin, positions, ROPE_OPTION_ARGS);
  return x;
}

}  // namespace

ROPE_CHECK_SIGNATURE(fused_single, RotateOne);
ROPE_CHECK_SIGNATURE(fused_single_backward, RotateOne);
ROPE_CHECK_SIGNATURE(fused_single_inplace, RotateOneInplace);

TORCH_LIBRARY_IMPL(rope, CompositeImplicitAutograd, m) {
  m.impl("fused", &fused_single);
  m.impl("fused_backward", &fused_single_backward);
  m.impl("fused_", &fused_single_inplace);
}

}  // namespace rope_kernels
