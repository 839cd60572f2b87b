// The checks that only the in-place op needs (rope::fused_qk_), on top of check_and_normalize:
// what it writes must be writable element by element without clobbering what it still reads.
#pragma once

#include <rope_kernels/rope_kernels.h>

#include <ATen/core/Tensor.h>

#include <optional>

namespace rope_kernels {

// q and k each have no two elements at one address (a stride-0 broadcast, or strides that fold a
// tensor onto itself): writing one rotated element would overwrite another before it is read.
// Reads only sizes and strides, so it holds for fake and functional tensors too (torch.compile
// refuses what eager refuses; with symbolic strides, what torch's own check finds).
void check_inplace_targets(const char* op_name, const at::Tensor& q, const at::Tensor& k);

// q and k share no memory with each other, nor with cos, sin, positions or the packed
// sequences' cu_seqlens and seqlen_offsets. Compares real addresses: for the CPU and CUDA kernels
// only. Views with gaps in one buffer pass where their elements provably lie apart (q and k
// sliced from one qkv projection) and are refused where they may not (memory_footprint.h).
void check_inplace_apart(const char* op_name, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                         const Options& options);

}  // namespace rope_kernels
