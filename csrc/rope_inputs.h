// Validation and normalization of the op's arguments, shared by every backend (CPU, CUDA, Meta),
// so that all of them accept and reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <tuple>

namespace rope_kernels {

// The op's arguments after checking: every backend computes from these.
struct RopeInputs {
  at::Tensor q;    // (B, Hq, S, D), stride(-1) == 1
  at::Tensor k;    // (B, Hk, S, D), stride(-1) == 1
  // (T, rows, W), stride(-1) == 1: T == 1 (one table for every sequence) or T == B (one per
  // sequence); W == D/2 or D (only the first D/2 columns are used).
  at::Tensor cos;
  at::Tensor sin;  // same shape and dtype as cos
  std::optional<at::Tensor> positions;  // (B, S) int32 or int64; an (S,) input is expanded (stride 0)
  c10::SymInt half_dim;  // SymInt so that the Meta kernel works under dynamic shapes
};

// Checks every argument and raises `<op_name>: <what is wrong>` before any work is done.
// Views are kept where they are; only a last dimension with a stride other than 1 is copied.
RopeInputs check_and_normalize(const char* op_name, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& positions);

// The strides of a fresh dense tensor with t's dimension order (see rope_inputs.cpp): what every
// backend gives its outputs, so that the Meta kernel's strides equal the real ones.
c10::SmallVector<c10::SymInt, 4> output_strides(const at::Tensor& t);

// Fresh outputs with those strides, through the dispatcher (CPU, Meta).
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q, const at::Tensor& k);

}  // namespace rope_kernels
