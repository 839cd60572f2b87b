"""Hugging Face transformers' interleaved RoPE functions, served by the fused op.

Two drop-ins, with the signature and results of transformers' functions:

- ``apply_rotary_pos_emb_interleave``: DeepSeek-V3's (``transformers.models.deepseek_v3``, and
  the MLA models built on it). The pairs are read interleaved, ``(x[2i], x[2i+1])``, and written
  half-split, ``(out[i], out[i + D/2])``: the op's ``interleaved=True, interleaved_out=False``.
  Every feature of q and k is rotated (DeepSeek passes the rotary slice of each head on its own).
- ``apply_rotary_pos_emb_glm``: GLM's and GLM-4's ``apply_rotary_pos_emb``
  (``transformers.models.glm.modeling_glm``, ``glm4.modeling_glm4``). Interleaved pairs in and
  out over the first ``R = cos.shape[-1]`` features (half of head_dim with GLM's partial rotary
  factor), the rest passed through: the op's ``interleaved=True, rotary_dim=R``.

cos/sin are what transformers' rotary embeddings pass: ``(batch, seq, R)`` or ``(1, seq, R)``, each
token's angles twice (``cat(freqs, freqs)``), of which both functions read the first half: column
i is the angle of pair i. ``position_ids`` is accepted and ignored, as in transformers, where
the angles are already per token. ``unsqueeze_dim=1`` takes q ``(batch, heads_q, seq, D)`` and k
``(batch, heads_k, seq, D)``; ``unsqueeze_dim=2`` takes ``(batch, seq, heads, D)``. The result has
the dtype transformers' formula gives (float32 for bfloat16 q with float32 cos).

Inputs the op cannot serve (a device other than CPU and CUDA, cos/sin that require grad, q and k
of different dtypes, shapes that only broadcasting makes fit, an odd width or head_dim, head_dim
above the CUDA kernels' limit on CUDA) are computed by the same formula as transformers'.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._compat_inputs import formula_dtype, in_dtype, op_takes, pair_tables, per_token_angles, tables_from_dim_0


def _halves_from_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) rotated by angle i, written as the two halves of the result."""
    even = x[..., 0::2]
    odd = x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)


def interleave_by_formula(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's computation, for the inputs the op does not serve: the first half of cos/sin
    (one angle per pair), then the even and odd features rotated and concatenated."""
    cos = cos[..., :cos.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    sin = sin[..., :sin.shape[-1] // 2].unsqueeze(unsqueeze_dim)
    return _halves_from_pairs(q, cos, sin), _halves_from_pairs(k, cos, sin)


def _pairs_in_place(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) of the first cos.shape[-1] features rotated where they are (cos/sin
    hold each pair's angle twice); the features after them pass through."""
    width = cos.shape[-1]
    rotated = x[..., :width]
    # (-x[2i+1], x[2i]) at (2i, 2i+1): the pair turned by a quarter, multiplied by sin.
    turned = torch.stack((-rotated[..., 1::2], rotated[..., 0::2]), dim=-1).flatten(-2)
    return torch.cat([rotated * cos + turned * sin, x[..., width:]], dim=-1)


def glm_by_formula(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """GLM's computation, for the inputs the op does not serve: the first half of cos/sin with each
    angle repeated for the two features of its pair, over the first 2 * (cos.shape[-1] // 2)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    cos = cos[..., :cos.shape[-1] // 2].repeat_interleave(2, dim=-1)
    sin = sin[..., :sin.shape[-1] // 2].repeat_interleave(2, dim=-1)
    return _pairs_in_place(q, cos, sin), _pairs_in_place(k, cos, sin)


def _seq_dim(q: torch.Tensor, k: torch.Tensor, unsqueeze_dim: int) -> int:
    """The sequence dimension of 4-D q and k for this unsqueeze_dim (2: heads first, 1: heads
    last), or -1 where the op takes no such layout."""
    if q.dim() != 4 or k.dim() != 4:
        return -1
    if unsqueeze_dim == 1 or unsqueeze_dim == -3:
        return 2
    if unsqueeze_dim == 2 or unsqueeze_dim == -2:
        return 1
    return -1


def apply_rotary_pos_emb_interleave(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` does, in one fused
    kernel: pairs (x[2i], x[2i+1]) in, half-split pairs (out[i], out[i + D/2]) out.

    cos/sin ``(batch or 1, seq, D)``; see the module documentation. Returns new tensors;
    differentiable in q and k.
    """
    # Every feature is rotated, by the first half of a full-width table: D columns for D features
    # (a narrower table is not DeepSeek's call: its formula raises on it).
    fused: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    if cos.size(-1) == q.size(-1):
        fused = fused_interleaved_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim, interleaved_out=False)
    if fused is None:
        return interleave_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    return fused


def _interleaved_call(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int,
    keep_dtype: bool,
    tables: str,
) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[int], str]]:
    """The op's arguments (q, k, cos, sin, rotary_dim, layout) for an interleaved call of
    transformers' form, or None for inputs the op does not serve. Shared by the pair and the
    one-tensor forms."""
    cos, sin, unsqueeze_dim = tables_from_dim_0(cos, sin, unsqueeze_dim)
    seq_dim = _seq_dim(q, k, unsqueeze_dim)
    if seq_dim < 0:
        return None
    head_dim = q.size(-1)
    dtype = q.dtype if keep_dtype else formula_dtype(q, cos, sin)
    width, op_cos, op_sin = pair_tables(cos, sin, head_dim, tables)
    # An odd width rotates one feature fewer than the table has columns: the formula serves it.
    if width % 2 != 0 or width == 0 or width > head_dim or not per_token_angles(cos, q.size(0), q.size(seq_dim)) \
            or not op_takes(q, k, cos, sin, seq_dim, dtype):
        return None
    q, k, cos, sin = in_dtype(q, k, op_cos, op_sin, dtype)
    rotary_dim: Optional[int] = None
    if width != head_dim:
        rotary_dim = width
    return q, k, cos, sin, rotary_dim, "bhsd" if seq_dim == 2 else "bshd"


