#include "memory_footprint.h"

#include <ATen/MemoryOverlap.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace rope_kernels {
namespace {

// One dimension that takes more than one index: its stride and its size, in elements.
struct Dim {
  int64_t stride;
  int64_t size;
};

// The dimensions of t that take more than one index, or nothing where a size or a stride is
// symbolic.
std::optional<std::vector<Dim>> concrete_dims(const at::Tensor& t) {
  std::vector<Dim> dims;
  for (int64_t d = 0; d < t.dim(); ++d) {
    const std::optional<int64_t> size = t.sym_size(d).maybe_as_int();
    const std::optional<int64_t> stride = t.sym_stride(d).maybe_as_int();
    if (!size.has_value() || !stride.has_value()) {
      return std::nullopt;
    }
    if (*size > 1) {
      dims.push_back({*stride, *size});
    }
  }
  return dims;
}

// The elements' offsets lie in [0, extent(dims)], in elements.
int64_t extent(const std::vector<Dim>& dims) {
  int64_t last = 0;
  for (const Dim& dim : dims) {
    last += dim.stride * (dim.size - 1);
  }
  return last;
}

// Where the bytes of t's elements lie relative to `period` bytes: every element's address is
// first + (a multiple of period) + r with r in [0, span), where the dimensions whose stride is a
// multiple of the period supply the multiples and the others r. Nothing when span exceeds the
// period (the residues wrap around it more than once).
struct Residues {
  int64_t start;  // first's address modulo the period
  int64_t span;   // bytes, the last element's included
};

std::optional<Residues> residues(std::uintptr_t first, const std::vector<Dim>& dims, int64_t item, int64_t period) {
  int64_t span = item;
  for (const Dim& dim : dims) {
    const int64_t stride_bytes = dim.stride * item;
    if (stride_bytes % period != 0) {
      span += stride_bytes * (dim.size - 1);
    }
  }
  if (span > period) {
    return std::nullopt;
  }
  return Residues{static_cast<int64_t>(first % static_cast<std::uintptr_t>(period)), span};
}

// Whether two arcs [start, start + span) of a circle of `period` bytes are apart.
bool arcs_apart(const Residues& a, const Residues& b, int64_t period) {
  const int64_t b_after_a = ((b.start - a.start) % period + period) % period;
  const int64_t a_after_b = ((a.start - b.start) % period + period) % period;
  return b_after_a >= a.span && a_after_b >= b.span;
}

}  // namespace

bool may_overlap_itself(const at::Tensor& t) {
  std::optional<std::vector<Dim>> dims = concrete_dims(t);
  if (!dims.has_value()) {
    return at::has_internal_overlap(t) == at::MemOverlap::Yes;
  }
  if (t.numel() == 0) {
    return false;
  }
  // Innermost first: each dimension's stride must step past every offset the inner ones reach,
  // so that the copies of the inner block it makes lie apart. A sufficient condition, which
  // every layout made by views of a dense tensor (transposes, slices, gaps) meets.
  std::sort(dims->begin(), dims->end(), [](const Dim& x, const Dim& y) { return x.stride < y.stride; });
  int64_t reached = 0;
  for (const Dim& dim : *dims) {
    if (dim.stride <= reached) {
      return true;
    }
    reached += dim.stride * (dim.size - 1);
  }
  return false;
}

bool may_share_memory(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) {
    return false;
  }
  const std::optional<std::vector<Dim>> a_concrete = concrete_dims(a);
  const std::optional<std::vector<Dim>> b_concrete = concrete_dims(b);
  TORCH_INTERNAL_ASSERT(a_concrete.has_value() && b_concrete.has_value(),
                        "may_share_memory compares real tensors, which have concrete sizes and strides");
  const std::vector<Dim>& a_dims = *a_concrete;
  const std::vector<Dim>& b_dims = *b_concrete;
  const int64_t a_item = static_cast<int64_t>(a.element_size());
  const int64_t b_item = static_cast<int64_t>(b.element_size());
  const auto a_first = reinterpret_cast<std::uintptr_t>(a.data_ptr());
  const auto b_first = reinterpret_cast<std::uintptr_t>(b.data_ptr());
  // Byte ranges apart: nothing shared.
  const std::uintptr_t a_end = a_first + static_cast<std::uintptr_t>(extent(a_dims) * a_item + a_item);
  const std::uintptr_t b_end = b_first + static_cast<std::uintptr_t>(extent(b_dims) * b_item + b_item);
  if (a_end <= b_first || b_end <= a_first) {
    return false;
  }
  // Ranges that interleave, such as q and k sliced from one fused qkv projection: apart where,
  // for some period (a stride of either), the bytes of each repeat within an arc of it, and the
  // two arcs are apart.
  std::vector<int64_t> periods;
  for (const auto& [dims, item] : {std::pair{&a_dims, a_item}, std::pair{&b_dims, b_item}}) {
    for (const Dim& dim : *dims) {
      if (dim.stride > 0) {
        periods.push_back(dim.stride * item);
      }
    }
  }
  for (const int64_t period : periods) {
    const std::optional<Residues> a_arc = residues(a_first, a_dims, a_item, period);
    const std::optional<Residues> b_arc = residues(b_first, b_dims, b_item, period);
    if (a_arc.has_value() && b_arc.has_value() && arcs_apart(*a_arc, *b_arc, period)) {
      return false;
    }
  }
  return true;
}

}  // namespace rope_kernels
