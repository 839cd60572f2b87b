"""Correctness self-check of torch.ops.rope.fused_qk against a float64 reference.

`python -m rope_kernels` runs it on every device present, so a broken build, a missing or
misbehaving kernel for this GPU, or a wrong layout shows up here rather than as a silently worse
training run. Each case draws fresh random inputs, runs the op forward and backward, and compares
with a plain float64 formula computed on the CPU (independent of the device's arithmetic).
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from .testing import (FUSED_KERNEL, cos_sin_tables, dtype_name, error_ratio, random_qk,
                      reference_rope_and_size)

# The allowance (rope_kernels.testing.FUSED_KERNEL): the op computes in fp32 (fp64 for fp64
# inputs); a rotated element is a sum of two products, so a few rounding steps of that precision,
# relative to the size of the products, plus one rounding to the output dtype bound its error.


@dataclasses.dataclass(frozen=True)
class Case:
    """One self-check configuration: shapes, dtypes, memory layout and position mode."""

    batch: int
    seq: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    # "bhsd": contiguous (B, H, S, D); "bshd": transposed view of a (B, S, H, D) projection output;
    # "qkv": q and k sliced out of one fused (B, S, Hq + 2*Hk, D) projection (not dense).
    layout: str
    # True: the Hugging Face full-width (S_max, D) table; False: the half table (S_max, D/2).
    full_table: bool
    # None: tables in q's dtype (what Hugging Face passes); otherwise this dtype (fp32 tables).
    table_dtype: Optional[torch.dtype]
    table_rows: int
    # "none": token s uses row s; "bs": (B, S) int64; "s": (S,) int32 shared by the batch;
    # "out_of_range": (B, S) int64 with a few invalid rows, whose tokens must come out NaN.
    positions: str
    # Size-1 dims in front of the table, as Hugging Face sometimes keeps them: the op squeezes them.
    table_leading_ones: int = 0
    # fp64 and head dims above 512 are CPU-only by contract.
    cpu_only: bool = False
    # The op's conventions (docs/conventions.md): partial rotary and the pairing of features.
    rotary_dim: Optional[int] = None
    interleaved: bool = False
    interleaved_out: Optional[bool] = None

    def options(self) -> Dict[str, Any]:
        return {"rotary_dim": self.rotary_dim, "interleaved": self.interleaved,
                "interleaved_out": self.interleaved_out}


def self_check_cases() -> List[Case]:
    """A handful of cases that together touch every input path the op has."""
    return [
        # The main training shape in small: GQA on transposed views, HF bf16 full-width table.
        Case(2, 64, 8, 2, 128, torch.bfloat16, "bshd", True, None, 64, "none"),
        # Contiguous (B, H, S, D) fp32 with a half table that has more rows than tokens.
        Case(2, 33, 4, 4, 64, torch.float32, "bhsd", False, None, 40, "none"),
        # Packed sequences: per-token rows from a longer table; D/2 = 48 exercises a masked block.
        Case(3, 17, 6, 2, 96, torch.bfloat16, "bshd", False, torch.float32, 256, "bs"),
        # MQA slices of a fused projection, (S,) int32 positions, fp32 table with leading size-1 dims.
        Case(2, 40, 4, 1, 32, torch.float16, "qkv", True, torch.float32, 128, "s", 2),
        # The largest head dim the GPU kernels take.
        Case(1, 8, 2, 1, 512, torch.bfloat16, "bhsd", False, None, 8, "none"),
        # Partial rotary (Phi-4-mini: 96 of 128 features; the rest copied through).
        Case(2, 24, 8, 2, 128, torch.bfloat16, "bshd", True, None, 24, "bs", rotary_dim=96),
        # Interleaved pairs over half the head (GLM-4), on slices of a fused projection.
        Case(2, 16, 4, 2, 128, torch.float16, "qkv", False, torch.float32, 16, "none", rotary_dim=64,
             interleaved=True),
        # Interleaved pairs in, half-split out (DeepSeek-V3), a head size whose half is not a power of two.
        Case(1, 8, 2, 1, 192, torch.bfloat16, "bshd", False, None, 8, "s", interleaved=True, interleaved_out=False),
        # Invalid rows (negative, S_max, and one past 2^32 that would alias row 1 if truncated).
        Case(2, 8, 2, 2, 16, torch.float32, "bshd", True, None, 12, "out_of_range"),
        # fp64 and the smallest head dim: the CPU implementation's exact path.
        Case(1, 16, 2, 2, 2, torch.float64, "bhsd", True, None, 16, "bs", 0, True),
    ]


def describe(case: Case) -> str:
    """A short, column-aligned description of a case for its result line."""
    table_dtype = case.table_dtype if case.table_dtype is not None else case.dtype
    table = "{} {}".format("full" if case.full_table else "half", dtype_name(table_dtype))
    layout = {"bhsd": "(B,H,S,D)", "bshd": "(B,S,H,D).T", "qkv": "fused-qkv"}[case.layout]
    shape = "B{} S{} H{}/{} D{}".format(case.batch, case.seq, case.heads_q, case.heads_k, case.head_dim)
    pairs = "interleaved" if case.interleaved else "half"
    out_pairs = case.interleaved if case.interleaved_out is None else case.interleaved_out
    if out_pairs != case.interleaved:
        pairs += "->" + ("interleaved" if out_pairs else "half")
    rotary = "" if case.rotary_dim is None else " R{}".format(case.rotary_dim)
    return "{:<5} {:<20} {:<12} table {:<10} pos {:<12} {}{}".format(
        dtype_name(case.dtype), shape, layout, table, case.positions, pairs, rotary)


def random_tensor(shape: List[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn on the CPU, so every device of one run sees the same inputs."""
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def make_qk(case: Case, gen: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, S, D) and k (B, Hk, S, D) in the case's layout (rope_kernels.testing.random_qk),
    both leaves requiring grad that keep the layout (detach keeps strides and storage offset)."""
    q, k = random_qk(case.layout, case.batch, case.heads_q, case.heads_k, case.seq, case.head_dim,
                     case.dtype, device, generator=gen)
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def make_tables(case: Case, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The case's cos/sin tables, with any leading size-1 dims it asks for."""
    table_dtype = case.table_dtype if case.table_dtype is not None else case.dtype
    rotary = case.head_dim if case.rotary_dim is None else case.rotary_dim
    cos, sin = cos_sin_tables(case.table_rows, rotary, full_width=case.full_table,
                              dtype=table_dtype, device=device)
    for _ in range(case.table_leading_ones):
        cos, sin = cos.unsqueeze(0), sin.unsqueeze(0)
    return cos, sin


