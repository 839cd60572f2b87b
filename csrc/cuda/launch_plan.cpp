#include "cuda/launch_plan.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <limits>

namespace rope_kernels::cuda {
namespace {

constexpr int64_t kInt32Max = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridYZ = 65535;  // CUDA's limit on gridDim.y and gridDim.z
constexpr int kNumHintedStrides = kPosStrideB;
static_assert(kKStrideB == kQStrideB + 3 && kQOutStrideB == kQStrideB + 6 && kKOutStrideB == kQStrideB + 9,
              "make_args fills the strides of q, k, q_out and k_out in a loop, three apart in that order");

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The programs walk (batch, sequence, head block) in memory order: heads fastest where a token's
// heads lie closer together than neighbouring tokens, as in (B, S, H, D), else sequence fastest,
// as in (B, H, S, D). Each coordinate gets its own grid dimension, so that a program finds its
// token and head block without dividing (integer division is tens of dependent instructions
// before the first address, much of a decoding kernel's run time). Sequences or batches beyond
// the 65535 that y and z hold (long context, huge head counts) take one flat dimension instead.
Grid choose_grid(const char* op, const RopeInputs& in, int64_t head_blocks, int block_h,
                 std::optional<bool> heads_fastest_override) {
  const int64_t batch = in.q.size(0);
  const int64_t seq_len = in.q.size(2);
  const bool heads_fastest = heads_fastest_override.value_or(seq_len == 1 || in.q.stride(1) <= in.q.stride(2));
  if (batch <= kMaxGridYZ) {
    if (heads_fastest && seq_len <= kMaxGridYZ) {
      return {head_blocks, seq_len, batch, GridOrder::kHeadsFastest};
    }
    if (!heads_fastest && head_blocks <= kMaxGridYZ) {
      return {seq_len, head_blocks, batch, GridOrder::kSequenceFastest};
    }
  }
  int64_t programs = 0;  // tokens <= 2^31 - 1: check_grid_limits
  TORCH_CHECK(!__builtin_mul_overflow(batch * seq_len, head_blocks, &programs) && programs <= kInt32Max, op, ": ",
              batch * seq_len, " tokens of ", in.q.size(1), " + ", in.k.size(1),
              " heads exceed the CUDA grid limit of 2^31 - 1 programs of ", block_h, " heads");
  return {programs, 1, 1, GridOrder::kFlat};
}

const char* dtype_name(QkDtype dtype) { return kQkDtypeNames[static_cast<int>(dtype)]; }

const char* pairs_name(bool interleaved) { return interleaved ? "interleaved" : "half-split"; }

QkDtype qk_dtype_of(const char* op, at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return QkDtype::kFloat16;
    case at::kBFloat16:
      return QkDtype::kBFloat16;
    case at::kFloat:
      return QkDtype::kFloat32;
    default:
      break;
  }
  // check_and_normalize refuses every other dtype on CUDA (check_cuda_limits).
  TORCH_CHECK(false, op, ": internal error: no CUDA kernel for q and k of dtype ", dtype);
  return QkDtype::kFloat32;  // not reached
}

// The table is read in q's dtype or in float32; for float32 q both are the same kernel.
TableDtype table_dtype_of(const char* op, at::ScalarType table, at::ScalarType qk) {
  if (table == qk) {
    return TableDtype::kSameAsQk;
  }
  TORCH_CHECK(table == at::kFloat, op, ": cos and sin must be float32 or q's dtype (", qk, "); got ", table);
  return TableDtype::kFloat32;
}

// The smallest BLOCK_D2 >= rotary_half; check_and_normalize refuses a larger head_dim on CUDA.
int block_d2_index_of(int64_t rotary_half) {
  int index = 0;
  while (index < kNumBlockD2 - 1 && kBlockD2Values[index] < rotary_half) {
    ++index;
  }
  return index;
}

// Where each token's row comes from: positions, the packed documents' boundaries, or its index.
PosKind positions_kind_of(const RopeInputs& in) {
  if (in.cu_seqlens.has_value()) {
    return in.cu_seqlens->scalar_type() == at::kInt ? PosKind::kCuSeqlensInt32 : PosKind::kCuSeqlensInt64;
  }
  if (!in.positions.has_value()) {
    return PosKind::kNone;
  }
  return in.positions->scalar_type() == at::kInt ? PosKind::kInt32 : PosKind::kInt64;
}

PosKind offsets_kind_of(const RopeInputs& in) {
  if (!in.seqlen_offsets.has_value()) {
    return PosKind::kNone;
  }
  return in.seqlen_offsets->scalar_type() == at::kInt ? PosKind::kInt32 : PosKind::kInt64;
}

// A size-1 dimension is only ever indexed at 0, so its stride is irrelevant: passing 0 lets
// views such as a single-head slice still qualify for the aligned variant, and the kernel gets
// exactly the values the aligned variant's divisibility hints were checked against.
int64_t kernel_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 ? 0 : t.stride(dim);
}

