"""Correctness self-check of torch.ops.rope.fused_qk against a float64 reference.

`python -m rope_kernels` runs it on every device present, so a broken build, a missing or
misbehaving kernel for this GPU, or a wrong layout shows up here rather than as a silently worse
training run. Each case draws fresh random inputs, runs the op forward and backward, and compares
with a plain float64 formula computed on the CPU (independent of the device's arithmetic).
"""

import dataclasses
import math
from typing import List, Optional, Tuple

import torch

# RoPE frequencies as in Llama / Hugging Face: theta_i = base^(-2i/D).
ROPE_BASE: float = 10000.0

# The op computes in fp32 (fp64 for fp64 inputs); a rotated element is a sum of two products, so a
# few rounding steps of that precision, relative to the size of the products, bound its error.
MATH_ROUNDING_STEPS: float = 8.0


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
    # fp64 and head dims above 256 are CPU-only by contract.
    cpu_only: bool = False


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
        Case(1, 8, 2, 1, 256, torch.bfloat16, "bhsd", False, None, 8, "none"),
        # Invalid rows (negative, S_max, and one past 2^32 that would alias row 1 if truncated).
        Case(2, 8, 2, 2, 16, torch.float32, "bshd", True, None, 12, "out_of_range"),
        # fp64 and the smallest head dim: the CPU implementation's exact path.
        Case(1, 16, 2, 2, 2, torch.float64, "bhsd", True, None, 16, "bs", 0, True),
    ]


def short_dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bf16", torch.float32 -> "fp32": narrow columns."""
    return str(dtype).replace("torch.", "").replace("bfloat", "bf").replace("float", "fp")


def describe(case: Case) -> str:
    """A short, column-aligned description of a case for its result line."""
    table_dtype = case.table_dtype if case.table_dtype is not None else case.dtype
    table = "{} {}".format("full" if case.full_table else "half", short_dtype_name(table_dtype))
    layout = {"bhsd": "(B,H,S,D)", "bshd": "(B,S,H,D).T", "qkv": "fused-qkv"}[case.layout]
    shape = "B{} S{} H{}/{} D{}".format(case.batch, case.seq, case.heads_q, case.heads_k, case.head_dim)
    return "{:<5} {:<20} {:<12} table {:<10} pos {:<12}".format(
        short_dtype_name(case.dtype), shape, layout, table, case.positions)


def rope_tables(rows: int, head_dim: int, full_width: bool, dtype: torch.dtype,
                device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE cos/sin tables: (rows, D/2), or (rows, D) with the halves repeated as HF builds them."""
    # Angles in float64 so each table entry is the correctly rounded cos/sin of the true angle.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = 1.0 / (ROPE_BASE ** exponents)
    angles = torch.outer(torch.arange(rows, dtype=torch.float64, device=device), inv_freq)
    if full_width:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def random_tensor(shape: List[int], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Standard normal values drawn on the CPU, so every device of one run sees the same inputs."""
    draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=gen, dtype=draw_dtype).to(dtype)


def make_qk(case: Case, gen: torch.Generator, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, S, D) and k (B, Hk, S, D) in the case's layout, both requiring grad."""
    b, s, hq, hk, d = case.batch, case.seq, case.heads_q, case.heads_k, case.head_dim
    if case.layout == "bhsd":
        q = random_tensor([b, hq, s, d], case.dtype, gen).to(device).requires_grad_()
        k = random_tensor([b, hk, s, d], case.dtype, gen).to(device).requires_grad_()
        return q, k
    if case.layout == "bshd":
        # The layout a projection produces: the op must read it where it lies.
        q_base = random_tensor([b, s, hq, d], case.dtype, gen).to(device).requires_grad_()
        k_base = random_tensor([b, s, hk, d], case.dtype, gen).to(device).requires_grad_()
        return q_base.transpose(1, 2), k_base.transpose(1, 2)
    # One fused projection output holding q, k and v heads side by side: q and k are strided
    # slices of it with gaps (the v heads) between token rows.
    fused = random_tensor([b, s, hq + 2 * hk, d], case.dtype, gen).to(device).requires_grad_()
    return fused[:, :, :hq].transpose(1, 2), fused[:, :, hq:hq + hk].transpose(1, 2)


