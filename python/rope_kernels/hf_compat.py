"""Hugging Face transformers' ``apply_rotary_pos_emb``, served by the fused op.

Same signature and results as the function in ``transformers.models.llama.modeling_llama`` (and
its copies in Mistral, Qwen2, Qwen3, Gemma, Gemma2 and Phi-3), for every form of cos/sin those
models pass in transformers 4.x and 5.x:

- ``(batch, seq, dim)`` or ``(1, seq, dim)``, gathered per token by the model's rotary embedding
  (transformers 4.38 and later; ``position_ids`` is then ignored, as there);
- a table ``(max_seq, dim)`` or ``(1, 1, max_seq, dim)`` with ``position_ids`` picking each
  token's row (transformers 4.3x), or without ``position_ids``: token ``s`` uses row ``s``.

``dim`` is the full rotary width (the angles twice, as transformers builds them; the first half is
read). A width below ``head_dim`` rotates only the first ``dim`` features and passes the rest
through (Phi-3's partial rotary factor): the op's ``rotary_dim``, which copies the rest in the same
pass. cos/sin in the model dtype or float32; the result has the dtype transformers' function gives
(float32 for bfloat16 q with float32 cos).

A per-token ``(batch, seq, dim)`` cos/sin goes to the op as it is: one table per sequence, token
``s`` reading row ``s`` of its own (a ``(1, seq, dim)`` one is the table of every sequence).

Inputs the op cannot serve (a device other than CPU and CUDA, cos/sin that require grad, q and k
of different dtypes, shapes that only broadcasting makes fit, an odd head_dim, head_dim above the
CUDA kernels' limit on CUDA, 512 in the shipped build) are computed by the same formula as
transformers', so the function is a drop-in everywhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._compat_inputs import (as_table, formula_dtype, in_dtype, op_takes, pair_tables, per_token_angles,
                             tables_from_dim_0, token_positions)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_by_formula(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """transformers' own computation, for the inputs the op does not serve (and as a reference)."""
    if position_ids is not None and cos.dim() != 3:
        # A table indexed by position (transformers 4.3x); a 3-D cos is already per token.
        cos = as_table(cos, "rope_kernels.apply_rotary_pos_emb", "cos")[position_ids]
        sin = as_table(sin, "rope_kernels.apply_rotary_pos_emb", "sin")[position_ids]
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    width = cos.shape[-1]
    if width == q.shape[-1] and width == k.shape[-1]:
        # Llama's form, without a rest to concatenate: q and k may broadcast against the angles.
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    # Phi-3's form: the first `width` features rotated, the rest concatenated after them.
    q_rot, q_pass = q[..., :width], q[..., width:]
    k_rot, k_pass = k[..., :width], k[..., width:]
    q_out = torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)
    k_out = torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q_out, k_out


def _table_form(cos: torch.Tensor, batch: int, seq: int) -> bool:
    """Whether cos is a form the op reads as transformers does: per token, ``(batch or 1, seq,
    width)``, or a table ``(max_seq, width)`` after leading size-1 dims."""
    if cos.dim() == 3:
        return per_token_angles(cos, batch, seq)
    if cos.dim() < 2:
        return False
    for size in cos.shape[:-2]:
        if size != 1:
            return False
    return True