CUdeviceptr device_address(const at::Tensor& t) {
  return static_cast<CUdeviceptr>(reinterpret_cast<std::uintptr_t>(t.data_ptr()));
}

int32_t as_int32(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value >= 0 && value <= kInt32Max, op, ": ", what, " (", value,
              ") does not fit the CUDA kernel's 32-bit parameter");
  return static_cast<int32_t>(value);
}

// Every value the aligned variant hints with `:16` (16-byte aligned pointers except pos_ptr and
// offsets_ptr; rotary_half, copy_end and every q/k/out/cos/sin stride divisible by 16). A hint that does not hold gives
// wrong vector loads, so the aligned cubin is chosen only when all of them hold.
bool alignment_hints_hold(const KernelArgs& a) {
  const CUdeviceptr pointers[] = {a.q_ptr, a.k_ptr, a.q_out_ptr, a.k_out_ptr, a.cos_ptr, a.sin_ptr};
  for (const CUdeviceptr p : pointers) {
    if (p % 16 != 0) {
      return false;
    }
  }
  if (a.rotary_half % 16 != 0 || a.copy_end % 16 != 0) {
    return false;
  }
  for (int i = 0; i < kNumHintedStrides; ++i) {
    if (a.strides[i] % 16 != 0) {
      return false;
    }
  }
  return true;
}

// The aligned variants also take every stride in 32 bits (aot_specs.ALIGNED_STRIDE_BITS): they
// are chosen only when all strides fit. torch strides are never negative.
bool strides_fit_int32(const KernelArgs& a) {
  for (const int64_t stride : a.strides) {
    if (stride > kInt32Max) {
      return false;
    }
  }
  return true;
}

// The kernel reads and writes the last dimension as contiguous; rope_inputs guarantees it for
// the inputs and allocate_outputs for the outputs. Checked here because a violation would not
// fail but write out of place.
void check_unit_last_stride(const char* op, const char* name, const at::Tensor& t) {
  // An empty tensor is never read or written, whatever its strides (an empty view of an expanded
  // gradient keeps stride 0, and contiguous() leaves empty tensors as they are).
  TORCH_CHECK(t.numel() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, op, ": internal error: ", name,
              " reaches the CUDA launch with last-dimension stride ", t.stride(-1));
}

KernelArgs make_args(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                     int sin_sign) {
  const at::Tensor& q = in.q;
  const at::Tensor& k = in.k;
  KernelArgs a{};
  a.q_ptr = device_address(q);
  a.k_ptr = device_address(k);
  a.q_out_ptr = device_address(q_out);
  a.k_out_ptr = device_address(k_out);
  a.cos_ptr = device_address(in.cos);
  a.sin_ptr = device_address(in.sin);
  const PosKind pos_kind = positions_kind_of(in);
  a.pos_ptr = in.cu_seqlens.has_value()  ? device_address(*in.cu_seqlens)
              : in.positions.has_value() ? device_address(*in.positions)
                                         : 0;
  a.offsets_ptr = in.seqlen_offsets.has_value() ? device_address(*in.seqlen_offsets) : 0;

  a.seq_len = as_int32(op, "the sequence length", q.size(2));
  a.n_heads_q = as_int32(op, "the number of q heads", q.size(1));
  a.n_heads_k = as_int32(op, "the number of k heads", k.size(1));
  a.rotary_half = as_int32(op, "rotary_dim/2", in.rotary_half.expect_int());
  // In place, the features past rotary_dim stay where they are: nothing to copy.
  const bool in_place = q_out.data_ptr() == q.data_ptr() && k_out.data_ptr() == k.data_ptr();
  a.copy_end = in_place ? 2 * a.rotary_half : as_int32(op, "head_dim", q.size(3));
  a.table_rows = as_int32(op, "the number of cos/sin rows", in.cos.size(1));
  a.sin_sign = sin_sign;
  a.pos_kind = static_cast<int32_t>(pos_kind);
  a.n_docs = in.cu_seqlens.has_value() ? as_int32(op, "the number of documents", in.cu_seqlens->size(0) - 1) : 0;
  a.offsets_kind = static_cast<int32_t>(offsets_kind_of(in));

  // Batch, head and sequence strides (dims 0, 1, 2) of q, k, q_out and k_out, in that order.
  const at::Tensor* const addressed[] = {&q, &k, &q_out, &k_out};
  for (int t = 0; t < 4; ++t) {
    for (int dim = 0; dim < 3; ++dim) {
      a.strides[kQStrideB + 3 * t + dim] = kernel_stride(*addressed[t], dim);
    }
  }
  a.strides[kCosStrideRow] = kernel_stride(in.cos, 1);
  a.strides[kSinStrideRow] = kernel_stride(in.sin, 1);
  a.strides[kCosStrideB] = kernel_stride(in.cos, 0);  // 0 for one table shared by every sequence
  a.strides[kSinStrideB] = kernel_stride(in.sin, 0);
  if (in.positions.has_value()) {
    a.strides[kPosStrideB] = kernel_stride(*in.positions, 0);
    a.strides[kPosStrideS] = kernel_stride(*in.positions, 1);
  }
  return a;
}

