"""Testing RoPE kernels: a float64 reference, a rounding-based tolerance, real cos/sin tables, the
random memory layouts a kernel must read where they lie, and the project's workload table.

The tests of rope_kernels, its self-check (``python -m rope_kernels``), its quick benchmark and the
benchmark in ``bench/`` all use this module, and so can anyone who writes a RoPE kernel of their
own. Only torch is needed (no pytest, no GPU, not the op itself)::

    from rope_kernels.testing import RopeCase, make_args, reference_fused_qk, assert_close_to_reference

    case = RopeCase(dtype=torch.bfloat16, layout="qkv", table_width="full", positions="bs:int64")
    args = make_args(case, "cuda")
    q_out, k_out = my_rope(*args)
    expected_q, expected_k = reference_fused_qk(args)
    assert_close_to_reference(q_out, expected_q, case.dtype)

Conventions (those of ``torch.ops.rope.fused_qk``): q and k are ``(B, H, S, D)`` with any strides;
the rotation is Hugging Face's ``rotate_half`` one, ``out = x * cos + rotate_half(x) * sin`` with
``(x1, x2) -> (x1 c - x2 s, x2 c + x1 s)`` over the two halves of D; cos/sin are ``(S_max, D/2)``
half tables or ``(S_max, D)`` Hugging Face full-width tables (only the first D/2 columns count),
with optional leading size-1 dims, or one table per sequence ``(B, S_max, W)``; positions are
optional ``(B, S)`` or ``(S,)`` integer table rows, and a row outside the table makes that token NaN.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

__all__ = [
    # constants
    "ROPE_BASE", "LAYOUTS", "POSITIONS", "TABLE_ROWS",
    # tables
    "rope_angles", "cos_sin_tables",
    # random layouts
    "random_heads", "fused_qkv_heads", "random_qk",
    # sample inputs
    "RopeArgs", "RopeCase", "make_args", "dtype_name",
    # the reference
    "reference_rope", "reference_rope_and_size", "reference_fused_qk", "reference_grads",
    "to_bhsd", "from_bhsd", "packed_positions",
    # the tolerance
    "unit_roundoff", "compute_dtype", "RoundingModel", "FUSED_KERNEL", "ANY_FORMULA",
    "tolerance", "assert_close_to_reference", "error_ratio", "CheckResult", "check_rotation",
    # other checks of an op's outputs
    "assert_output_layout", "assert_fresh_outputs", "poison_allocator", "snapshot", "assert_unchanged",
    # workloads
    "Workload", "WORKLOADS", "workload_by_name",
]

Device = Union[str, torch.device]

# ----------------------------------------------------------------------------------------------
# Tables

# The angle base of the original RoPE paper and of Llama: tables built with it are the real thing.
ROPE_BASE: float = 10000.0


def rope_angles(rows: int, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(rows, head_dim/2) float64 angles p * base^(-2i/D): the real RoPE frequencies."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.outer(torch.arange(rows, dtype=torch.float64), inv_freq)


def cos_sin_tables(rows: int, head_dim: int, *, full_width: bool = False,
                   dtype: torch.dtype = torch.float32, device: Device = "cpu",
                   base: float = ROPE_BASE) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE cos/sin tables of `rows` positions: the half table (rows, D/2), or with
    full_width the Hugging Face table (rows, D), the angles repeated: cat((freqs, freqs), -1).

    The angles are computed in float64 on the CPU, so every entry is the correctly rounded cos/sin
    of the true angle and every device gets the same values.
    """
    angles = rope_angles(rows, head_dim, base)
    if full_width:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


# ----------------------------------------------------------------------------------------------
# Random layouts

# Layouts of q and k (each still shaped (B, H, S, D)); see `random_heads` and `fused_qkv_heads`.
LAYOUTS: Tuple[str, ...] = ("bhsd", "bshd", "qkv", "padded", "broadcast", "strided_d")


def _normal(shape: Sequence[int], dtype: torch.dtype, device: Device,
            generator: Optional[torch.Generator], draw_on_device: bool) -> torch.Tensor:
    """Standard normal values (never zeros, so an unwritten output cannot pass).

    Drawn in float64 on the CPU and rounded to dtype (the same values on every device for one
    seed), or, with draw_on_device, directly on the device in dtype (fast, for large inputs).
    """
    if draw_on_device:
        return torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
    return torch.randn(tuple(shape), dtype=torch.float64, generator=generator).to(dtype).to(device)


