"""Tiny, randomly initialised transformers models of every family the patch supports (built from a
config: no download), and the ways the tests run them.

The weights are drawn with a large initializer range so that attention is far from uniform: with
transformers' default (0.02) every query attends almost evenly to every key, the positions hardly
matter, and a broken rotation would go unnoticed (test_rope_matters checks that it would not).
"""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Optional, Tuple

import torch
from transformers import AutoConfig, AutoModelForCausalLM

# Model variants: one per family, and Phi-3 with a partial rotary factor of 1/2, whose rotated
# width (head_dim / 2) must not be mistaken for a half-width table.
VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"attn_implementation": "eager"}),  # its logit soft-capping wants eager
    "phi3": ("phi3", {}),
    "phi3_partial": ("phi3", {"partial_rotary_factor": 0.5}),
}

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, initializer_range=0.2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


def tiny_model(variant: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """The same weights for a variant every time (seeded), in eval mode (no dropout anyway)."""
    family, extra = VARIANTS[variant]
    extra = dict(extra)
    attn = extra.pop("attn_implementation", "sdpa")
    config = AutoConfig.for_model(family, **TINY, **extra)
    torch.manual_seed(1234)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    return model.to(device=device, dtype=dtype).eval()


def float32_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights computed in float32: the reference a 16-bit model is judged against."""
    return copy.deepcopy(model).float()


def padded_batch(device: str, side: str = "left") -> Tuple[torch.Tensor, torch.Tensor]:
    """Two sequences of 12 tokens, the first padded by 4: (input_ids, attention_mask).

    Left padding is what batched generation uses; training batches are padded on the right, which
    also leaves no query with every key masked (whose attention backward is not the point here).
    """
    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(3, TINY["vocab_size"], (2, 12), generator=generator)
    mask = torch.ones_like(ids)
    padding = slice(0, 4) if side == "left" else slice(8, 12)
    mask[0, padding] = 0
    ids[0, padding] = TINY["pad_token_id"]
    return ids.to(device), mask.to(device)


def packed_positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that differ between the sequences at real tokens: the first sequence counts
    from its first real token, the second holds two packed documents of 6 tokens (0..5, 0..5)."""
    positions = positions_from_mask(mask)
    positions[1] = torch.arange(mask.shape[1], device=mask.device) % 6
    return positions


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each token's position counted from its sequence's first real token, as generate() does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def training_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                  position_ids: Optional[torch.Tensor]) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Logits and the gradient of every parameter after one backward of the language-model loss
    (padding excluded from the loss)."""
    model.zero_grad(set_to_none=True)
    labels = ids.masked_fill(mask == 0, -100)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)
    out.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


def decode(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, steps: int,
           forced: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Prefill then `steps` tokens one at a time through the KV cache, positions continuing past
    the prompt. Greedy, unless `forced` (batch, steps) says which tokens to feed: then two models
    see exactly the same inputs. Returns (logits of every step (batch, steps + 1, vocab), tokens fed)."""
    position_ids = positions_from_mask(mask)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=True)
        logits: List[torch.Tensor] = [out.logits[:, -1]]
        fed: List[torch.Tensor] = []
        for step in range(steps):
            token = logits[-1].argmax(-1) if forced is None else forced[:, step]
            fed.append(token)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            position_ids = position_ids[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=position_ids,
                        past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits, dim=1), torch.stack(fed, dim=1)
