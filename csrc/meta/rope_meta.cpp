// Meta implementation: outputs with exactly the sizes, strides and dtype the real kernels return,
// for fake tensors (torch.compile, torch.export). It runs the same checks as the real backends so
// that bad input fails at trace time with the same message. SymInt-safe: nothing here reads a
// concrete size.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "rope_inplace.h"
#include "op_handles.h"
#include "rope_inputs.h"

namespace rope_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> rotate_meta(const char* op, const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& cos, const at::Tensor& sin,
                                               const std::optional<at::Tensor>& positions, const Options& options) {
  check_and_normalize(op, q, k, cos, sin, positions, options);
  return allocate_outputs(q, k);
}

std::tuple<at::Tensor, at::Tensor> fused_qk_meta(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& cos, const at::Tensor& sin,
                                                 const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  return rotate_meta("rope::fused_qk", q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS));
}

std::tuple<at::Tensor, at::Tensor> fused_qk_backward_meta(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                          const at::Tensor& cos, const at::Tensor& sin,
                                                          const std::optional<at::Tensor>& positions,
                                                          ROPE_OPTION_PARAMS) {
  return rotate_meta("rope::fused_qk_backward", grad_q, grad_k, cos, sin, positions, options_of(ROPE_OPTION_ARGS));
}

// The in-place op returns q and k themselves: nothing to allocate, only the checks to run.
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_meta(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                          const at::Tensor& sin,
                                                          const std::optional<at::Tensor>& positions,
                                                          ROPE_OPTION_PARAMS) {
  const char* op = "rope::fused_qk_";
  check_and_normalize(op, q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS));
  check_inplace_targets(op, q, k);
  return {q, k};
}

}  // namespace

ROPE_CHECK_SIGNATURE(fused_qk_meta, Rotate);
ROPE_CHECK_SIGNATURE(fused_qk_backward_meta, Rotate);
ROPE_CHECK_SIGNATURE(fused_qk_inplace_meta, RotateInplace);

TORCH_LIBRARY_IMPL(rope, Meta, m) {
  m.impl("fused_qk", &fused_qk_meta);
  m.impl("fused_qk_backward", &fused_qk_backward_meta);
  m.impl("fused_qk_", &fused_qk_inplace_meta);
}

}  // namespace rope_kernels
