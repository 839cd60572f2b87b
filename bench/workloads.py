"""The benchmark's workloads and the inputs each one is measured on.

q and k are transposed views of (B, S, H, D) projection outputs (what a model hands to RoPE),
except where a workload says "bhsd" (contiguous (B, H, S, D) tensors). Values are random normal,
never zeros: zeros hide unwritten outputs and can run faster than real data.

Every candidate is checked on (B, H, S, D) views, the form the Hugging Face formula takes; the
rows of the op's "bshd" and "thd" layouts also hold the tensors that layout names, the same
storage: the (B, S, H, D) tensors, or the packed (T, H, D) tokens, of which the views are views.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Tuple

import torch

from .library import import_rope_kernels

# rope_kernels installed, or else the in-place build in python/ of this checkout (put on sys.path).
import_rope_kernels()

# The workload table is the project's one (rope_kernels.testing), shared with the quick benchmark
# of `python -m rope_kernels`; these names are re-exported for bench/ and its users.
from rope_kernels.testing import (SMOKE_BATCH, SMOKE_SEQ, TABLE_ROWS, WORKLOADS, Workload,  # noqa: E402,F401
                                  cos_sin_tables, random_heads, workload_by_name)


def as_heads(x: torch.Tensor, op_layout: str) -> torch.Tensor:
    """The (B, H, S, D) view of a tensor in the op's layout: (B, S, H, D) for "bshd", (T, H, D)
    for "thd" (one sequence of T tokens); a "bhsd" tensor is one already."""
    if op_layout == "bshd":
        return x.transpose(1, 2)
    if op_layout == "thd":
        return x.unsqueeze(0).transpose(1, 2)
    return x


def _random_heads(workload: Workload, heads: int, device: torch.device,
                  requires_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """A random (B, H, S, D) tensor in the workload's layout (rope_kernels.testing.random_heads,
    drawn on the device), as (the op's tensor, its (B, H, S, D) view). With requires_grad the
    op's tensor is a leaf, or for op_layout "bhsd" and layout "bshd" the storage it views."""
    w = workload
    x = random_heads(w.layout, w.batch, heads, w.seq, w.head_dim, w.dtype, device, draw_on_device=True)
    if w.op_layout == "bhsd":
        if w.layout == "bshd":
            x = x.transpose(1, 2).requires_grad_(requires_grad).transpose(1, 2)
        else:
            x = x.requires_grad_(requires_grad)
        return x, x
    native = x.transpose(1, 2)  # the contiguous (B, S, H, D) tensor
    if w.op_layout == "thd":
        native = native[0]
    native = native.requires_grad_(requires_grad)
    return native, as_heads(native, w.op_layout)


def copy_in_layout(x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """A copy of the (B, H, S, D) tensor x with the same layout, a leaf of its own if asked."""
    if layout == "bshd":
        base = x.detach().transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return base.requires_grad_(requires_grad).transpose(1, 2)
    return x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)


def rope_table(rows: int, rotary_dim: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face full-width table (rows, R): real angles over the R rotated features, the
    halves repeated (column i is the angle of pair i in both pairings)."""
    return cos_sin_tables(rows, rotary_dim, full_width=True, dtype=dtype, device=device)


@dataclasses.dataclass
class Inputs:
    """Everything one workload's candidates are called with.

    q, k: (B, H, S, D) views in the workload's layout, requiring grad; grad_q, grad_k: the
    gradients fed to the backward, laid out like q and k. native_q, native_k, native_grad_q,
    native_grad_k: the same tensors as the op's `layout` option takes them (the same objects for
    "bhsd"; their (B, H, S, D) views are q, k, grad_q, grad_k). table_cos/table_sin: the
    full-width (rows, R) table in q's dtype, with positions (B, S) or None (token s uses row s,
    or in a packed row its place in its document). token_cos/token_sin: the table rows of each
    token, (1, S, R) or (B, S, R), as a Hugging Face model hands them to apply_rotary_pos_emb
    (gathered once per step for all layers, so not part of a call). options: the op's keyword
    options for this workload, only those that differ from the defaults.
    """

    layout: str
    op_layout: str
    rotary_dim: int
    interleaved: bool
    q: torch.Tensor
    k: torch.Tensor
    grad_q: torch.Tensor
    grad_k: torch.Tensor
    native_q: torch.Tensor
    native_k: torch.Tensor
    native_grad_q: torch.Tensor
    native_grad_k: torch.Tensor
    table_cos: torch.Tensor
    table_sin: torch.Tensor
    positions: Optional[torch.Tensor]
    token_cos: torch.Tensor
    token_sin: torch.Tensor
    # Packed rows: (documents + 1,) int32 offsets of the documents, and the longest one's length.
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: int = 0
    options: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def as_heads(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, H, S, D) view of a tensor laid out like native_q."""
        return as_heads(x, self.op_layout)

    def _copy(self, native: torch.Tensor, requires_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.op_layout == "bhsd":
            x = copy_in_layout(native, self.layout, requires_grad)
            return x, x
        fresh = native.detach().clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)
        return fresh, self.as_heads(fresh)

    def clone(self) -> "Inputs":
        """Fresh q, k and gradients with the same values and layout (some candidates write
        their inputs in place); the tables are shared, as no candidate writes them."""
        native_q, q = self._copy(self.native_q, True)
        native_k, k = self._copy(self.native_k, True)
        native_grad_q, grad_q = self._copy(self.native_grad_q, False)
        native_grad_k, grad_k = self._copy(self.native_grad_k, False)
        return dataclasses.replace(self, q=q, k=k, grad_q=grad_q, grad_k=grad_k, native_q=native_q,
                                   native_k=native_k, native_grad_q=native_grad_q, native_grad_k=native_grad_k)

    def reference_angles(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of each token's angles in float64, (1 or B, S, R/2), for the reference."""
        half = self.rotary_dim // 2
        return self.token_cos[..., :half].double(), self.token_sin[..., :half].double()


def op_options(workload: Workload, cu_seqlens: Optional[torch.Tensor]) -> Dict[str, Any]:
    """The op's keyword options for the workload, only those that differ from the defaults (so
    that the Llama rows call the op exactly as before)."""
    options: Dict[str, Any] = {}
    if workload.interleaved:
        options["interleaved"] = True
    if workload.rotary_dim is not None and workload.rotary_dim != workload.head_dim:
        options["rotary_dim"] = workload.rotary_dim
    if workload.op_layout != "bhsd":
        options["layout"] = workload.op_layout
    if cu_seqlens is not None:
        options["cu_seqlens"] = cu_seqlens
    return options


def make_inputs(workload: Workload, device: torch.device) -> Inputs:
    w = workload
    native_q, q = _random_heads(w, w.heads_q, device, True)
    native_k, k = _random_heads(w, w.heads_k, device, True)
    native_grad_q, grad_q = _random_heads(w, w.heads_q, device, False)
    native_grad_k, grad_k = _random_heads(w, w.heads_k, device, False)
    table_cos, table_sin = rope_table(w.table_rows, w.rotary, w.dtype, device)
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen = 0
    positions: Optional[torch.Tensor] = None
    if w.packed:
        # Token t of document j uses row t - cu_seqlens[j]: its place in its document, computed
        # once here for the candidates that take per-token rows.
        lengths = torch.tensor(w.document_lengths(), dtype=torch.int64)
        starts = torch.cumsum(lengths, 0) - lengths
        cu_seqlens = torch.cat([starts, lengths.sum().reshape(1)]).to(torch.int32).to(device)
        max_seqlen = int(lengths.max().item())
        rows = (torch.arange(w.seq) - torch.repeat_interleave(starts, lengths)).to(device)
        token_cos, token_sin = table_cos[rows][None], table_sin[rows][None]
    elif w.decode:
        positions = torch.randint(0, w.table_rows, (w.batch, w.seq), device=device)
        token_cos, token_sin = table_cos[positions], table_sin[positions]
    else:
        token_cos, token_sin = table_cos[None, :w.seq], table_sin[None, :w.seq]
    return Inputs(w.layout, w.op_layout, w.rotary, w.interleaved, q, k, grad_q, grad_k,
                  native_q, native_k, native_grad_q, native_grad_k, table_cos, table_sin, positions,
                  token_cos, token_sin, cu_seqlens, max_seqlen, op_options(w, cu_seqlens))
