// What a backward node of a rope op keeps of its call: the tables, positions and packed-sequence
// tensors, and the options, so that the backward calls its op exactly as the forward was called.
// Shared by both autograd files (rope_autograd.cpp, rope_inplace_autograd.cpp).
#pragma once

#include <rope_kernels/rope_kernels.h>
#include <torch/autograd.h>

#include <optional>

namespace rope_kernels {

inline std::optional<at::Tensor> saved_or_none(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// Saved variables, in order: cos, sin, positions, cu_seqlens, seqlen_offsets (undefined where absent).
inline void save_options(torch::autograd::AutogradContext* ctx, const at::Tensor& cos, const at::Tensor& sin,
                         const std::optional<at::Tensor>& positions, const Options& o) {
  ctx->save_for_backward({cos, sin, positions.value_or(at::Tensor()), o.cu_seqlens.value_or(at::Tensor()),
                          o.seqlen_offsets.value_or(at::Tensor())});
  ctx->saved_data["interleaved"] = o.interleaved;
  ctx->saved_data["interleaved_out"] = o.interleaved_out.has_value() ? c10::IValue(*o.interleaved_out) : c10::IValue();
  ctx->saved_data["rotary_dim"] = o.rotary_dim.has_value() ? c10::IValue(*o.rotary_dim) : c10::IValue();
  ctx->saved_data["layout"] = o.layout;
}

// The options save_options kept; `saved` is ctx->get_saved_variables().
inline Options saved_options(torch::autograd::AutogradContext* ctx, const torch::autograd::variable_list& saved) {
  Options o;
  o.interleaved = ctx->saved_data["interleaved"].toBool();
  o.interleaved_out = ctx->saved_data["interleaved_out"].toOptional<bool>();
  o.rotary_dim = ctx->saved_data["rotary_dim"].toOptional<int64_t>();
  o.layout = ctx->saved_data["layout"].toStringRef();
  o.cu_seqlens = saved_or_none(saved[3]);
  o.seqlen_offsets = saved_or_none(saved[4]);
  return o;
}

}  // namespace rope_kernels
