"""Forward correctness of torch.ops.rope.fused_qk against the float64 reference.

Each test sweeps one property (dtype and head_dim, heads and layout, positions, tables, lengths)
with the others at ordinary values, and every call goes through `check_forward`, which also
checks the output layout, that outputs are fresh, that no output element is left unwritten
and that no input is written.
"""
from __future__ import annotations

import math
import random

import pytest
import torch

import rope_kernels
from rope_env import DEVICES, device_dtype_params, requires_cuda
from rope_kernels.testing import (LAYOUTS, POSITIONS, RopeArgs, RopeCase, assert_close_to_reference,
                                  assert_fresh_outputs, assert_output_layout, assert_unchanged,
                                  make_args, poison_allocator, reference_fused_qk, snapshot)

HEAD_DIMS = [2, 8, 10, 64, 80, 96, 128, 256]

# (Hq, Hk): MHA, GQA 4:1, MQA 32:1, head counts that are no multiple of any block size, Hk > Hq.
HEADS = [(4, 4), (16, 4), (32, 1), (5, 5), (3, 7)]


def check_forward(case: RopeCase, device: str) -> None:
    """Run fused_qk on `case` and check everything a forward call promises."""
    args = make_args(case, device)
    expected = reference_fused_qk(args)
    before = snapshot(args)
    poison_allocator(device, (args.q, args.k))
    outputs = torch.ops.rope.fused_qk(*args)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    for out, x, ref in zip(outputs, (args.q, args.k), expected):
        assert_output_layout(out, x)
        assert_close_to_reference(out, ref, case.dtype)
    assert_fresh_outputs(outputs, tuple(args))
    assert_unchanged(args, before)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params())
def test_dtypes_and_head_dims(device: str, dtype: torch.dtype, head_dim: int) -> None:
    check_forward(RopeCase(dtype=dtype, head_dim=head_dim, table_dtype="same"), device)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("heads_q", "heads_k"), HEADS, ids=[f"hq{q}-hk{k}" for q, k in HEADS])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_heads_and_layouts(device: str, dtype: torch.dtype, heads_q: int, heads_k: int, layout: str) -> None:
    check_forward(RopeCase(dtype=dtype, heads_q=heads_q, heads_k=heads_k, layout=layout, head_dim=80), device)


@pytest.mark.parametrize("positions", POSITIONS)
@pytest.mark.parametrize("layout", ["bhsd", "qkv"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "fp32")))
def test_positions(device: str, dtype: torch.dtype, layout: str, positions: str) -> None:
    check_forward(RopeCase(dtype=dtype, layout=layout, positions=positions, seq=9), device)


@pytest.mark.parametrize("positions", ["bs:int32", "s:int64"])
@pytest.mark.parametrize("device", DEVICES)
def test_positions_allow_a_table_shorter_than_the_sequence(device: str, positions: str) -> None:
    # With positions, only the rows they name must exist (e.g. packed sequences of short documents).
    check_forward(RopeCase(seq=12, table_rows=4, positions=positions), device)


@pytest.mark.parametrize("table_layout", ["dense", "packed"])
@pytest.mark.parametrize("table_leading", [0, 2])
@pytest.mark.parametrize("table_dtype", ["fp32", "same"])
@pytest.mark.parametrize("table_width", ["half", "full"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_tables(device: str, dtype: torch.dtype, table_width: str, table_dtype: str, table_leading: int,
                table_layout: str) -> None:
    case = RopeCase(dtype=dtype, table_width=table_width, table_dtype=table_dtype,
                    table_leading=table_leading, table_layout=table_layout, positions="bs:int64")
    check_forward(case, device)


@pytest.mark.parametrize("positions", ["none", "bs:int32", "s:int64"])
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_one_table_per_sequence(device: str, dtype: torch.dtype, layout: str, positions: str) -> None:
    # cos/sin (B, S_max, W): sequence b reads its own table, as with the per-token angles Hugging
    # Face models pass (B, S, D). Full width, so the table's batch stride is no row multiple.
    case = RopeCase(dtype=dtype, layout=layout, positions=positions, per_sequence_tables=True, batch=3,
                    table_width="full", table_dtype="same")
    check_forward(case, device)


@pytest.mark.parametrize("device", DEVICES)
def test_one_table_per_sequence_out_of_range_positions_give_nan(device: str) -> None:
    # A position is checked against the rows of one table, not of all of them together.
    case = RopeCase(positions="bs:int64", per_sequence_tables=True, table_rows=6, seq=4, batch=2)
    args = make_args(case, device)
    positions = args.positions.clone()
    positions[0, 1] = 6  # the first row of the second sequence's table, were they one
    outputs = torch.ops.rope.fused_qk(*args._replace(positions=positions))
    for out in outputs:
        nan_tokens = out.isnan().any(dim=-1).any(dim=1).cpu()  # (B, S)
        expected = torch.zeros_like(nan_tokens)
        expected[0, 1] = True
        assert torch.equal(nan_tokens, expected)


@pytest.mark.parametrize(("batch", "seq", "positions"), [
    (0, 7, "none"),  # empty batch: empty outputs, no launch with an empty grid
    (0, 7, "bs:int64"),
    (1, 1, "none"),  # one token
    (3, 1, "bs:int32"),  # decoding: one new token per sequence at its own position
    (2, 5, "none"),
    (1, 33, "s:int64"),
    (2, 129, "none"),
    (1, 2049, "bs:int64"),  # many programs, a long table
])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("bf16", "fp32")))
def test_sequence_lengths(device: str, dtype: torch.dtype, batch: int, seq: int, positions: str) -> None:
    check_forward(RopeCase(dtype=dtype, batch=batch, seq=seq, positions=positions, layout="bshd"), device)


