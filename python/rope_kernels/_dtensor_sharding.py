"""How rope::fused_qk and rope::fused_qk_backward take DTensors: their sharding rule.

This module imports torch.distributed.tensor (over a second of import time), so the package loads
it only once DTensor is in use (see _dtensor_hook).

RoPE rotates each head vector of each token on its own, by the angle of that token's table row:
- batch and heads are independent, so q and k may be sharded over them (each rank rotates its
  part; for heads, q and k may even be split differently, as grouped-query attention does);
- a sequence shard is right only when every token knows its table row, i.e. with positions
  sharded like the sequence; without positions a shard would start again at row 0, so then the
  sequence is gathered first (DTensor does so, as no rule below accepts that sharding);
- the head dimension pairs its first half with its second, so it is never sharded;
- cos/sin are looked up by any row: each rank needs the whole table (Replicate), or with one
  table per sequence ((batch, max_seq, W)), the tables of its own sequences when the batch is
  sharded.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import Placement
from torch.distributed.tensor.experimental import register_sharding

# One acceptable sharding: the placements of (q_out, k_out), then of (q, k, cos, sin, positions),
# with None for an argument that is not a tensor (positions=None).
PlacementRow = Tuple[List[Optional[Placement]], List[Optional[Placement]]]

# Dimensions of q and k, (B, H, S, D).
BATCH_DIM, HEADS_DIM, SEQ_DIM = 0, 1, 2


def _positions_placement(positions: Optional[object], q_dim: int) -> Optional[Placement]:
    """Where positions must be for q/k sharded over q_dim (None: replicated q/k).

    positions is (B, S) or (S,): sharded with the batch only when it has a batch dimension, with
    the sequence along its last dimension, and replicated for a head split.
    """
    if positions is None:
        return None
    ndim: int = positions.ndim  # type: ignore[attr-defined]  (DTensor's spec of the tensor)
    if q_dim == BATCH_DIM and ndim == 2:
        return Shard(0)
    if q_dim == SEQ_DIM:
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


def rope_shardings(q: object, k: object, cos: object, sin: object,
                   positions: Optional[object] = None) -> Sequence[PlacementRow]:
    """The shardings under which the op on each rank's pieces gives the pieces of the whole result.

    Called by DTensor with specs in place of the tensors; the same for forward and backward,
    whose arguments (grad_q_out, grad_k_out, cos, sin, positions) have the same meaning.
    """
    table = Replicate()
    rows: List[PlacementRow] = []
    # Heads: q and k independently (e.g. q split across ranks, a single k head replicated).
    for q_place in (Replicate(), Shard(HEADS_DIM)):
        for k_place in (Replicate(), Shard(HEADS_DIM)):
            rows.append(([q_place, k_place],
                         [q_place, k_place, table, table, _positions_placement(positions, HEADS_DIM)]))
    # Batch: q and k together, as the op requires equal batch sizes; per-sequence tables with them.
    batch = Shard(BATCH_DIM)
    table_batch_dim = _table_batch_dim(cos)
    batch_table = table if table_batch_dim is None else Shard(table_batch_dim)
    rows.append(([batch, batch], [batch, batch, batch_table, batch_table,
                                  _positions_placement(positions, BATCH_DIM)]))
    # Sequence: only with positions (see the module's doc).
    if positions is not None:
        seq = Shard(SEQ_DIM)
        rows.append(([seq, seq], [seq, seq, table, table, _positions_placement(positions, SEQ_DIM)]))
    return rows


def register() -> None:
    """Register rope_shardings for both ops with DTensor (registering again replaces it)."""
    register_sharding([torch.ops.rope.fused_qk.default,
                       torch.ops.rope.fused_qk_backward.default])(rope_shardings)
