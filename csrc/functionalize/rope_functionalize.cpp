// Functionalization of rope::fused_qk_, the in-place rotation: what torch.compile, torch.export
// and torch.func.functionalize run to turn the mutation into a pure graph. As torch's generated
// kernels do for aten's in-place ops, `q.rotate_()` becomes `q_new = fused_qk(q)` followed by
// "q now holds q_new" (replace_), which the functionalization pass propagates to every alias of
// q (its base, other views) and, for graph inputs, copies back into the caller's tensor once.
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "op_handles.h"
#include "rope_inplace.h"

namespace rope_kernels {
namespace {

namespace functional = at::functionalization::impl;

// The current value behind a functional tensor (pending writes through its aliases applied).
at::Tensor current_value(const at::Tensor& t) {
  if (!functional::isFunctionalTensor(t)) {
    return t;
  }
  functional::sync(t);
  return functional::from_functional_tensor(t);
}

std::optional<at::Tensor> current_value(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(current_value(*t)) : std::nullopt;
}

std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_functionalize(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                                   const at::Tensor& sin,
                                                                   const std::optional<at::Tensor>& positions,
                                                                   ROPE_OPTION_PARAMS) {
  const char* op = "rope::fused_qk_";
  const bool q_functional = functional::isFunctionalTensor(q);
  const bool k_functional = functional::isFunctionalTensor(k);
  if (!q_functional && !k_functional) {
    // Nothing here is being functionalized, unless a read-only input is: then the write would
    // escape the functional program, which cannot be expressed.
    TORCH_CHECK(!functional::isFunctionalTensor(cos) && !functional::isFunctionalTensor(sin) &&
                    !functional::isFunctionalTensor(positions) && !functional::isFunctionalTensor(cu_seqlens) &&
                    !functional::isFunctionalTensor(seqlen_offsets),
                op, ": q and k are ordinary tensors but cos, sin, positions, cu_seqlens or seqlen_offsets are "
                "functionalized; create q and k inside the functionalized program");
    at::AutoDispatchSkipFunctionalize skip_functionalize;
    fused_qk_inplace_op().call(q, k, cos, sin, positions, ROPE_OPTION_ARGS);
    return {q, k};
  }
  TORCH_CHECK(q_functional && k_functional, op,
              ": q and k must both be functionalized tensors or neither (one of them is)");

  const at::Tensor q_value = current_value(q);
  const at::Tensor k_value = current_value(k);
  at::Tensor q_rotated;
  at::Tensor k_rotated;
  {
    at::AutoDispatchSkipFunctionalize skip_functionalize;
    // The functional op checks everything else; this is what only the in-place op refuses, and
    // it must be refused here as in eager mode.
    check_inplace_targets(op, q_value, k_value);
    std::tie(q_rotated, k_rotated) =
        fused_qk_op().call(q_value, k_value, current_value(cos), current_value(sin), current_value(positions),
                           interleaved, interleaved_out, rotary_dim, layout, current_value(cu_seqlens),
                           current_value(seqlen_offsets));
  }
  functional::replace_(q, q_rotated);
  functional::commit_update(q);
  functional::sync(q);
  functional::replace_(k, k_rotated);
  functional::commit_update(k);
  functional::sync(k);
  return {q, k};
}

}  // namespace

ROPE_CHECK_SIGNATURE(fused_qk_inplace_functionalize, RotateInplace);

TORCH_LIBRARY_IMPL(rope, Functionalize, m) {
  m.impl("fused_qk_", &fused_qk_inplace_functionalize);
}

}  // namespace rope_kernels