# The CUDA launcher runs launches of at least this many head vectors (tokens x (q + k heads)) with
# the "wide grid" kernels and smaller ones with the "narrow grid" kernels (kNarrowBelowHeadVectors
# in csrc/cuda/kernel_table.h); the other tests here are small, so they check the narrow ones.
WIDE_GRID_HEAD_VECTORS = 16384
WIDE_CASES = [  # (layout, positions, table dtype): heads-fastest and sequence-fastest program orders
    ("bshd", "none", "same"),
    ("bhsd", "bs:int32", "fp32"),
    ("qkv", "s:int64", "same"),
    ("padded", "sb:int64", "fp32"),
]


@pytest.mark.parametrize(("layout", "positions", "table_dtype"), WIDE_CASES, ids=["-".join(c) for c in WIDE_CASES])
@pytest.mark.parametrize("head_dim", [32, 64, 128, 256])
@pytest.mark.parametrize(("device", "dtype"), device_dtype_params(("fp16", "bf16", "fp32")))
def test_wide_grids(device: str, dtype: torch.dtype, head_dim: int, layout: str, positions: str,
                    table_dtype: str) -> None:
    # 13 q heads and 3 k heads, counted along one axis (q's, then k's): for every heads-per-program
    # value above 1 some block holds heads of both, and no value divides 13, so blocks are partial.
    case = RopeCase(dtype=dtype, batch=2, seq=700, heads_q=13, heads_k=3, head_dim=head_dim, layout=layout,
                    positions=positions, table_dtype=table_dtype)
    assert case.batch * case.seq * (case.heads_q + case.heads_k) >= WIDE_GRID_HEAD_VECTORS
    check_forward(case, device)


@requires_cuda
def test_more_head_blocks_than_the_2d_grid_takes() -> None:
    # A (B, H, S, D) launch walks the sequence fastest on a grid (seq_len, head blocks, batch), and
    # CUDA caps a grid's y extent at 65535. With more head blocks than that, even at the largest
    # heads-per-program value (64), the launcher must fall back to the flat grid, not fail.
    case = RopeCase(dtype=torch.bfloat16, batch=1, seq=2, heads_q=65535 * 64 + 5, heads_k=3, head_dim=2,
                    layout="bhsd", positions="bs:int32", table_dtype="same")
    check_forward(case, "cuda")


# Grids whose sequence or batch exceeds the 65535 that CUDA's y and z extents hold: the launcher
# takes the flat grid (the kernel divides its program index), in both program orders.
BEYOND_GRID_YZ = [  # (layout, batch, seq, positions)
    ("bshd", 1, 65536 + 7, "none"),  # heads fastest: the sequence would be the y extent
    ("bshd", 65536 + 3, 1, "bs:int32"),  # decoding a huge batch: the batch would be the z extent
    ("bhsd", 65536 + 3, 2, "s:int64"),  # sequence fastest: the batch would be the z extent
]


@requires_cuda
@pytest.mark.parametrize(("layout", "batch", "seq", "positions"), BEYOND_GRID_YZ,
                         ids=[f"{c[0]}-b{c[1]}-s{c[2]}" for c in BEYOND_GRID_YZ])
def test_sequences_and_batches_beyond_the_grid_yz_limit(layout: str, batch: int, seq: int, positions: str) -> None:
    case = RopeCase(dtype=torch.bfloat16, batch=batch, seq=seq, heads_q=3, heads_k=1, head_dim=32,
                    layout=layout, positions=positions, table_dtype="same")
    check_forward(case, "cuda")


@requires_cuda
def test_strides_beyond_32_bits() -> None:
    # The aligned kernels take their strides as 32-bit integers; a view with a larger stride must
    # get the general kernel (64-bit strides), not a truncated one. Here q's two sequences lie
    # 2^31 + 64 elements apart in one 4 GiB buffer: aligned in every other respect.
    case = RopeCase(dtype=torch.bfloat16, batch=2, seq=5, heads_q=4, heads_k=2, head_dim=64,
                    positions="bs:int32", table_dtype="same")
    args = make_args(case, "cuda")
    gap = 2**31 + 64
    per_sequence = case.seq * case.heads_q * case.head_dim
    buffer = torch.empty(gap + per_sequence, dtype=case.dtype, device="cuda")
    far_q = buffer.as_strided(args.q.shape, (gap, case.head_dim, case.heads_q * case.head_dim, 1))
    far_q.copy_(args.q)
    args = args._replace(q=far_q)
    expected = reference_fused_qk(args)
    outputs = torch.ops.rope.fused_qk(*args)
    for out, x, ref in zip(outputs, (args.q, args.k), expected):
        assert_output_layout(out, x)
        assert_close_to_reference(out, ref, case.dtype)


