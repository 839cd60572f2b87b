#include "rope_inputs.h"

#include "cuda/kernel_table.h"

#include <ATen/ATen.h>
#include <c10/util/Exception.h>
#include <c10/util/SmallVector.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace rope_kernels {
namespace {

bool is_supported_float(c10::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

// The kernels read the last dimension as contiguous; any other stride is copied once here.
at::Tensor with_unit_last_stride(const at::Tensor& t) {
  if (t.sym_size(-1) <= 1 || t.sym_stride(-1) == 1) {
    return t;
  }
  return t.contiguous();
}

// The table as (tables, rows, W), tables being 1 (one table for every sequence) or q's batch
// size (one per sequence, as Hugging Face models pass each token's angles, (B, S, D)). Leading
// size-1 dims are dropped first, so (1, 1, S, D) and (1, S, D) are one shared table. Views only.
at::Tensor as_tables(const char* op, const char* name, const at::Tensor& t, const c10::SymInt& batch) {
  at::Tensor out = t;
  while (out.dim() > 2 && out.sym_size(0) == 1) {
    out = out.squeeze(0);
  }
  TORCH_CHECK(out.dim() == 2 || out.dim() == 3, op, ": ", name,
              " must be (max_seq, head_dim/2) or (max_seq, head_dim), one table for every sequence, or "
              "(batch, max_seq, ...) with one per sequence, optionally with leading size-1 dims; got shape ",
              t.sym_sizes());
  if (out.dim() == 2) {
    return out.unsqueeze(0);
  }
  TORCH_CHECK(out.sym_size(0) == batch, op, ": ", name, " of shape ", t.sym_sizes(), " holds ", out.sym_size(0),
              " tables (one per sequence), but q and k have a batch of ", batch);
  return out;
}

const char* layout_shape(Layout layout) {
  switch (layout) {
    case Layout::kBHSD:
      return "4-D (batch, heads, seq, head_dim)";
    case Layout::kBSHD:
      return "4-D (batch, seq, heads, head_dim) (layout=\"bshd\")";
    case Layout::kTHD:
      return "3-D (tokens, heads, head_dim) (layout=\"thd\")";
  }
  return "?";
}

// q and k, already as (B, H, S, D) views.
void check_qk(const char* op, const at::Tensor& q, const at::Tensor& k) {
  TORCH_CHECK(q.device() == k.device(), op, ": q and k must be on the same device; got q on ",
              q.device(), " and k on ", k.device());
  TORCH_CHECK(q.scalar_type() == k.scalar_type(), op, ": q and k must have the same dtype; got q ",
              q.scalar_type(), " and k ", k.scalar_type());
  TORCH_CHECK(is_supported_float(q.scalar_type()), op,
              ": q and k must be float16, bfloat16, float32 or float64; got ", q.scalar_type());
  TORCH_CHECK(q.sym_size(0) == k.sym_size(0), op, ": q and k must have the same batch size; got ", q.sym_size(0),
              " and ", k.sym_size(0));
  TORCH_CHECK(q.sym_size(2) == k.sym_size(2), op, ": q and k must have the same sequence length; got ",
              q.sym_size(2), " and ", k.sym_size(2));
  TORCH_CHECK(q.sym_size(3) == k.sym_size(3), op, ": q and k must have the same head_dim; got ", q.sym_size(3),
              " and ", k.sym_size(3));
  TORCH_CHECK(q.sym_size(3) % 2 == 0 && q.sym_size(3) > 0, op, ": head_dim must be even and positive; got ",
              q.sym_size(3));
}

// The first rotary_dim features of each head are rotated: rotary_dim/2 pairs.
c10::SymInt rotary_half_of(const char* op, const std::optional<int64_t>& rotary_dim, const c10::SymInt& head_dim) {
  if (!rotary_dim.has_value()) {
    return head_dim / 2;
  }
  TORCH_CHECK(*rotary_dim > 0 && *rotary_dim % 2 == 0, op, ": rotary_dim must be even and positive; got ",
              *rotary_dim);
  TORCH_CHECK(head_dim >= *rotary_dim, op, ": rotary_dim (", *rotary_dim, ") exceeds head_dim (", head_dim, ")");
  return c10::SymInt(*rotary_dim / 2);
}

void check_index_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q) {
  TORCH_CHECK(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name,
              " must be int32 or int64; got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device (", q.device(), "); got ",
              t.device());
}

// Packed sequences: (n + 1,) boundaries and (n,) offsets. Their values are read only on the CPU
// (rope_cpu.cpp checks them there); the CUDA kernel reads them in bounds whatever they hold.
void check_packed(const char* op, const at::Tensor& q, const Options& o, Layout layout,
                  const std::optional<at::Tensor>& positions) {
  if (!o.cu_seqlens.has_value()) {
    TORCH_CHECK(!o.seqlen_offsets.has_value(), op, ": seqlen_offsets needs cu_seqlens (one offset per document)");
    return;
  }
  TORCH_CHECK(layout == Layout::kTHD, op,
              ": cu_seqlens needs packed sequences, layout=\"thd\" with q of shape (tokens, heads, head_dim)");
  TORCH_CHECK(!positions.has_value(), op,
              ": pass positions or cu_seqlens, not both (cu_seqlens gives each token its position)");
  const at::Tensor& cu = *o.cu_seqlens;
  check_index_tensor(op, "cu_seqlens", cu, q);
  TORCH_CHECK(cu.dim() == 1 && cu.sym_size(0) >= 1, op,
              ": cu_seqlens must be 1-D (documents + 1,), starting at 0 and ending at the token count; got shape ",
              cu.sym_sizes());
  TORCH_CHECK(cu.sym_size(0) >= 2 || q.sym_size(2) == 0, op, ": cu_seqlens of shape ", cu.sym_sizes(),
              " holds no document, but there are ", q.sym_size(2), " tokens");
  if (o.seqlen_offsets.has_value()) {
    const at::Tensor& offsets = *o.seqlen_offsets;
    check_index_tensor(op, "seqlen_offsets", offsets, q);
    TORCH_CHECK(offsets.dim() == 1 && offsets.sym_size(0) == cu.sym_size(0) - 1, op,
                ": seqlen_offsets must be 1-D with one offset per document (", cu.sym_size(0) - 1, "); got shape ",
                offsets.sym_sizes());
  }
}

void check_table(const char* op, const at::Tensor& q, const at::Tensor& cos, const at::Tensor& sin,
                 const c10::SymInt& rotary_half, bool partial) {
  TORCH_CHECK(cos.device() == q.device() && sin.device() == q.device(), op,
              ": cos and sin must be on q's device (", q.device(), "); got cos on ", cos.device(),
              " and sin on ", sin.device());
  TORCH_CHECK(cos.sym_sizes() == sin.sym_sizes(), op, ": cos and sin must have the same shape; got ",
              cos.sym_sizes(), " and ", sin.sym_sizes());
  TORCH_CHECK(cos.scalar_type() == sin.scalar_type(), op,
              ": cos and sin must have the same dtype; got ", cos.scalar_type(), " and ",
              sin.scalar_type());
  const auto t = cos.scalar_type();
  TORCH_CHECK(t == q.scalar_type() || t == at::kFloat, op,
              ": cos and sin must be float32 or q's dtype (", q.scalar_type(), "); got ", t);
  const c10::SymInt width = cos.sym_size(-1);
  // Named after what sets the width: head_dim, or rotary_dim where given.
  const char* rotated = partial ? "rotary_dim" : "head_dim";
  TORCH_CHECK(width == rotary_half || width == rotary_half * 2, op, ": cos and sin must have ", rotated, "/2 (",
              rotary_half, ") or ", rotated, " (", rotary_half * 2, ") columns; got ", width);
}

void check_positions(const char* op, const at::Tensor& q, const at::Tensor& positions) {
  TORCH_CHECK(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong, op,
              ": positions must be int32 or int64; got ", positions.scalar_type());
  TORCH_CHECK(positions.device() == q.device(), op, ": positions must be on q's device (", q.device(),
              "); got ", positions.device());
  const c10::SymInt batch = q.sym_size(0);
  const c10::SymInt seq = q.sym_size(2);
  const bool per_batch = positions.dim() == 2 && positions.sym_size(0) == batch && positions.sym_size(1) == seq;
  const bool shared = positions.dim() == 1 && positions.sym_size(0) == seq;
  TORCH_CHECK(per_batch || shared, op, ": positions must have shape (batch, seq) = (", batch, ", ",
              seq, ") or (seq,) = (", seq, ") (packed sequences: (tokens,)); got ", positions.sym_sizes());
}

// The CUDA kernels' limits (the dtypes they are built for, the largest head-dim block of the
// kernel table). Checked here, for every backend that sees a CUDA tensor. (The Meta kernel sees
// meta tensors, whose device says nothing of where they will run.)
void check_cuda_limits(const char* op, const at::Tensor& q) {
  if (!q.is_cuda()) {
    return;
  }
  TORCH_CHECK(q.scalar_type() != at::kDouble, op, ": q and k of dtype ", q.scalar_type(),
              " are not supported on CUDA (float16, bfloat16 and float32 are; float64 runs on the CPU)");
  TORCH_CHECK(q.sym_size(3) <= cuda::kMaxHeadDim, op, ": head_dim above ", cuda::kMaxHeadDim,
              " is not supported on CUDA (got ", q.sym_size(3),
              "; the CPU backend has no such limit)");
}

}  // namespace

