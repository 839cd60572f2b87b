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
through (Phi-3's partial rotary factor). cos/sin in the model dtype or float32; the result has
the dtype transformers' function gives (float32 for bfloat16 q with float32 cos).

A per-token ``(batch, seq, dim)`` cos/sin goes to the op as it is: one table per sequence, token
``s`` reading row ``s`` of its own (a ``(1, seq, dim)`` one is the table of every sequence).

Inputs the op cannot serve (a device other than CPU and CUDA, cos/sin that require grad, q and k
of different dtypes, shapes that only broadcasting makes fit, head_dim above 256 on CUDA) are
computed by the same formula as transformers', so the function is a drop-in everywhere.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._compat_inputs import as_table, token_positions
from . import _limits



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
    q_rot, q_pass = q[..., :width], q[..., width:]
    k_rot, k_pass = k[..., :width], k[..., width:]
    q_out = torch.cat((q_rot * cos + _rotate_half(q_rot) * sin, q_pass), dim=-1)
    k_out = torch.cat((k_rot * cos + _rotate_half(k_rot) * sin, k_pass), dim=-1)
    return q_out, k_out


def _op_serves(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq: int,
               dtype: torch.dtype) -> bool:
    """Whether the op computes what transformers' formula would for these inputs, in `dtype`.

    Runs on every call of a model's attention layers: tensor properties that need no Python
    object (is_cuda, is_cpu, size(i)) are read rather than device and shape objects.
    """
    on_cuda = q.is_cuda
    if not (on_cuda or q.is_cpu) or q.dtype != k.dtype:
        return False
    if dtype != torch.float16 and dtype != torch.bfloat16 and dtype != torch.float32 and dtype != torch.float64:
        return False
    if cos.requires_grad or sin.requires_grad or cos.shape != sin.shape:
        return False
    width = cos.size(-1)
    head_dim = q.size(-1)
    if width % 2 != 0 or width > head_dim or head_dim != k.size(-1) or width == 0:
        return False
    # The CUDA kernels' limits, as the build reports them (the CPU has none). Read as attributes
    # of their module, which TorchScript takes as constants.
    if on_cuda and (width > _limits.CUDA_MAX_HEAD_DIM or (dtype == torch.float64 and not _limits.CUDA_TAKES_FLOAT64)):
        return False
    if cos.dim() == 3:  # per token: (batch or 1, seq, width)
        return cos.size(1) == seq and (cos.size(0) == 1 or cos.size(0) == q.size(0))
    if cos.dim() < 2:
        return False
    for size in cos.shape[:-2]:  # a table: (max_seq, width) after leading size-1 dims
        if size != 1:
            return False
    return True


def _rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            positions: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The op on (batch, heads, seq, dim) q and k, or on their first `width` features when cos/sin
    are narrower than head_dim (partial rotary: the op sees those features as heads of dim
    `width`, cos/sin being their full-width table; the rest passes through)."""
    width = cos.size(-1)
    if width == q.size(-1):
        return torch.ops.rope.fused_qk(q, k, cos, sin, positions)
    q_rot, k_rot = torch.ops.rope.fused_qk(q[..., :width], k[..., :width], cos, sin, positions)
    return torch.cat((q_rot, q[..., width:]), dim=-1), torch.cat((k_rot, k[..., width:]), dim=-1)


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
    heads_first = unsqueeze_dim == 1 or unsqueeze_dim == -3
    if not heads_first and not (unsqueeze_dim == 2 or unsqueeze_dim == -2):
        return rotate_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    if q.dim() != 4 or k.dim() != 4:
        return rotate_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    # The op takes (batch, heads, seq, dim) views of any strides: a transpose, not a copy.
    q4 = q if heads_first else q.transpose(1, 2)
    k4 = k if heads_first else k.transpose(1, 2)
    batch, seq = q4.size(0), q4.size(2)
    # The dtype transformers' formula gives (q * cos promotes), and the op computes in.
    dtype = q.dtype
    if cos.dtype != dtype or sin.dtype != dtype:  # (promote_types is a dispatched call: host time)
        dtype = torch.promote_types(torch.promote_types(q.dtype, cos.dtype), sin.dtype)
    if not _op_serves(q4, k4, cos, sin, seq, dtype):
        return rotate_by_formula(q, k, cos, sin, position_ids, unsqueeze_dim)
    if q4.dtype != dtype:
        q4 = q4.to(dtype)
        k4 = k4.to(dtype)
    if cos.dtype != dtype and cos.dtype != torch.float32:
        cos = cos.to(dtype)
        sin = sin.to(dtype)

    # A per-token (batch or 1, seq, width) cos/sin is one table per sequence (or one for all), read
    # at row s: the op takes it as it is, and position_ids are ignored, as transformers does. A
    # table (max_seq, width) is read at position_ids (transformers 4.3x), or at row s without them.
    positions: Optional[torch.Tensor] = None
    if cos.dim() != 3 and position_ids is not None:
        positions = token_positions(position_ids, batch, seq, q4.device, "rope_kernels.apply_rotary_pos_emb",
                                    "position_ids")
    q_out, k_out = _rotate(q4, k4, cos, sin, positions)
    if not heads_first:
        q_out = q_out.transpose(1, 2)
        k_out = k_out.transpose(1, 2)
    return q_out, k_out
