// Autograd for both ops. RoPE is a rotation, so the gradient of each op is the other op applied to
// the incoming gradients: fused_qk's backward calls fused_qk_backward and fused_qk_backward's
// backward calls fused_qk. Both go through the dispatcher, so the backward graph is itself
// differentiable (double backward) and traceable by torch.compile.
#include <torch/autograd.h>
#include <torch/library.h>

#include "autograd/saved_options.h"
#include "op_handles.h"

namespace rope_kernels {
namespace {

const c10::TypedOperatorHandle<RotateSignature>& rotate_op(bool inverse) {
  return inverse ? fused_qk_backward_op() : fused_qk_op();
}

const char* op_name(bool inverse) {
  return inverse ? "rope::fused_qk_backward" : "rope::fused_qk";
}

template <bool kInverse>
struct RotateFunction : public torch::autograd::Function<RotateFunction<kInverse>> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const at::Tensor& q,
                                                const at::Tensor& k, const at::Tensor& cos,
                                                const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions, const Options& options) {
    save_options(ctx, cos, sin, positions, options);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [q_out, k_out] = call_with(rotate_op(kInverse), options, q, k, cos, sin, positions);
    return {q_out, k_out};
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Options options = saved_options(ctx, saved);
    // grads are materialized (zeros) when a loss uses only one of the outputs.
    auto [grad_q, grad_k] =
        call_with(rotate_op(!kInverse), options, grads[0], grads[1], saved[0], saved[1], saved_or_none(saved[2]));
    return {grad_q, grad_k, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

template <bool kInverse>
std::tuple<at::Tensor, at::Tensor> rotate_autograd(c10::DispatchKeySet keys, const at::Tensor& q,
                                                   const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  // cos/sin are treated as constants; a silent zero gradient for them would be a wrong answer.
  // Checked here, not in forward(), where autograd has already switched grad mode off.
  const bool table_needs_grad = at::GradMode::is_enabled() && (cos.requires_grad() || sin.requires_grad());
  TORCH_CHECK(!table_needs_grad, op_name(kInverse),
              ": gradients with respect to cos/sin are not supported; pass them detached "
              "(cos.detach(), sin.detach())");
  // Nothing to record (no grad mode, or neither q nor k requires grad): call the kernel directly.
  // Function::apply would build, fill and drop a graph node first, which costs more host time
  // than the launch itself on small inputs. A forward-mode tangent still takes apply's path,
  // which refuses it, rather than being dropped here.
  const bool records = at::GradMode::is_enabled() && (q.requires_grad() || k.requires_grad());
  // The kernel is reached by redispatching on the keys this call came with, minus autograd's,
  // rather than by a fresh call that would compute them again.
  if (!records && !q._fw_grad(/*level=*/0).defined() && !k._fw_grad(/*level=*/0).defined()) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return rotate_op(kInverse).redispatch(keys & c10::after_autograd_keyset, q, k, cos, sin, positions,
                                          ROPE_OPTION_ARGS);
  }
  const auto outputs = RotateFunction<kInverse>::apply(q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS));
  return {outputs[0], outputs[1]};
}

}  // namespace

TORCH_LIBRARY_IMPL(rope, Autograd, m) {
  m.impl("fused_qk", &rotate_autograd<false>);
  m.impl("fused_qk_backward", &rotate_autograd<true>);
}

}  // namespace rope_kernels
