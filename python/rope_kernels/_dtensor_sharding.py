"""How rope::fused_qk, rope::fused_qk_backward and the in-place rope::fused_qk_ take DTensors.

This module imports torch.distributed.tensor (over a second of import time), so the package loads
it only once DTensor is in use (see _dtensor_hook).

RoPE rotates each head vector of each token on its own, by the angle of that token's table row:
- batch and heads are independent, so q and k may be sharded over them (each rank rotates its
  part; for heads, q and k may even be split differently, as grouped-query attention does);
- a sequence (or packed token) shard is right only when every token knows its table row, i.e.
  with positions sharded like the tokens; without positions a shard would start again at row 0,
  and with cu_seqlens a shard's local token indices no longer match the document boundaries, so
  then the tokens are gathered first (DTensor does so, as no rule below accepts that sharding);
- the head dimension pairs its features (half-split or interleaved, within the first rotary_dim),
  so it is never sharded; interleaved, interleaved_out and rotary_dim change nothing else;
- cos/sin are looked up by any row: each rank needs the whole table (Replicate), or with one
  table per sequence ((batch, max_seq, W)), the tables of its own sequences when the batch is
  sharded; cu_seqlens and seqlen_offsets describe every document, so they are replicated.

Where each role sits in q and k depends on the layout: (B, H, S, D) for "bhsd", (B, S, H, D) for
"bshd", and (T, H, D) for packed "thd", which has no batch dimension.

The in-place op takes the same shardings, by a handler of its own: DTensor's in-place path serves
ops that mutate and return one argument, and fused_qk_ mutates and returns two. q and k are
rotated where they lie, so their sharding must be one of the rule's as it is (nothing can gather
them and still rotate them in place); the other arguments are redistributed to what that sharding
needs, as DTensor does for the out-of-place op.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.placement_types import Placement
from torch.distributed.tensor.experimental import register_sharding

# One acceptable sharding: the placements of (q_out, k_out), then of (q, k, cos, sin, positions,
# cu_seqlens, seqlen_offsets), with None for an argument that is not a tensor (positions=None).
PlacementRow = Tuple[List[Optional[Placement]], List[Optional[Placement]]]


@dataclasses.dataclass(frozen=True)
class LayoutDims:
    """The dimensions of q and k that hold the batch (None: there is none), heads and tokens."""

    batch: Optional[int]
    heads: int
    seq: int


LAYOUT_DIMS: Dict[str, LayoutDims] = {
    "bhsd": LayoutDims(batch=0, heads=1, seq=2),
    "bshd": LayoutDims(batch=0, heads=2, seq=1),
    "thd": LayoutDims(batch=None, heads=1, seq=0),
}

# What q and k are split over in one row, which decides where positions go.
_REPLICATED, _HEADS, _BATCH, _TOKENS = "replicated", "heads", "batch", "tokens"


def _positions_placement(positions: Optional[object], split: str) -> Optional[Placement]:
    """Where positions must be for q/k split over `split` (None: positions is not a tensor).

    positions is (B, S) or (S,) ((T,) or (1, T) for packed tokens): sharded with the batch only
    when it has a batch dimension, with the tokens along its last dimension, else replicated.
    """
    if positions is None:
        return None
    ndim: int = positions.ndim  # type: ignore[attr-defined]  (DTensor's spec of the tensor)
    if split == _BATCH and ndim == 2:
        return Shard(0)
    if split == _TOKENS:
        return Shard(ndim - 1)
    return Replicate()


def _table_batch_dim(table: object) -> Optional[int]:
    """The dimension of cos/sin that counts the sequences when they hold one table per sequence,
    else None. The op drops leading size-1 dims first, as here: (1, B, max_seq, W) is B tables
    along dim 1, and (1, max_seq, W) one shared table."""
    shape = table.shape  # type: ignore[attr-defined]  (DTensor's spec of the tensor)
    leading = 0
    while len(shape) - leading > 2 and shape[leading] == 1:
        leading += 1
    return leading if len(shape) - leading == 3 else None


def rope_shardings(q: object, k: object, cos: object, sin: object, positions: Optional[object] = None, *,
                   interleaved: bool = False, interleaved_out: Optional[bool] = None,
                   rotary_dim: Optional[int] = None, layout: str = "bhsd",
                   cu_seqlens: Optional[object] = None,
                   seqlen_offsets: Optional[object] = None) -> Sequence[PlacementRow]:
    """The shardings under which the op on each rank's pieces gives the pieces of the whole result.

    Called by DTensor with specs in place of the tensors and with the op's options; the same for
    forward and backward, whose arguments (grad_q_out, grad_k_out, cos, sin, positions, options)
    have the same meaning. interleaved, interleaved_out and rotary_dim only rearrange features
    within a head, which is never split, so they leave the rows as they are.
    """
    replicate = Replicate()
    # The packed-sequence tensors (DTensor lists its tensor kwargs after the positional ones, in
    # the schema's order) go whole to every rank; None where absent.
    packed = [None if t is None else replicate for t in (cu_seqlens, seqlen_offsets)]

    def row(q_place: Placement, k_place: Placement, table: Placement, split: str) -> PlacementRow:
        return ([q_place, k_place],
                [q_place, k_place, table, table, _positions_placement(positions, split), *packed])

    dims = LAYOUT_DIMS.get(layout)
    if dims is None:  # not a layout: everything whole, so the op itself reports the error
        return [row(replicate, replicate, replicate, _REPLICATED)]
    rows: List[PlacementRow] = []
    # Heads: q and k independently (e.g. q split across ranks, a single k head replicated).
    heads = Shard(dims.heads)
    for q_place in (replicate, heads):
        for k_place in (replicate, heads):
            split = _REPLICATED if q_place == k_place == replicate else _HEADS
            rows.append(row(q_place, k_place, replicate, split))
    # Batch: q and k together, as the op requires equal batch sizes; per-sequence tables with them.
    if dims.batch is not None:
        batch = Shard(dims.batch)
        table_batch_dim = _table_batch_dim(cos)
        batch_table = replicate if table_batch_dim is None else Shard(table_batch_dim)
        rows.append(row(batch, batch, batch_table, _BATCH))
    # Tokens: only with positions, and never with cu_seqlens (see the module's doc).
    if positions is not None and cu_seqlens is None:
        seq = Shard(dims.seq)
        rows.append(row(seq, seq, replicate, _TOKENS))
    return rows


_INPLACE_OP = "rope::fused_qk_"


def _inplace_rotation(op_call: object, args: Tuple[object, ...], kwargs: Dict[str, object]) -> object:
    """rope::fused_qk_ on DTensors: each rank rotates its pieces of q and k in place, under a
    sharding of the rule found for each mesh dimension; returns q and k, their placements as they were."""
    q, k, cos, sin = args[:4]
    positions = args[4] if len(args) > 4 else kwargs.get("positions")
    options = {name: value for name, value in kwargs.items() if name != "positions"}
    if not isinstance(q, DTensor) or not isinstance(k, DTensor):
        raise RuntimeError(f"{_INPLACE_OP}: q and k must both be DTensors when one argument is")
    mesh = q.device_mesh
    others = [cos, sin, positions, options.get("cu_seqlens"), options.get("seqlen_offsets")]
    needed: List[List[Placement]] = [[] for _ in others]
    for dim in range(mesh.ndim):
        placed = [q.placements[dim], k.placements[dim]]
        rows = [inputs for outputs, inputs in rope_shardings(q, k, cos, sin, positions, **options)
                if list(inputs[:2]) == placed]
        if not rows:
            raise RuntimeError(
                f"{_INPLACE_OP}: q and k placed as {placed[0]} and {placed[1]} on mesh dimension {dim} cannot be "
                "rotated in place: the op rotates q and k sharded over batch or heads, or over the tokens "
                "with positions (and no cu_seqlens); fused_qk, out of place, takes any sharding")
        for i, placement in enumerate(rows[0][2:]):
            if placement is not None:
                needed[i].append(placement)

    def local(t: object, placements: List[Placement]) -> object:
        if not isinstance(t, DTensor):
            return t  # None, or a plain tensor DTensor's own checks let through
        return t.redistribute(mesh, placements).to_local()

    cos_l, sin_l, positions_l, cu_seqlens_l, offsets_l = (local(t, p) for t, p in zip(others, needed))
    if "cu_seqlens" in options:
        options["cu_seqlens"] = cu_seqlens_l
    if "seqlen_offsets" in options:
        options["seqlen_offsets"] = offsets_l
    torch.ops.rope.fused_qk_(q.to_local(), k.to_local(), cos_l, sin_l, positions_l, **options)
    return q, k


def register() -> None:
    """Register rope_shardings for both out-of-place ops with DTensor (registering again replaces
    it, for the calls whose sharding DTensor has not cached yet), and the in-place op's handler.

    DTensor caches the sharding it picks for an op, keyed by the specs of the tensor arguments and
    by the arguments its schema info names; register_sharding names the int options only. The
    rows depend on layout and on which of cu_seqlens/seqlen_offsets are given, so every
    keyword-only option of the op is named in the key: a "bshd" call never reuses a "bhsd" call's
    sharding of the same shapes.
    """
    ops = [torch.ops.rope.fused_qk.default, torch.ops.rope.fused_qk_backward.default]
    # Looked up first: where this private attribute is missing, nothing gets registered at all.
    schema_infos = DTensor._op_dispatcher.sharding_propagator.op_to_schema_info
    handlers = DTensor._op_dispatcher._custom_op_handlers
    register_sharding(ops)(rope_shardings)
    for op in ops:
        options = [argument.name for argument in op._schema.arguments if argument.kwarg_only]
        schema_infos[op] = dataclasses.replace(schema_infos[op], static_kwargkey=options)
    handlers[torch.ops.rope.fused_qk_.default] = _inplace_rotation