Layout parse_layout(const char* op, const std::string& layout) {
  if (layout == "bhsd") {
    return Layout::kBHSD;
  }
  if (layout == "bshd") {
    return Layout::kBSHD;
  }
  TORCH_CHECK(layout == "thd", op, ": layout must be \"bhsd\", \"bshd\" or \"thd\"; got \"", layout, "\"");
  return Layout::kTHD;
}

int64_t heads_dim(Layout layout) { return layout == Layout::kBSHD ? 2 : 1; }

at::Tensor as_bhsd(const at::Tensor& t, Layout layout) {
  switch (layout) {
    case Layout::kBHSD:
      return t;
    case Layout::kBSHD:
      return t.transpose(1, 2);
    case Layout::kTHD:
      return t.unsqueeze(0).transpose(1, 2);  // one sequence of T tokens
  }
  return t;
}

RopeInputs check_and_normalize(const char* op, const at::Tensor& q_in, const at::Tensor& k_in,
                               const at::Tensor& cos, const at::Tensor& sin,
                               const std::optional<at::Tensor>& positions, const Options& options,
                               Direction direction) {
  const Layout layout = parse_layout(op, options.layout);
  const int64_t dims = layout == Layout::kTHD ? 3 : 4;
  TORCH_CHECK(q_in.dim() == dims, op, ": q must be ", layout_shape(layout), "; got ", q_in.dim(),
              "-D with shape ", q_in.sym_sizes());
  TORCH_CHECK(k_in.dim() == dims, op, ": k must be ", layout_shape(layout), "; got ", k_in.dim(),
              "-D with shape ", k_in.sym_sizes());
  const at::Tensor q = as_bhsd(q_in, layout);
  const at::Tensor k = as_bhsd(k_in, layout);
  check_qk(op, q, k);
  check_cuda_limits(op, q);
  const c10::SymInt head_dim = q.sym_size(3);
  const c10::SymInt rotary_half = rotary_half_of(op, options.rotary_dim, head_dim);
  const at::Tensor cos3 = as_tables(op, "cos", cos, q.sym_size(0));
  const at::Tensor sin3 = as_tables(op, "sin", sin, q.sym_size(0));
  check_table(op, q, cos3, sin3, rotary_half, options.rotary_dim.has_value());
  check_packed(op, q, options, layout, positions);

  RopeInputs in;
  in.layout = layout;
  in.head_dim = head_dim;
  in.rotary_half = rotary_half;
  const bool interleaved_out = options.interleaved_out.value_or(options.interleaved);
  const bool backward = direction == Direction::kBackward;
  in.read_interleaved = backward ? interleaved_out : options.interleaved;
  in.write_interleaved = backward ? options.interleaved : interleaved_out;
  in.q = with_unit_last_stride(q);
  in.k = with_unit_last_stride(k);
  in.cos = with_unit_last_stride(cos3);
  in.sin = with_unit_last_stride(sin3);
  // The kernels read these as consecutive elements: a strided view is copied (n + 1 values).
  if (options.cu_seqlens.has_value()) {
    in.cu_seqlens = options.cu_seqlens->contiguous();
  }
  if (options.seqlen_offsets.has_value()) {
    in.seqlen_offsets = options.seqlen_offsets->contiguous();
  }
  if (positions.has_value()) {
    check_positions(op, q, *positions);
    in.positions = positions->dim() == 1 ? positions->unsqueeze(0).expand_symint({q.sym_size(0), q.sym_size(2)})
                                         : *positions;
  } else if (!options.cu_seqlens.has_value()) {
    // Only without positions can the table length be checked without reading device memory;
    // with positions, a row outside the table gives NaN outputs for that token (documented).
    TORCH_CHECK(cos3.sym_size(1) >= q.sym_size(2), op, ": cos and sin have ", cos3.sym_size(1),
                " rows but the sequence has ", q.sym_size(2),
                " tokens; pass a longer table or explicit positions");
  }
  return in;
}

