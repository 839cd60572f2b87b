// The C++ API (rope_kernels/rope_kernels.h) against a float64 reference written here with plain
// ATen ops: forward with and without positions, in float32 and bfloat16, on transposed views of
// a (B, S, H, D) projection, gradients through autograd, the backward op, the options and the
// single-tensor op, errors, build info.
#include <rope_kernels/rope_kernels.h>

#include <ATen/ATen.h>

#include <cmath>
#include <optional>
#include <string>

#include "test_support.h"

namespace {

using rope_test::expect;
using rope_test::expect_close;

constexpr int64_t kBatch = 2, kHeadsQ = 4, kHeadsK = 2, kSeq = 7, kHeadDim = 64;
constexpr int64_t kTableRows = kSeq + 5;

// (rows, head_dim/2) float64 angles p * 10000^(-2i/D): the real RoPE frequencies.
at::Tensor rope_angles(int64_t rows, int64_t head_dim) {
  const auto f64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor inv_freq = at::pow(10000.0, -at::arange(0, head_dim, 2, f64) / double(head_dim));
  return at::outer(at::arange(rows, f64), inv_freq);
}

// RoPE of x (B, H, S, D) in float64 on the CPU: token (b, s) rotated by the angles of table row
// rows[b, s]; with `inverse`, by the negated angles. cos/sin: (table_rows, D/2) or (table_rows, D).
at::Tensor reference_rotate(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                            const at::Tensor& rows, bool inverse) {
  const int64_t batch = x.size(0), seq = x.size(2), half = x.size(3) / 2;
  const at::Tensor flat_rows = rows.to(at::kCPU, at::kLong).reshape({-1});
  const auto gather = [&](const at::Tensor& table) {
    const at::Tensor half_table = table.to(at::kCPU, at::kDouble).narrow(-1, 0, half);
    return half_table.index_select(0, flat_rows).reshape({batch, 1, seq, half});
  };
  const at::Tensor c = gather(cos);
  const at::Tensor s = inverse ? -gather(sin) : gather(sin);
  const at::Tensor x64 = x.detach().to(at::kCPU, at::kDouble);
  const at::Tensor x1 = x64.narrow(-1, 0, half), x2 = x64.narrow(-1, half, half);
  return at::cat({x1 * c - x2 * s, x2 * c + x1 * s}, -1);
}

// q or k as a transposed view of a (B, S, H, D) projection output: the layout models produce.
at::Tensor projection_heads(int64_t heads, at::ScalarType dtype, const at::Device& device) {
  return at::randn({kBatch, kSeq, heads, kHeadDim}, at::kDouble).to(device, dtype).transpose(1, 2);
}

struct Tolerance {
  double rtol, atol;
};

// One rounding of a float32 computation to the output dtype (see rope_kernels.testing).
Tolerance tolerance(at::ScalarType dtype) {
  return dtype == at::kBFloat16 ? Tolerance{std::ldexp(1.0, -8), 1e-5} : Tolerance{1e-5, 1e-5};
}

void forward_matches_reference(const at::Device& device, at::ScalarType dtype, bool with_positions) {
  const std::string what = std::string("forward on ") + device.str() + " " + c10::toString(dtype) +
                           (with_positions ? " with positions" : " without positions");
  const at::Tensor q = projection_heads(kHeadsQ, dtype, device);
  const at::Tensor k = projection_heads(kHeadsK, dtype, device);
  // The Hugging Face full-width (rows, D) float32 table: only its first half is read.
  const at::Tensor angles = rope_angles(kTableRows, kHeadDim).repeat({1, 2});
  const at::Tensor cos = angles.cos().to(device, at::kFloat);
  const at::Tensor sin = angles.sin().to(device, at::kFloat);
  std::optional<at::Tensor> positions;
  at::Tensor rows = at::arange(kSeq, at::kLong).expand({kBatch, kSeq});
  if (with_positions) {
    rows = at::randint(0, kTableRows, {kBatch, kSeq}, at::kLong);
    positions = rows.to(device);
  }

  const auto [q_out, k_out] = rope_kernels::fused_qk(q, k, cos, sin, positions);
  expect(q_out.device() == device && q_out.scalar_type() == dtype, what + ": q_out device or dtype");
  const Tolerance tol = tolerance(dtype);
  expect_close(q_out, reference_rotate(q, cos, sin, rows, false), tol.rtol, tol.atol, what + ", q_out");
  expect_close(k_out, reference_rotate(k, cos, sin, rows, false), tol.rtol, tol.atol, what + ", k_out");
}

// Gradients through the dispatcher's autograd: the gradient of sum(q_out * w_q) + sum(k_out * w_k)
// is w rotated by the negated angles. Also the backward op called directly.
void gradients_match_reference(const at::Device& device) {
  const std::string what = std::string("gradients on ") + device.str();
  const at::Tensor q = projection_heads(kHeadsQ, at::kFloat, device).detach().requires_grad_();
  const at::Tensor k = projection_heads(kHeadsK, at::kFloat, device).detach().requires_grad_();
  const at::Tensor angles = rope_angles(kTableRows, kHeadDim);
  const at::Tensor cos = angles.cos().to(device, at::kFloat);
  const at::Tensor sin = angles.sin().to(device, at::kFloat);
  const at::Tensor rows = at::randint(0, kTableRows, {kSeq}, at::kLong);  // an (S,) positions tensor
  const at::Tensor weight_q = at::randn(q.sizes(), at::kFloat).to(device);
  const at::Tensor weight_k = at::randn(k.sizes(), at::kFloat).to(device);

  const auto [q_out, k_out] = rope_kernels::fused_qk(q, k, cos, sin, rows.to(device));
  expect(q_out.requires_grad() && k_out.requires_grad(), what + ": outputs do not require grad");
  ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward();
  const at::Tensor batch_rows = rows.expand({kBatch, kSeq});
  const at::Tensor want_q = reference_rotate(weight_q, cos, sin, batch_rows, true);
  const at::Tensor want_k = reference_rotate(weight_k, cos, sin, batch_rows, true);
  expect(q.grad().defined() && k.grad().defined(), what + ": no gradient reached q or k");
  expect_close(q.grad(), want_q, 1e-5, 1e-5, what + ", grad q");
  expect_close(k.grad(), want_k, 1e-5, 1e-5, what + ", grad k");

  const auto [grad_q, grad_k] = rope_kernels::fused_qk_backward(weight_q, weight_k, cos, sin, rows.to(device));
  expect_close(grad_q, want_q, 1e-5, 1e-5, what + ", fused_qk_backward q");
  expect_close(grad_k, want_k, 1e-5, 1e-5, what + ", fused_qk_backward k");
}

// fused_qk_ rotates q and k where they lie (here transposed views of projections) and returns
// them: the same values as the functional op, in the caller's own storage.
void in_place_matches_reference(const at::Device& device, at::ScalarType dtype) {
  const std::string what = std::string("in place on ") + device.str() + " " + c10::toString(dtype);
  at::Tensor q = projection_heads(kHeadsQ, dtype, device);
  at::Tensor k = projection_heads(kHeadsK, dtype, device);
  const at::Tensor q_before = q.clone();
  const at::Tensor k_before = k.clone();
  const void* q_storage = q.data_ptr();
  const at::Tensor angles = rope_angles(kTableRows, kHeadDim);
  const at::Tensor cos = angles.cos().to(device, at::kFloat);
  const at::Tensor sin = angles.sin().to(device, at::kFloat);
  const at::Tensor rows = at::randint(0, kTableRows, {kBatch, kSeq}, at::kLong);

  const auto [q_rotated, k_rotated] = rope_kernels::fused_qk_(q, k, cos, sin, rows.to(device));
  expect(q_rotated.is_same(q) && k_rotated.is_same(k), what + ": fused_qk_ did not return q and k themselves");
  expect(q.data_ptr() == q_storage && !q.is_contiguous(), what + ": q no longer the caller's transposed view");
  const Tolerance tol = tolerance(dtype);
  expect_close(q, reference_rotate(q_before, cos, sin, rows, false), tol.rtol, tol.atol, what + ", q");
  expect_close(k, reference_rotate(k_before, cos, sin, rows, false), tol.rtol, tol.atol, what + ", k");
}

// rope_kernels::Options: interleaved pairs over the first 32 of 64 features of (B, S, H, D)
// tensors passed as they are; and the single-tensor op, which rotates one tensor the same way.
void options_match_reference(const at::Device& device) {
  const std::string what = std::string("options on ") + device.str();
  constexpr int64_t kRotary = 32;
  const at::Tensor q = at::randn({kBatch, kSeq, kHeadsQ, kHeadDim}, at::kDouble).to(device, at::kFloat);
  const at::Tensor k = at::randn({kBatch, kSeq, kHeadsK, kHeadDim}, at::kDouble).to(device, at::kFloat);
  const at::Tensor angles = rope_angles(kTableRows, kRotary);
  const at::Tensor cos = angles.cos().to(device, at::kFloat);
  const at::Tensor sin = angles.sin().to(device, at::kFloat);
  rope_kernels::Options options;
  options.interleaved = true;
  options.rotary_dim = kRotary;
  options.layout = "bshd";
  const auto [q_out, k_out] = rope_kernels::fused_qk(q, k, cos, sin, std::nullopt, options);
  expect(q_out.sizes() == q.sizes() && q_out.strides() == q.strides(), what + ": q_out not laid out as q");

  // Pairs (2i, 2i + 1) of the first 32 features, the rest passed through.
  const at::Tensor x = q.transpose(1, 2).to(at::kCPU, at::kDouble);
  const at::Tensor c = angles.narrow(0, 0, kSeq).cos().reshape({1, 1, kSeq, kRotary / 2});
  const at::Tensor s = angles.narrow(0, 0, kSeq).sin().reshape({1, 1, kSeq, kRotary / 2});
  const at::Tensor x1 = x.slice(-1, 0, kRotary, 2), x2 = x.slice(-1, 1, kRotary, 2);
  const at::Tensor rotated = at::stack({x1 * c - x2 * s, x2 * c + x1 * s}, -1).flatten(-2);
  const at::Tensor want = at::cat({rotated, x.narrow(-1, kRotary, kHeadDim - kRotary)}, -1);
  expect_close(q_out.transpose(1, 2), want, 1e-5, 1e-5, what + ", q_out");

  const at::Tensor one = rope_kernels::fused(q, cos, sin, std::nullopt, options);
  expect(at::equal(one, q_out), what + ": fused (one tensor) differs from fused_qk's q");
}

void bad_input_raises_a_clear_error(const at::Device& device) {
  const at::Tensor odd = at::randn({1, 2, 3, 7}).to(device);  // head_dim 7 is odd
  const at::Tensor table = at::randn({8, 4}).to(device);
  try {
    rope_kernels::fused_qk(odd, odd, table, table);
  } catch (const c10::Error& error) {
    const std::string message = error.what();
    expect(message.find("rope::fused_qk: head_dim must be even") != std::string::npos,
           "unexpected error message: " + message);
    return;
  }
  throw std::runtime_error("an odd head_dim on " + device.str() + " did not raise");
}

}  // namespace

int main() {
  return rope_test::run_test("cpp_api", [] {
    rope_test::seed_from_environment();
    const std::string info = rope_kernels::build_info();
    expect(info.find("\"version\"") != std::string::npos, "build_info() is not the build's JSON: " + info);
    for (const at::Device& device : rope_test::devices()) {
      for (const at::ScalarType dtype : {at::kFloat, at::kBFloat16}) {
        forward_matches_reference(device, dtype, true);
        forward_matches_reference(device, dtype, false);
      }
      gradients_match_reference(device);
      in_place_matches_reference(device, at::kFloat);
      in_place_matches_reference(device, at::kBFloat16);
      options_match_reference(device);
      bad_input_raises_a_clear_error(device);
      std::cout << "checked on " << device << std::endl;
    }
    rope_test::expect_no_python();
  });
}
