"""A position outside the cos/sin table turns that token's outputs into NaN, on every device.

Such a position must never read memory outside the table; NaN makes the bad input visible
instead of rotating by whatever angle a clamp or a wrap-around would pick.
"""
from __future__ import annotations

import pytest
import torch

import rope_kernels  # noqa: F401  (registers torch.ops.rope)
from rope_env import DEVICES
from rope_kernels.testing import RopeCase, assert_close_to_reference, make_args, reference_fused_qk

CASE = RopeCase(batch=2, seq=8, heads_q=8, heads_k=2, head_dim=96, dtype=torch.bfloat16, layout="bshd")


def bad_positions(dtype: torch.dtype, rows: int) -> dict[tuple[int, int], int]:
    """Out-of-range positions by token (b, s): just outside either end, far outside, and for int64
    values that a 32-bit truncation would turn into valid rows (2^32 + 1 -> 1, -2^32 -> 0)."""
    bad = {(0, 1): -1, (0, 5): rows, (1, 0): rows + 1000, (1, 7): torch.iinfo(dtype).min}
    if dtype == torch.int64:
        bad.update({(1, 3): 2**32 + 1, (0, 6): -(2**32), (1, 4): torch.iinfo(dtype).max})
    else:
        bad[(1, 4)] = torch.iinfo(dtype).max
    return bad


def assert_nan_exactly_at(outputs: tuple[torch.Tensor, torch.Tensor], bad_tokens: set[tuple[int, int]]) -> None:
    """Each bad token is NaN in every head and every element of q and k; other tokens are finite."""
    for out in outputs:
        nan_tokens = out.isnan().cpu()  # (B, H, S, D)
        for b in range(out.shape[0]):
            for s in range(out.shape[2]):
                if (b, s) in bad_tokens:
                    assert nan_tokens[b, :, s].all(), f"token {(b, s)} has a bad position but is not all NaN"
                else:
                    assert not nan_tokens[b, :, s].any(), f"token {(b, s)} has a valid position but has NaN"


@pytest.mark.parametrize("inverse", [False, True], ids=["fused_qk", "fused_qk_backward"])
@pytest.mark.parametrize("pos_dtype", [torch.int32, torch.int64], ids=["int32", "int64"])
@pytest.mark.parametrize("device", DEVICES)
def test_per_token_positions(device: str, pos_dtype: torch.dtype, inverse: bool) -> None:
    args = make_args(CASE, device)
    positions = torch.randint(0, CASE.rows, (CASE.batch, CASE.seq), dtype=pos_dtype)
    bad = bad_positions(pos_dtype, CASE.rows)
    for (b, s), value in bad.items():
        positions[b, s] = value
    args = args._replace(positions=positions.to(device))
    op = torch.ops.rope.fused_qk_backward if inverse else torch.ops.rope.fused_qk
    outputs = op(*args)
    assert_nan_exactly_at(outputs, set(bad))
    for out, ref in zip(outputs, reference_fused_qk(args, inverse=inverse)):
        assert_close_to_reference(out, ref, CASE.dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_shared_positions(device: str) -> None:
    # A bad entry of a (S,) positions tensor spoils that token in every sequence of the batch.
    args = make_args(CASE, device)
    positions = torch.arange(CASE.seq)
    positions[2] = -5
    positions[6] = CASE.rows
    args = args._replace(positions=positions.to(device))
    outputs = torch.ops.rope.fused_qk(*args)
    assert_nan_exactly_at(outputs, {(b, s) for b in range(CASE.batch) for s in (2, 6)})
    for out, ref in zip(outputs, reference_fused_qk(args)):
        assert_close_to_reference(out, ref, CASE.dtype)


@pytest.mark.parametrize("table_shape", ["shared", "per_sequence"])
@pytest.mark.parametrize("op_name", ["fused_qk", "fused_qk_backward", "fused_qk_"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_table(device: str, op_name: str, table_shape: str) -> None:
    # With a table of no rows every position lies outside it: every token is NaN, on every device.
    args = make_args(CASE, device)
    half = CASE.head_dim // 2
    shape = (0, half) if table_shape == "shared" else (CASE.batch, 0, half)
    empty = torch.empty(shape, dtype=CASE.dtype, device=device)
    positions = torch.randint(0, CASE.rows, (CASE.batch, CASE.seq), device=device)
    q, k = args.q.detach().clone(), args.k.detach().clone()
    outputs = getattr(torch.ops.rope, op_name)(q, k, empty, empty.clone(), positions)
    assert_nan_exactly_at(outputs, {(b, s) for b in range(CASE.batch) for s in range(CASE.seq)})


@pytest.mark.parametrize("device", DEVICES)
def test_empty_table_with_packed_sequences(device: str) -> None:
    tokens, heads_q, heads_k, head_dim = 7, 4, 2, 32
    q = torch.randn(tokens, heads_q, head_dim, device=device)
    k = torch.randn(tokens, heads_k, head_dim, device=device)
    empty = torch.empty(0, head_dim // 2, device=device)
    cu_seqlens = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)
    q_out, k_out = torch.ops.rope.fused_qk(q, k, empty, empty.clone(), layout="thd", cu_seqlens=cu_seqlens)
    assert q_out.shape == q.shape and k_out.shape == k.shape
    assert q_out.isnan().all() and k_out.isnan().all()
