// The CPU ops: validate, allocate, run the CPU kernel (cpu/rotate_kernel.cpp). It is what CI
// exercises; the CUDA kernels must agree with it, and both with the float64 reference of
// rope_kernels.testing.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cpu/rotate_kernel.h"
#include "rope_inplace.h"
#include "op_handles.h"
#include "rope_inputs.h"

namespace rope_kernels {
namespace {

// Packed sequences: cu_seqlens as contiguous int64, checked here, where reading the values costs
// no device synchronization.
std::optional<at::Tensor> checked_document_starts(const char* op, const RopeInputs& in) {
  if (!in.cu_seqlens.has_value()) {
    return std::nullopt;
  }
  at::Tensor cu = in.cu_seqlens->to(at::kLong).contiguous();
  const int64_t tokens = in.q.size(2);
  const int64_t docs = cu.size(0) - 1;
  const int64_t* bounds = cu.const_data_ptr<int64_t>();
  TORCH_CHECK(bounds[0] == 0, op, ": cu_seqlens must start at 0; got ", bounds[0]);
  for (int64_t j = 0; j < docs; ++j) {
    TORCH_CHECK(bounds[j + 1] >= bounds[j], op, ": cu_seqlens must not decrease; got ", bounds[j], " then ",
                bounds[j + 1], " at index ", j);
  }
  TORCH_CHECK(bounds[docs] == tokens, op, ": cu_seqlens must end at the token count (", tokens, "); got ",
              bounds[docs]);
  return cu;
}

std::tuple<at::Tensor, at::Tensor> rotate_cpu(const char* op, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              const std::optional<at::Tensor>& positions, const Options& options,
                                              Direction direction) {
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options, direction);
  auto [q_out, k_out] = allocate_outputs(q, k);
  cpu::rotate(in, as_bhsd(q_out, in.layout), as_bhsd(k_out, in.layout), direction == Direction::kBackward,
              checked_document_starts(op, in));
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> fused_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions, ROPE_OPTION_PARAMS) {
  return rotate_cpu("rope::fused_qk", q, k, cos, sin, positions, options_of(ROPE_OPTION_ARGS), Direction::kForward);
}

std::tuple<at::Tensor, at::Tensor> fused_qk_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& positions,
                                                         ROPE_OPTION_PARAMS) {
  return rotate_cpu("rope::fused_qk_backward", grad_q, grad_k, cos, sin, positions, options_of(ROPE_OPTION_ARGS),
                    Direction::kBackward);
}

// In place: the kernel writes each head where it lies, after reading all of its rotated part.
// Features past rotary_dim stay as they are.
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                         const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& positions,
                                                         ROPE_OPTION_PARAMS) {
  const char* op = "rope::fused_qk_";
  const Options options = options_of(ROPE_OPTION_ARGS);
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options);
  check_inplace_targets(op, q, k);
  check_inplace_apart(op, q, k, cos, sin, positions, options);
  cpu::rotate(in, in.q, in.k, /*inverse=*/false, checked_document_starts(op, in));
  // check_and_normalize copies only a q or k whose last dimension is not contiguous (every other
  // normalization is a view, at the caller's address); such a copy was rotated instead of the
  // caller's tensor, so its result is written back.
  if (in.q.data_ptr() != q.data_ptr()) {
    as_bhsd(q, in.layout).copy_(in.q);
  }
  if (in.k.data_ptr() != k.data_ptr()) {
    as_bhsd(k, in.layout).copy_(in.k);
  }
  return {q, k};
}

}  // namespace

ROPE_CHECK_SIGNATURE(fused_qk_cpu, Rotate);
ROPE_CHECK_SIGNATURE(fused_qk_backward_cpu, Rotate);
ROPE_CHECK_SIGNATURE(fused_qk_inplace_cpu, RotateInplace);

TORCH_LIBRARY_IMPL(rope, CPU, m) {
  m.impl("fused_qk", &fused_qk_cpu);
  m.impl("fused_qk_backward", &fused_qk_backward_cpu);
  m.impl("fused_qk_", &fused_qk_inplace_cpu);
}

}  // namespace rope_kernels
