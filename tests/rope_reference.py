"""The float64 reference of the fused RoPE op and the sample inputs that every test file builds on.

The reference is written the plainest way on purpose (split the halves, gather the table rows
by position, rotate) so that it is obviously right; it is not meant to be fast. Every sample
input is built here, so each test file speaks of cases (`RopeCase`) rather than of tensors.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch

# The angle base of the original RoPE paper and of Llama: tables built with it are the real thing.
ROPE_BASE = 10000.0

# Layouts of q and k (each still shaped (B, H, S, D)); see `_carve_heads` for what each one is.
LAYOUTS = ("bhsd", "bshd", "qkv", "padded", "broadcast", "strided_d")

# Positions: "none", or "<shape>:<dtype>" with shape "bs" (B, S), "s" (S,) or "sb" (a transposed
# (S, B) buffer seen as (B, S), i.e. positions that are not contiguous).
POSITIONS = ("none", "bs:int32", "bs:int64", "s:int32", "s:int64", "sb:int64")

_INT_DTYPES = {"int32": torch.int32, "int64": torch.int64}

_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype, for test ids."""
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
    """One sample input of the op, described by the properties the tests vary.

    The defaults are a small, unremarkable input; each test changes the fields it is about.
    """

    batch: int = 2
    heads_q: int = 4
    heads_k: int = 2
    seq: int = 7
    head_dim: int = 64
    dtype: torch.dtype = torch.float32
    layout: str = "bhsd"
    positions: str = "none"
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


def rope_angles(rows: int, head_dim: int, base: float = ROPE_BASE) -> torch.Tensor:
    """(rows, head_dim/2) float64 angles p * base^(-2i/D): the real RoPE frequencies."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return torch.outer(torch.arange(rows, dtype=torch.float64), inv_freq)


def _random(shape: tuple[int, ...]) -> torch.Tensor:
    """Standard normal values in float64 (never zeros, so an unwritten output cannot pass)."""
    return torch.randn(shape, dtype=torch.float64)


def _carve_heads(layout: str, batch: int, heads: int, seq: int, head_dim: int,
                 dtype: torch.dtype, device: str) -> torch.Tensor:
    """A (B, H, S, D) tensor of random values laid out in memory as `layout` says.

    Everything in a buffer that is not part of the view is NaN: a kernel that reads outside the
    view (wrong stride, offset ignored, a block wider than D/2 unmasked) then yields NaN outputs.
    """
    shape = (batch, heads, seq, head_dim)
    if layout == "bhsd":  # contiguous (B, H, S, D)
        return _random(shape).to(dtype).to(device)
    if layout == "bshd":  # a projection output (B, S, H, D) seen as (B, H, S, D): the common case
        return _random((batch, seq, heads, head_dim)).to(dtype).to(device).transpose(1, 2)
    if layout == "padded":  # gaps in every dimension and an odd storage offset (no 16-byte alignment)
        buffer = torch.full((batch + 1, heads + 1, seq + 2, head_dim + 5), math.nan, dtype=torch.float64)
        buffer[1:, 1:, 1:seq + 1, 3:3 + head_dim] = _random(shape)
        return buffer.to(dtype).to(device)[1:, 1:, 1:seq + 1, 3:3 + head_dim]
    if layout == "broadcast":  # one head expanded over all heads (head stride 0)
        return _random((batch, 1, seq, head_dim)).to(dtype).to(device).expand(shape)
    if layout == "strided_d":  # last dim with stride 2: the op must not read the NaN between
        buffer = torch.full((batch, heads, seq, 2 * head_dim), math.nan, dtype=torch.float64)
        buffer[..., ::2] = _random(shape)
        return buffer.to(dtype).to(device)[..., ::2]
    raise ValueError(f"unknown layout {layout!r}")


def _qkv_split(case: RopeCase, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as views of one fused (B, S, (Hq + 2 Hk) * D) projection, split like `qkv.split(...)`.

    k has a storage offset and both have row strides wider than H * D; v is NaN, so a read past
    the end of k's heads shows up in the outputs.
    """
    width_q = case.heads_q * case.head_dim
    width_kv = case.heads_k * case.head_dim
    fused = _random((case.batch, case.seq, width_q + 2 * width_kv))
    fused[..., width_q + width_kv:] = math.nan
    fused = fused.to(case.dtype).to(device)
    q, k, _ = fused.split([width_q, width_kv, width_kv], dim=-1)
    q = q.view(case.batch, case.seq, case.heads_q, case.head_dim).transpose(1, 2)
    k = k.view(case.batch, case.seq, case.heads_k, case.head_dim).transpose(1, 2)
    return q, k


def _tables(case: RopeCase, device: str) -> tuple[torch.Tensor, torch.Tensor]:
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


def _positions(case: RopeCase, device: str) -> Optional[torch.Tensor]:
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


