"""rope_kernels: Rotary Position Embedding at the speed of device memory.

The work is done by ``torch.ops.rope.fused_qk`` (a C++ op with CPU, CUDA and Meta kernels and a
C++ autograd node) and its in-place twin ``torch.ops.rope.fused_qk_``; this package loads them and
offers typed, TorchScript-compatible wrappers, drop-ins for Unsloth's ``fast_rope_embedding`` /
``inplace_rope_embedding`` and transformers' ``apply_rotary_pos_emb``, and
``patch_transformers()`` to switch transformers' models to the op.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from ._dtensor_hook import install as _install_dtensor_sharding
from ._dtensor_hook import register_dtensor_sharding
from ._loader import load_op_library

__version__ = (Path(__file__).resolve().parent / "VERSION").read_text().strip()

load_op_library()
# DTensor arguments: the sharding rule is registered once torch.distributed.tensor is imported.
_install_dtensor_sharding()

# Imported after the op library is loaded: they call torch.ops.rope.
from .hf_compat import apply_rotary_pos_emb  # noqa: E402
from .hf_interleaved import apply_rotary_pos_emb_glm, apply_rotary_pos_emb_interleave  # noqa: E402
from .transformers_patch import (  # noqa: E402
    TransformersPatch,
    patch_transformers,
    patched_modules,
    unpatch_transformers,
)
from .unsloth_compat import fast_rope_embedding, inplace_rope_embedding  # noqa: E402

__all__ = [
    "fused_qk",
    "fused_qk_",
    "fused",
    "fused_",
    "build_info",
    "register_dtensor_sharding",
    "__version__",
    # Unsloth's API
    "fast_rope_embedding",
    "inplace_rope_embedding",
    # Hugging Face transformers
    "apply_rotary_pos_emb",
    "apply_rotary_pos_emb_interleave",
    "apply_rotary_pos_emb_glm",
    "patch_transformers",
    "unpatch_transformers",
    "patched_modules",
    "TransformersPatch",
]


def fused_qk(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    interleaved_out: Optional[bool] = None,
    rotary_dim: Optional[int] = None,
    layout: str = "bhsd",
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate q ``(B, Hq, S, D)`` and k ``(B, Hk, S, D)`` by the angles in cos/sin.

    (The options are not keyword-only, as they are in the op's schema, because TorchScript
    cannot compile keyword-only parameters; pass them by name.)

    cos/sin: ``(S_max, R/2)`` or ``(S_max, R)`` (first half used; R is ``rotary_dim``, the head
    size D unless given), leading size-1 dims allowed, float32 or q's dtype; or one such table per
    sequence, ``(B, S_max, R/2 or R)`` (the per-token angles of Hugging Face models). positions:
    optional int32/int64 ``(B, S)`` or ``(S,)`` table rows; without it token s uses row s. A
    position outside the table gives NaN for that token.

    Options (docs/conventions.md): ``interleaved`` pairs features (2i, 2i+1) instead of (i, i+R/2),
    and ``interleaved_out`` (default: the same) says how the output pairs them; ``rotary_dim``
    rotates the first R features of each head and copies the rest; ``layout`` "bshd" takes
    ``(B, S, H, D)`` tensors and "thd" packed sequences ``(T, H, D)``, with positions ``(T,)`` or
    ``cu_seqlens`` ``(n + 1,)`` (token t of document j at t - cu_seqlens[j], plus
    ``seqlen_offsets[j]`` if given). Returns new tensors laid out like q and k. Differentiable
    with respect to q and k.
    """
    return torch.ops.rope.fused_qk(q, k, cos, sin, positions, interleaved=interleaved,
                                   interleaved_out=interleaved_out, rotary_dim=rotary_dim, layout=layout,
                                   cu_seqlens=cu_seqlens, seqlen_offsets=seqlen_offsets)


def fused_qk_(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    interleaved_out: Optional[bool] = None,
    rotary_dim: Optional[int] = None,
    layout: str = "bhsd",
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fused_qk`` written into q and k themselves; returns them (the same tensor objects).

    Same arguments and math as ``fused_qk``; features past ``rotary_dim`` are left as they are.
    An in-place op like any of torch's: q and k must not share memory with each other, the tables
    or the index tensors (views of one buffer pass where their elements provably lie apart, as
    slices of one qkv projection do), and, under autograd, must not be leaves that require grad; gradients flow through the
    rotation to what q and k were computed from.
    """
    return torch.ops.rope.fused_qk_(q, k, cos, sin, positions, interleaved=interleaved,
                                    interleaved_out=interleaved_out, rotary_dim=rotary_dim, layout=layout,
                                    cu_seqlens=cu_seqlens, seqlen_offsets=seqlen_offsets)


def fused(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    interleaved_out: Optional[bool] = None,
    rotary_dim: Optional[int] = None,
    layout: str = "bhsd",
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """One tensor (q alone, k alone, a KV cache) rotated as ``fused_qk`` rotates q: the same
    arguments, options and math (``torch.ops.rope.fused``). Differentiable with respect to x."""
    return torch.ops.rope.fused(x, cos, sin, positions, interleaved=interleaved, interleaved_out=interleaved_out,
                                rotary_dim=rotary_dim, layout=layout, cu_seqlens=cu_seqlens,
                                seqlen_offsets=seqlen_offsets)


def fused_(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
    interleaved: bool = False,
    interleaved_out: Optional[bool] = None,
    rotary_dim: Optional[int] = None,
    layout: str = "bhsd",
    cu_seqlens: Optional[torch.Tensor] = None,
    seqlen_offsets: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``fused`` written into x itself; returns it (``torch.ops.rope.fused_``)."""
    return torch.ops.rope.fused_(x, cos, sin, positions, interleaved=interleaved, interleaved_out=interleaved_out,
                                 rotary_dim=rotary_dim, layout=layout, cu_seqlens=cu_seqlens,
                                 seqlen_offsets=seqlen_offsets)


def build_info() -> Dict[str, Any]:
    """Versions this build was made with, and the GPU architectures and kernels compiled in."""
    info: Dict[str, Any] = json.loads(torch.ops.rope.build_info())
    kernels = info.pop("cuda_kernels", None) or {}
    info["triton"] = kernels.get("triton")
    info["architectures"] = list(kernels.get("architectures", []))
    # Asked for by the build (ROPE_CUDA_ARCHS) but not compilable by its Triton.
    info["skipped_architectures"] = list(kernels.get("skipped_architectures", []))
    info["variants_per_architecture"] = kernels.get("variants_per_architecture", 0)
    info["kernels"] = kernels.get("kernels", 0)
    info["cuda_max_head_dim"] = kernels.get("max_head_dim", 0)
    info["cuda_dtypes"] = list(kernels.get("dtypes", []))
    # The arch whose PTX the build carries for GPUs no cubin runs on (None: no PTX), and whether
    # ROPE_FORCE_PTX=1 makes this process use it wherever it can run.
    info["ptx_architecture"] = kernels.get("ptx_architecture")
    info["ptx_forced"] = bool(kernels.get("ptx_forced", False))
    return info