def fused_interleaved_pos_emb(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
    keep_dtype: bool = False,
    tables: str = "twice",
    interleaved_out: bool = True,
) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """GLM's ``apply_rotary_pos_emb`` result from the fused op (interleaved pairs over the first
    ``cos.shape[-1]`` features, the rest passed through), or None for inputs the op does not serve.
    The result is in the dtype transformers' formula gives, or with ``keep_dtype`` in q's dtype, as
    the modules that compute in float32 and cast back (ERNIE 4.5) return it. ``tables``: the form of
    cos/sin (see ``pair_tables``): ``"twice"``, transformers' own; ``"once"``, one angle per pair for
    every feature (OpenAI's privacy filter); ``"pairwise"``, each angle at both columns of its pair
    (Cohere, BLT, EfficientLoFTR, LightGlue, ERNIE 4.5 VL's text model). ``interleaved_out=False``:
    the pairs written half-split, as DeepSeek-V3's ``apply_rotary_pos_emb_interleave`` does."""
    call = _interleaved_call(q, k, cos, sin, unsqueeze_dim, keep_dtype, tables)
    if call is None:
        return None
    q, k, cos, sin, rotary_dim, layout = call
    return torch.ops.rope.fused_qk(q, k, cos, sin, None, interleaved=True, interleaved_out=interleaved_out,
                                   rotary_dim=rotary_dim, layout=layout)


def fused_interleaved_pos_emb_one(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
    keep_dtype: bool = False,
    tables: str = "twice",
    interleaved_out: bool = True,
    position_ids: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """One tensor rotated with interleaved pairs by the fused op (``rope::fused``), as GPT-J's and
    CodeGen's ``apply_rotary_pos_emb(tensor, sin, cos)`` rotates q and k by separate calls, or None
    for inputs the op does not serve; otherwise as ``fused_interleaved_pos_emb`` (``position_ids``
    ignored, as there)."""
    call = _interleaved_call(x, x, cos, sin, unsqueeze_dim, keep_dtype, tables)
    if call is None:
        return None
    x, _, cos, sin, rotary_dim, layout = call
    return torch.ops.rope.fused(x, cos, sin, None, interleaved=True, interleaved_out=interleaved_out,
                                rotary_dim=rotary_dim, layout=layout)


def apply_rotary_pos_emb_glm(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    position_ids: Optional[torch.Tensor] = None,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k as GLM's ``apply_rotary_pos_emb`` does, in one fused kernel: interleaved
    pairs over the first ``cos.shape[-1]`` features, the rest passed through.

    cos/sin ``(batch or 1, seq, R)``, R even and at most head_dim; see the module documentation.
    Returns new tensors; differentiable in q and k.
    """
    fused = fused_interleaved_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim)
    if fused is None:
        return glm_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    return fused
