"""RoPE as model code writes it in PyTorch: Hugging Face's apply_rotary_pos_emb, generalized to
the op's options. What the eager and torch.compile candidates run.

cos/sin are the rows of each token, (1 or B, S, W), broadcast over the heads of (B, H, S, D) q
and k. Half-split pairs take the Hugging Face full-width rows (W = R, the angles twice) and rotate
with rotate_half; interleaved pairs (x[2i], x[2i+1]) take the half-width rows (W = R/2) and
rotate the even and odd features. A rotary width R below D rotates x[..., :R] and concatenates
the rest unchanged (transformers' partial rotary).
"""
from __future__ import annotations

from typing import Tuple

import torch

Outputs = Tuple[torch.Tensor, torch.Tensor]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the halves of the last dimension."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def hf_apply_rotary_pos_emb(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                            sin: torch.Tensor) -> Outputs:
    """The Hugging Face Llama formulation: cos/sin (1 or B, S, D) broadcast over the heads."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) rotated by angle i: the even/odd formula, re-interleaved."""
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)


def rope_formula(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> Outputs:
    """RoPE of q and k with the rotary width given by cos/sin: R = W half-split, R = 2 W
    interleaved. With R = D and half-split pairs it is hf_apply_rotary_pos_emb, op for op."""
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    rotary_dim = cos.shape[-1] * 2 if interleaved else cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return _rotate_interleaved(x, cos, sin) if interleaved else x * cos + rotate_half(x) * sin

    if rotary_dim == q.shape[-1]:
        return rotate(q), rotate(k)
    return (torch.cat((rotate(q[..., :rotary_dim]), q[..., rotary_dim:]), dim=-1),
            torch.cat((rotate(k[..., :rotary_dim]), k[..., rotary_dim:]), dim=-1))