def make_positions(case: Case, gen: torch.Generator, device: torch.device) -> Optional[torch.Tensor]:
    """The case's positions tensor, or None when tokens use their own index as row."""
    rows = case.table_rows
    if case.positions == "none":
        return None
    if case.positions == "s":
        return torch.randint(0, rows, [case.seq], generator=gen, dtype=torch.int32).to(device)
    positions = torch.randint(0, rows, [case.batch, case.seq], generator=gen, dtype=torch.int64)
    if case.positions == "out_of_range":
        positions[0, 1] = -1
        positions[case.batch - 1, case.seq - 1] = rows
        # Truncated to 32 bits this would be row 1, a valid row: it must still give NaN.
        positions[case.batch - 1, 0] = 2 ** 32 + 1
    return positions.to(device)


def dimension_order(t: torch.Tensor) -> List[int]:
    """Dims of size > 1 from outermost to innermost in memory; size-1 dims have no place."""
    dims = [i for i in range(t.dim()) if t.shape[i] > 1]
    return sorted(dims, key=lambda i: -t.stride(i))


def dtype_shape_problems(name: str, x: torch.Tensor, out: torch.Tensor) -> List[str]:
    """A message when out does not have x's dtype and shape (outputs and gradients both must)."""
    if out.dtype == x.dtype and out.shape == x.shape:
        return []
    return ["{} is {} {}, expected {} {}".format(name, out.dtype, list(out.shape), x.dtype, list(x.shape))]


