// The C++ API of the rope operator library: typed calls of the registered ops.
//
// Each function calls its op through the PyTorch dispatcher, as torch.ops.rope.* does in Python:
// the kernel is chosen by the inputs' device (CPU or CUDA), and autograd records the call, so
// gradients flow to q and k. The ops are registered when the library is loaded; linking the CMake
// target RopeKernels::rope_kernels is all it takes.
//
// The C++ signature of each op is written once, in rope_kernels::signatures: these calls, the
// library's own kernels (which static_assert that they match) and its internal handles use it, and
// the dispatcher checks it against the registered schema when a handle is first looked up.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace rope_kernels {

namespace signatures {

// rope::fused_qk and rope::fused_qk_backward: (q, k, cos, sin, positions, then the keyword options
// of rope_kernels::Options in their order) -> (q_out, k_out).
using Rotate = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                    const at::Tensor&, const std::optional<at::Tensor>&, bool,
                                                    std::optional<bool>, std::optional<int64_t>, c10::string_view,
                                                    const std::optional<at::Tensor>&,
                                                    const std::optional<at::Tensor>&);
// rope::fused_qk_: q and k rotated where they lie, and returned.
using RotateInplace = std::tuple<at::Tensor, at::Tensor>(at::Tensor&, at::Tensor&, const at::Tensor&,
                                                           const at::Tensor&, const std::optional<at::Tensor>&, bool,
                                                           std::optional<bool>, std::optional<int64_t>,
                                                           c10::string_view, const std::optional<at::Tensor>&,
                                                           const std::optional<at::Tensor>&);
// rope::fused and rope::fused_backward: one tensor, the same options -> the rotated tensor.
using RotateOne = at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                             const std::optional<at::Tensor>&, bool, std::optional<bool>, std::optional<int64_t>,
                             c10::string_view, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&);
// rope::fused_: one tensor rotated where it lies, and returned.
using RotateOneInplace = at::Tensor&(at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, bool, std::optional<bool>,
                                     std::optional<int64_t>, c10::string_view, const std::optional<at::Tensor>&,
                                     const std::optional<at::Tensor>&);
// rope::build_info.
using BuildInfo = std::string();

}  // namespace signatures

// The keyword options of every rope op, in schema order; the defaults are the four-argument call
// (half-split pairs over the whole head of (B, H, S, D) tensors). docs/conventions.md has the
// contract of each.
struct Options {
  // Input pairs (x[2i], x[2i+1]) (GPT-J, GLM) instead of (x[i], x[i + rotary_dim/2]) (NeoX, Llama).
  bool interleaved = false;
  // Output pairing; unset: the same as the input's. interleaved = true with interleaved_out =
  // false reads interleaved pairs and writes half-split ones (DeepSeek-V3's MLA).
  std::optional<bool> interleaved_out = std::nullopt;
  // Rotate the first rotary_dim features of each head; the rest is copied (or, in place, left).
  std::optional<int64_t> rotary_dim = std::nullopt;
  // "bhsd": (B, H, S, D); "bshd": (B, S, H, D); "thd": packed sequences (T, H, D).
  std::string layout = "bhsd";
  // "thd" only: (n + 1,) document boundaries; token t of document j sits at t - cu_seqlens[j]
  // (plus seqlen_offsets[j], if given).
  std::optional<at::Tensor> cu_seqlens = std::nullopt;
  std::optional<at::Tensor> seqlen_offsets = std::nullopt;
};

namespace detail {

// The typed handle of a registered op, looked up once. Not finding it means the library is not in
// the program, which deserves a better message than the dispatcher's.
template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  const auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  TORCH_CHECK(handle.has_value(), name,
              ": the op is not registered in this program; link the CMake target "
              "RopeKernels::rope_kernels (or load librope_kernels_ops before the first call)");
  return handle->typed<Signature>();
}

