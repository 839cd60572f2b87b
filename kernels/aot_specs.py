"""The specialization table of rope_qk_kernel: every variant the AOT build compiles, and how.

This is the one place that decides what gets compiled. The C++ launcher indexes the generated
table with ``variant_index`` from csrc/cuda/kernel_table.h, so the enumeration order here must
match that formula exactly (the generated sources static_assert it per variant).

No Triton import here: the build driver and the C++ emitter use this table without a compiler.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

KERNEL_NAME = "rope_qk_kernel"

# Runtime parameters of rope_qk_kernel in launch order, with the Triton type of each scalar.
# Pointer types and the width of the strides depend on the variant (see Variant.signature);
# Triton appends its own scratch pointers after these, which the launcher passes as null.
POINTER_PARAMS = ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "cos_ptr", "sin_ptr", "pos_ptr", "offsets_ptr")
I32_PARAMS = ("seq_len", "n_heads_q", "n_heads_k", "rotary_half", "copy_end", "table_rows", "sin_sign",
              "grid_order", "pos_kind", "n_docs", "offsets_kind")
STRIDE_PARAMS = (
    "q_stride_b", "q_stride_h", "q_stride_s",
    "k_stride_b", "k_stride_h", "k_stride_s",
    "q_out_stride_b", "q_out_stride_h", "q_out_stride_s",
    "k_out_stride_b", "k_out_stride_h", "k_out_stride_s",
    "cos_stride_row", "sin_stride_row",
    "cos_stride_b", "sin_stride_b",
    "pos_stride_b", "pos_stride_s",
)
# Values of grid_order, in order: which grid index is which coordinate (the GRID_* constants of
# rope_kernel.py and the GridOrder enum of kernel_table.h; the build checks both against this).
GRID_ORDERS = ("flat", "heads_fastest", "sequence_fastest")
# Values of pos_kind, in order: where a token's table row comes from (the POS_* constants of
# rope_kernel.py and the PosKind enum of kernel_table.h; the build checks both). A runtime
# argument: written so that it costs wide grids nothing measurable, it spares the table a variant
# per kind (docs/performance.md).
POS_KINDS = ("none", "int32", "int64", "cu_seqlens_int32", "cu_seqlens_int64")
RUNTIME_PARAMS = POINTER_PARAMS + I32_PARAMS + STRIDE_PARAMS
NUM_RUNTIME_PARAMS = len(RUNTIME_PARAMS)  # 37, as the launcher passes them
CONSTEXPR_PARAMS = ("BLOCK_D2", "BLOCK_H", "EVEN_D", "READ_INTERLEAVED", "WRITE_INTERLEAVED", "NARROW_GRID")

# What the launcher may promise in an aligned variant: every pointer but pos_ptr and offsets_ptr
# is 16-byte aligned, and rotary_half, copy_end and every q/k/out/cos/sin stride is a multiple of
# 16 elements. These are the hints that turn the loads and stores into 16-byte vector accesses.
ALIGNED_HINTED_PARAMS = (
    ("q_ptr", "k_ptr", "q_out_ptr", "k_out_ptr", "cos_ptr", "sin_ptr", "rotary_half", "copy_end")
    + STRIDE_PARAMS[:16]
)
# An aligned variant also takes every stride as a 32-bit integer, which the launcher promises by
# choosing it only when all of them fit. Multiplied by 32-bit indices, a 32-bit stride gives the
# 64-bit offset in one widening multiply instead of a 64-bit one (several instructions, many per
# program; docs/performance.md has the measurement). The general variants keep 64-bit strides,
# so any view still runs.
ALIGNED_STRIDE_BITS = 32
GENERAL_STRIDE_BITS = 64

# Index order of each axis is fixed by the enums of kernel_table.h.
QK_DTYPES = ("fp16", "bf16", "fp32")  # QkDtype
TABLE_DTYPES = ("same", "fp32")  # TableDtype: kSameAsQk, kFloat32
BLOCK_D2_VALUES = (16, 32, 64, 128, 256)  # kBlockD2Values: head_dim up to 512
# Pair conventions of what is read and of what is written: (i, i + rotary_half) or (2i, 2i + 1).
# Specializations: an interleaved row is loaded whole and split in registers, a half-split one as
# two half rows, and the two compile to different memory access patterns.
INTERLEAVED = (False, True)
ALIGNED = (False, True)
# Whether rotary_half equals BLOCK_D2, so that q and k need a mask along the heads only (a mask of
# heads and features both is measurably slower on wide grids: docs/performance.md). Used by
# aligned wide-grid launches only; see Variant.is_built.
EVEN_D = (False, True)
# An aligned launch promises rotary_half a multiple of this; so where no other multiple lies between
# BLOCK_D2 and the BLOCK_D2 below it (16 and 32), every aligned launch is an even one.
ALIGNED_HALF_DIM_MULTIPLE = 16
# Grid classes: "wide" launches (many programs: bandwidth-bound) and "narrow" ones (few programs:
# decode and short prefill, latency-bound) get their own launch shape. Which launch is which is
# the launcher's rule (kNarrowBelowHeadVectors in csrc/cuda/kernel_table.h; rope::_launch_plan).
GRID_CLASSES = ("wide", "narrow")

NUM_VARIANTS = (len(QK_DTYPES) * len(TABLE_DTYPES) * len(BLOCK_D2_VALUES) * len(INTERLEAVED) ** 2
                * len(ALIGNED) * len(EVEN_D) * len(GRID_CLASSES))

# Architectures (10 * major + minor). The first group must compile; the second is built only
# where the installed Triton (its LLVM and bundled ptxas) knows it.
REQUIRED_ARCHS = (80, 86, 89, 90)
OPTIONAL_ARCHS = (100, 120)
DEFAULT_ARCHS = REQUIRED_ARCHS + OPTIONAL_ARCHS
# Triton compiles sm_90 and later to arch-specific PTX (sm_90a, sm_100a, sm_120a), which only a
# GPU of exactly that architecture runs; the PTX of earlier ones (plain sm_89 and below) the
# driver compiles for any later GPU. So the PTX kept for GPUs newer than the build is that of the
# newest arch built below this one (ptx_arch).
FIRST_ARCH_SPECIFIC_PTX = 90


# The largest heads-per-program value a table may hold. A sequence-fastest grid holds at most 65535
# head blocks in its y extent; the launcher falls back to the flat grid above that, and
# tests/test_forward.py checks the fallback with a head count past 65535 blocks of this size.
MAX_BLOCK_H = 64


@dataclasses.dataclass(frozen=True)
class LaunchShape:
    """Heads per program (BLOCK_H) and warps per program."""

    block_h: int
    num_warps: int

    def __post_init__(self) -> None:
        # tl.arange needs a power of two.
        if not (1 <= self.block_h <= MAX_BLOCK_H and self.block_h & (self.block_h - 1) == 0):
            raise ValueError(f"block_h {self.block_h} must be a power of two <= {MAX_BLOCK_H}")


# Key: (bytes per q/k element, BLOCK_D2, narrow grid). Chosen with `python -m kernels.tune` on an
# H200 (sm_90); docs/performance.md has the figures. Where no workload of the benchmark measured a
# key, the entry keeps the per-thread work of its measured neighbour (the same pairs of elements
# per thread and warps), marked "by analogy".
SM90_LAUNCH_SHAPES: dict[tuple[int, int, bool], LaunchShape] = {
    # 16-bit q/k, wide grids: two warps, 8 to 16 pairs per thread (16-byte accesses).
    (2, 16, False): LaunchShape(block_h=32, num_warps=2),  # by analogy
    (2, 32, False): LaunchShape(block_h=32, num_warps=2),  # hd64-mha
    (2, 64, False): LaunchShape(block_h=16, num_warps=2),  # llama8b-train, long-128k, seed-example
    (2, 128, False): LaunchShape(block_h=4, num_warps=2),  # hd256-gemma
    (2, 256, False): LaunchShape(block_h=2, num_warps=2),  # by analogy
    # 16-bit q/k, narrow grids: four warps, 4 pairs per thread (more loads in flight per program).
    (2, 16, True): LaunchShape(block_h=32, num_warps=4),  # by analogy
    (2, 32, True): LaunchShape(block_h=16, num_warps=4),  # by analogy
    (2, 64, True): LaunchShape(block_h=8, num_warps=4),  # decode-b1, decode-b64, small-prefill
    (2, 128, True): LaunchShape(block_h=4, num_warps=4),  # by analogy
    (2, 256, True): LaunchShape(block_h=2, num_warps=4),  # by analogy
    # 32-bit q/k, wide grids: four warps, 4 pairs per thread (16-byte accesses).
    (4, 16, False): LaunchShape(block_h=32, num_warps=4),  # by analogy
    (4, 32, False): LaunchShape(block_h=16, num_warps=4),  # by analogy
    (4, 64, False): LaunchShape(block_h=8, num_warps=4),  # fp32
    (4, 128, False): LaunchShape(block_h=4, num_warps=4),  # by analogy
    (4, 256, False): LaunchShape(block_h=2, num_warps=4),  # by analogy
    # 32-bit q/k, narrow grids: four warps, 4 pairs per thread.
    (4, 16, True): LaunchShape(block_h=32, num_warps=4),  # by analogy
    (4, 32, True): LaunchShape(block_h=16, num_warps=4),  # by analogy
    (4, 64, True): LaunchShape(block_h=8, num_warps=4),  # by analogy
    (4, 128, True): LaunchShape(block_h=4, num_warps=4),  # by analogy
    (4, 256, True): LaunchShape(block_h=2, num_warps=4),  # by analogy
}

# Per architecture; an architecture not listed (nobody has measured it yet) gets sm_90's shapes.
MEASURED_LAUNCH_SHAPES: dict[int, dict[tuple[int, int, bool], LaunchShape]] = {90: SM90_LAUNCH_SHAPES}
DEFAULT_LAUNCH_SHAPES = SM90_LAUNCH_SHAPES

ELEMENT_SIZES = {"fp16": 2, "bf16": 2, "fp32": 4}


def launch_shape(arch: int, qk_dtype: str, block_d2: int, narrow: bool) -> LaunchShape:
    table = MEASURED_LAUNCH_SHAPES.get(arch, DEFAULT_LAUNCH_SHAPES)
    return table[(ELEMENT_SIZES[qk_dtype], block_d2, narrow)]


@dataclasses.dataclass(frozen=True)
class Variant:
    """One specialization, named by its index on each axis of the table."""

    qk: int
    table: int
    block: int
    read_interleaved: bool
    write_interleaved: bool
    aligned: bool
    even_d: bool
    narrow: bool

    @property
    def index(self) -> int:
        """Position in the generated table: the same formula as variant_index() in C++."""
        i = self.qk
        i = i * len(TABLE_DTYPES) + self.table
        i = i * len(BLOCK_D2_VALUES) + self.block
        i = i * len(INTERLEAVED) + int(self.read_interleaved)
        i = i * len(INTERLEAVED) + int(self.write_interleaved)
        i = i * len(ALIGNED) + int(self.aligned)
        i = i * len(EVEN_D) + int(self.even_d)
        return i * len(GRID_CLASSES) + int(self.narrow)

    @property
    def is_built(self) -> bool:
        # fp32 q with an fp32 table is already "same as qk": the second slot would duplicate it.
        if QK_DTYPES[self.qk] == "fp32" and TABLE_DTYPES[self.table] == "fp32":
            return False
        # The launcher asks for an even variant only for aligned wide-grid launches (on the
        # latency-bound narrow grids the mask made no difference that repeated), and for those
        # it always asks where alignment leaves rotary_half no other value than BLOCK_D2.
        if self.even_d:
            return self.aligned and not self.narrow
        return not (self.aligned and not self.narrow and self.alignment_makes_even)

    @property
    def alignment_makes_even(self) -> bool:
        """Whether every rotary_half an aligned launch may bring to this BLOCK_D2 equals it."""
        below = BLOCK_D2_VALUES[self.block - 1] if self.block > 0 else 0
        return self.block_d2 - ALIGNED_HALF_DIM_MULTIPLE <= below

    @property
    def block_d2(self) -> int:
        return BLOCK_D2_VALUES[self.block]

    def launch(self, arch: int) -> LaunchShape:
        return launch_shape(arch, QK_DTYPES[self.qk], self.block_d2, self.narrow)

    def key(self) -> dict[str, object]:
        """Readable description, used in the manifest and in cache keys."""
        return {
            "qk_dtype": QK_DTYPES[self.qk],
            "table_dtype": TABLE_DTYPES[self.table],
            "block_d2": self.block_d2,
            "read_interleaved": self.read_interleaved,
            "write_interleaved": self.write_interleaved,
            "aligned": self.aligned,
            "even_d": self.even_d,
            "grid": GRID_CLASSES[int(self.narrow)],
        }

    def signature(self) -> dict[str, str]:
        """Triton signature of every parameter, constexprs marked as such."""
        qk = "*" + QK_DTYPES[self.qk]
        table = qk if TABLE_DTYPES[self.table] == "same" else "*fp32"
        # Index tensors of either width come through *i32 pointers (the kernel casts for int64);
        # without them the launcher passes 0.
        sig = dict(zip(POINTER_PARAMS, (qk, qk, qk, qk, table, table, "*i32", "*i32"), strict=True))
        sig.update({name: "i32" for name in I32_PARAMS})
        sig.update({name: f"i{self.stride_bits}" for name in STRIDE_PARAMS})
        sig.update({name: "constexpr" for name in CONSTEXPR_PARAMS})
        return sig

    @property
    def stride_bits(self) -> int:
        """Width of the stride parameters (32 in the aligned variants, 64 in the general ones)."""
        return ALIGNED_STRIDE_BITS if self.aligned else GENERAL_STRIDE_BITS

    def param_bits(self) -> list[int]:
        """Register width of each runtime parameter, in launch order (what the PTX entry declares
        and the launcher's argument array must match)."""
        return [64] * len(POINTER_PARAMS) + [32] * len(I32_PARAMS) + [self.stride_bits] * len(STRIDE_PARAMS)

    def constexprs(self, arch: int) -> dict[str, object]:
        return {
            "BLOCK_D2": self.block_d2,
            "BLOCK_H": self.launch(arch).block_h,
            "EVEN_D": self.even_d,
            "READ_INTERLEAVED": self.read_interleaved,
            "WRITE_INTERLEAVED": self.write_interleaved,
            "NARROW_GRID": self.narrow,
        }

    def divisible_by_16(self) -> tuple[str, ...]:
        """Parameters hinted as 16-byte aligned pointers or multiples of 16."""
        return ALIGNED_HINTED_PARAMS if self.aligned else ()

    def label(self) -> str:
        """Short name for messages and comments, e.g. bf16/fp32/d64/half-interleaved/aligned/even/wide."""
        pairs = "-".join("interleaved" if i else "half" for i in (self.read_interleaved, self.write_interleaved))
        return "/".join((QK_DTYPES[self.qk], TABLE_DTYPES[self.table], f"d{self.block_d2}",
                         pairs, "aligned" if self.aligned else "unaligned",
                         "even" if self.even_d else "masked", GRID_CLASSES[int(self.narrow)]))


def all_variants() -> Iterator[Variant]:
    """Every slot of the table, built or not, in table order."""
    for qk in range(len(QK_DTYPES)):
        for table in range(len(TABLE_DTYPES)):
            for block in range(len(BLOCK_D2_VALUES)):
                for read_interleaved in INTERLEAVED:
                    for write_interleaved in INTERLEAVED:
                        for aligned in ALIGNED:
                            for even_d in EVEN_D:
                                for narrow in (False, True):
                                    yield Variant(qk, table, block, read_interleaved, write_interleaved, aligned,
                                                  even_d, narrow)


def built_variants() -> list[Variant]:
    return [v for v in all_variants() if v.is_built]


def is_optional_arch(arch: int) -> bool:
    """Whether a compile failure for this arch skips it instead of failing the build."""
    return arch not in REQUIRED_ARCHS


def ptx_arch(archs: list[int]) -> int | None:
    """The arch whose PTX is embedded for GPUs that no cubin of `archs` runs on, or None."""
    portable = [arch for arch in archs if arch < FIRST_ARCH_SPECIFIC_PTX]
    return max(portable) if portable else None