def layout_problems(name: str, x: torch.Tensor, out: torch.Tensor) -> List[str]:
    """What is wrong with an output's dtype, shape, memory layout or aliasing, as messages."""
    problems = dtype_shape_problems(name, x, out)
    if problems or out.numel() == 0:
        return problems
    if out.stride(-1) != 1:
        problems.append("{} last dim stride {} != 1".format(name, out.stride(-1)))
    # The attention kernel downstream expects the layout it would have had without RoPE.
    if dimension_order(out) != dimension_order(x):
        problems.append("{} strides {} do not keep the input's dimension order (strides {})".format(
            name, list(out.stride()), list(x.stride())))
    if out.data_ptr() == x.data_ptr():
        problems.append("{} aliases its input".format(name))
    return problems


@dataclasses.dataclass
class CaseResult:
    """Outcome of one case: error ratios (<= 1 passes) and any other problem found."""

    forward_ratio: float
    backward_ratio: float
    problems: List[str]

    def passed(self) -> bool:
        return not self.problems and self.forward_ratio <= 1.0 and self.backward_ratio <= 1.0


def run_case(case: Case, device: torch.device, gen: torch.Generator) -> CaseResult:
    """Forward and backward of the op on one case, compared with the float64 reference."""
    q, k = make_qk(case, gen, device)
    cos, sin = make_tables(case, device)
    positions = make_positions(case, gen, device)

    options = case.options()
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, positions, **options)
    problems = layout_problems("q_out", q, q_out) + layout_problems("k_out", k, k_out)
    if dtype_shape_problems("q_out", q, q_out) or dtype_shape_problems("k_out", k, k_out):
        return CaseResult(math.nan, math.nan, problems)  # nothing to compare element by element
    q_ref, q_size = reference_rope_and_size(q, cos, sin, positions, inverse=False, **options)
    k_ref, k_size = reference_rope_and_size(k, cos, sin, positions, inverse=False, **options)
    forward = max(error_ratio(q_out, q_ref, q_size, FUSED_KERNEL), error_ratio(k_out, k_ref, k_size, FUSED_KERNEL))

    # d/dx sum(out * w) = R(-angle) w: the backward must be the inverse rotation of the weights.
    w_q = random_tensor(list(q_out.shape), case.dtype, gen).to(device)
    w_k = random_tensor(list(k_out.shape), case.dtype, gen).to(device)
    loss = (q_out * w_q).sum() + (k_out * w_k).sum()
    grad_q, grad_k = torch.autograd.grad(loss, [q, k])
    # The layout of a gradient is autograd's business (it may reach q through a view).
    grad_problems = dtype_shape_problems("grad_q", q, grad_q) + dtype_shape_problems("grad_k", k, grad_k)
    if grad_problems:
        return CaseResult(forward, math.nan, problems + grad_problems)
    gq_ref, gq_size = reference_rope_and_size(w_q, cos, sin, positions, inverse=True, **options)
    gk_ref, gk_size = reference_rope_and_size(w_k, cos, sin, positions, inverse=True, **options)
    backward = max(error_ratio(grad_q, gq_ref, gq_size, FUSED_KERNEL), error_ratio(grad_k, gk_ref, gk_size, FUSED_KERNEL))
    return CaseResult(forward, backward, problems)


def format_ratio(ratio: float) -> str:
    """An error ratio in a fixed width; "-" when it could not be measured."""
    if math.isnan(ratio):
        return "  -  "
    if ratio >= 100.0:  # far off: the magnitude is all that matters, and it must not break columns
        return "{:5.0e}".format(ratio)
    return "{:5.2f}".format(ratio)


def run_self_check(device: torch.device, seed: int) -> bool:
    """Runs every case on device, prints one line each, and says whether all passed."""
    all_passed = True
    for case in self_check_cases():
        if case.cpu_only and device.type != "cpu":
            continue
        # The same seed on every device: a case that fails on one device only points at that device.
        gen = torch.Generator().manual_seed(seed)
        label = "{:<7} {}".format(str(device), describe(case))
        try:
            result = run_case(case, device, gen)
        except Exception as error:  # report every case, not just the first broken one
            first_line = (str(error).strip().splitlines() or [""])[0]
            print("{} FAILED: {}: {}".format(label, type(error).__name__, first_line))
            all_passed = False
            continue
        verdict = "ok" if result.passed() else "FAILED"
        print("{} fwd {} bwd {}  {}".format(
            label, format_ratio(result.forward_ratio), format_ratio(result.backward_ratio), verdict))
        for problem in result.problems:
            print("        " + problem)
        all_passed = all_passed and result.passed()
    return all_passed
