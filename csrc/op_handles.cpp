#include "op_handles.h"

namespace rope_kernels {
namespace {

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

}  // namespace

const c10::TypedOperatorHandle<RotateSignature>& fused_qk_op() {
  static const auto op = find_op<RotateSignature>("rope::fused_qk");
  return op;
}

const c10::TypedOperatorHandle<RotateSignature>& fused_qk_backward_op() {
  static const auto op = find_op<RotateSignature>("rope::fused_qk_backward");
  return op;
}

const c10::TypedOperatorHandle<InplaceSignature>& fused_qk_inplace_op() {
  static const auto op = find_op<InplaceSignature>("rope::fused_qk_");
  return op;
}

}  // namespace rope_kernels
