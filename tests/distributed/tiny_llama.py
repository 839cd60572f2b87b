"""A tiny Llama-shaped decoder whose attention rotates q and k with torch.ops.rope.fused_qk.

Shaped like the real thing where it matters to the op: q and k are transposed (B, S, H, D) views
of the projections (read in place), grouped-query attention (fewer k heads than q heads), cos/sin
half tables in float32, and per-token positions (each sequence starts at its own offset, as in
packed or continued sequences). Small enough to train for a few steps on a CPU.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

import rope_kernels  # noqa: F401  (registers torch.ops.rope)


@dataclasses.dataclass(frozen=True)
class TinyLlamaConfig:
    vocab: int = 64
    dim: int = 64
    layers: int = 2
    heads_q: int = 4
    heads_k: int = 2
    head_dim: int = 16
    hidden: int = 128
    max_positions: int = 256
    rope_base: float = 10000.0


def rope_tables(config: TinyLlamaConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_positions, head_dim/2) float32 cos and sin of the Llama angles."""
    inv_freq = config.rope_base ** (-torch.arange(0, config.head_dim, 2, dtype=torch.float64) / config.head_dim)
    angles = torch.outer(torch.arange(config.max_positions, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE by the fused op.

    The head counts are read from the projections' outputs (view(..., -1, D)), so that under
    tensor parallelism, where each rank holds some of the heads, the same code runs unchanged.
    """

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.dim, config.heads_q * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.heads_k * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.heads_k * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.heads_q * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)  # (B, Hq, S, D) view
        k = self.k_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, -1, self.head_dim).transpose(1, 2)
        q, k = torch.ops.rope.fused_qk(q, k, cos, sin, positions)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class FeedForward(nn.Module):
    """SwiGLU, as in Llama."""

    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(config.dim, config.hidden, bias=False)
        self.up = nn.Linear(config.dim, config.hidden, bias=False)
        self.down = nn.Linear(config.hidden, config.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim)
        self.attention = Attention(config)
        self.ffn_norm = RMSNorm(config.dim)
        self.ffn = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, positions)
        return x + self.ffn(self.ffn_norm(x))


class TinyLlama(nn.Module):
    def __init__(self, config: TinyLlamaConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.layers))
        self.norm = RMSNorm(config.dim)
        self.lm_head = nn.Linear(config.dim, config.vocab, bias=False)
        cos, sin = rope_tables(config)
        # Not persistent: derived from the config, not learned state.
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, self.cos, self.sin, positions)
        return self.lm_head(self.norm(x))


def synthetic_batch(step: int, batch: int, seq: int, config: TinyLlamaConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step `step`'s (tokens, targets, positions), the same on every process.

    Each sequence counts up from a random token by a stride of its own (1..3), so the next token
    depends on the previous two: a pattern attention can learn in a few steps. Positions start
    at a random offset per sequence. Drawn on the CPU from a generator seeded by the step.
    """
    generator = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, config.vocab, (batch, 1), generator=generator)
    stride = torch.randint(1, 4, (batch, 1), generator=generator)
    sequence = (start + stride * torch.arange(seq + 1)) % config.vocab
    offset = torch.randint(0, config.max_positions - seq + 1, (batch, 1), generator=generator)
    positions = offset + torch.arange(seq)
    return sequence[:, :-1], sequence[:, 1:], positions
