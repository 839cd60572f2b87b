"""The benchmark's workloads and the inputs each one is measured on.

q and k are transposed views of (B, S, H, D) projection outputs (what a model hands to RoPE),
except where a workload says "bhsd" (contiguous (B, H, S, D) tensors). Values are random normal,
never zeros: zeros hide unwritten outputs and can run faster than real data.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch

from .library import import_rope_kernels

# rope_kernels installed, or else the in-place build in python/ of this checkout (put on sys.path).
import_rope_kernels()

# The workload table is the project's one (rope_kernels.testing), shared with the quick benchmark
# of `python -m rope_kernels`; these names are re-exported for bench/ and its users.
from rope_kernels.testing import (SMOKE_BATCH, SMOKE_SEQ, TABLE_ROWS, WORKLOADS, Workload,  # noqa: E402,F401
                                  cos_sin_tables, random_heads, workload_by_name)


def _random_heads(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, layout: str,
                  device: torch.device, requires_grad: bool) -> torch.Tensor:
    """A (B, H, S, D) tensor in the given layout (rope_kernels.testing.random_heads, drawn on the
    device); with requires_grad its storage is a leaf (for "bshd", q is a view of it)."""
    x = random_heads(layout, batch, heads, seq, head_dim, dtype, device, draw_on_device=True)
    if layout == "bshd":
        return x.transpose(1, 2).requires_grad_(requires_grad).transpose(1, 2)
    return x.requires_grad_(requires_grad)


def copy_in_layout(x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """A copy of the (B, H, S, D) tensor x with the same layout, a leaf of its own if asked."""
    if layout == "bshd":
        base = x.detach().transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return base.requires_grad_(requires_grad).transpose(1, 2)
    return x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)


def rope_table(rows: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face full-width table (rows, D): real angles, the halves repeated."""
    return cos_sin_tables(rows, head_dim, full_width=True, dtype=dtype, device=device)


@dataclasses.dataclass
class Inputs:
    """Everything one workload's candidates are called with.

    q, k: (B, H, S, D) in the workload's layout, requiring grad; grad_q, grad_k: the gradients
    fed to the backward, laid out like q and k. table_cos/table_sin: the full-width (rows, D)
    table in q's dtype, with positions (B, S) or None (token s uses row s). token_cos/token_sin:
    the table rows of each token, (1, S, D) or (B, S, D), as a Hugging Face model hands them to
    apply_rotary_pos_emb (gathered once per step for all layers, so not part of a call).
    """

    layout: str
    q: torch.Tensor
    k: torch.Tensor
    grad_q: torch.Tensor
    grad_k: torch.Tensor
    table_cos: torch.Tensor
    table_sin: torch.Tensor
    positions: Optional[torch.Tensor]
    token_cos: torch.Tensor
    token_sin: torch.Tensor

    def clone(self) -> "Inputs":
        """Fresh q, k and gradients with the same values and layout (some candidates write
        their inputs in place); the tables are shared, as no candidate writes them."""
        return dataclasses.replace(
            self,
            q=copy_in_layout(self.q, self.layout, True),
            k=copy_in_layout(self.k, self.layout, True),
            grad_q=copy_in_layout(self.grad_q, self.layout, False),
            grad_k=copy_in_layout(self.grad_k, self.layout, False))

    def reference_angles(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's angles in float64, (1 or B, S, D/2), for the reference."""
        half = self.q.shape[-1] // 2
        return self.token_cos[..., :half].double(), self.token_sin[..., :half].double()


def make_inputs(workload: Workload, device: torch.device) -> Inputs:
    w = workload
    q = _random_heads(w.batch, w.heads_q, w.seq, w.head_dim, w.dtype, w.layout, device, True)
    k = _random_heads(w.batch, w.heads_k, w.seq, w.head_dim, w.dtype, w.layout, device, True)
    grad_q = _random_heads(w.batch, w.heads_q, w.seq, w.head_dim, w.dtype, w.layout, device, False)
    grad_k = _random_heads(w.batch, w.heads_k, w.seq, w.head_dim, w.dtype, w.layout, device, False)
    table_cos, table_sin = rope_table(w.table_rows, w.head_dim, w.dtype, device)
    if w.decode:
        positions: Optional[torch.Tensor] = torch.randint(0, w.table_rows, (w.batch, w.seq), device=device)
        token_cos, token_sin = table_cos[positions], table_sin[positions]
    else:
        positions = None
        token_cos, token_sin = table_cos[None, :w.seq], table_sin[None, :w.seq]
    return Inputs(w.layout, q, k, grad_q, grad_k, table_cos, table_sin, positions, token_cos, token_sin)