def random_heads(layout: str, batch: int, heads: int, seq: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: Device = "cpu", *,
                 generator: Optional[torch.Generator] = None,
                 draw_on_device: bool = False) -> torch.Tensor:
    """A (B, H, S, D) tensor of random normal values laid out in memory as `layout` says:

    - "bhsd": contiguous (B, H, S, D);
    - "bshd": a transposed view of a contiguous (B, S, H, D) projection output (the common case);
    - "padded": gaps in every dimension and an odd storage offset (no 16-byte alignment);
    - "broadcast": one head expanded over all heads (head stride 0);
    - "strided_d": the last dim with stride 2.

    Everything in a buffer that is not part of the view is NaN: a kernel that reads outside the
    view (wrong stride, offset ignored, a block wider than D/2 unmasked) then yields NaN outputs.
    For q and k sliced out of one fused qkv projection ("qkv"), see `fused_qkv_heads`.
    """
    shape = (batch, heads, seq, head_dim)

    def normal(s: Sequence[int]) -> torch.Tensor:
        return _normal(s, dtype, device, generator, draw_on_device)

    if layout == "bhsd":
        return normal(shape)
    if layout == "bshd":
        return normal((batch, seq, heads, head_dim)).transpose(1, 2)
    if layout == "padded":
        buffer = torch.full((batch + 1, heads + 1, seq + 2, head_dim + 5), math.nan, dtype=dtype, device=device)
        view = buffer[1:, 1:, 1:seq + 1, 3:3 + head_dim]
        view.copy_(normal(shape))
        return view
    if layout == "broadcast":
        return normal((batch, 1, seq, head_dim)).expand(shape)
    if layout == "strided_d":
        buffer = torch.full((batch, heads, seq, 2 * head_dim), math.nan, dtype=dtype, device=device)
        view = buffer[..., ::2]
        view.copy_(normal(shape))
        return view
    raise ValueError(f"unknown layout {layout!r} (fused qkv slices: fused_qkv_heads)")


