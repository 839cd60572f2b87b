// Autograd of rope::fused_qk_, the in-place rotation.
//
// Around the write, this op does what every in-place op of PyTorch does: it refuses to overwrite
// a leaf that requires grad (or a view of one) before touching it, bumps the version counters of
// what it wrote (so that a tensor saved earlier for some backward is known to be stale), and
// rebases the history of what it wrote onto a node that maps gradients back through the rotation.
//
// q and k get a node each rather than one node for both. q and k are usually views (transposed
// projections), and autograd can rebase the history of a view only onto a node with a single
// output, which it wraps in CopySlices so that the gradient also reaches the view's base. So the
// rotation runs once, for both tensors, below autograd; then each tensor that requires grad gets
// its own single-output node, whose backward is the inverse rotation of that tensor's gradient.
#include <torch/autograd.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "autograd/saved_options.h"
#include "op_handles.h"
#include "rope_inputs.h"

namespace rope_kernels {
namespace {

// The history of one tensor rotated in place. Its forward does no work (the rotation has already
// been written); it only declares the tensor modified, so that autograd rebases its history here.
struct RotatedInPlace : public torch::autograd::Function<RotatedInPlace> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& rotated,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions, const Options& options) {
    ctx->mark_dirty({rotated});
    save_options(ctx, cos, sin, positions, options);
    return {rotated};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Options options = saved_options(ctx, saved);
    const at::Tensor& grad = grads[0];
    // fused_qk_backward rotates a (q, k) pair; given a k with no heads (an empty view of the
    // gradient, no allocation) it rotates this one gradient alone.
    const at::Tensor no_heads = grad.narrow(heads_dim(parse_layout("rope::fused_qk_", options.layout)), 0, 0);
    auto [grad_in, unused] =
        call_with(fused_qk_backward_op(), options, grad, no_heads, saved[0], saved[1], saved_or_none(saved[2]));
    return {grad_in, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_autograd(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                              const at::Tensor& sin,
                                                              const std::optional<at::Tensor>& positions,
                                                              ROPE_OPTION_PARAMS) {
  const Options options = options_of(ROPE_OPTION_ARGS);
  const bool grad_mode = at::GradMode::is_enabled();
  TORCH_CHECK(!(grad_mode && (cos.requires_grad() || sin.requires_grad())),
              "rope::fused_qk_: gradients with respect to cos/sin are not supported; pass them detached "
              "(cos.detach(), sin.detach())");
  const bool q_needs_grad = grad_mode && q.requires_grad();
  const bool k_needs_grad = grad_mode && k.requires_grad();
  // Before anything is written: the same refusals (leaf, view of a leaf, view made in no_grad
  // mode or by a multi-output op) with the same messages as torch's own in-place ops.
  torch::autograd::check_inplace(q, q_needs_grad);
  torch::autograd::check_inplace(k, k_needs_grad);
  {
    // Below autograd but above ADInplaceOrView, where the version counters are bumped.
    at::AutoDispatchBelowAutograd below_autograd;
    fused_qk_inplace_op().call(q, k, cos, sin, positions, ROPE_OPTION_ARGS);
  }
  if (q_needs_grad) {
    RotatedInPlace::apply(q, cos, sin, positions, options);
  }
  if (k_needs_grad) {
    RotatedInPlace::apply(k, cos, sin, positions, options);
  }
  return {q, k};
}

// Version counters: bumped for every call, with or without autograd, as for any in-place op, so
// that a backward which saved q or k before the rotation raises instead of using new values.
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_ad_inplace_or_view(at::Tensor& q, at::Tensor& k,
                                                                        const at::Tensor& cos, const at::Tensor& sin,
                                                                        const std::optional<at::Tensor>& positions,
                                                                        ROPE_OPTION_PARAMS) {
  {
    at::AutoDispatchBelowADInplaceOrView below;
    fused_qk_inplace_op().call(q, k, cos, sin, positions, ROPE_OPTION_ARGS);
  }
  torch::autograd::increment_version(q);
  torch::autograd::increment_version(k);
  return {q, k};
}

}  // namespace

ROPE_CHECK_SIGNATURE(fused_qk_inplace_autograd, RotateInplace);
ROPE_CHECK_SIGNATURE(fused_qk_inplace_ad_inplace_or_view, RotateInplace);

TORCH_LIBRARY_IMPL(rope, Autograd, m) {
  m.impl("fused_qk_", &fused_qk_inplace_autograd);
}

TORCH_LIBRARY_IMPL(rope, ADInplaceOrView, m) {
  m.impl("fused_qk_", &fused_qk_inplace_ad_inplace_or_view);
}

}  // namespace rope_kernels
