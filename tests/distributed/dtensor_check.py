"""The op on DTensors equals the op on the whole tensors, and tensor parallelism around it works.

    torchrun --nproc-per-node 2 tests/distributed/dtensor_check.py --backend gloo   # CPU processes
    torchrun --nproc-per-node 2 tests/distributed/dtensor_check.py --backend nccl   # a GPU per process

1. fused_qk and its backward on q/k sharded over batch, heads or sequence (cos/sin replicated,
   positions sharded like the tokens): values and gradients equal the float64 reference and the
   op on the unsharded tensors, and the outputs keep the inputs' sharding (no gathering).
   The in-place fused_qk_ on the same shardings: q and k rotated where they lie, their placements
   kept, gradients through it; a sharding it cannot rotate in place refused with the op's message.
2. Tensor parallelism of an attention block (projections split by heads): the same output and
   input gradient as the block on one process.
Exit status 0 when every check passes; rank 0 prints one line per check.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, List, NoReturn, Optional, Tuple

import torch

import rope_kernels  # noqa: F401  (imported before DTensor on purpose: the rule must still be registered)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import Placement

# This directory (process_group, tiny_llama) and the tests directory.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [_HERE, os.path.dirname(_HERE)]
import process_group  # noqa: E402
from rope_kernels.testing import (RopeCase, assert_close_to_reference, make_args,  # noqa: E402
                                  reference_fused_qk, tolerance)
from tiny_llama import Attention, TinyLlamaConfig, rope_tables  # noqa: E402

R = Replicate()


@dataclasses.dataclass(frozen=True)
class Sharding:
    name: str
    q: Placement
    k: Placement
    positions: Placement  # for (B, S) positions; (S,) positions are handled in positions_placement
    outputs: Optional[Tuple[Placement, Placement]]  # None: not asserted (the op needs a gathered input)


SHARDINGS = [
    Sharding("batch", Shard(0), Shard(0), Shard(0), (Shard(0), Shard(0))),
    Sharding("heads", Shard(1), Shard(1), R, (Shard(1), Shard(1))),
    Sharding("q heads, k replicated", Shard(1), R, R, (Shard(1), R)),
    Sharding("sequence", Shard(2), Shard(2), Shard(1), (Shard(2), Shard(2))),
    # Positions given whole: DTensor cuts each rank's part locally, still no gathering of q/k.
    Sharding("sequence, positions replicated", Shard(2), Shard(2), R, (Shard(2), Shard(2))),
    Sharding("replicated", R, R, R, (R, R)),
]

POSITIONS = ("bs:int64", "s:int32", "none")
PER_SEQUENCE_TABLE_CASES = (("bs:int64", 0), ("none", 1))  # (positions, leading size-1 dims)


def positions_placement(sharding: Sharding, positions: str) -> Placement:
    """(S,) positions have no batch dimension: replicated for a batch split, dim 0 for a sequence one."""
    if positions.startswith("s:") and isinstance(sharding.positions, Shard):
        return Shard(0) if sharding.q == Shard(2) else R
    return sharding.positions


def expected_outputs(sharding: Sharding, positions: str) -> Optional[Tuple[Placement, Placement]]:
    # A sequence shard without positions would restart at table row 0 on every rank: the rule
    # refuses it and DTensor gathers the sequence first, so only the values are checked.
    if positions == "none" and sharding.q == Shard(2):
        return None
    return sharding.outputs


def within_one_rounding(dtype: torch.dtype) -> Dict[str, float]:
    """Tolerance between two results that are each within half an ulp of the exact value (other
    kernel variants may be picked for the shards' layouts): one ulp."""
    tol = tolerance(dtype)
    return {"rtol": 2 * tol["rtol"], "atol": 2 * tol["atol"]}


def table_placement(sharding: Sharding, per_sequence_tables: bool, table_leading: int) -> Placement:
    """Where cos/sin go: whole on every rank, or with one table per sequence, split with a batch
    split (along their sequence dimension, after `table_leading` size-1 dims)."""
    return Shard(table_leading) if per_sequence_tables and sharding.q == Shard(0) else R


def check_sharded_op(mesh: DeviceMesh, device: str, dtype: torch.dtype, sharding: Sharding, positions: str,
                     per_sequence_tables: bool, seed: int, table_leading: int = 0) -> None:
    torch.manual_seed(seed)  # the same global tensors on every rank
    # Uneven splits on purpose: batch 3 and sequence 7 do not divide by 2.
    case = RopeCase(batch=3, heads_q=4, heads_k=2, seq=7, head_dim=32, dtype=dtype, layout="bshd",
                    positions=positions, per_sequence_tables=per_sequence_tables, table_leading=table_leading)
    args = make_args(case, device)
    grads = make_args(case, device)  # random output gradients of the same shapes
    whole = torch.ops.rope.fused_qk(*args)
    q = distribute_tensor(args.q, mesh, [sharding.q]).requires_grad_()
    k = distribute_tensor(args.k, mesh, [sharding.k]).requires_grad_()
    table = table_placement(sharding, per_sequence_tables, table_leading)
    cos = distribute_tensor(args.cos, mesh, [table])
    sin = distribute_tensor(args.sin, mesh, [table])
    pos = None if args.positions is None else distribute_tensor(args.positions, mesh,
                                                                [positions_placement(sharding, positions)])
    q_out, k_out = torch.ops.rope.fused_qk(q, k, cos, sin, pos)
    assert isinstance(q_out, DTensor) and isinstance(k_out, DTensor)
    wanted = expected_outputs(sharding, positions)
    if wanted is not None:
        got = (tuple(q_out.placements), tuple(k_out.placements))
        assert got == ((wanted[0],), (wanted[1],)), f"output placements {got}, expected {wanted}"
    for out, one_device, ref in zip((q_out, k_out), whole, reference_fused_qk(args)):
        full = out.full_tensor()
        assert_close_to_reference(full, ref, dtype)
        torch.testing.assert_close(full, one_device, **within_one_rounding(dtype))

    # Backward: fused_qk_backward on the output gradients, placed like the outputs.
    grad_q_out = distribute_tensor(grads.q, mesh, q_out.placements)
    grad_k_out = distribute_tensor(grads.k, mesh, k_out.placements)
    grad_q, grad_k = torch.autograd.grad((q_out, k_out), (q, k), (grad_q_out, grad_k_out))
    reference = reference_fused_qk(grads._replace(cos=args.cos, sin=args.sin, positions=args.positions),
                                   inverse=True)
    for grad, leaf, ref in zip((grad_q, grad_k), (q, k), reference):
        if wanted is not None:  # the backward rule kept the sharding too
            assert tuple(grad.placements) == tuple(leaf.placements), f"gradient placements {grad.placements}"
        assert_close_to_reference(grad.full_tensor(), ref, dtype)


def check_inplace_op(mesh: DeviceMesh, device: str, dtype: torch.dtype, sharding: Sharding, positions: str,
                     seed: int) -> None:
    torch.manual_seed(seed)
    case = RopeCase(batch=3, heads_q=4, heads_k=2, seq=7, head_dim=32, dtype=dtype, layout="bshd", positions=positions)
    args = make_args(case, device)
    grads = make_args(case, device)
    q_leaf = distribute_tensor(args.q, mesh, [sharding.q]).requires_grad_()
    k_leaf = distribute_tensor(args.k, mesh, [sharding.k]).requires_grad_()
    cos, sin = (distribute_tensor(t, mesh, [R]) for t in (args.cos, args.sin))
    pos = None if args.positions is None else distribute_tensor(args.positions, mesh,
                                                                [positions_placement(sharding, positions)])
    q, k = q_leaf * 1, k_leaf * 1  # non-leaf copies, which autograd lets the op rotate in place
    if expected_outputs(sharding, positions) is None:
        try:
            torch.ops.rope.fused_qk_(q, k, cos, sin, pos)
        except RuntimeError as error:
            assert "rope::fused_qk_: q and k placed as" in str(error) and "cannot be rotated in place" in str(error), error
            return
        raise AssertionError(f"{sharding.name} without positions was rotated in place")
    before = (tuple(q.placements), tuple(k.placements))
    q_out, k_out = torch.ops.rope.fused_qk_(q, k, cos, sin, pos)
    assert q_out is q and k_out is k, "the in-place op returns its q and k"
    assert (tuple(q.placements), tuple(k.placements)) == before, f"placements changed from {before}"
    for out, ref in zip((q, k), reference_fused_qk(args)):
        assert_close_to_reference(out.full_tensor(), ref, dtype)
    grad_q_out = distribute_tensor(grads.q, mesh, q.placements)
    grad_k_out = distribute_tensor(grads.k, mesh, k.placements)
    grad_q, grad_k = torch.autograd.grad((q, k), (q_leaf, k_leaf), (grad_q_out, grad_k_out))
    reference = reference_fused_qk(grads._replace(cos=args.cos, sin=args.sin, positions=args.positions), inverse=True)
    for grad, ref in zip((grad_q, grad_k), reference):
        assert_close_to_reference(grad.full_tensor(), ref, dtype)


def check_inplace_packed(mesh: DeviceMesh, device: str, dtype: torch.dtype) -> None:
    """Packed documents (T, H, D), interleaved pairs, in place: a head split is rotated where it
    lies; a token split with cu_seqlens is refused (its local token indices miss the boundaries)."""
    torch.manual_seed(7)
    q = torch.randn(13, 4, 32, device=device, dtype=dtype)
    k = torch.randn(13, 2, 32, device=device, dtype=dtype)
    cos, sin = torch.randn(40, 16, device=device), torch.randn(40, 16, device=device)
    cu_seqlens = torch.tensor([0, 5, 13], device=device, dtype=torch.int32)
    options = {"layout": "thd", "interleaved": True}
    expected = torch.ops.rope.fused_qk(q, k, cos, sin, cu_seqlens=cu_seqlens, **options)
    whole = [distribute_tensor(t, mesh, [R]) for t in (cos, sin, cu_seqlens)]
    q_dt, k_dt = (distribute_tensor(t.clone(), mesh, [Shard(1)]) for t in (q, k))
    torch.ops.rope.fused_qk_(q_dt, k_dt, whole[0], whole[1], cu_seqlens=whole[2], **options)
    assert tuple(q_dt.placements) == (Shard(1),) and tuple(k_dt.placements) == (Shard(1),)
    for got, want in zip((q_dt, k_dt), expected):
        torch.testing.assert_close(got.full_tensor(), want, **within_one_rounding(dtype))
    q_dt, k_dt = (distribute_tensor(t.clone(), mesh, [Shard(0)]) for t in (q, k))
    try:
        torch.ops.rope.fused_qk_(q_dt, k_dt, whole[0], whole[1], cu_seqlens=whole[2], **options)
    except RuntimeError as error:
        assert "cannot be rotated in place" in str(error), error
        return
    raise AssertionError("a token split with cu_seqlens was rotated in place")


def check_tensor_parallel_attention(mesh: DeviceMesh, device: str, dtype: torch.dtype) -> None:
    """Heads split over the ranks (q/k/v projections by columns, the output one by rows): the op
    sees each rank's heads; the result is the one-process block's."""
    config = TinyLlamaConfig(heads_q=4, heads_k=2, head_dim=16, dim=64)
    torch.manual_seed(1)
    block = Attention(config).to(device=device, dtype=dtype)
    parallel = Attention(config).to(device=device, dtype=dtype)
    parallel.load_state_dict(block.state_dict())
    parallelize_module(parallel, mesh, {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(),
                                        "v_proj": ColwiseParallel(), "o_proj": RowwiseParallel()})
    cos, sin = (t.to(device) for t in rope_tables(config))
    x = torch.randn(2, 9, config.dim, device=device, dtype=dtype, requires_grad=True)
    positions = torch.randint(0, config.max_positions, (2, 9), device=device)
    expected = block(x, cos, sin, positions)
    (expected_grad,) = torch.autograd.grad(expected, x, torch.ones_like(expected))
    got = parallel(x, cos, sin, positions)
    (got_grad,) = torch.autograd.grad(got, x, torch.ones_like(got))
    # The output projection sums partial products across ranks: a few ulps of reordering.
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    torch.testing.assert_close(got, expected, **tol)
    torch.testing.assert_close(got_grad, expected_grad, **tol)


def check_dtensor_heads_from_projection(mesh: DeviceMesh, device: str, dtype: torch.dtype) -> None:
    """q/k kept as DTensors out of column-parallel projections: after view and transpose they are
    sharded over heads, and the op keeps them so."""
    config = TinyLlamaConfig(heads_q=4, heads_k=2, head_dim=16, dim=64)
    torch.manual_seed(2)
    q_proj = torch.nn.Linear(config.dim, config.heads_q * config.head_dim, bias=False).to(device=device, dtype=dtype)
    k_proj = torch.nn.Linear(config.dim, config.heads_k * config.head_dim, bias=False).to(device=device, dtype=dtype)
    x = torch.randn(2, 9, config.dim, device=device, dtype=dtype)
    cos, sin = (t.to(device) for t in rope_tables(config))
    positions = torch.randint(0, config.max_positions, (2, 9), device=device)
    whole = [proj(x).view(2, 9, -1, config.head_dim).transpose(1, 2) for proj in (q_proj, k_proj)]
    expected = torch.ops.rope.fused_qk(whole[0], whole[1], cos, sin, positions)
    for proj in (q_proj, k_proj):
        parallelize_module(proj, mesh, ColwiseParallel(use_local_output=False))
    x_dt = distribute_tensor(x, mesh, [R])
    q, k = (proj(x_dt).view(2, 9, -1, config.head_dim).transpose(1, 2) for proj in (q_proj, k_proj))
    assert tuple(q.placements) == (Shard(1),), f"q placements {q.placements}"
    table = [distribute_tensor(t, mesh, [R]) for t in (cos, sin, positions)]
    q_out, k_out = torch.ops.rope.fused_qk(q, k, *table)
    assert tuple(q_out.placements) == (Shard(1),) and tuple(k_out.placements) == (Shard(1),)
    # The split projections may round differently from the whole one (another GEMM algorithm).
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(q_out.full_tensor(), expected[0], **tol)
    torch.testing.assert_close(k_out.full_tensor(), expected[1], **tol)


def main(argv: Optional[List[str]] = None) -> NoReturn:
    group = process_group.start(__doc__, argv)
    mesh, device, world = group.mesh, group.device, group.world

    def report(line: str) -> None:
        if group.rank == 0:
            print(line, flush=True)

    seed = 0
    for dtype in group.dtypes:
        for sharding in SHARDINGS:
            for positions in POSITIONS:
                seed += 1
                check_sharded_op(mesh, device, dtype, sharding, positions, False, seed)
            # One (B, S_max, W) table per sequence; with a leading size-1 dim, (1, B, S_max, W).
            for positions, table_leading in PER_SEQUENCE_TABLE_CASES:
                seed += 1
                check_sharded_op(mesh, device, dtype, sharding, positions, True, seed, table_leading)
            for positions in POSITIONS:
                seed += 1
                check_inplace_op(mesh, device, dtype, sharding, positions, seed)
            report(f"dtensor {str(dtype).replace('torch.', '')} {sharding.name}: ok")
        check_inplace_packed(mesh, device, dtype)
        report(f"dtensor {str(dtype).replace('torch.', '')} packed tokens in place: ok")
    # Whole-model checks in full precision (float32 on a GPU, TF32 off): the split matmuls differ
    # from the whole ones only by summation order.
    torch.backends.cuda.matmul.allow_tf32 = False
    model_dtype = torch.float32 if device == "cuda" else torch.float64
    check_tensor_parallel_attention(mesh, device, model_dtype)
    report(f"tensor-parallel attention ({world} ranks, heads split): ok")
    check_dtensor_heads_from_projection(mesh, device, model_dtype)
    report("column-parallel projections kept as DTensors, rotated without gathering: ok")
    report(f"DTensor checks on {world} x {device} ({group.backend}): all ok")
    process_group.finish()


if __name__ == "__main__":
    main()