def make_tables(case: Case, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The case's cos/sin tables, with any leading size-1 dims it asks for."""
    table_dtype = case.table_dtype if case.table_dtype is not None else case.dtype
    cos, sin = rope_tables(case.table_rows, case.head_dim, case.full_table, table_dtype, device)
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


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: Optional[torch.Tensor], inverse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """RoPE in float64 on the CPU: (result, size of the products summed into each element).

    inverse=True rotates by -angle, which is the gradient of the forward rotation.
    The second tensor lets the caller bound the fp32 rounding the op may add.
    """
    half = x.shape[-1] // 2
    cos2d = cos.detach().cpu().reshape(cos.shape[-2], cos.shape[-1])[:, :half].double()
    sin2d = sin.detach().cpu().reshape(sin.shape[-2], sin.shape[-1])[:, :half].double()
    rows = cos2d.shape[0]
    batch, seq = x.shape[0], x.shape[2]
    if positions is None:
        index = torch.arange(seq).expand(batch, seq)
    else:
        index = positions.cpu().long().expand(batch, seq)
    valid = (index >= 0) & (index < rows)
    safe_index = torch.where(valid, index, torch.zeros_like(index))
    # Invalid rows give NaN for the whole token, per the contract.
    not_a_number = torch.tensor(float("nan"), dtype=torch.float64)
    c = torch.where(valid.unsqueeze(-1), cos2d[safe_index], not_a_number).unsqueeze(1)
    s = torch.where(valid.unsqueeze(-1), sin2d[safe_index], not_a_number).unsqueeze(1)
    if inverse:
        s = -s
    x64 = x.detach().cpu().double()
    x1, x2 = x64[..., :half], x64[..., half:]
    result = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    product_size = torch.cat([(x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs()], dim=-1)
    return result, product_size


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of one round-to-nearest into dtype."""
    return torch.finfo(dtype).eps / 2


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, product_size: torch.Tensor) -> float:
    """Worst error as a fraction of what one final rounding plus fp32 math allows (<= 1 passes).

    Infinite when a NaN appears where none is expected or is missing where one is.
    """
    got = actual.detach().cpu().double()
    math_dtype = torch.float64 if actual.dtype == torch.float64 else torch.float32
    # Rounded once to the output dtype, after math in fp32: both errors, plus the smallest normal
    # number to cover results that land among fp16 subnormals.
    allowed = (unit_roundoff(actual.dtype) * expected.abs()
               + MATH_ROUNDING_STEPS * unit_roundoff(math_dtype) * product_size
               + torch.finfo(actual.dtype).tiny)
    nan_expected = expected.isnan()
    if not torch.equal(got.isnan(), nan_expected):
        return math.inf
    if got.numel() == 0:
        return 0.0
    ratio = torch.where(nan_expected, torch.zeros_like(got), (got - expected).abs() / allowed)
    return float(ratio.max().item())


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

    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, positions)
    problems = layout_problems("q_out", q, q_out) + layout_problems("k_out", k, k_out)
    if dtype_shape_problems("q_out", q, q_out) or dtype_shape_problems("k_out", k, k_out):
        return CaseResult(math.nan, math.nan, problems)  # nothing to compare element by element
    q_ref, q_size = reference_rope(q, cos, sin, positions, inverse=False)
    k_ref, k_size = reference_rope(k, cos, sin, positions, inverse=False)
    forward = max(error_ratio(q_out, q_ref, q_size), error_ratio(k_out, k_ref, k_size))

    # d/dx sum(out * w) = R(-angle) w: the backward must be the inverse rotation of the weights.
    w_q = random_tensor(list(q_out.shape), case.dtype, gen).to(device)
    w_k = random_tensor(list(k_out.shape), case.dtype, gen).to(device)
    loss = (q_out * w_q).sum() + (k_out * w_k).sum()
    grad_q, grad_k = torch.autograd.grad(loss, [q, k])
    # The layout of a gradient is autograd's business (it may reach q through a view).
    grad_problems = dtype_shape_problems("grad_q", q, grad_q) + dtype_shape_problems("grad_k", k, grad_k)
    if grad_problems:
        return CaseResult(forward, math.nan, problems + grad_problems)
    gq_ref, gq_size = reference_rope(w_q, cos, sin, positions, inverse=True)
    gk_ref, gk_size = reference_rope(w_k, cos, sin, positions, inverse=True)
    backward = max(error_ratio(grad_q, gq_ref, gq_size), error_ratio(grad_k, gk_ref, gk_size))
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
