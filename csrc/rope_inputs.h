// Validation and normalization of the op's arguments, shared by every backend (CPU, CUDA, Meta),
// so that all of them accept and reject exactly the same inputs with the same messages.
#pragma once

#include <rope_kernels/rope_kernels.h>

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>
#include <c10/util/SmallVector.h>

#include <optional>
#include <tuple>

namespace rope_kernels {

// How q and k are laid out (Options::layout).
enum class Layout { kBHSD, kBSHD, kTHD };

// Which way a call rotates: a backward op's options are those of the forward call, so it reads the
// pairs as the forward wrote them and writes them as the forward read them.
enum class Direction { kForward, kBackward };

// The op's arguments after checking: every backend computes from these.
struct RopeInputs {
  // (B, Hq, S, D) and (B, Hk, S, D) views of the caller's tensors, whatever their layout (packed
  // (T, H, D) tensors are one sequence, (1, H, T, D)); stride(-1) == 1.
  at::Tensor q;
  at::Tensor k;
  // (T, rows, W), stride(-1) == 1: T == 1 (one table for every sequence) or T == B (one per
  // sequence); W == rotary_dim/2 or rotary_dim (only the first rotary_dim/2 columns are used).
  at::Tensor cos;
  at::Tensor sin;  // same shape and dtype as cos
  std::optional<at::Tensor> positions;  // (B, S) int32 or int64; an (S,) input is expanded (stride 0)
  // Packed sequences: (n + 1,) and (n,) int32/int64, values unchecked (the CPU backend checks them).
  std::optional<at::Tensor> cu_seqlens;
  std::optional<at::Tensor> seqlen_offsets;
  Layout layout;
  // SymInts so that the Meta kernel works under dynamic shapes.
  c10::SymInt head_dim;
  c10::SymInt rotary_half;  // pairs rotated per head: rotary_dim / 2
  bool read_interleaved;    // pairs (2i, 2i + 1) in what is read, else (i, i + rotary_half)
  bool write_interleaved;   // the same for what is written
};

// Checks every argument and raises `<op_name>: <what is wrong>` before any work is done.
// Views are kept where they are; only a last dimension with a stride other than 1 is copied.
RopeInputs check_and_normalize(const char* op_name, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& positions, const Options& options,
                               Direction direction = Direction::kForward);

// t (laid out as `layout` says) as the (B, H, S, D) view the kernels address: how an output
// allocated like the caller's q is seen next to RopeInputs::q.
at::Tensor as_bhsd(const at::Tensor& t, Layout layout);

// Options::layout's value; raises `<op_name>: ...` for an unknown one.
Layout parse_layout(const char* op_name, const std::string& layout);

// The dimension of the caller's q and k that counts heads.
int64_t heads_dim(Layout layout);

// The strides of a fresh dense tensor with t's dimension order (see rope_inputs.cpp): what every
// backend gives its outputs, so that the Meta kernel's strides equal the real ones.
c10::SmallVector<c10::SymInt, 4> output_strides(const at::Tensor& t);

// Fresh outputs with those strides, through the dispatcher (CPU, Meta).
std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q, const at::Tensor& k);

}  // namespace rope_kernels
