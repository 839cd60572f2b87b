"""A small attention block with the rope op between other ops, as models use it.

Shared by the export, AOTInductor and compile-mode tests and by the C++ test fixtures, so that
every route (eager, torch.compile, torch.export, AOTInductor, TorchScript from C++) runs the same
model. Scriptable, so that TorchScript can save it.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.nn.functional as F

from rope_kernels.testing import rope_angles


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
        # GQA: q head h attends with k/v head h // group. Written as a loop over the position in
        # the group rather than by repeating k and v (repeat_interleave, or expand + reshape as
        # Hugging Face does): torch 2.11's export cannot trace those with a dynamic sequence
        # length, even without this op (the reshape's stride is min(16*s, 32*s), which adds a
        # guard that export rejects as a constraint on s).
        group = self.heads_q // self.heads_k
        q_groups = q.view(batch, self.heads_k, group, seq, self.head_dim)
        causal = torch.ones(seq, seq, dtype=torch.bool, device=x.device).tril()
        attended_groups: List[torch.Tensor] = []
        for g in range(group):
            # Attention written out (not SDPA): the same arithmetic on every device and backend,
            # so compiled and eager results differ only by the rounding of fused float32 arithmetic.
            scores = torch.matmul(q_groups[:, :, g], k.transpose(-1, -2)) / math.sqrt(self.head_dim)
            weights = F.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
            attended_groups.append(torch.matmul(weights, v))
        # (B, Hk, group, S, D) -> (B, S, Hq * D), head hk * group + g in q's head order.
        attended = torch.stack(attended_groups, dim=2).permute(0, 3, 1, 2, 4).reshape(batch, seq, width_q)
        return self.out(attended)
