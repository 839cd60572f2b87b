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
std::tuple<at::Tensor, at::Tensor> gather_angles(const RopeInputs& in, const std::optional<at::Tensor>& positions,
                                                 at::ScalarType compute, bool inverse) {
  const int64_t half = in.rotary_half.expect_int();
  const int64_t seq = in.q.size(2);
  const int64_t tables = in.cos.size(0);
  const int64_t rows_per_table = in.cos.size(1);
  const at::Tensor cos = in.cos.narrow(2, 0, half);
  const at::Tensor sin = in.sin.narrow(2, 0, half);
  at::Tensor cos_rows;
  at::Tensor sin_rows;
  if (!positions.has_value()) {
    cos_rows = cos.narrow(1, 0, seq).unsqueeze(1);
    sin_rows = sin.narrow(1, 0, seq).unsqueeze(1);
  } else {
    const at::Tensor pos = positions->to(at::kLong);  // (B, S)
    const int64_t batch = pos.size(0);
    const at::Tensor valid = pos.ge(0).logical_and(pos.lt(rows_per_table));
    const at::Tensor rows = at::where(valid, pos, at::zeros_like(pos));
    const at::Tensor invalid = valid.logical_not().unsqueeze(-1);
    const auto nan = std::numeric_limits<double>::quiet_NaN();
    // Row lookups on views of the tables: nothing beyond the B * S rows is read or copied.
    const auto pick = [&](const at::Tensor& table) {
      if (rows_per_table == 0) {  // every position lies outside an empty table
        return at::full({batch, seq, half}, nan, table.options());
      }
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

// Packed sequences: the position of each token, (1, T), from the document boundaries (and
// offsets). The values are checked here, where reading them costs no device synchronization.
at::Tensor packed_positions(const char* op, const RopeInputs& in) {
  const at::Tensor cu = in.cu_seqlens->to(at::kLong).contiguous();
  const int64_t tokens = in.q.size(2);
  const int64_t docs = cu.size(0) - 1;
  const int64_t* bounds = cu.data_ptr<int64_t>();
  TORCH_CHECK(bounds[0] == 0, op, ": cu_seqlens must start at 0; got ", bounds[0]);
  for (int64_t j = 0; j < docs; ++j) {
    TORCH_CHECK(bounds[j + 1] >= bounds[j], op, ": cu_seqlens must not decrease; got ", bounds[j], " then ",
                bounds[j + 1], " at index ", j);
  }
  TORCH_CHECK(bounds[docs] == tokens, op, ": cu_seqlens must end at the token count (", tokens, "); got ",
              bounds[docs]);
  const at::Tensor token = at::arange(tokens, cu.options());
  if (tokens == 0) {
    return token.unsqueeze(0);
  }
  // The last document starting at or before each token (an empty document starts where the next does).
  const at::Tensor doc = at::searchsorted(cu, token, /*out_int32=*/false, /*right=*/true) - 1;
  at::Tensor position = token - cu.index_select(0, doc);
  if (in.seqlen_offsets.has_value()) {
    position = position + in.seqlen_offsets->to(at::kLong).index_select(0, doc);
  }
  return position.unsqueeze(0);
}

// The two halves of each rotated pair: (x[i], x[i + half]) or, interleaved, (x[2i], x[2i + 1]).
// Views, so that they can be written through too.
std::pair<at::Tensor, at::Tensor> pair_halves(const at::Tensor& t, int64_t half, bool interleaved) {
  if (interleaved) {
    return {t.slice(-1, 0, 2 * half, 2), t.slice(-1, 1, 2 * half, 2)};
  }
  return {t.narrow(-1, 0, half), t.narrow(-1, half, half)};
}

void rotate_into(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::ScalarType compute,
                 const RopeInputs& in, at::Tensor out) {
  if (x.numel() == 0) {
    return;
  }
  const int64_t half = in.rotary_half.expect_int();
  const auto [x1_view, x2_view] = pair_halves(x, half, in.read_interleaved);
  const at::Tensor x1 = x1_view.to(compute);
  const at::Tensor x2 = x2_view.to(compute);
  auto [out1, out2] = pair_halves(out, half, in.write_interleaved);
  out1.copy_(x1 * cos - x2 * sin);
  out2.copy_(x2 * cos + x1 * sin);
  // Partial rotary: the features after the rotated ones are copied through.
  const int64_t rest = in.head_dim.expect_int() - 2 * half;
  if (rest > 0) {
    out.narrow(-1, 2 * half, rest).copy_(x.narrow(-1, 2 * half, rest));
  }
}

std::tuple<at::Tensor, at::Tensor> rotate_cpu(const char* op, const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              const std::optional<at::Tensor>& positions, const Options& options,
                                              Direction direction) {
  const RopeInputs in = check_and_normalize(op, q, k, cos, sin, positions, options, direction);
  auto [q_out, k_out] = allocate_outputs(q, k);
  // Math in float32 as on the GPU (float64 stays float64, for gradcheck).
  const at::ScalarType compute = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::optional<at::Tensor> rows = in.cu_seqlens.has_value() ? packed_positions(op, in) : in.positions;
  if (q.numel() == 0 && k.numel() == 0) {
    return {q_out, k_out};
  }
  const bool inverse = direction == Direction::kBackward;
  const auto [cos_rows, sin_rows] = gather_angles(in, rows, compute, inverse);
  rotate_into(in.q, cos_rows, sin_rows, compute, in, as_bhsd(q_out, in.layout));
  rotate_into(in.k, cos_rows, sin_rows, compute, in, as_bhsd(k_out, in.layout));
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

// In place: the rotation is computed as for fused_qk, then written back over q and k (the CPU
// path is the reference, kept simple; the CUDA kernel rotates where the data lies). Features
// past rotary_dim are written back unchanged.
std::tuple<at::Tensor, at::Tensor> fused_qk_inplace_cpu(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                         const at::Tensor& sin,
                                                         const std::optional<at::Tensor>& positions,
                                                         ROPE_OPTION_PARAMS) {
  const char* op = "rope::fused_qk_";
  const Options options = options_of(ROPE_OPTION_ARGS);
  check_and_normalize(op, q, k, cos, sin, positions, options);
  check_inplace_targets(op, q, k);
  check_inplace_apart(op, q, k, cos, sin, positions, options);
  const auto [q_out, k_out] = rotate_cpu(op, q, k, cos, sin, positions, options, Direction::kForward);
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
