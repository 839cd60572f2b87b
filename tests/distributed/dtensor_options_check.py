"""The op's layouts and options on DTensors (OPTION_CASES): each sharded call, forward and backward,
equals the op on the whole tensors and the float64 reference, and keeps the inputs' placements
exactly where the sharding rule accepts them.

    torchrun --nproc-per-node 2 tests/distributed/dtensor_options_check.py --backend gloo   # CPU processes
    torchrun --nproc-per-node 2 tests/distributed/dtensor_options_check.py --backend nccl   # a GPU per process

Rank 0 prints one line per case, "case NAME: ok" or what failed on which rank; the exit status is 0
once every case ran (tests/test_dtensor.py reads the lines, one test per case). That test file also
imports this module for the cases' names: DTensor is imported only in the functions that run a
check, so collecting the tests does not import it.
"""
from __future__ import annotations

import dataclasses
import traceback
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

import process_group
import rope_kernels  # noqa: F401  (before DTensor on purpose: the rule must still be registered)
from rope_kernels.testing import assert_close_to_reference, reference_rope, rope_angles


@dataclasses.dataclass(frozen=True)
class OptionCase:
    """One sharded call: q/k in `layout` with the op's options, and where each input lies.

    Placements are a dimension to shard over, or None for Replicate. `kept`: the rule accepts the
    sharding, so outputs and gradients keep the inputs' placements; otherwise DTensor must
    redistribute the tokens first, and the outputs must not be split over them.
    """

    name: str
    layout: str
    q: Optional[int]
    k: Optional[int]
    kept: bool
    positions: str = "none"  # "none", "batch" ((B, S) or (1, T)) or "shared" ((S,) or (T,))
    positions_dim: Optional[int] = None
    packed: str = "none"  # "none", "cu_seqlens", or "cu_seqlens+offsets" (layout "thd")
    per_sequence_tables: bool = False  # (B, S_max, W), sharded with a batch split
    full_width: bool = False  # tables of R columns rather than R/2
    interleaved: bool = False
    interleaved_out: Optional[bool] = None
    rotary_dim: Optional[int] = None


# Uneven splits on purpose: batch 3, sequence 7 and 13 packed tokens do not divide by 2.
BATCH, SEQ, HEADS_Q, HEADS_K, HEAD_DIM, TABLE_ROWS = 3, 7, 4, 2, 32, 24
CU_SEQLENS, SEQLEN_OFFSETS = (0, 5, 9, 13), (3, 0, 7)
TOKENS = CU_SEQLENS[-1]
# Where the tokens are split in each layout.
TOKEN_DIM = {"bhsd": 2, "bshd": 1, "thd": 0}

OPTION_CASES = [
    # "bshd": batch 0, sequence 1, heads 2.
    OptionCase("bshd batch, per-sequence tables", "bshd", 0, 0, True, "batch", 0, per_sequence_tables=True),
    OptionCase("bshd heads", "bshd", 2, 2, True, "batch", None),
    OptionCase("bshd q heads, k replicated", "bshd", 2, None, True),
    OptionCase("bshd sequence, positions (B, S)", "bshd", 1, 1, True, "batch", 1),
    OptionCase("bshd sequence, positions (S,)", "bshd", 1, 1, True, "shared", 0),
    OptionCase("bshd sequence without positions", "bshd", 1, 1, False),
    # "thd": tokens 0, heads 1.
    OptionCase("thd heads, positions", "thd", 1, 1, True, "shared", None),
    OptionCase("thd tokens, positions (T,)", "thd", 0, 0, True, "shared", 0),
    OptionCase("thd tokens, positions (1, T)", "thd", 0, 0, True, "batch", 1),
    OptionCase("thd tokens, positions replicated", "thd", 0, 0, True, "shared", None),
    OptionCase("thd tokens without positions", "thd", 0, 0, False),
    OptionCase("thd heads, cu_seqlens", "thd", 1, 1, True, packed="cu_seqlens"),
    OptionCase("thd q heads, k replicated, cu_seqlens + offsets", "thd", 1, None, True,
               packed="cu_seqlens+offsets"),
    OptionCase("thd tokens, cu_seqlens", "thd", 0, 0, False, packed="cu_seqlens"),
    OptionCase("thd tokens, cu_seqlens + offsets", "thd", 0, 0, False, packed="cu_seqlens+offsets"),
    # Pair conventions and a partial rotation, in each layout.
    OptionCase("interleaved, bhsd heads", "bhsd", 1, 1, True, "batch", None, interleaved=True),
    OptionCase("interleaved, bhsd sequence", "bhsd", 2, 2, True, "batch", 1, interleaved=True, full_width=True),
    OptionCase("interleaved in, half-split out, bshd batch", "bshd", 0, 0, True, "shared", None,
               per_sequence_tables=True, interleaved=True, interleaved_out=False, rotary_dim=16),
    OptionCase("half-split in, interleaved out, bshd sequence", "bshd", 1, 1, True, "batch", 1,
               interleaved_out=True, rotary_dim=8, full_width=True),
    OptionCase("rotary_dim, bhsd batch", "bhsd", 0, 0, True, "batch", 0, rotary_dim=16),
    OptionCase("all options, thd tokens, positions", "thd", 0, 0, True, "shared", 0,
               interleaved=True, interleaved_out=False, rotary_dim=16),
    OptionCase("all options, thd heads, cu_seqlens + offsets", "thd", 1, 1, True,
               packed="cu_seqlens+offsets", interleaved=True, rotary_dim=24, full_width=True),
    OptionCase("all options, thd tokens, cu_seqlens", "thd", 0, 0, False, packed="cu_seqlens",
               interleaved=True, interleaved_out=False, rotary_dim=16),
]

