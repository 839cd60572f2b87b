"""Bringing the tables and positions that other libraries pass into the form the op takes.

Shared by the Unsloth and Hugging Face compatible entry points. Typed and TorchScript-compatible,
and free of data-dependent control flow, so torch.compile traces through without graph breaks.
"""
from __future__ import annotations

from typing import List

import torch


def as_table(t: torch.Tensor, caller: str, name: str) -> torch.Tensor:
    """A cos/sin table as the 2-D ``(rows, width)`` the op reads, without a copy.

    Size-1 dimensions are dropped wherever they are, as Unsloth's ``cos.squeeze()`` does
    (``(1, 1, S, D)``, ``(S, 1, D)``), but the result keeps two dimensions, so a one-row table (one
    decoding step) stays a table.
    """
    if t.dim() == 2:
        return t
    if t.dim() < 2:
        raise ValueError(caller + ": " + name + " must have at least 2 dimensions (rows, width); got shape "
                         + str(list(t.shape)))
    outer: List[int] = []
    for size in t.shape[:-1]:
        if size != 1:
            outer.append(size)
    if len(outer) > 1:
        raise ValueError(caller + ": " + name + " must be (max_seq, width) up to size-1 dimensions; got shape "
                         + str(list(t.shape)))
    return t.reshape(-1, t.shape[-1])


def table_for(table: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The table in a dtype the op reads (float32 or q's): any other is converted to float32,
    where the op computes anyway (a float16 table for bfloat16 q, a float64 table for float32 q)."""
    if table.dtype == q.dtype or table.dtype == torch.float32:
        return table
    return table.to(torch.float32)


def token_positions(positions: torch.Tensor, batch: int, seq: int, device: torch.device,
                    caller: str, name: str) -> torch.Tensor:
    """Table rows per token as the op takes them: ``(batch, seq)`` or ``(seq,)``, int32 or int64,
    on q's device.

    Accepted: ``(batch, seq)``; ``(1, seq)`` and ``(seq,)`` (one set of positions for every
    sequence, kept without a copy); a flat ``(batch * seq,)`` as Unsloth's indices. Any other
    integer dtype is converted to int32, as Unsloth does.
    """
    # Runs on every call of a model's attention layers: the common case (int32 or int64 (batch, seq)
    # positions on q's device) is decided first and returned as it is, without dispatching an op.
    dtype = positions.dtype
    if dtype != torch.int64 and dtype != torch.int32:
        if dtype == torch.bool or positions.is_floating_point() or positions.is_complex():
            raise ValueError(caller + ": " + name + " must be an integer tensor; got " + str(dtype))
        positions = positions.to(torch.int32)
    if positions.device != device:
        positions = positions.to(device)
    if positions.dim() == 2 and positions.size(1) == seq:
        rows = positions.size(0)
        if rows == batch:
            return positions
        if rows == 1:
            return positions.expand(batch, seq)
    if positions.dim() == 1 and positions.shape[0] == seq:
        return positions
    if positions.dim() == 1 and positions.shape[0] == batch * seq:
        return positions.view(batch, seq)
    raise ValueError(caller + ": " + name + " must have shape (batch, seq) = (" + str(batch) + ", " + str(seq)
                     + "), (1, seq), (seq,) or (batch * seq,); got " + str(list(positions.shape)))
