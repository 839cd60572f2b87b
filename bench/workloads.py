"""The benchmark's workloads and the inputs each one is measured on.

q and k are transposed views of (B, S, H, D) projection outputs (what a model hands to RoPE),
except where a workload says "bhsd" (contiguous (B, H, S, D) tensors). Values are random normal,
never zeros: zeros hide unwritten outputs and can run faster than real data.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import torch

# RoPE frequencies as in Llama / Hugging Face: theta_i = base^(-2i/D).
ROPE_BASE: float = 10000.0

# Decode rows draw their positions at random from a table this long (a KV cache of 8192 tokens);
# training rows use a table of at least this many rows too, as a model's table is its context.
TABLE_ROWS: int = 8192

# Smoke runs keep each workload's heads, head dim, dtype and layout and shrink only B and S.
SMOKE_BATCH: int = 2
SMOKE_SEQ: int = 8


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    seq: int
    heads_q: int
    heads_k: int
    head_dim: int
    dtype: torch.dtype
    # "bshd": transposed views of (B, S, H, D) tensors; "bhsd": contiguous (B, H, S, D) tensors.
    layout: str = "bshd"
    # Decode rows: positions drawn at random from the table, and a CUDA-graph figure.
    decode: bool = False
    note: str = ""

    @property
    def table_rows(self) -> int:
        return max(self.seq, TABLE_ROWS)

    @property
    def bytes_moved(self) -> int:
        """Bytes the memory system must move at least: q and k read once and written once
        (the cos/sin rows are small next to them and are left out, as in the copy floor)."""
        elements = self.batch * self.seq * (self.heads_q + self.heads_k) * self.head_dim
        return 2 * elements * torch.empty((), dtype=self.dtype).element_size()

    def smoke(self) -> "Workload":
        """The same workload with B and S cut down, for functional runs on a CPU."""
        seq = self.seq if self.decode else min(self.seq, SMOKE_SEQ)
        return dataclasses.replace(self, batch=min(self.batch, SMOKE_BATCH), seq=seq)

    def describe(self) -> str:
        dtype = str(self.dtype).replace("torch.", "")
        return "B={} S={} Hq={} Hk={} D={} {} {}".format(
            self.batch, self.seq, self.heads_q, self.heads_k, self.head_dim, dtype, self.layout)


# The project's workload table (performance notes), in its order.
WORKLOADS: List[Workload] = [
    Workload("llama8b-train", 4, 4096, 32, 8, 128, torch.bfloat16, note="the main training shape"),
    Workload("seed-example", 2, 1024, 32, 32, 128, torch.float16, layout="bhsd",
             note="contiguous (B, H, S, D) tensors"),
    Workload("long-128k", 1, 131072, 32, 8, 128, torch.bfloat16, note="long context"),
    Workload("hd64-mha", 8, 2048, 16, 16, 64, torch.bfloat16, note="small heads"),
    Workload("hd256-gemma", 2, 4096, 8, 4, 256, torch.bfloat16, note="large heads"),
    Workload("fp32", 2, 2048, 32, 8, 128, torch.float32),
    Workload("small-prefill", 1, 128, 32, 8, 128, torch.bfloat16, note="launch-bound"),
    Workload("decode-b1", 1, 1, 32, 8, 128, torch.bfloat16, decode=True,
             note="positions drawn at random from 8192"),
    Workload("decode-b64", 64, 1, 32, 8, 128, torch.bfloat16, decode=True,
             note="positions drawn at random from 8192"),
]


def workload_by_name(name: str) -> Workload:
    for workload in WORKLOADS:
        if workload.name == name:
            return workload
    raise KeyError("unknown workload {!r}; known: {}".format(name, ", ".join(w.name for w in WORKLOADS)))


def _random_heads(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype, layout: str,
                  device: torch.device, requires_grad: bool) -> torch.Tensor:
    """A (B, H, S, D) tensor in the given layout; with requires_grad its storage is a leaf."""
    if layout == "bshd":
        base = torch.randn(batch, seq, heads, head_dim, dtype=dtype, device=device)
        return base.requires_grad_(requires_grad).transpose(1, 2)
    if layout == "bhsd":
        return torch.randn(batch, heads, seq, head_dim, dtype=dtype, device=device).requires_grad_(requires_grad)
    raise ValueError("unknown layout {!r}".format(layout))


def copy_in_layout(x: torch.Tensor, layout: str, requires_grad: bool) -> torch.Tensor:
    """A copy of the (B, H, S, D) tensor x with the same layout, a leaf of its own if asked."""
    if layout == "bshd":
        base = x.detach().transpose(1, 2).clone(memory_format=torch.contiguous_format)
        return base.requires_grad_(requires_grad).transpose(1, 2)
    return x.detach().clone(memory_format=torch.contiguous_format).requires_grad_(requires_grad)


def rope_table(rows: int, head_dim: int, dtype: torch.dtype,
               device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The Hugging Face full-width table (rows, D): real angles, the halves repeated."""
    # Angles in float64, so each entry is the correctly rounded cos/sin of the true angle.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    inv_freq = 1.0 / (ROPE_BASE ** exponents)
    angles = torch.outer(torch.arange(rows, dtype=torch.float64, device=device), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


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