def make_args(case: RopeCase, device: str, requires_grad: bool = False) -> RopeArgs:
    """Fresh random arguments for `case` on `device` (values drawn on the CPU, so reproducible).

    With requires_grad, q and k are leaves that keep the case's layout (detach keeps strides and
    storage offset); cos, sin and positions never require grad.
    """
    if case.layout == "qkv":
        q, k = _qkv_split(case, device)
    else:
        q = _carve_heads(case.layout, case.batch, case.heads_q, case.seq, case.head_dim, case.dtype, device)
        k = _carve_heads(case.layout, case.batch, case.heads_k, case.seq, case.head_dim, case.dtype, device)
    if requires_grad:
        q = q.detach().requires_grad_()
        k = k.detach().requires_grad_()
    cos, sin = _tables(case, device)
    return RopeArgs(q, k, cos, sin, _positions(case, device))


def reference_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     positions: Optional[torch.Tensor], inverse: bool = False) -> torch.Tensor:
    """RoPE of x (B, H, S, D) in float64 on the CPU, as the contract states it.

    Token (b, s) uses row positions[b, s] (positions[s] for a (S,) tensor, s without positions)
    of the table of sequence b: cos/sin (max_seq, W) is one table for every sequence, (B, max_seq,
    W) one per sequence. A row outside the table makes that token NaN. `inverse` negates sin (the
    backward op). Differentiable in x, so it also gives reference gradients.
    """
    batch, _, seq, head_dim = x.shape
    half = head_dim // 2

    def tables(t: torch.Tensor) -> torch.Tensor:
        # (B, max_seq, D/2): leading size-1 dims squeezed, a shared table repeated for every
        # sequence; of a full-width table only the first D/2 columns count.
        t = t.detach().cpu().to(torch.float64)
        while t.dim() > 2 and t.shape[0] == 1:
            t = t[0]
        return t.expand(batch, *t.shape[-2:])[..., :half]

    cos_tables, sin_tables = tables(cos), tables(sin)
    if positions is None:
        rows = torch.arange(seq).expand(batch, seq)
    else:
        rows = positions.cpu().to(torch.int64).expand(batch, seq)
    inside = (rows >= 0) & (rows < cos_tables.shape[1])
    safe_rows = torch.where(inside, rows, torch.zeros_like(rows))
    sequence = torch.arange(batch)[:, None]
    nan = torch.tensor(math.nan, dtype=torch.float64)
    c = torch.where(inside[..., None], cos_tables[sequence, safe_rows], nan)[:, None]  # (B, 1, S, D/2)
    s = torch.where(inside[..., None], sin_tables[sequence, safe_rows], nan)[:, None]
    if inverse:
        s = -s
    x64 = x.cpu().to(torch.float64)
    x1, x2 = x64[..., :half], x64[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def reference_fused_qk(args: RopeArgs, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 reference of fused_qk (or of fused_qk_backward with inverse=True)."""
    return (reference_rotate(args.q, args.cos, args.sin, args.positions, inverse),
            reference_rotate(args.k, args.cos, args.sin, args.positions, inverse))


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """assert_close tolerances for an output of `dtype` computed in fp32 and rounded once.

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
    """actual (any device, `dtype`) equals the float64 reference within `dtype`'s tolerance;
    NaN is accepted exactly where the reference is NaN."""
    assert actual.dtype == dtype, f"output dtype {actual.dtype}, expected {dtype}"
    torch.testing.assert_close(actual.detach().cpu().to(torch.float64), expected.detach(),
                               equal_nan=True, **tolerance(dtype))


def _dense_strides_in_order(shape: torch.Size, order: list[int]) -> list[int]:
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


def assert_fresh_outputs(outputs: tuple[torch.Tensor, ...], inputs: tuple[Optional[torch.Tensor], ...]) -> None:
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


def poison_allocator(device: str, like: tuple[torch.Tensor, ...]) -> None:
    """Free NaN-filled blocks of the sizes of `like` just before the op allocates its outputs.

    Caching allocators (and malloc, for small blocks) hand such blocks back to the next request of
    the same size, so an output element the op forgets to write reads NaN instead of a stale,
    possibly correct, value from an earlier call. Best effort: a miss only weakens the check.
    """
    blocks = [torch.full((t.numel(),), math.nan, dtype=t.dtype, device=device) for t in like]
    del blocks


def snapshot(args: RopeArgs) -> list[Optional[torch.Tensor]]:
    """Copies of every argument, to check afterwards that the op wrote none of its inputs."""
    return [None if t is None else t.detach().clone() for t in args]


def assert_unchanged(args: RopeArgs, before: list[Optional[torch.Tensor]]) -> None:
    for name, now, then in zip(RopeArgs._fields, args, before):
        if now is not None:
            torch.testing.assert_close(now, then, rtol=0, atol=0, equal_nan=True,
                                       msg=f"the op wrote its input {name}")


def reference_grads(args: RopeArgs, weight_q: torch.Tensor, weight_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 gradients of sum(q_out * weight_q) + sum(k_out * weight_k) with respect to q and k,
    by autograd through the reference."""
    q64 = args.q.detach().cpu().to(torch.float64).requires_grad_()
    k64 = args.k.detach().cpu().to(torch.float64).requires_grad_()
    q_out = reference_rotate(q64, args.cos, args.sin, args.positions)
    k_out = reference_rotate(k64, args.cos, args.sin, args.positions)
    loss = (q_out * weight_q.detach().cpu().to(torch.float64)).sum() + (k_out * weight_k.detach().cpu().to(torch.float64)).sum()
    grad_q, grad_k = torch.autograd.grad(loss, (q64, k64))
    return grad_q, grad_k
