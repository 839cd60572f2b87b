// The table of ahead-of-time compiled kernels: declared here, defined by the generated
// rope_kernel_table.cpp (kernels/build_aot.py). Both sides index the variants with
// variant_index(), and the generated file static_asserts every entry's position against it,
// so a change of order on either side fails the build instead of launching the wrong cubin.
#pragma once

#include <cstddef>

namespace rope_kernels::cuda {

enum class QkDtype : int { kFloat16 = 0, kBFloat16 = 1, kFloat32 = 2 };
constexpr int kNumQkDtypes = 3;
constexpr const char* kQkDtypeNames[kNumQkDtypes] = {"float16", "bfloat16", "float32"};  // torch's names
enum class TableDtype : int { kSameAsQk = 0, kFloat32 = 1 };
// Where a token's table row comes from: the kernel's runtime pos_kind argument (rope_kernel.py's
// POS_* values; aot_specs.POS_KINDS lists them in this order, and the generated table asserts it).
// kNone and the int kinds double as offsets_kind (no offsets, int32, int64).
enum class PosKind : int { kNone = 0, kInt32 = 1, kInt64 = 2, kCuSeqlensInt32 = 3, kCuSeqlensInt64 = 4 };
constexpr int kNumPosKinds = 5;
constexpr int kNumBlockD2 = 5;
constexpr int kBlockD2Values[kNumBlockD2] = {16, 32, 64, 128, 256};
// The largest head_dim the kernels rotate: two halves of the largest BLOCK_D2 the table holds.
// check_and_normalize refuses larger ones on CUDA, for real and fake tensors alike, and
// build_info() reports it ("cuda_kernels": {"max_head_dim": ...}).
constexpr int kMaxHeadDim = 2 * kBlockD2Values[kNumBlockD2 - 1];
constexpr int kNumVariants = 960;

// Mixed-radix position of one specialization: qk dtype (3) x table dtype (2) x BLOCK_D2 (5)
// x pairs read interleaved (2) x pairs written interleaved (2) x aligned (2) x even (2:
// rotary_half == BLOCK_D2, so the kernel masks heads only) x grid class (2: wide, narrow). Plain
// arithmetic, so choosing a kernel costs no lookup. Not every slot is built:
// aot_specs.Variant.is_built says which.
constexpr int variant_index(QkDtype qk, TableDtype table, int block_d2_index, bool read_interleaved,
                            bool write_interleaved, bool aligned, bool even_d, bool narrow) {
  int i = static_cast<int>(qk) * 2 + static_cast<int>(table);
  i = i * kNumBlockD2 + block_d2_index;
  i = i * 2 + (read_interleaved ? 1 : 0);
  i = i * 2 + (write_interleaved ? 1 : 0);
  i = i * 2 + (aligned ? 1 : 0);
  i = i * 2 + (even_d ? 1 : 0);
  return i * 2 + (narrow ? 1 : 0);
}
static_assert(variant_index(QkDtype::kFloat32, TableDtype::kFloat32, kNumBlockD2 - 1, true, true, true, true,
                            true) == kNumVariants - 1,
              "kNumVariants must count every combination of variant_index");

// A launch rotating fewer head vectors (tokens x (q heads + k heads)) than this is latency-bound
// (decode, short prefill) and takes the narrow-grid kernels, whose launch shape puts more warps on
// fewer heads; larger launches are bandwidth-bound and take the wide-grid ones (the threshold lies
// between the measured ends, small-prefill and seed-example: docs/performance.md). plan_launch
// (launch_plan.cpp) is the one place that applies it.
constexpr long long kNarrowBelowHeadVectors = 16384;

// The largest heads-per-program value (BLOCK_H) of any kernel: the launcher checks head counts
// against it before choosing one. aot_specs.MAX_BLOCK_H is the same number (the generated table
// asserts it).
constexpr int kMaxBlockH = 64;

// What the kernel's grid_order parameter says about the grid: which grid index is which
// coordinate (rope_kernel.py's GRID_* values; aot_specs.GRID_ORDERS lists them in this order,
// and the generated table asserts it).
enum class GridOrder : int {
  kFlat = 0,             // (tokens x head blocks, 1, 1), heads fastest: the kernel divides
  kHeadsFastest = 1,     // (head blocks, seq_len, batch)
  kSequenceFastest = 2,  // (seq_len, head blocks, batch)
};

struct KernelImage {
  // What cuModuleLoadData takes: a cubin, or (in kPtxKernels) NUL-terminated PTX text that the
  // driver compiles for the device at the first load. nullptr: this variant was not built.
  const unsigned char* image;
  std::size_t image_size;
  const char* function_name;   // Triton metadata.name
  int num_warps;
  int shared_bytes;            // metadata.shared
  int num_trailing_null_params;// pointer params Triton appends (global/profile scratch): passed as null
  int block_h;                 // heads per program, counted over q's heads then k's: sets the head blocks per token
  int stride_bits;             // width of the 18 stride parameters: 32 (aligned variants) or 64
};
// arch = 10*major + minor; kNumVariants entries; ptx: the images are PTX text, not cubins.
struct ArchKernels { int arch; const KernelImage* kernels; bool ptx; };
extern const ArchKernels kBuiltArchs[];  // the cubins, one entry per built arch
extern const int kNumBuiltArchs;
// The PTX of one built arch (kernels/aot_specs.ptx_arch: the newest whose PTX runs on later GPUs),
// for GPUs that no cubin runs on; kernels == nullptr where the build has none.
extern const ArchKernels kPtxKernels;
extern const char* const kTritonVersion;   // triton version the cubins were built with
// The archs the build was asked for but its Triton could not compile (optional ones), as a JSON
// list: asked for = built + skipped.
extern const char* const kSkippedArchsJson;

}  // namespace rope_kernels::cuda
