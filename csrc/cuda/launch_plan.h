// The launch plan of the RoPE kernel: from the checked inputs, the outputs and the device's
// compute capability to everything a launch needs (the cubin's arch and variant, the grid and its
// order, heads per program, the kernel's argument values). A pure function: it reads tensor
// metadata and addresses only, never the device, so the CPU tests, the tuner and the launcher all
// see the same choice (the tuner and tests through the private op rope::_launch_plan).
#pragma once

#include "cuda/kernel_table.h"
#include "rope_inputs.h"

#include <ATen/core/Tensor.h>
#include <cuda.h>

#include <cstdint>
#include <optional>
#include <string>

namespace rope_kernels::cuda {

// One specialization of the kernel, chosen from the inputs by plain arithmetic.
struct Variant {
  QkDtype qk;
  TableDtype table;
  int block_d2_index;
  bool read_interleaved;   // pairs (2i, 2i + 1) in q and k
  bool write_interleaved;  // and in the outputs
  bool aligned;
  bool even_d;  // rotary_half == BLOCK_D2: masks along the heads only
  bool narrow;

  int index() const {
    return variant_index(qk, table, block_d2_index, read_interleaved, write_interleaved, aligned, even_d, narrow);
  }
};

// The kernel's strides in launch order (aot_specs.STRIDE_PARAMS): all but the positions' are
// hinted as multiples of 16 in the aligned variants.
// Each tensor's three strides are in (batch, head, sequence) order, its dims 0, 1, 2.
enum StrideParam : int {
  kQStrideB, kQStrideH, kQStrideS,
  kKStrideB, kKStrideH, kKStrideS,
  kQOutStrideB, kQOutStrideH, kQOutStrideS,
  kKOutStrideB, kKOutStrideH, kKOutStrideS,
  kCosStrideRow, kSinStrideRow,
  kCosStrideB, kSinStrideB,
  kPosStrideB, kPosStrideS,
  kNumStrideParams
};

// rope_qk_kernel's launch parameters (contract order, aot_specs.RUNTIME_PARAMS): 8 pointers, 11
// int32, 18 strides (int32 in the aligned variants, int64 in the general ones).
constexpr int kNumPointerParams = 8;
constexpr int kNumInt32Params = 11;
constexpr int kNumKernelParams = 37;

// The kernel's parameters as locals of the exact C types the cubin reads: CUdeviceptr for
// pointers, int32_t for i32; the strides in 64 bits and, for a cubin that takes them in 32
// (the aligned variants), narrowed copies. Their addresses make the launch's argument array.
struct KernelArgs {
  // pos_ptr: positions, or cu_seqlens for packed sequences; offsets_ptr: seqlen_offsets (0: none).
  CUdeviceptr q_ptr, k_ptr, q_out_ptr, k_out_ptr, cos_ptr, sin_ptr, pos_ptr, offsets_ptr;
  // rotary_half: pairs rotated per head; copy_end: features [2 * rotary_half, copy_end) are
  // copied through; pos_kind and offsets_kind: PosKind values; n_docs: packed documents.
  int32_t seq_len, n_heads_q, n_heads_k, rotary_half, copy_end, table_rows, sin_sign, grid_order, pos_kind, n_docs,
      offsets_kind;
  int64_t strides[kNumStrideParams];
  int32_t strides32[kNumStrideParams];
};
static_assert(kNumPointerParams + kNumInt32Params + kNumStrideParams == kNumKernelParams,
              "KernelArgs must hold exactly the kernel's parameters (update the argument array with it)");

// A launch's grid and what the kernel must be told about it.
struct Grid {
  int64_t x, y, z;
  GridOrder order;
};

// What the tuner varies to time shapes the table does not hold; a launch never sets them.
struct PlanOverrides {
  std::optional<int> block_h;             // heads per program instead of the cubin's
  std::optional<bool> heads_fastest;      // program order instead of the layout's
};

struct LaunchPlan {
  int arch;                    // the built architecture whose cubins (or PTX) run (select_arch)
  bool ptx;                    // the image is that arch's PTX, compiled by the driver at load
  Variant variant;
  const KernelImage* image;    // never null: a variant that was not built is an error
  int block_h;                 // heads per program
  Grid grid;
  KernelArgs args;             // args.grid_order set from grid.order
  bool narrow_strides;         // the cubin takes 32-bit strides (args.strides32)
};

// What only the CUDA backend cannot do beyond what check_and_normalize refuses: more tokens or
// heads than the grid and the kernel's 32-bit indices take. Checked before the outputs are
// allocated, so the error comes before any work.
void check_grid_limits(const char* op, const RopeInputs& in);

// The plan of rotating in.q and in.k (sin multiplied by sin_sign: +1 forward, -1 backward) into
// q_out and k_out, (B, H, S, D) views like in.q and in.k, on a device of this capability (10 *
// major + minor). Outputs at the inputs' addresses are an in-place rotation, which leaves the
// features past rotary_dim where they are. Raises `<op>: ...` when no built kernel serves it.
LaunchPlan plan_launch(const char* op, const RopeInputs& in, const at::Tensor& q_out, const at::Tensor& k_out,
                       int sin_sign, int capability, const PlanOverrides& overrides = {});

// The built kernels that run on a device of this capability (10 * major + minor), or nullptr:
// the cubins of an exact match, else for 8.x the largest built 8.y with y <= the device's minor
// (sm_90 and later cubins are "a" targets, which run only on exactly their capability), else the
// build's PTX where its arch is not above the device's. With ROPE_FORCE_PTX=1 in the environment
// (read once), the PTX wherever it can run: the way to test that path on a GPU the cubins serve.
const ArchKernels* select_arch(int capability);

// Whether ROPE_FORCE_PTX=1 was set when the process first asked.
bool ptx_forced();

// "sm_80, sm_86, sm_89, sm_90": the architectures of this build, for error messages.
std::string built_arch_list();

}  // namespace rope_kernels::cuda