# Same shapes, other layout: q (2, 4, 4, D) split over dim 1 is heads in "bhsd" and the sequence
# in "bshd". The second call must not reuse the sharding DTensor picked (and cached) for the first.
LAYOUT_IN_CACHE_KEY = "bshd sequence after bhsd heads of the same shapes"

ALL_CASE_NAMES = [case.name for case in OPTION_CASES] + [LAYOUT_IN_CACHE_KEY]


def _tables(case: OptionCase, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Real RoPE tables of R/2 (or R) columns; per sequence, sequence b's starts at position 5 * b."""
    rotary = HEAD_DIM if case.rotary_dim is None else case.rotary_dim
    if case.per_sequence_tables:
        angles = rope_angles(TABLE_ROWS + 5 * (BATCH - 1), rotary)
        angles = torch.stack([angles[5 * b:5 * b + TABLE_ROWS] for b in range(BATCH)])
    else:
        angles = rope_angles(TABLE_ROWS, rotary)
    if case.full_width:
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)


def _qk_views(layout: str, dtype: torch.dtype, device: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """q and k as views of one fused qkv projection in the layout's shape: not contiguous, k at a
    storage offset; v is NaN, so reading past k's heads shows in the outputs."""
    width_q, width_k = HEADS_Q * HEAD_DIM, HEADS_K * HEAD_DIM
    leading = (TOKENS,) if layout == "thd" else (BATCH, SEQ)
    fused = torch.randn(*leading, width_q + 2 * width_k, dtype=torch.float64).to(dtype).to(device)
    fused[..., width_q + width_k:] = float("nan")
    q = fused[..., :width_q].unflatten(-1, (HEADS_Q, HEAD_DIM))
    k = fused[..., width_q:width_q + width_k].unflatten(-1, (HEADS_K, HEAD_DIM))
    if layout == "bhsd":
        return q.transpose(1, 2), k.transpose(1, 2)
    return q, k


def _positions(case: OptionCase, device: str) -> Optional[torch.Tensor]:
    """Random in-range table rows: (B, S) or (S,), or for packed tokens (1, T) or (T,)."""
    if case.positions == "none":
        return None
    tokens = TOKENS if case.layout == "thd" else SEQ
    if case.positions == "batch":
        shape: Tuple[int, ...] = (1, tokens) if case.layout == "thd" else (BATCH, tokens)
    else:
        shape = (tokens,)
    return torch.randint(0, TABLE_ROWS, shape).to(device)


def _check_case(mesh: DeviceMesh, device: str, dtype: torch.dtype, case: OptionCase) -> None:
    """The DTensor call (forward, then backward through autograd) equals the op on the whole
    tensors and the float64 reference; placements are kept exactly where the rule accepts them."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    from dtensor_check import within_one_rounding

    def place(t: Optional[torch.Tensor], dim: Optional[int]) -> Any:
        if t is None:
            return None
        return distribute_tensor(t, mesh, [Replicate() if dim is None else Shard(dim)])

    q, k = _qk_views(case.layout, dtype, device)
    cos, sin = _tables(case, dtype, device)
    positions = _positions(case, device)
    grad_q_out = torch.randn(q.shape, dtype=torch.float64).to(dtype).to(device)
    grad_k_out = torch.randn(k.shape, dtype=torch.float64).to(dtype).to(device)
    cu_seqlens = torch.tensor(CU_SEQLENS, device=device) if case.packed != "none" else None
    offsets = torch.tensor(SEQLEN_OFFSETS, device=device) if case.packed == "cu_seqlens+offsets" else None
    options: Dict[str, Any] = {"interleaved": case.interleaved, "interleaved_out": case.interleaved_out,
                               "rotary_dim": case.rotary_dim, "layout": case.layout}
    whole = torch.ops.rope.fused_qk(q, k, cos, sin, positions, cu_seqlens=cu_seqlens,
                                    seqlen_offsets=offsets, **options)
    whole_grads = torch.ops.rope.fused_qk_backward(grad_q_out, grad_k_out, cos, sin, positions,
                                                   cu_seqlens=cu_seqlens, seqlen_offsets=offsets, **options)

    table_dim = 0 if case.per_sequence_tables and case.q == 0 else None
    q_d = place(q, case.q).requires_grad_()
    k_d = place(k, case.k).requires_grad_()
    q_out, k_out = torch.ops.rope.fused_qk(q_d, k_d, place(cos, table_dim), place(sin, table_dim),
                                           place(positions, case.positions_dim), cu_seqlens=place(cu_seqlens, None),
                                           seqlen_offsets=place(offsets, None), **options)
    assert isinstance(q_out, DTensor) and isinstance(k_out, DTensor)
    for out, leaf in ((q_out, q_d), (k_out, k_d)):
        if case.kept:
            assert out.placements == leaf.placements, f"output {out.placements}, input {leaf.placements}"
        else:  # redistributed: the rule gave no token split
            assert Shard(TOKEN_DIM[case.layout]) not in out.placements, f"output {out.placements}"
    grads = torch.autograd.grad((q_out, k_out), (q_d, k_d),
                                (distribute_tensor(grad_q_out, mesh, q_out.placements),
                                 distribute_tensor(grad_k_out, mesh, k_out.placements)))

    packed_kwargs = {"cu_seqlens": cu_seqlens, "seqlen_offsets": offsets}
    tol = within_one_rounding(dtype)
    results = ((q_out, whole[0], q, q_d, False), (k_out, whole[1], k, k_d, False),
               (grads[0], whole_grads[0], grad_q_out, q_d, True), (grads[1], whole_grads[1], grad_k_out, k_d, True))
    for got, one_device, x, leaf, inverse in results:
        if case.kept and inverse:  # the backward rule kept the split too
            assert got.placements == leaf.placements, f"gradient {got.placements}, input {leaf.placements}"
        full = got.full_tensor()
        torch.testing.assert_close(full, one_device, **tol)
        expected = reference_rope(x, cos, sin, positions, inverse, **options, **packed_kwargs)
        assert_close_to_reference(full, expected, dtype)


def _check_layout_in_cache_key(mesh: DeviceMesh, device: str, dtype: torch.dtype) -> None:
    """A "bhsd" heads split, then a "bshd" call on tensors of the same shapes split alike: that is
    a sequence split without positions, which must be gathered, not rotated shard by shard."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    cos, sin = _tables(OptionCase("one shared table", "bhsd", None, None, True), dtype, device)
    x = [torch.randn(2, 4, 4, HEAD_DIM, dtype=torch.float64).to(dtype).to(device) for _ in range(2)]
    placed = [distribute_tensor(t, mesh, [Shard(1)]) for t in x]
    table = [distribute_tensor(t, mesh, [Replicate()]) for t in (cos, sin)]
    heads = torch.ops.rope.fused_qk(*placed, *table)
    assert heads[0].placements == (Shard(1),), heads[0].placements
    sequence = torch.ops.rope.fused_qk(*placed, *table, layout="bshd")
    for out, t in zip(sequence, x):
        assert out.placements != (Shard(1),), "bshd reused the bhsd call's sequence split"
        assert_close_to_reference(out.full_tensor(), reference_rope(t, cos, sin, layout="bshd"), dtype)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    group = process_group.start(__doc__, argv)
    mesh, device = group.mesh, group.device
    checks: List[Tuple[str, Callable[[torch.dtype], None]]] = [
        (case.name, lambda dtype, case=case: _check_case(mesh, device, dtype, case)) for case in OPTION_CASES]
    checks.append((LAYOUT_IN_CACHE_KEY, lambda dtype: _check_layout_in_cache_key(mesh, device, dtype)))
    seed = 0
    for name, check in checks:
        failures: List[str] = []
        for dtype in group.dtypes:
            seed += 1
            torch.manual_seed(seed)  # the same global tensors on every rank
            try:
                check(dtype)
            except Exception:  # reported on one line, the traceback's lines joined by " | "
                trace = " | ".join(line.strip() for line in traceback.format_exc().splitlines() if line.strip())
                failures.append(f"rank {group.rank}, {dtype}: {trace[-3000:]}")
        everyone: List[Optional[List[str]]] = [None] * group.world
        dist.all_gather_object(everyone, failures)
        found = [failure for rank_failures in everyone for failure in rank_failures or []]
        if group.rank == 0:
            print(f"case {name}: " + ("; ".join(found) if found else "ok"), flush=True)
    process_group.finish()


if __name__ == "__main__":
    main()