def fused_qkv_heads(batch: int, seq: int, heads_q: int, heads_k: int, head_dim: int,
                    dtype: torch.dtype = torch.float32, device: Device = "cpu", *,
                    generator: Optional[torch.Generator] = None,
                    draw_on_device: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """q (B, Hq, S, D) and k (B, Hk, S, D) as views of one fused (B, S, (Hq + 2 Hk) * D) projection,
    split like ``qkv.split(...)``: k has a storage offset and both have row strides wider than
    H * D; v is NaN, so a read past the end of k's heads shows up in the outputs."""
    width_q = heads_q * head_dim
    width_kv = heads_k * head_dim
    fused = _normal((batch, seq, width_q + 2 * width_kv), dtype, device, generator, draw_on_device)
    fused[..., width_q + width_kv:] = math.nan
    q, k, _ = fused.split([width_q, width_kv, width_kv], dim=-1)
    return (q.view(batch, seq, heads_q, head_dim).transpose(1, 2),
            k.view(batch, seq, heads_k, head_dim).transpose(1, 2))


def random_qk(layout: str, batch: int, heads_q: int, heads_k: int, seq: int, head_dim: int,
              dtype: torch.dtype = torch.float32, device: Device = "cpu", *,
              generator: Optional[torch.Generator] = None,
              draw_on_device: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """q and k in any of `LAYOUTS` (q drawn first, then k)."""
    if layout == "qkv":
        return fused_qkv_heads(batch, seq, heads_q, heads_k, head_dim, dtype, device,
                               generator=generator, draw_on_device=draw_on_device)
    q = random_heads(layout, batch, heads_q, seq, head_dim, dtype, device,
                     generator=generator, draw_on_device=draw_on_device)
    k = random_heads(layout, batch, heads_k, seq, head_dim, dtype, device,
                     generator=generator, draw_on_device=draw_on_device)
    return q, k


# ----------------------------------------------------------------------------------------------
# Sample inputs

# Positions: "none", or "<shape>:<dtype>" with shape "bs" (B, S), "s" (S,) or "sb" (a transposed
# (S, B) buffer seen as (B, S), i.e. positions that are not contiguous).
POSITIONS: Tuple[str, ...] = ("none", "bs:int32", "bs:int64", "s:int32", "s:int64", "sb:int64")

_INT_DTYPES = {"int32": torch.int32, "int64": torch.int64}

_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype (torch.bfloat16 -> "bf16"), for test ids and narrow columns."""
    return _DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


class RopeArgs(NamedTuple):
    """The op's arguments in schema order, so `op(*args)` is a call of the op."""

    q: torch.Tensor
    k: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    positions: Optional[torch.Tensor]


@dataclasses.dataclass(frozen=True)
class RopeCase:
    """One sample input of the op, described by the properties tests vary.

    The defaults are a small, unremarkable input; each test changes the fields it is about.
    """

    batch: int = 2
    heads_q: int = 4
    heads_k: int = 2
    seq: int = 7
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    layout: str = "bhsd"  # one of LAYOUTS
    positions: str = "none"  # one of POSITIONS
    # Rows of the cos/sin tables (S_max); None: seq + 3, so that positions can point past seq.
    table_rows: Optional[int] = None
    table_width: str = "half"  # "half": (S_max, D/2); "full": Hugging Face (S_max, D)
    table_dtype: str = "fp32"  # "fp32" or "same" (q's dtype)
    table_leading: int = 0  # number of leading size-1 dims, as in Hugging Face's (1, 1, S, D)
    table_layout: str = "dense"  # "dense", or "packed": cos and sin side by side in one buffer
    # One table for every sequence, or one per sequence (B, S_max, W) with different angles each
    # (as if each sequence started at another offset), as Hugging Face passes per-token angles.
    per_sequence_tables: bool = False

    def __str__(self) -> str:
        # Only the fields that differ from the defaults, so that test ids stay short and readable.
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value != field.default:
                shown = dtype_name(value) if isinstance(value, torch.dtype) else value
                parts.append(f"{field.name}={shown}")
        return ",".join(parts) or "default"

    @property
    def rows(self) -> int:
        return self.table_rows if self.table_rows is not None else self.seq + 3

    @property
    def table_torch_dtype(self) -> torch.dtype:
        return self.dtype if self.table_dtype == "same" else torch.float32


def _case_tables(case: RopeCase, device: Device) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables of real RoPE angles in the shape, dtype and layout the case asks for."""
    angles = rope_angles(case.rows, case.head_dim)
    if case.per_sequence_tables:  # sequence b's table starts at position 5 * b
        shift = 5
        all_angles = rope_angles(case.rows + shift * (case.batch - 1), case.head_dim)
        angles = torch.stack([all_angles[shift * b:shift * b + case.rows] for b in range(case.batch)])
    if case.table_width == "full":  # Hugging Face repeats the angles: cat((freqs, freqs), -1)
        angles = torch.cat([angles, angles], dim=-1)
    width = angles.shape[-1]
    if case.table_layout == "packed":  # row stride 2 * width, sin at a storage offset
        packed = torch.cat([angles.cos(), angles.sin()], dim=-1).to(case.table_torch_dtype).to(device)
        cos, sin = packed[..., :width], packed[..., width:]
    else:
        cos = angles.cos().to(case.table_torch_dtype).to(device)
        sin = angles.sin().to(case.table_torch_dtype).to(device)
    leading = (None,) * case.table_leading
    return cos[leading], sin[leading]


def _case_positions(case: RopeCase, device: Device) -> Optional[torch.Tensor]:
    """Random in-range table rows for each token, in the shape and dtype the case asks for."""
    if case.positions == "none":
        return None
    shape_kind, dtype_key = case.positions.split(":")
    dtype = _INT_DTYPES[dtype_key]
    if shape_kind == "bs":
        return torch.randint(0, case.rows, (case.batch, case.seq), dtype=dtype).to(device)
    if shape_kind == "s":
        return torch.randint(0, case.rows, (case.seq,), dtype=dtype).to(device)
    if shape_kind == "sb":
        return torch.randint(0, case.rows, (case.seq, case.batch), dtype=dtype).to(device).t()
    raise ValueError(f"unknown positions {case.positions!r}")


def make_args(case: RopeCase, device: Device, requires_grad: bool = False) -> RopeArgs:
    """Fresh random arguments for `case` on `device` (values drawn on the CPU from torch's global
    generator, so reproducible under torch.manual_seed).

    With requires_grad, q and k are leaves that keep the case's layout (detach keeps strides and
    storage offset); cos, sin and positions never require grad.
    """
    q, k = random_qk(case.layout, case.batch, case.heads_q, case.heads_k, case.seq, case.head_dim,
                     case.dtype, device)
    if requires_grad:
        q = q.detach().requires_grad_()
        k = k.detach().requires_grad_()
    cos, sin = _case_tables(case, device)
    return RopeArgs(q, k, cos, sin, _case_positions(case, device))


# ----------------------------------------------------------------------------------------------
# The float64 reference


def _gathered_angles(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: Optional[torch.Tensor], half: Optional[int] = None
                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each token's angles, (B, 1, S, half) float64 on the CPU (half: the pairs
    rotated, D/2 unless given); NaN for a token whose row lies outside the table."""
    batch, _, seq, head_dim = x.shape
    half = head_dim // 2 if half is None else half

    def tables(t: torch.Tensor) -> torch.Tensor:
        # (B, max_seq, half): leading size-1 dims squeezed, a shared table repeated for every
        # sequence; of a full-width table only the first half columns count.
        t = t.detach().cpu().to(torch.float64)
        while t.dim() > 2 and t.shape[0] == 1:
            t = t[0]
        return t.expand(batch, *t.shape[-2:])[..., :half]

    cos_tables, sin_tables = tables(cos), tables(sin)
    if cos_tables.shape[1] == 0:  # a table of no rows: every token lies outside it
        nan_rows = torch.full((batch, 1, seq, half), math.nan, dtype=torch.float64)
        return nan_rows, nan_rows.clone()
    if positions is None:
        rows = torch.arange(seq).expand(batch, seq)
    else:
        rows = positions.detach().cpu().to(torch.int64).expand(batch, seq)
    inside = (rows >= 0) & (rows < cos_tables.shape[1])
    safe_rows = torch.where(inside, rows, torch.zeros_like(rows))
    sequence = torch.arange(batch)[:, None]
    nan = torch.tensor(math.nan, dtype=torch.float64)
    c = torch.where(inside[..., None], cos_tables[sequence, safe_rows], nan)[:, None]
    s = torch.where(inside[..., None], sin_tables[sequence, safe_rows], nan)[:, None]
    return c, s


def _pairs(x: torch.Tensor, half: int, interleaved: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two members of each rotated pair: (x[i], x[i + half]) or (x[2i], x[2i + 1])."""
    if interleaved:
        return x[..., 0:2 * half:2], x[..., 1:2 * half:2]
    return x[..., :half], x[..., half:2 * half]


def _place_pairs(first: torch.Tensor, second: torch.Tensor, rest: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """A head of pairs (first[i], second[i]) laid out half-split or interleaved, then `rest`."""
    if interleaved:
        rotated = torch.stack([first, second], dim=-1).flatten(-2)
    else:
        rotated = torch.cat([first, second], dim=-1)
    return torch.cat([rotated, rest], dim=-1)


def _rotate(x64: torch.Tensor, c: torch.Tensor, s: torch.Tensor, with_size: bool,
            read_interleaved: bool = False, write_interleaved: bool = False
            ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The rotation of float64 x by float64 angles c/s (broadcast over x's leading dims; their
    width is the number of pairs rotated, the features after 2 * width are passed through), and
    with with_size the size of the two products summed into each element, |x1 c| + |x2 s| and
    |x2 c| + |x1 s| (|x| for a feature passed through): what the rounding of the products and of
    their sum is relative to. Pairs are read and written half-split or interleaved as asked."""
    half = c.shape[-1]
    x1, x2 = _pairs(x64, half, read_interleaved)
    rest = x64[..., 2 * half:]
    result = _place_pairs(x1 * c - x2 * s, x2 * c + x1 * s, rest, write_interleaved)
    if not with_size:
        return result, None
    size = _place_pairs((x1 * c).abs() + (x2 * s).abs(), (x2 * c).abs() + (x1 * s).abs(), rest.abs(),
                        write_interleaved)
    return result, size.detach()


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x laid out as `layout` says ("bhsd", "bshd" or packed "thd") as a (B, H, S, D) view."""
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "thd":
        return x.unsqueeze(0).transpose(1, 2)
    return x


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The inverse of to_bhsd."""
    if layout == "bshd":
        return x.transpose(1, 2)
    if layout == "thd":
        return x.transpose(1, 2)[0]
    return x


def packed_positions(cu_seqlens: torch.Tensor, seqlen_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Each packed token's position, (T,) int64: token t of document j is at t - cu_seqlens[j]
    (+ seqlen_offsets[j]), written out token by token."""
    bounds = [int(v) for v in cu_seqlens.cpu()]
    offsets = [0] * (len(bounds) - 1) if seqlen_offsets is None else [int(v) for v in seqlen_offsets.cpu()]
    positions: List[int] = []
    for doc in range(len(bounds) - 1):
        positions += [t - bounds[doc] + offsets[doc] for t in range(bounds[doc], bounds[doc + 1])]
    return torch.tensor(positions, dtype=torch.int64)


def _reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: Optional[torch.Tensor],
               inverse: bool, with_size: bool, interleaved: bool, interleaved_out: Optional[bool],
               rotary_dim: Optional[int], layout: str, cu_seqlens: Optional[torch.Tensor],
               seqlen_offsets: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    x_bhsd = to_bhsd(x, layout)
    if cu_seqlens is not None:
        positions = packed_positions(cu_seqlens, seqlen_offsets)
    half = (x_bhsd.shape[-1] if rotary_dim is None else rotary_dim) // 2
    c, s = _gathered_angles(x_bhsd, cos, sin, positions, half)
    out_interleaved = interleaved if interleaved_out is None else interleaved_out
    # The gradient reads the pairs as the forward wrote them and writes them as it read them.
    read, write = (out_interleaved, interleaved) if inverse else (interleaved, out_interleaved)
    x64 = x_bhsd.cpu().to(torch.float64)
    result, size = _rotate(x64 if not with_size else x64.detach(), c, -s if inverse else s, with_size, read, write)
    return from_bhsd(result, layout), None if size is None else from_bhsd(size, layout)


def reference_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: Optional[torch.Tensor] = None, inverse: bool = False, *,
                   interleaved: bool = False, interleaved_out: Optional[bool] = None,
                   rotary_dim: Optional[int] = None, layout: str = "bhsd",
                   cu_seqlens: Optional[torch.Tensor] = None,
                   seqlen_offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE of x (B, H, S, D) in float64 on the CPU, as the op's contract states it.

    Token (b, s) uses row positions[b, s] (positions[s] for a (S,) tensor, s without positions)
    of the table of sequence b: cos/sin (S_max, W), with any leading size-1 dims, is one table for
    every sequence, (B, S_max, W) one per sequence; of a full-width table (W = R, the rotary_dim)
    the first R/2 columns count. A row outside the table makes that token NaN. `inverse` negates
    sin (the backward op: the gradient of a rotation is the inverse rotation of the output
    gradient). The options are the op's (docs/conventions.md): x laid out as `layout` says, pairs
    (2i, 2i + 1) where interleaved, the features past rotary_dim passed through, packed tokens at
    their positions in their documents. Differentiable in x, so it also gives reference gradients.
    """
    result, _ = _reference(x, cos, sin, positions, inverse, False, interleaved, interleaved_out, rotary_dim, layout,
                           cu_seqlens, seqlen_offsets)
    return result


def reference_rope_and_size(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            positions: Optional[torch.Tensor] = None,
                            inverse: bool = False, *, interleaved: bool = False,
                            interleaved_out: Optional[bool] = None, rotary_dim: Optional[int] = None,
                            layout: str = "bhsd", cu_seqlens: Optional[torch.Tensor] = None,
                            seqlen_offsets: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`reference_rope` of x (detached) and the size of the products summed into each element,
    for `RoundingModel.allowed` and `error_ratio`."""
    result, size = _reference(x, cos, sin, positions, inverse, True, interleaved, interleaved_out, rotary_dim,
                              layout, cu_seqlens, seqlen_offsets)
    assert size is not None
    return result, size


def reference_fused_qk(args: RopeArgs, inverse: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference of fused_qk (or of fused_qk_backward with inverse=True)."""
    return (reference_rope(args.q, args.cos, args.sin, args.positions, inverse),
            reference_rope(args.k, args.cos, args.sin, args.positions, inverse))


def reference_grads(args: RopeArgs, weight_q: torch.Tensor,
                    weight_k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 gradients of sum(q_out * weight_q) + sum(k_out * weight_k) with respect to q and k,
    by autograd through the reference."""
    q64 = args.q.detach().cpu().to(torch.float64).requires_grad_()
    k64 = args.k.detach().cpu().to(torch.float64).requires_grad_()
    q_out = reference_rope(q64, args.cos, args.sin, args.positions)
    k_out = reference_rope(k64, args.cos, args.sin, args.positions)
    loss = ((q_out * weight_q.detach().cpu().to(torch.float64)).sum()
            + (k_out * weight_k.detach().cpu().to(torch.float64)).sum())
    grad_q, grad_k = torch.autograd.grad(loss, (q64, k64))
    return grad_q, grad_k


# ----------------------------------------------------------------------------------------------
# The tolerance: what roundings can cost


def unit_roundoff(dtype: torch.dtype) -> float:
    """Largest relative error of one round-to-nearest into dtype (half an ulp)."""
    return torch.finfo(dtype).eps / 2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a RoPE kernel computes in for inputs of dtype: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclasses.dataclass(frozen=True)
class RoundingModel:
    """The error allowed per element, as a count of roundings of half an ulp each.

    allowed = output_roundings  * u(dtype)         * |reference|
            + product_roundings * u(dtype)         * size
            + math_roundings    * u(compute dtype) * size
            + the smallest normal number of dtype (results that land among subnormals)

    where size = |x1 c| + |x2 s| (resp. |x2 c| + |x1 s|), the size of the products summed into
    the element. A wrong convention, layout, an unwritten or stale element, or a NaN fails by far.
    """

    output_roundings: float = 1.0
    product_roundings: float = 0.0
    math_roundings: float = 8.0

    def allowed(self, reference: torch.Tensor, size: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The allowed absolute error of each element of an output of dtype."""
        allowed = size * (self.product_roundings * unit_roundoff(dtype)
                          + self.math_roundings * unit_roundoff(compute_dtype(dtype)))
        if self.output_roundings:
            allowed = allowed + self.output_roundings * unit_roundoff(dtype) * reference.abs()
        return allowed + torch.finfo(dtype).tiny

    def describe(self) -> str:
        """The allowance in words, for messages: "4 roundings of the products' size"."""
        parts = []
        for count, what in ((self.output_roundings, "of the result"),
                            (self.product_roundings, "of the products' size"),
                            (self.math_roundings, "of the products' size in the compute dtype")):
            if count:
                parts.append("{:g} rounding{} {}".format(count, "" if count == 1 else "s", what))
        return " + ".join(parts) or "no rounding"


# A fused kernel: math in fp32 (fp64 for fp64), a few roundings of that precision relative to the
# size of the products, then one rounding to the output dtype. What the self-check holds the op to.
FUSED_KERNEL = RoundingModel(output_roundings=1.0, product_roundings=0.0, math_roundings=8.0)

# Any correct implementation, the unfused Hugging Face formula included: in bf16 it rounds each
# product and the sum in the output dtype (three roundings); four allowed. The benchmark's gate.
ANY_FORMULA = RoundingModel(output_roundings=0.0, product_roundings=4.0, math_roundings=0.0)


def tolerance(dtype: torch.dtype) -> Dict[str, float]:
    """torch.testing.assert_close tolerances for an output of `dtype` computed in fp32 and rounded
    once: the rounding model in assert_close's (rtol, atol) form.

    fp16/bf16: rtol is the unit roundoff (half an ulp: one rounding of the output), atol covers
    the fp32 arithmetic before the rounding and fp16 subnormals. fp32: a few fp32 ulps of
    inputs of size ~1, rounded up to 1e-5. fp64: computed in fp64.
    """
    if dtype == torch.float16:
        return {"rtol": 2.0**-11, "atol": 1e-5}
    if dtype == torch.bfloat16:
        return {"rtol": 2.0**-8, "atol": 1e-5}
    if dtype == torch.float32:
        return {"rtol": 1e-5, "atol": 1e-5}
    if dtype == torch.float64:
        return {"rtol": 1e-12, "atol": 1e-12}
    raise ValueError(f"no tolerance for {dtype}")


def assert_close_to_reference(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """actual (any device, `dtype`) equals the float64 reference within `tolerance(dtype)`;
    NaN is accepted exactly where the reference is NaN."""
    assert actual.dtype == dtype, f"output dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.detach(),
                               equal_nan=True, **tolerance(dtype))


def error_ratio(actual: torch.Tensor, reference: torch.Tensor, size: torch.Tensor,
                model: RoundingModel = FUSED_KERNEL) -> float:
    """Worst error of actual (any device) as a fraction of what `model` allows for its dtype
    (<= 1 passes), against `reference_rope_and_size`'s reference and size.

    Infinite when a NaN appears where none is expected or is missing where one is.
    """
    got = actual.detach().cpu().double()
    expected = reference.detach()
    nan_expected = expected.isnan()
    if not torch.equal(got.isnan(), nan_expected):
        return math.inf
    if got.numel() == 0:
        return 0.0
    allowed = model.allowed(expected, size, actual.dtype)
    ratio = torch.where(nan_expected, torch.zeros_like(got), (got - expected).abs() / allowed)
    return float(ratio.max().item())


@dataclasses.dataclass
class CheckResult:
    """The outcome of `check_rotation`."""

    passed: bool
    worst_ratio: float  # worst error / allowance over all elements (<= 1 passes; inf: NaN)
    relative_l2: float  # ||out - ref|| / ||ref||
    bad_elements: int
    message: str = ""

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def combined(self, other: "CheckResult") -> "CheckResult":
        return CheckResult(
            self.passed and other.passed,
            max(self.worst_ratio, other.worst_ratio),
            max(self.relative_l2, other.relative_l2),
            self.bad_elements + other.bad_elements,
            "; ".join(m for m in (self.message, other.message) if m))


# check_rotation computes the float64 reference in chunks of about this many elements (a few
# hundred MB), so that long-context inputs do not need tens of GB for it.
CHUNK_ELEMENTS: int = 1 << 25


def check_rotation(name: str, actual: torch.Tensor, source: torch.Tensor, cos_half: torch.Tensor,
                   sin_half: torch.Tensor, inverse: bool,
                   model: RoundingModel = ANY_FORMULA) -> CheckResult:
    """actual against the rotation of source (B, H, S, D) by per-token angles cos_half/sin_half
    (float64, (1 or B, S, D/2), already gathered by position), on source's device and in chunks
    of the sequence, so that it suits large inputs; inverse rotates by -angle (the gradient).
    A NaN in actual counts as a bad element."""
    if actual.shape != source.shape or actual.dtype != source.dtype:
        return CheckResult(False, math.inf, math.inf, actual.numel(), "{} is {} {}, expected {} {}".format(
            name, actual.dtype, list(actual.shape), source.dtype, list(source.shape)))
    batch, heads, seq, head_dim = source.shape
    step = max(1, CHUNK_ELEMENTS // max(1, batch * heads * head_dim))
    worst, bad, err_sq, ref_sq = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for start in range(0, seq, step):
            x = source[:, :, start:start + step].detach().to(torch.float64)
            c = cos_half[:, start:start + step].unsqueeze(1).to(x.device)
            s = sin_half[:, start:start + step].unsqueeze(1).to(x.device)
            ref, size = _rotate(x, c, -s if inverse else s, with_size=True)
            assert size is not None
            del x
            got = actual[:, :, start:start + step].detach().to(torch.float64)
            err = (got - ref).abs()
            allowed = model.allowed(ref, size, source.dtype)
            # NaN compares false, so a NaN output counts as bad.
            bad += int((~(err <= allowed)).sum().item())
            ratio = torch.nan_to_num(err / allowed, nan=math.inf)
            worst = max(worst, float(ratio.max().item()) if ratio.numel() else 0.0)
            err_sq += float(torch.nan_to_num(err, nan=math.inf).square().sum().item())
            ref_sq += float(ref.square().sum().item())
    relative = math.sqrt(err_sq / ref_sq) if ref_sq > 0 else (0.0 if err_sq == 0 else math.inf)
    message = "" if bad == 0 else "{}: {} of {} elements off by more than {} (worst {:.3g}x)".format(
        name, bad, actual.numel(), model.describe(), worst)
    return CheckResult(bad == 0, worst, relative, bad, message)


# ----------------------------------------------------------------------------------------------
# Other checks of an op's outputs


def _dense_strides_in_order(shape: torch.Size, order: List[int]) -> List[int]:
    """Strides of a dense tensor of `shape` whose dims, outermost first, are `order`."""
    strides = [0] * len(shape)
    step = 1
    for dim in reversed(order):
        strides[dim] = step
        step *= max(shape[dim], 1)
    return strides


def assert_output_layout(out: torch.Tensor, x: torch.Tensor) -> None:
    """out has x's sizes, dtype and device, is dense, has stride 1 in the last dim, and keeps
    x's dimension order; for a dense x its strides are torch.empty_like(x)'s.

    Strides of size-1 dims carry no meaning and are not compared. Where x has no dimension
    order (a stride-0 broadcast), only density is required.
    """
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.stride(-1) == 1, f"last-dim stride {out.stride(-1)}"
    meaningful = [d for d in range(x.dim()) if x.shape[d] > 1]
    outer = [d for d in range(x.dim() - 1) if x.shape[d] > 1]
    outer_strides = [x.stride(d) for d in outer]
    if 0 in outer_strides or len(set(outer_strides)) != len(outer_strides):
        by_stride = sorted(range(out.dim()), key=lambda d: -out.stride(d))
        assert out.permute(by_stride).is_contiguous(), f"output strides {out.stride()} are not dense"
        return
    order = sorted(range(x.dim() - 1), key=lambda d: -x.stride(d)) + [x.dim() - 1]
    expected = _dense_strides_in_order(x.shape, order)
    if x.is_contiguous() or x.permute(order).is_contiguous():  # dense x: the design's empty_like rule
        expected = list(torch.empty_like(x).stride())
    got = [out.stride(d) for d in meaningful]
    want = [expected[d] for d in meaningful]
    assert got == want, f"output strides {out.stride()} for input strides {x.stride()}, expected {expected}"


def assert_fresh_outputs(outputs: Tuple[torch.Tensor, ...],
                         inputs: Tuple[Optional[torch.Tensor], ...]) -> None:
    """No output shares memory with an input or with another output (the op is functional)."""
    def storage_of(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    live_outputs = [o for o in outputs if o.numel() > 0]  # empty tensors may all point at null
    live_inputs = [i for i in inputs if i is not None and i.numel() > 0]
    for index, out in enumerate(live_outputs):
        for other in live_outputs[index + 1:]:
            assert storage_of(out) != storage_of(other), "two outputs share memory"
        for inp in live_inputs:
            assert storage_of(out) != storage_of(inp), "an output shares memory with an input"


def poison_allocator(device: Device, like: Sequence[torch.Tensor]) -> None:
    """Free NaN-filled blocks of the sizes of `like` just before the op allocates its outputs.

    Caching allocators (and malloc, for small blocks) hand such blocks back to the next request of
    the same size, so an output element the op forgets to write reads NaN instead of a stale,
    possibly correct, value from an earlier call. Best effort: a miss only weakens the check.
    """
    blocks = [torch.full((t.numel(),), math.nan, dtype=t.dtype, device=device) for t in like]
    del blocks


def snapshot(args: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    """Copies of every argument, to check afterwards that the op wrote none of its inputs."""
    return [None if t is None else t.detach().clone() for t in args]


def assert_unchanged(args: RopeArgs, before: List[Optional[torch.Tensor]]) -> None:
    """Every argument still equals its `snapshot` (bit for bit, NaN included)."""
    for name, now, then in zip(RopeArgs._fields, args, before):
        if now is not None:
            torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True,
                                       msg=f"the op wrote its input {name}")


# ----------------------------------------------------------------------------------------------
# The project's workload table (docs/performance.md), shared by the quick benchmark
# of `python -m rope_kernels` and by bench/.

# Decode rows draw their positions at random from a table this long (a KV cache of 8192 tokens);
# training rows use a table of at least this many rows too, as a model's table is its context.
TABLE_ROWS: int = 8192

# Smoke runs keep each workload's heads, head dim, dtype, layout and conventions and shrink only
# B and S (and the number of packed documents).
SMOKE_BATCH: int = 2
SMOKE_SEQ: int = 8
SMOKE_DOCUMENTS: int = 3

# The seed of the packed rows' document lengths: every run packs the same documents.
DOCUMENT_SEED: int = 0

# Values of Workload.op_layout, the op's `layout` option.
OP_LAYOUTS: Tuple[str, ...] = ("bhsd", "bshd", "thd")


def document_lengths(total: int, count: int, seed: int = DOCUMENT_SEED) -> List[int]:
    """`count` document lengths, each at least 1, summing to `total`: cut at count - 1 distinct
    points of (0, total) drawn uniformly from a generator seeded with `seed`, so that the lengths
    are mixed (many short documents, a few long ones) and the same on every run and machine."""
    if not 0 < count <= total:
        raise ValueError("cannot cut {} tokens into {} documents".format(total, count))
    generator = torch.Generator().manual_seed(seed)
    cuts = (torch.randperm(total - 1, generator=generator)[:count - 1] + 1).tolist()
    bounds = [0] + sorted(cuts) + [total]
    return [end - start for start, end in zip(bounds, bounds[1:])]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark shape. q and k are transposed views of (B, S, H, D) projection outputs
    (layout "bshd", what a model hands to RoPE), or contiguous (B, H, S, D) tensors ("bhsd").

    The conventions default to the Llama ones (every feature rotated, half-split pairs, the op
    given the (B, H, S, D) views); a row that sets them measures the op's options on the same
    kind of tensors."""

    name: str
    batch: int
    seq: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    layout: str = "bshd"
    # Decode rows: positions drawn at random from the table, and a CUDA-graph figure.
    decode: bool = False
    note: str = ""
    # Features rotated at the start of each head (the op's rotary_dim); None: all of them.
    rotary_dim: Optional[int] = None
    # Pairs (x[2i], x[2i+1]) (GPT-J, GLM) instead of (x[i], x[i + R/2]).
    interleaved: bool = False
    # The op's `layout` option: "bhsd" takes the (B, H, S, D) views; "bshd" the (B, S, H, D)
    # tensors themselves (layout "bshd"); "thd" the B * S tokens packed as (T, H, D) tensors
    # (batch 1, layout "bshd"), cut into `documents` documents that cu_seqlens delimits.
    op_layout: str = "bhsd"
    documents: int = 0

    def __post_init__(self) -> None:
        if self.op_layout not in OP_LAYOUTS:
            raise ValueError("{}: op_layout {!r} is none of {}".format(self.name, self.op_layout, OP_LAYOUTS))
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0):
            raise ValueError("{}: rotary_dim {} is not even in (0, {}]".format(self.name, self.rotary_dim, self.head_dim))
        if self.op_layout != "bhsd" and self.layout != "bshd":
            raise ValueError("{}: op_layout {!r} needs (B, S, H, D) tensors (layout \"bshd\")".format(
                self.name, self.op_layout))
        if (self.op_layout == "thd") != (self.documents > 0) or (self.packed and self.batch != 1):
            raise ValueError("{}: packed rows (op_layout \"thd\") have batch 1 and documents, others none".format(
                self.name))

    @property
    def rotary(self) -> int:
        """R, the number of features rotated at the start of each head."""
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def packed(self) -> bool:
        return self.op_layout == "thd"

    def document_lengths(self) -> List[int]:
        """The lengths of the packed documents (empty for a row that packs none)."""
        return document_lengths(self.seq, self.documents) if self.packed else []

    @property
    def table_rows(self) -> int:
        return max(self.seq, TABLE_ROWS)

    @property
    def bytes_moved(self) -> int:
        """Bytes the memory system must move at least: q and k read once and written once, all
        of them (an out-of-place call writes the features past rotary_dim too; the cos/sin rows
        are small next to q and k and are left out, as in the copy floor)."""
        elements = self.batch * self.seq * (self.heads_q + self.heads_k) * self.head_dim
        return 2 * elements * torch.empty((), dtype=self.dtype).element_size()

    def smoke(self) -> "Workload":
        """The same workload with B and S cut down, for functional runs on a CPU."""
        seq = self.seq if self.decode else min(self.seq, SMOKE_SEQ)
        documents = min(self.documents, SMOKE_DOCUMENTS, seq)
        return dataclasses.replace(self, batch=min(self.batch, SMOKE_BATCH), seq=seq, documents=documents)

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        if self.packed:
            tokens = "T={} in {} documents".format(self.batch * self.seq, self.documents)
        else:
            tokens = "B={} S={}".format(self.batch, self.seq)
        text = "{} Hq={} Hk={} D={} {} {}".format(
            tokens, self.heads_q, self.heads_k, self.head_dim, dtype,
            self.layout if self.op_layout == "bhsd" else "layout=" + self.op_layout)
        if self.rotary_dim is not None:
            text += " rotary_dim={}".format(self.rotary_dim)
        if self.interleaved:
            text += " interleaved"
        return text


# In the order of the performance notes; the rows of the op's options come last.
WORKLOADS: List[Workload] = [
    Workload("llama8b-train", 4, 4096, 32, 8, 128, torch.bfloat16, note="the main training shape"),
    Workload("seed-example", 2, 1024, 32, 32, 128, torch.float16, layout="bhsd",
             note="contiguous (B, H, S, D) tensors"),
    Workload("long-128k", 1, 131072, 32, 8, 128, torch.bfloat16, note="long context"),
    Workload("hd64-mha", 8, 2048, 16, 16, 64, torch.bfloat16, note="small heads"),
    Workload("hd256-gemma", 2, 4096, 8, 4, 256, torch.bfloat16, note="large heads"),
    Workload("fp32", 2, 2048, 32, 8, 128, torch.float32),
    Workload("small-prefill", 1, 128, 32, 8, 128, torch.bfloat16, note="launch-bound"),
    Workload("decode-b1", 1, 1, 32, 8, 128, torch.bfloat16, decode=True,
             note="positions drawn at random from 8192"),
    Workload("decode-b64", 64, 1, 32, 8, 128, torch.bfloat16, decode=True,
             note="positions drawn at random from 8192"),
    Workload("phi4-partial", 4, 4096, 32, 8, 128, torch.bfloat16, rotary_dim=96,
             note="partial rotary: the first 96 of 128 features"),
    Workload("glm4-interleaved", 4, 4096, 32, 2, 128, torch.bfloat16, rotary_dim=64, interleaved=True,
             note="GLM-4: interleaved pairs over half of each head"),
    Workload("thd-packed", 1, 16384, 32, 8, 128, torch.bfloat16, op_layout="thd", documents=64,
             note="64 packed documents of mixed lengths, cu_seqlens"),
    Workload("bshd-decode", 64, 1, 32, 8, 128, torch.bfloat16, decode=True, op_layout="bshd",
             note="(B, S, H, D) tensors with layout=\"bshd\"; positions drawn at random from 8192"),
    Workload("hd512-gemma4", 2, 4096, 16, 8, 512, torch.bfloat16, note="head_dim 512 (Gemma 4)"),
]


def workload_by_name(name: str) -> Workload:
    """The row of WORKLOADS called name (KeyError listing the known names otherwise)."""
    for workload in WORKLOADS:
        if workload.name == name:
            return workload
    raise KeyError("unknown workload {!r}; known: {}".format(name, ", ".join(w.name for w in WORKLOADS)))
