#include "rope_inplace.h"

#include "memory_footprint.h"

#include <c10/util/Exception.h>

namespace rope_kernels {
namespace {

void check_no_internal_overlap(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(!may_overlap_itself(t), op, ": ", name, " has elements that share memory (sizes ", t.sym_sizes(),
              ", strides ", t.sym_strides(), ": a stride-0 dimension, or strides that fold it onto itself), so it ",
              "cannot be rotated in place; pass ", name, ".clone() or use rope::fused_qk");
}

void check_apart(const char* op, const char* written, const at::Tensor& a, const char* other_name,
                 const at::Tensor& b) {
  TORCH_CHECK(!may_share_memory(a, b), op, ": ", written, " and ", other_name,
              " share memory (or may: no arrangement of their strides keeps their elements apart), so rotating ",
              written, " in place could change what is still to be read; pass copies (.clone())");
}

}  // namespace

void check_inplace_targets(const char* op, const at::Tensor& q, const at::Tensor& k) {
  check_no_internal_overlap(op, "q", q);
  check_no_internal_overlap(op, "k", k);
}

void check_inplace_apart(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos,
                         const at::Tensor& sin, const std::optional<at::Tensor>& positions,
                         const Options& options) {
  check_apart(op, "q", q, "k", k);
  for (const auto& [name, written] : {std::pair<const char*, const at::Tensor*>{"q", &q}, {"k", &k}}) {
    check_apart(op, name, *written, "cos", cos);
    check_apart(op, name, *written, "sin", sin);
    const std::pair<const char*, const std::optional<at::Tensor>*> indices[] = {
        {"positions", &positions}, {"cu_seqlens", &options.cu_seqlens}, {"seqlen_offsets", &options.seqlen_offsets}};
    for (const auto& [index_name, index] : indices) {
      if (index->has_value()) {
        check_apart(op, name, *written, index_name, **index);
      }
    }
  }
}

}  // namespace rope_kernels
