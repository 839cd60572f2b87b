// CPU implementation: the reference semantics of the op, written with ATen operations.
// It is what CI exercises; the CUDA kernels must agree with it.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <limits>

#include "rope_inplace.h"
#include "op_handles.h"
#include "rope_inputs.h"

namespace rope_kernels {
namespace {

// The cos/sin rows each token uses, in the compute dtype, shaped (B or 1, 1, S, D/2) to broadcast
// over heads: row positions[b, s] (or s) of sequence b's table, or of the one shared table. A
// position outside the table gives NaN rows (the CUDA kernels do the same). The rows are picked
// before they are converted (and negated for the inverse): the table can be far longer than the
// sequence, and converting all of it cost more than the rotation itself.
std::tuple<at::Tensor, at::Tensor> gather_angles(const RopeInputs& in, at::ScalarType compute,
                                                 bool inverse) {
  const int64_t half = in.half_dim.expect_int();
  const int64_t seq = in.q.size(2);
  const int64_t tables = in.cos.size(0);
  const int64_t rows_per_table = in.cos.size(1);
  const at::Tensor cos = in.cos.narrow(2, 0, half);
  const at::Tensor sin = in.sin.narrow(2, 0, half);
  at::Tensor cos_rows;
  at::Tensor sin_rows;
  if (!in.positions.has_value()) {
    cos_rows = cos.narrow(1, 0, seq).unsqueeze(1);
    sin_rows = sin.narrow(1, 0, seq).unsqueeze(1);
  } else {
    const at::Tensor pos = in.positions->to(at::kLong);  // (B, S)
    const int64_t batch = pos.size(0);
    const at::Tensor valid = pos.ge(0).logical_and(pos.lt(rows_per_table));
    const at::Tensor rows = at::where(valid, pos, at::zeros_like(pos));
    const at::Tensor invalid = valid.logical_not().unsqueeze(-1);
    const auto nan = std::numeric_limits<double>::quiet_NaN();
    // Row lookups on views of the tables: nothing beyond the B * S rows is read or copied.
    const auto pick = [&](const at::Tensor& table) {
      if (tables == 1) {
        return table.select(0, 0).index_select(0, rows.reshape({-1})).view({batch, seq, half});
      }
      const at::Tensor sequence = at::arange(batch, pos.options()).unsqueeze(1);  // (B, 1)
      return table.index({at::indexing::TensorIndex(sequence), at::indexing::TensorIndex(rows)});  // (B, S, D/2)
    };
    cos_rows = pick(cos).masked_fill(invalid, nan).unsqueeze(1);
    sin_rows = pick(sin).masked_fill(invalid, nan).unsqueeze(1);
  }
  cos_rows = cos_rows.to(compute);
  sin_rows = sin_rows.to(compute);
  return {cos_rows, inverse ? sin_rows.neg() : sin_rows};
}

void rotate_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                 at::ScalarType compute, int64_t half, at::Tensor& out) {
  if (x.numel() == 0) {
    return;
  }
  const at::Tensor x1 = x.narrow(-1, 0, half).to(compute);
  const at::Tensor x2 = x.narrow(-1, half, half).to(compute);
  out.narrow(-1, 0, half).copy_(x1 * cos - x2 * sin);
  out.narrow(-1, half, half).copy_(x2 * cos + x1 * sin);
}

std::tuple<at::Tensor, at::Tensor> rotate_cpu(const char* op, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              const std::optional<at::Tensor>& positions, bool inverse) {
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions);
  auto [q_out, k_out] = allocate_outputs(q, k);
  // Math in float32 as on the GPU (float64 stays float64, for gradcheck).
  const at::ScalarType compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t half = in.half_dim.expect_int();
  if (q.numel() == 0 && k.numel() == 0) {
    return {q_out, k_out};
  }
  const auto [cos_rows, sin_rows] = gather_angles(in, compute, inverse);
  rotate_into(in.q, cos_rows, sin_rows, compute, half, q_out);
  rotate_into(in.k, cos_rows, sin_rows, compute, half, k_out);
  return {q_out, k_out};
}

std::tuple<at::Tensor, at::Tensor> fused_qk_cpu(const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& cos, const at::Tensor& sin,
                                                const std::optional<at::Tensor>& positions) {
  return rotate_cpu("rope::fused_qk", q, k, cos, sin, positions, /*inverse=*/false);
}

std::tuple<at::Tensor, at::Tensor> fused_qk_backward_cpu(const at::Tensor& grad_q, const at::Tensor& grad_k,
                                                         const at::Tensor& cos, const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& positions) {
  return rotate_cpu("rope::fused_qk_backward", grad_q, grad_k, cos, sin, positions, /*inverse=*/true);
}

// In place: the rotation is computed as for fused_qk, then written back over q and k (the CPU
// path is the reference, kept simple; the CUDA kernel rotates where the data lies).
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                         const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& positions) {
  const char* op = "rope::fused_qk_";
  check_and_normalize(op, q, k, cos, sin, positions);
  check_inplace_targets(op, q, k);
  check_inplace_apart(op, q, k, cos, sin, positions);
  const auto [q_out, k_out] = rotate_cpu(op, q, k, cos, sin, positions, /*inverse=*/false);
  q.copy_(q_out);
  k.copy_(k_out);
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