@pytest.mark.parametrize("head_dim", [258, 512])
def test_cpu_takes_any_even_head_dim(head_dim: int) -> None:
    # The CUDA kernels stop at 256; the CPU implementation has no such limit.
    check_forward(RopeCase(head_dim=head_dim, dtype=torch.float64, table_dtype="same"), "cpu")


@pytest.mark.parametrize("device", DEVICES)
def test_unused_half_of_a_full_width_table_is_never_read(device: str) -> None:
    # Only the first D/2 columns of a (S_max, D) table count: NaN in the rest must not show up.
    case = RopeCase(table_width="full", positions="bs:int64", dtype=torch.bfloat16)
    args = make_args(case, device)
    cos, sin = args.cos.clone(), args.sin.clone()
    cos[:, case.head_dim // 2:] = math.nan
    sin[:, case.head_dim // 2:] = math.nan
    poisoned = args._replace(cos=cos, sin=sin)
    outputs = torch.ops.rope.fused_qk(*poisoned)
    for out, ref in zip(outputs, reference_fused_qk(args)):
        assert not out.isnan().any()
        assert_close_to_reference(out, ref, case.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_no_positions_means_row_s(device: str) -> None:
    # positions=None and positions=arange(S) are the same rotation, bit for bit.
    args = make_args(RopeCase(dtype=torch.float16, layout="qkv"), device)
    arange = torch.arange(args.q.shape[2], device=device)
    implicit = torch.ops.rope.fused_qk(*args)
    explicit = torch.ops.rope.fused_qk(args.q, args.k, args.cos, args.sin, arange)
    for a, b in zip(implicit, explicit):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_python_api_matches_the_op(device: str) -> None:
    # rope_kernels.fused_qk is the typed front door; it must be the op itself, bit for bit.
    args = make_args(RopeCase(positions="bs:int32", layout="bshd"), device)
    via_op = torch.ops.rope.fused_qk(*args)
    via_api = rope_kernels.fused_qk(args.q, args.k, args.cos, args.sin, positions=args.positions)
    without_positions = rope_kernels.fused_qk(args.q, args.k, args.cos, args.sin)
    for a, b in zip(via_op, via_api):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(torch.ops.rope.fused_qk(*RopeArgs(*args[:4], None)), without_positions):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_backward_op_is_the_inverse_rotation(device: str) -> None:
    # fused_qk_backward is fused_qk with sin negated: check it directly and as a round trip.
    case = RopeCase(positions="bs:int64", layout="bshd")
    args = make_args(case, device)
    grads = torch.ops.rope.fused_qk_backward(*args)
    for out, x, ref in zip(grads, (args.q, args.k), reference_fused_qk(args, inverse=True)):
        assert_output_layout(out, x)
        assert_close_to_reference(out, ref, case.dtype)
    rotated = torch.ops.rope.fused_qk(*args)
    restored = torch.ops.rope.fused_qk_backward(*args._replace(q=rotated[0], k=rotated[1]))
    for back, x in zip(restored, (args.q, args.k)):
        torch.testing.assert_close(back, x, rtol=1e-5, atol=1e-5)


def random_cases(count: int, seed: int) -> list[RopeCase]:
    """Cases that combine every property at random (reproducibly), for the interactions that the
    one-property sweeps above cannot reach."""
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        heads_q = rng.choice([1, 2, 3, 8, 12])
        cases.append(RopeCase(
            batch=rng.choice([1, 2, 3]),
            heads_q=heads_q,
            heads_k=rng.choice([1, heads_q, max(1, heads_q // 4), 5]),
            seq=rng.choice([1, 2, 7, 16, 31]),
            head_dim=rng.choice([2, 4, 10, 32, 66, 128, 192, 256]),
            dtype=rng.choice([torch.float16, torch.bfloat16, torch.float32]),
            layout=rng.choice(LAYOUTS),
            positions=rng.choice(POSITIONS),
            table_rows=rng.choice([None, 40]),
            table_width=rng.choice(["half", "full"]),
            table_dtype=rng.choice(["fp32", "same"]),
            table_leading=rng.choice([0, 1, 3]),
            table_layout=rng.choice(["dense", "packed"]),
        ))
    return cases


@pytest.mark.parametrize("case", random_cases(60, seed=2024), ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_random_combinations(device: str, case: RopeCase) -> None:
    check_forward(case, device)