std::string describe_variant(const Variant& v) {
  std::string out = std::string("q/k ") + dtype_name(v.qk) + ", cos/sin " +
                    (v.table == TableDtype::kFloat32 ? "float32" : dtype_name(v.qk)) + ", BLOCK_D2 " +
                    std::to_string(kBlockD2Values[v.block_d2_index]) + ", " + pairs_name(v.read_interleaved) +
                    " pairs in, " + pairs_name(v.write_interleaved) + " out" +
                    (v.aligned ? ", aligned" : ", unaligned") + (v.even_d ? ", even" : "") +
                    (v.narrow ? ", narrow grid" : ", wide grid") +
                    " (variant " + std::to_string(v.index()) + ")";
  return out;
}

}  // namespace

bool ptx_forced() {
  static const bool forced = [] {
    const char* value = std::getenv("ROPE_FORCE_PTX");
    return value != nullptr && std::string(value) == "1";
  }();
  return forced;
}

const ArchKernels* select_arch(int capability) {
  if (!ptx_forced()) {
    const int major = capability / 10;
    const int minor = capability % 10;
    const ArchKernels* best = nullptr;
    for (int i = 0; i < kNumBuiltArchs; ++i) {
      const ArchKernels& candidate = kBuiltArchs[i];
      if (candidate.arch == capability) {
        return &candidate;
      }
      // Plain sm_8y cubins run on any 8.x with x >= y (binary compatibility within a major).
      const bool runs_here = major < 9 && candidate.arch / 10 == major && candidate.arch % 10 <= minor;
      if (runs_here && (best == nullptr || candidate.arch > best->arch)) {
        best = &candidate;
      }
    }
    if (best != nullptr) {
      return best;
    }
  }
  // PTX of sm_X compiles for any GPU of capability X or later.
  if (kPtxKernels.kernels != nullptr && capability >= kPtxKernels.arch) {
    return &kPtxKernels;
  }
  return nullptr;
}

std::string built_arch_list() {
  std::string out;
  for (int i = 0; i < kNumBuiltArchs; ++i) {
    out += (i == 0 ? "sm_" : ", sm_") + std::to_string(kBuiltArchs[i].arch);
  }
  if (kNumBuiltArchs == 0) {
    out = "no GPU architectures";
  }
  if (kPtxKernels.kernels != nullptr) {
    out += " and the PTX of sm_" + std::to_string(kPtxKernels.arch) + " (for later GPUs)";
  }
  return out;
}


void check_grid_limits(const char* op, const RopeInputs& in) {
  // (Expanded views can name that many tokens or heads without holding the memory; the outputs
  // would.)
  int64_t tokens = 0;
  TORCH_CHECK(!__builtin_mul_overflow(in.q.size(0), in.q.size(2), &tokens) && tokens <= kInt32Max, op,
              ": batch * seq_len (", in.q.size(0), " * ", in.q.size(2),
              ") exceeds the CUDA grid limit of 2^31 - 1 tokens");
  // The kernel counts heads in 32 bits, up to the end of the last block of at most kMaxBlockH.
  const int64_t heads = in.q.size(1) + in.k.size(1);
  TORCH_CHECK(heads <= kInt32Max - kMaxBlockH, op, ": q and k have ", in.q.size(1), " + ", in.k.size(1),
              " heads, more than the CUDA kernel's 32-bit head index takes");
}

