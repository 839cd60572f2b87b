"""A small attention block with the rope op between other ops, as models use it.

Shared by the export, AOTInductor and compile-mode tests and by the C++ test fixtures, so that
every route (eager, torch.compile, torch.export, AOTInductor, TorchScript from C++) runs the same
model. Scriptable, so that TorchScript can save it.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from rope_reference import rope_angles


class RopeAttention(torch.nn.Module):
    """x (B, S, hidden) -> (B, S, hidden): fused qkv projection, rope on q and k (transposed
    (B, S, H, D) views of the projection, read where they lie), GQA causal attention, output
    projection. cos/sin are buffers of `max_seq` rows, so they travel with a saved module."""

    def __init__(self, hidden: int = 32, heads_q: int = 4, heads_k: int = 2, head_dim: int = 16,
                 max_seq: int = 64) -> None:
        super().__init__()
        self.heads_q = heads_q
        self.heads_k = heads_k
        self.head_dim = head_dim
        self.qkv = torch.nn.Linear(hidden, (heads_q + 2 * heads_k) * head_dim, bias=False)
        self.out = torch.nn.Linear(heads_q * head_dim, hidden, bias=False)
        angles = rope_angles(max_seq, head_dim).to(torch.float32)
        self.register_buffer("cos", angles.cos())
        self.register_buffer("sin", angles.sin())

    def forward(self, x: torch.Tensor, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
        batch, seq = x.size(0), x.size(1)
        width_q = self.heads_q * self.head_dim
        width_k = self.heads_k * self.head_dim
        q, k, v = self.qkv(x).split([width_q, width_k, width_k], dim=-1)
        q = q.view(batch, seq, self.heads_q, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.heads_k, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.heads_k, self.head_dim).transpose(1, 2)
        q, k = torch.ops.rope.fused_qk(q, k, self.cos, self.sin, positions)
        group = self.heads_q // self.heads_k
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        # Attention written out (not SDPA): the same arithmetic on every device and backend, so
        # compiled and eager results differ only by the rounding of fused float32 arithmetic.
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        weights = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        attended = torch.matmul(weights, v).transpose(1, 2).reshape(batch, seq, width_q)
        return self.out(attended)
