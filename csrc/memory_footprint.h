// Whether tensors may touch the same memory, decided from their sizes, strides and addresses
// alone, for any strides: where it cannot be proven that they do not, the answer is that they
// may. The in-place op refuses what may overlap (rope_inplace.cpp); torch's own overlap helpers
// answer "too hard" for such layouts and let them through.
#pragma once

#include <ATen/core/Tensor.h>

namespace rope_kernels {

// Whether two elements of t may lie at one address (a stride-0 dimension, or strides that fold
// the tensor onto itself). Tensors with symbolic sizes or strides (fake tensors under
// torch.compile) get torch's answer, which reads no value off a symbol.
bool may_overlap_itself(const at::Tensor& t);

// Whether an element of a and an element of b may share a byte. Compares real addresses: for
// tensors with storage (the CPU and CUDA kernels), not fake ones.
bool may_share_memory(const at::Tensor& a, const at::Tensor& b);

}  // namespace rope_kernels