LaunchPlan plan_launch(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                       int sin_sign, int capability, const PlanOverrides& overrides) {
  check_grid_limits(op, in);
  check_unit_last_stride(op, "q", in.q);
  check_unit_last_stride(op, "k", in.k);
  check_unit_last_stride(op, "q_out", q_out);
  check_unit_last_stride(op, "k_out", k_out);
  check_unit_last_stride(op, "cos", in.cos);
  check_unit_last_stride(op, "sin", in.sin);

  LaunchPlan plan{};
  plan.args = make_args(op, in, q_out, k_out, sin_sign);
  const KernelArgs& args = plan.args;
  const int64_t tokens = in.q.size(0) * in.q.size(2);
  const int64_t heads = in.q.size(1) + in.k.size(1);  // 32-bit head index: check_grid_limits
  const int block_d2_index = block_d2_index_of(args.rotary_half);
  const bool strides_fit_32_bits = strides_fit_int32(args);
  const bool aligned = alignment_hints_hold(args) && strides_fit_32_bits;
  const bool narrow = tokens * heads < kNarrowBelowHeadVectors;
  // The even variants serve aligned wide grids whose rotated rows fill BLOCK_D2 (rotary_dim 32,
  // 64, 128, 256, 512): aot_specs.Variant.is_built builds exactly those.
  const bool even_d = aligned && !narrow && args.rotary_half == kBlockD2Values[block_d2_index];
  plan.variant = Variant{qk_dtype_of(op, in.q.scalar_type()),
                         table_dtype_of(op, in.cos.scalar_type(), in.q.scalar_type()),
                         block_d2_index,
                         in.read_interleaved,
                         in.write_interleaved,
                         aligned,
                         even_d,
                         narrow};

  const ArchKernels* arch = select_arch(capability);
  TORCH_CHECK(arch != nullptr, op, ": no kernel for this GPU (sm_", capability, "); this build has ",
              built_arch_list(), ptx_forced() ? ", and ROPE_FORCE_PTX=1 allows only the PTX" : "");
  plan.arch = arch->arch;
  plan.ptx = arch->ptx;
  const KernelImage& image = arch->kernels[plan.variant.index()];
  TORCH_CHECK(image.image != nullptr, op, ": this build has no sm_", arch->arch, " kernel for ",
              describe_variant(plan.variant));
  plan.image = &image;

  // A program rotates one block of block_h heads of one token, counted along q's heads followed
  // by k's (a block may hold both); see rope_kernel.py.
  TORCH_CHECK(image.block_h > 0 && image.block_h <= kMaxBlockH, op, ": internal error: the sm_", arch->arch,
              " kernel ", image.function_name, " has heads-per-program value ", image.block_h);
  plan.block_h = overrides.block_h.value_or(image.block_h);
  TORCH_CHECK(plan.block_h > 0 && plan.block_h <= kMaxBlockH, op, ": heads per program must be in [1, ",
              kMaxBlockH, "]; got ", plan.block_h);
  plan.grid = choose_grid(op, in, ceil_div(heads, plan.block_h), plan.block_h, overrides.heads_fastest);
  plan.args.grid_order = static_cast<int32_t>(plan.grid.order);

  // The strides at the width this cubin declares them (checked against its PTX at build time).
  TORCH_CHECK(image.stride_bits == 32 || image.stride_bits == 64, op, ": internal error: the sm_", arch->arch,
              " kernel ", image.function_name, " declares ", image.stride_bits, "-bit strides");
  plan.narrow_strides = image.stride_bits == 32;
  TORCH_CHECK(!plan.narrow_strides || strides_fit_32_bits, op, ": internal error: the sm_", arch->arch,
              " kernel ", image.function_name, " takes 32-bit strides, and these do not fit");
  for (int i = 0; i < kNumStrideParams; ++i) {
    plan.args.strides32[i] = static_cast<int32_t>(plan.args.strides[i]);
  }
  return plan;
}

}  // namespace rope_kernels::cuda