// The strides of a fresh dense tensor with t's dimension order (outer dims by decreasing stride,
// the last dim innermost because the kernels write it contiguously). For a dense t this is the layout
// torch.empty_like(t) gives; a view with gaps (a slice of a fused qkv projection), for which
// empty_like would fall back to contiguous (B, H, S, D), keeps its (B, S, H, D) order too, so the
// attention kernel downstream sees the layout it would have seen without RoPE.
// The strides are computed here rather than by empty_like, whose fake-tensor version orders
// size-1 dims differently: this way the Meta kernel's strides equal the real ones exactly.
// SymInt-safe, for the Meta kernel under dynamic shapes.
c10::SmallVector<c10::SymInt, 4> output_strides(const at::Tensor& t) {
  const int64_t n = t.dim();
  // Outer dims ordered outermost first by decreasing stride; insertion sort keeps ties in order.
  c10::SmallVector<int64_t, 4> order(n - 1);
  std::iota(order.begin(), order.end(), 0);
  for (size_t i = 1; i < order.size(); ++i) {
    for (size_t j = i; j > 0 && t.sym_stride(order[j - 1]) < t.sym_stride(order[j]); --j) {
      std::swap(order[j - 1], order[j]);
    }
  }
  order.push_back(n - 1);
  // Dense strides in that order, innermost first: one allocation, no permuted view on top.
  c10::SmallVector<c10::SymInt, 4> strides(n);
  c10::SymInt running = 1;
  for (int64_t i = n - 1; i >= 0; --i) {
    strides[order[i]] = running;
    // As contiguous strides are computed: an empty dim counts as 1, so the strides stay
    // distinct. Only a size known to be 0 is skipped; a symbolic size adds no max() guard.
    const c10::SymInt& size = t.sym_size(order[i]);
    const std::optional<int64_t> known = size.maybe_as_int();
    if (!(known.has_value() && *known == 0)) {
      running = running * size;
    }
  }
  return strides;
}

namespace {

// A fresh dense tensor with t's dimension order: see output_strides.
at::Tensor output_like(const at::Tensor& t) {
  return at::empty_strided_symint(t.sym_sizes(), output_strides(t), t.options());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> allocate_outputs(const at::Tensor& q, const at::Tensor& k) {
  return {output_like(q), output_like(k)};
}

}  // namespace rope_kernels