def _op_call(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor],
    unsqueeze_dim: int,
    keep_dtype: bool,
    tables: str,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor],
                    Optional[int], str]]:
    """The op's arguments for transformers' call (q, k, cos, sin, positions, rotary_dim, layout),
    or None for inputs the op does not serve. Shared by the pair and the one-tensor forms."""
    if position_ids is None:
        cos, sin, unsqueeze_dim = tables_from_dim_0(cos, sin, unsqueeze_dim)
    heads_first = unsqueeze_dim == 1 or unsqueeze_dim == -3
    if not heads_first and not (unsqueeze_dim == 2 or unsqueeze_dim == -2):
        return None
    if q.dim() != 4 or k.dim() != 4:
        return None
    # The op takes (batch, heads, seq, dim) ("bhsd") and (batch, seq, heads, dim) ("bshd") tensors
    # of any strides as they are, and returns results in the same shape.
    seq_dim = 2 if heads_first else 1
    batch, seq = q.size(0), q.size(seq_dim)
    dtype = q.dtype if keep_dtype else formula_dtype(q, cos, sin)
    width, op_cos, op_sin = pair_tables(cos, sin, q.size(-1), tables)
    if width % 2 != 0 or width == 0 or width > q.size(-1) or not _table_form(cos, batch, seq) \
            or not op_takes(q, k, cos, sin, seq_dim, dtype):
        return None
    q, k, cos, sin = in_dtype(q, k, op_cos, op_sin, dtype)

    # A per-token (batch or 1, seq, width) cos/sin is one table per sequence (or one for all), read
    # at row s: the op takes it as it is, and position_ids are ignored, as transformers does. A
    # table (max_seq, width) is read at position_ids (transformers 4.3x), or at row s without them.
    positions: Optional[torch.Tensor] = None
    if cos.dim() != 3 and position_ids is not None:
        positions = token_positions(position_ids, batch, seq, q.device, "rope_kernels.apply_rotary_pos_emb",
                                    "position_ids")
    # The first `width` features are rotated (all of them, or Phi-3's partial rotary); the op copies
    # the rest in the same pass. cos/sin are their full-width table, of which it reads the first half
    # (or, one angle per pair, all of it: see pair_tables).
    rotary_dim: Optional[int] = None
    if width != q.size(-1):
        rotary_dim = width
    return q, k, cos, sin, positions, rotary_dim, "bhsd" if heads_first else "bshd"


def fused_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
    keep_dtype: bool = False,
    tables: str = "twice",
    reverse: bool = False,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``apply_rotary_pos_emb``'s result from the fused op, or None for inputs the op does not
    serve (see the module documentation). The result is in the dtype transformers' formula gives
    (q's promoted with the tables'), or with ``keep_dtype`` in q's dtype, as the modeling modules
    that cast their result back to q's dtype return it. ``tables``: the form of cos/sin (``"twice"``,
    transformers' own; ``"once"``, one angle per pair, as GPT-OSS's rotary embedding makes them;
    ``"pairwise"``: see ``pair_tables``). ``reverse``: each pair turned by the negated angle, as
    NanoChat's ``rotate_half`` (``cat(x2, -x1)``) makes it: the op's gradient,
    ``fused_qk_backward``, which is itself differentiable (its gradient is ``fused_qk``)."""
    call = _op_call(q, k, cos, sin, position_ids, unsqueeze_dim, keep_dtype, tables)
    if call is None:
        return None
    q, k, cos, sin, positions, rotary_dim, layout = call
    if reverse:
        return torch.ops.rope.fused_qk_backward(q, k, cos, sin, positions, rotary_dim=rotary_dim, layout=layout)
    return torch.ops.rope.fused_qk(q, k, cos, sin, positions, rotary_dim=rotary_dim, layout=layout)


def fused_rotary_pos_emb_one(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    keep_dtype: bool = False,
    tables: str = "twice",
    reverse: bool = False,
    position_ids: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """The one-tensor ``apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim)`` of Gemma 3n and Gemma 4
    (q and k rotated by separate calls) from the fused op (``rope::fused``, or its gradient
    ``rope::fused_backward`` with ``reverse``), or None for inputs the op does not serve; otherwise
    as ``fused_rotary_pos_emb`` (``position_ids`` included: a table's rows, as for the pair)."""
    call = _op_call(x, x, cos, sin, position_ids, unsqueeze_dim, keep_dtype, tables)
    if call is None:
        return None
    x, _, cos, sin, positions, rotary_dim, layout = call
    if reverse:
        return torch.ops.rope.fused_backward(x, cos, sin, positions, rotary_dim=rotary_dim, layout=layout)
    return torch.ops.rope.fused(x, cos, sin, positions, rotary_dim=rotary_dim, layout=layout)


def apply_rotary_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as transformers' ``apply_rotary_pos_emb`` does, in one fused kernel.

    q ``(batch, heads_q, seq, head_dim)`` and k ``(batch, heads_k, seq, head_dim)`` with
    ``unsqueeze_dim=1`` (the default), or ``(batch, seq, heads, head_dim)`` with
    ``unsqueeze_dim=2``. cos/sin: see the module documentation. Returns new tensors; differentiable
    in q and k.
    """
    fused = fused_rotary_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim)
    if fused is None:
        return rotate_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    return fused
