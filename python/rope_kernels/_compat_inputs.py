"""Bringing the tables and positions that other libraries pass into the form the op takes.

Shared by the Unsloth and Hugging Face compatible entry points. Typed and TorchScript-compatible,
and free of data-dependent control flow, so torch.compile traces through without graph breaks.
"""
from __future__ import annotations

from typing import List, Tuple

import torch

from . import _limits


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


def formula_dtype(q: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.dtype:
    """The dtype of transformers' ``q * cos + rotate(q) * sin``: q's, promoted with the tables'
    (float32 for bfloat16 q and float32 cos). The drop-ins compute in it and return it."""
    dtype = q.dtype
    if cos.dtype != dtype or sin.dtype != dtype:  # (promote_types is a dispatched call: host time)
        dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    return dtype


def op_takes(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_dim: int,
             dtype: torch.dtype) -> bool:
    """Whether the op computes, in `dtype`, what transformers' formula gives for 4-D q and k whose
    sequence dimension is `seq_dim` (2: (batch, heads, seq, dim); 1: (batch, seq, heads, dim)),
    the tables' shape aside (each drop-in checks the forms of cos/sin it serves).

    False for a device other than CPU and CUDA, q and k of different dtypes (the formula promotes
    each on its own), cos/sin that require grad (the op treats them as constants), q and k that
    only broadcasting makes fit, an odd head_dim, and what the CUDA kernels are not built for.
    Runs on every call of a model's attention layers: tensor properties that need no Python object
    (is_cuda, is_cpu, size(i)) are read rather than device and shape objects.
    """
    on_cuda = q.is_cuda
    if not (on_cuda or q.is_cpu) or q.dtype != k.dtype:
        return False
    if dtype != torch.float16 and dtype != torch.bfloat16 and dtype != torch.float32 and dtype != torch.float64:
        return False
    if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape:
        return False
    head_dim = q.size(-1)
    if head_dim != k.size(-1) or head_dim % 2 != 0:
        return False
    if k.size(0) != q.size(0) or k.size(seq_dim) != q.size(seq_dim):
        return False
    # The CUDA kernels' limits, as the build reports them (the CPU has none). Read as attributes
    # of their module, which TorchScript takes as constants.
    if on_cuda and head_dim > _limits.CUDA_MAX_HEAD_DIM:
        return False
    return not (on_cuda and dtype == torch.float64 and not _limits.CUDA_TAKES_FLOAT64)


def per_token_angles(cos: torch.Tensor, batch: int, seq: int) -> bool:
    """Whether cos is ``(batch, seq, width)`` or ``(1, seq, width)``: the angles of each token, as
    transformers' rotary embeddings make them, which the op reads as one table per sequence (or
    one for all) at row s."""
    return cos.dim() == 3 and cos.size(1) == seq and (cos.size(0) == 1 or cos.size(0) == batch)


def in_dtype(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype,
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """q and k in `dtype`, and cos/sin in `dtype` unless both are float32, which the op reads for
    q of any dtype. Inputs already in place are returned as they are. (Converting a table to a
    wider dtype is exact, so the op reads the values the formula multiplies by.)"""
    if q.dtype != dtype:
        q = q.to(dtype)
        k = k.to(dtype)
    if (cos.dtype != dtype or sin.dtype != dtype) and (cos.dtype != torch.float32 or sin.dtype != torch.float32):
        cos = cos.to(dtype)
        sin = sin.to(dtype)
    return q, k, cos, sin


def tables_from_dim_0(cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
                      ) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Pixtral's call, ``(seq, width)`` tables with ``unsqueeze_dim=0``, which broadcast as
    ``(1, seq, width)`` against ``(batch, heads, seq, dim)`` q, as the per-token form the drop-ins
    serve: ``(1, seq, width)`` tables with ``unsqueeze_dim=1``. Any other call as it is."""
    if unsqueeze_dim == 0 and cos.dim() == 2 and sin.dim() == 2:
        return cos.unsqueeze(0), sin.unsqueeze(0), 1
    return cos, sin, unsqueeze_dim


def pair_tables(cos: torch.Tensor, sin: torch.Tensor, head_dim: int, tables: str
                ) -> Tuple[int, torch.Tensor, torch.Tensor]:
    """(the features rotated, cos, sin as the op reads them) for cos/sin in one of the forms
    transformers' rotary embeddings make, where column i holds the angle of pair i:

    - ``"twice"``: ``cat(freqs, freqs)``, R columns for R rotated features (Llama and most others);
      the op reads the first half itself;
    - ``"once"``: ``head_dim / 2`` columns, one angle per pair, every feature rotated (GPT-OSS);
    - ``"pairwise"``: ``repeat_interleave(freqs, 2)``, R columns for R rotated features, each angle
      at the columns of its pair's two features (Cohere); given to the op as the strided view of
      one angle per pair, of which the op makes a dense copy (the tables' size, not q's).

    The width is 0 where the tables do not fit this form and head_dim; the caller then leaves the
    call to the function it replaces.
    """
    width = cos.size(-1)
    if tables == "once":
        if 2 * width != head_dim:
            return 0, cos, sin
        return head_dim, cos, sin
    if tables == "pairwise":
        return width, cos[..., 0::2], sin[..., 0::2]
    if tables != "twice":
        raise ValueError("rope_kernels: tables must be 'twice', 'once' or 'pairwise'; got " + tables)
    return width, cos, sin
