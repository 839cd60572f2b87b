"""Unsloth's RoPE entry points, same names, signatures and results, served by the fused op.

``from unsloth.kernels import fast_rope_embedding, inplace_rope_embedding`` becomes
``from rope_kernels import fast_rope_embedding, inplace_rope_embedding``.

Where this differs from Unsloth, on purpose:

- ``fast_rope_embedding`` always returns new tensors. Unsloth's indexed path rotates a contiguous
  Q or K in place behind the caller's back while returning it as if it were new; here the caller's
  tensors are never written (use ``inplace_rope_embedding`` to rotate in place, declared as such).
- ``inplace_rope_embedding`` is a registered in-place op (``rope::fused_qk_``): autograd,
  ``torch.compile`` and TorchScript see the write, and it needs no device synchronization.
- Neither is excluded from ``torch.compile``; both trace into one graph.
- Math is in float32 whatever the table dtype (Unsloth computes in the table's dtype).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._compat_inputs import as_table, table_for, token_positions


def fast_rope_embedding(
    Q: torch.Tensor,
    K: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    rope_embedding_indices: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate Q ``(batch, n_heads_q, seq, head_dim)`` and K ``(batch, n_heads_k, seq, head_dim)``.

    cos/sin: ``(max_seq, head_dim // 2)`` or the full-width ``(max_seq, head_dim)`` table (its first
    half is used), up to size-1 dimensions (``(1, 1, max_seq, head_dim)``). Token ``s`` of every
    sequence uses row ``s``, unless ``rope_embedding_indices`` gives each token's row: shape
    ``(batch, seq)`` or flat ``(batch * seq,)``, int32 (as TRL makes them) or any integer dtype.
    Returns new tensors ``(Q_out, K_out)`` laid out like Q and K. Differentiable in Q and K.
    """
    caller = "rope_kernels.fast_rope_embedding"
    cos = table_for(as_table(cos, caller, "cos"), Q)
    sin = table_for(as_table(sin, caller, "sin"), Q)
    positions: Optional[torch.Tensor] = None
    if rope_embedding_indices is not None:
        positions = token_positions(rope_embedding_indices, Q.shape[0], Q.shape[2], Q.device, caller,
                                    "rope_embedding_indices")
    return torch.ops.rope.fused_qk(Q, K, cos, sin, positions)


def inplace_rope_embedding(
    Q: torch.Tensor,
    K: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate Q and K in place and return them (the same tensor objects), as Unsloth does.

    Shapes as for ``fast_rope_embedding``; ``position_ids`` ``(batch, seq)``, ``(1, seq)`` or
    ``(seq,)`` gives each token's table row (None: token ``s`` uses row ``s``). Differentiable like
    any in-place op: Q and K must not be leaves that require grad (nor views of such leaves), and
    the gradient flows through the rotation to whatever Q and K were computed from.
    """
    caller = "rope_kernels.inplace_rope_embedding"
    cos = table_for(as_table(cos, caller, "cos"), Q)
    sin = table_for(as_table(sin, caller, "sin"), Q)
    positions: Optional[torch.Tensor] = None
    if position_ids is not None:
        positions = token_positions(position_ids, Q.shape[0], Q.shape[2], Q.device, caller, "position_ids")
    torch.ops.rope.fused_qk_(Q, K, cos, sin, positions)
    return Q, K