inline const c10::TypedOperatorHandle<signatures::Rotate>& fused_qk_handle() {
  static const auto op = find_op<signatures::Rotate>("rope::fused_qk");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::Rotate>& fused_qk_backward_handle() {
  static const auto op = find_op<signatures::Rotate>("rope::fused_qk_backward");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::RotateInplace>& fused_qk_inplace_handle() {
  static const auto op = find_op<signatures::RotateInplace>("rope::fused_qk_");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::RotateOne>& fused_handle() {
  static const auto op = find_op<signatures::RotateOne>("rope::fused");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::RotateOne>& fused_backward_handle() {
  static const auto op = find_op<signatures::RotateOne>("rope::fused_backward");
  return op;
}

inline const c10::TypedOperatorHandle<signatures::RotateOneInplace>& fused_inplace_handle() {
  static const auto op = find_op<signatures::RotateOneInplace>("rope::fused_");
  return op;
}

}  // namespace detail

// Rotates q (B, Hq, S, D) and k (B, Hk, S, D) (or, with options.layout, (B, S, H, D) or packed
// (T, H, D)), any strides, by the angles in the cos/sin tables:
// (S_max, D/2), or the full-width (S_max, D) table of which the first half is used, leading
// size-1 dims allowed, float32 or q's dtype; or one such table per sequence, (B, S_max, D/2 or D).
// positions: optional int32/int64 (B, S) or (S,) table rows; without it token s uses row s. A
// position outside the table gives NaN for that token.
// Returns new tensors laid out like q and k. Bad arguments raise c10::Error ("rope::fused_qk: ...").
inline std::tuple<at::Tensor, at::Tensor> fused_qk(const at::Tensor& q, const at::Tensor& k,
                                                   const at::Tensor& cos, const at::Tensor& sin,
                                                   const std::optional<at::Tensor>& positions = std::nullopt,
                                                   const Options& options = {}) {
  return detail::fused_qk_handle().call(q, k, cos, sin, positions, options.interleaved, options.interleaved_out,
                                        options.rotary_dim, options.layout, options.cu_seqlens,
                                        options.seqlen_offsets);
}

// The gradient of fused_qk with respect to q and k: the same rotation by the negated angles. The
// options are those of the fused_qk call whose gradient this is (grad_q_out is laid out as its
// output: with interleaved_out, say, the pairs are read as that call wrote them).
inline std::tuple<at::Tensor, at::Tensor> fused_qk_backward(const at::Tensor& grad_q_out,
                                                            const at::Tensor& grad_k_out,
                                                            const at::Tensor& cos, const at::Tensor& sin,
                                                            const std::optional<at::Tensor>& positions =
                                                                std::nullopt,
                                                            const Options& options = {}) {
  return detail::fused_qk_backward_handle().call(grad_q_out, grad_k_out, cos, sin, positions, options.interleaved,
                                                 options.interleaved_out, options.rotary_dim, options.layout,
                                                 options.cu_seqlens, options.seqlen_offsets);
}

// fused_qk writing into q and k themselves (same arguments and math), for callers that own them;
// returns q and k. The mutation is declared in the schema, so autograd records it (a q or k that
// requires grad must not be a leaf) and torch.compile sees it. q, k and the tables must not share
// memory ("rope::fused_qk_: ..." otherwise).
inline std::tuple<at::Tensor, at::Tensor> fused_qk_(at::Tensor& q, at::Tensor& k, const at::Tensor& cos,
                                                    const at::Tensor& sin,
                                                    const std::optional<at::Tensor>& positions = std::nullopt,
                                                    const Options& options = {}) {
  return detail::fused_qk_inplace_handle().call(q, k, cos, sin, positions, options.interleaved,
                                                options.interleaved_out, options.rotary_dim, options.layout,
                                                options.cu_seqlens, options.seqlen_offsets);
}

// One tensor (q alone, k alone, a KV cache) rotated as fused_qk rotates q: same arguments, options
// and math; returns a new tensor laid out like x.
inline at::Tensor fused(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                        const std::optional<at::Tensor>& positions = std::nullopt, const Options& options = {}) {
  return detail::fused_handle().call(x, cos, sin, positions, options.interleaved, options.interleaved_out,
                                     options.rotary_dim, options.layout, options.cu_seqlens, options.seqlen_offsets);
}

// The gradient of fused with respect to x (the options of that fused call).
inline at::Tensor fused_backward(const at::Tensor& grad_out, const at::Tensor& cos, const at::Tensor& sin,
                                 const std::optional<at::Tensor>& positions = std::nullopt,
                                 const Options& options = {}) {
  return detail::fused_backward_handle().call(grad_out, cos, sin, positions, options.interleaved,
                                              options.interleaved_out, options.rotary_dim, options.layout,
                                              options.cu_seqlens, options.seqlen_offsets);
}

// fused writing into x itself; returns x.
inline at::Tensor& fused_(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                          const std::optional<at::Tensor>& positions = std::nullopt, const Options& options = {}) {
  return detail::fused_inplace_handle().call(x, cos, sin, positions, options.interleaved, options.interleaved_out,
                                             options.rotary_dim, options.layout, options.cu_seqlens,
                                             options.seqlen_offsets);
}

// A JSON object describing the library in the program: its version, the torch it was built
// against and, for a CUDA build, the CUDA and Triton versions, architectures, kernel variants and
// limits (largest head_dim, dtypes).
inline std::string build_info() {
  static const auto op = detail::find_op<signatures::BuildInfo>("rope::build_info");
  return op.call();
}

}  // namespace rope_kernels
