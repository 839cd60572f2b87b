"""Real transformers models with `patch_transformers()`: for every supported family, a tiny random
model gives the unpatched model's logits and parameter gradients (padding and attention masks
included) and decodes through the KV cache the same way; and the patch itself: what it changes,
that it undoes exactly, and that the patched attention really runs the fused op.

float32 on the CPU must match transformers to float32 rounding. In bfloat16 on a GPU the fused op
rounds once where transformers rounds three times, so the two differ by bfloat16 noise: there the
patched model must be as close to a float32 run of the same weights as transformers' own bfloat16
model is (the distance within a factor of three: bfloat16 noise varies between two runs by up to
about two), for the logits and for every parameter's gradient.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from typing import Any, Callable, List

import pytest
import torch
from torch._dynamo.utils import counters

import rope_kernels
from hf_tiny_models import (VARIANTS, OpCounter, assert_generates_the_same, assert_matches_unpatched, decode,
                            float32_copy, packed_positions, padded_batch, positions_from_mask, tiny_family_model,
                            tiny_model, training_step)
from rope_env import DEVICES, requires_cuda, run_fresh_python
from rope_kernels.testing import tolerance

DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=requires_cuda),
]


# Every test starts and ends with transformers unpatched, whatever it did.
pytestmark = pytest.mark.usefixtures("unpatched_transformers")


def modeling_module(model: torch.nn.Module) -> Any:
    return inspect.getmodule(type(model))


def run_patched(model: torch.nn.Module, fn: Callable[[], Any]) -> Any:
    with rope_kernels.patch_transformers(model):
        return fn()


@pytest.mark.parametrize("positions", ["per_sequence", "default"])
@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_step_matches_transformers(variant: str, device: str, dtype: torch.dtype, positions: str) -> None:
    # "per_sequence": position ids that differ between the sequences (per-sequence cos/sin, as
    # generate() and packed batches make them); "default": the model's own 0..S-1 for every
    # sequence (one cos/sin shared by the batch).
    model = tiny_model(variant, device, dtype)
    ids, mask = padded_batch(device, side="right")
    position_ids = packed_positions(mask) if positions == "per_sequence" else None
    step = lambda m: training_step(m, ids, mask, position_ids)  # noqa: E731
    logits, grads = step(model)
    patched_logits, patched_grads = run_patched(model, lambda: step(model))
    reference_logits, reference_grads = step(float32_copy(model)) if dtype != torch.float32 else (logits, grads)

    real = mask.bool()  # logits of padding are not compared (nothing uses them)
    assert_matches_unpatched(patched_logits[real], logits[real], reference_logits[real], "logits")
    assert patched_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        assert_matches_unpatched(patched_grads[name], grads[name], reference_grads[name], f"grad of {name}")


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decoding_with_kv_cache_matches_transformers(variant: str, device: str, dtype: torch.dtype) -> None:
    # Left-padded prompts, then 6 tokens one at a time: positions run past the prompt, each
    # sequence from its own offset. Both models are fed the same tokens (those transformers picks).
    model = tiny_model(variant, device, dtype)
    ids, mask = padded_batch(device)
    logits, tokens = decode(model, ids, mask, steps=6)
    patched_logits, _ = run_patched(model, lambda: decode(model, ids, mask, steps=6, forced=tokens))
    reference_logits = decode(float32_copy(model), ids, mask, steps=6, forced=tokens)[0] \
        if dtype != torch.float32 else logits
    for step in range(logits.shape[1]):
        assert_matches_unpatched(patched_logits[:, step], logits[:, step], reference_logits[:, step],
                                 f"logits of decoding step {step}")


@pytest.mark.parametrize("variant", ["llama", "gemma2", "phi3_partial"])
def test_generate_gives_the_same_tokens(variant: str) -> None:
    assert_generates_the_same(tiny_model(variant, "cpu", torch.float32), new_tokens=8)


@pytest.mark.parametrize("variant", ["llama", "phi3_partial"])
def test_rope_matters(variant: str) -> None:
    # These tests can fail: with the rotation left out, the logits move by far more than any
    # tolerance above (the models are initialised so that attention depends on position).
    model = tiny_model(variant, "cpu", torch.float32)
    ids, mask = padded_batch("cpu")
    logits, _ = training_step(model, ids, mask, positions_from_mask(mask))
    module = modeling_module(model)
    original = module.apply_rotary_pos_emb
    module.apply_rotary_pos_emb = lambda q, k, cos, sin, *args, **kwargs: (q, k)
    try:
        without_rope, _ = training_step(model, ids, mask, positions_from_mask(mask))
    finally:
        module.apply_rotary_pos_emb = original
    real = mask.bool()
    assert float((without_rope - logits)[real].abs().max()) > 0.1 * float(logits.abs().max())


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_patched_attention_runs_the_fused_op(variant: str) -> None:
    model = tiny_model(variant, "cpu", torch.float32)
    ids, mask = padded_batch("cpu")
    layers = model.config.num_hidden_layers
    for patch in (False, True):
        counter = OpCounter()
        with rope_kernels.patch_transformers(model) if patch else contextlib.nullcontext(), counter, torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        assert counter.calls.count(torch.ops.rope.fused_qk.default) == (layers if patch else 0)


FAMILIES = sorted({family for family, _ in VARIANTS.values()})


def test_patch_all_and_undo() -> None:
    originals = {f: _module_of(f).apply_rotary_pos_emb for f in FAMILIES}  # imported before the patch
    handle = rope_kernels.patch_transformers()
    assert {f"transformers.models.{f}.modeling_{f}" for f in FAMILIES} <= set(handle.modules)
    assert rope_kernels.patched_modules() == tuple(sorted(handle.modules))
    for family in FAMILIES:
        replaced = _module_of(family).apply_rotary_pos_emb
        assert replaced is not originals[family]
        # The replacement has the signature of the function it replaces (5.x: no position_ids).
        # With the `kernels` package installed, 5.x's function is a hub hook: an nn.Module whose
        # forward carries the signature.
        original = originals[family]
        original_callable = original.forward if isinstance(original, torch.nn.Module) else original
        assert list(inspect.signature(replaced).parameters) == list(inspect.signature(original_callable).parameters)
    assert rope_kernels.patch_transformers().modules == handle.modules  # again: harmless
    handle.undo()
    for family in FAMILIES:
        assert _module_of(family).apply_rotary_pos_emb is originals[family]
    assert rope_kernels.patched_modules() == ()


def test_deepseek_v3s_interleaved_function_is_patched_and_restored() -> None:
    # A module with two RoPE functions: both replaced by one patch, both restored by undo(), and
    # the module listed once.
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as module

    originals = (module.apply_rotary_pos_emb, module.apply_rotary_pos_emb_interleave)
    with rope_kernels.patch_transformers("deepseek_v3") as handle:
        assert handle.modules == (module.__name__,)
        assert [s.function for s in handle.report] == ["apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave"]
        assert rope_kernels.patched_modules() == (module.__name__,)
        replaced = module.apply_rotary_pos_emb_interleave
        assert replaced is not originals[1] and replaced.__name__ == "apply_rotary_pos_emb_interleave"
        assert list(inspect.signature(replaced).parameters) == list(inspect.signature(originals[1]).parameters)
        q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 1, 6, 16)
        angles = torch.rand(2, 6, 8) * 6
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        counter = OpCounter()
        with counter:
            got = replaced(q, k, cos, sin)
        assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
        for a, b in zip(got, originals[1](q, k, cos, sin)):
            torch.testing.assert_close(a, b)
    assert (module.apply_rotary_pos_emb, module.apply_rotary_pos_emb_interleave) == originals
    assert rope_kernels.patched_modules() == ()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vision_towers_function_is_patched(dtype: torch.dtype) -> None:
    # Qwen2-VL's apply_rotary_pos_emb_vision: (S, H, D) patches as its vision attention unbinds
    # them from one qkv projection (strided views), (S, D) float32 tables, computed in float32 and
    # returned in q's dtype; the op, a batch of one, gives its result.
    from transformers.models.qwen2_vl import modeling_qwen2_vl as module

    original = module.apply_rotary_pos_emb_vision
    seq, heads, head_dim = 10, 4, 16
    qkv = torch.randn(seq, 3, heads, head_dim).to(dtype)
    q, k, _ = qkv.permute(1, 0, 2, 3).unbind(0)
    half = torch.rand(seq, head_dim // 2) * 6
    cos, sin = torch.cat([half, half], -1).cos(), torch.cat([half, half], -1).sin()
    with rope_kernels.patch_transformers(module) as handle:
        vision = [status for status in handle.report if status.function == "apply_rotary_pos_emb_vision"]
        assert len(vision) == 1 and vision[0].patched and vision[0].keep_dtype, vision
        counter = OpCounter()
        with counter:
            got = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
        assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
        expected = original(q, k, cos, sin)
        exact = [_rotated_in_float64(x, half) for x in (q, k)]
        for a, b, c in zip(got, expected, exact):
            assert a.dtype == dtype and a.shape == b.shape
            if dtype == torch.float32:
                torch.testing.assert_close(a, b)
            else:  # one rounding of the float64 result, as the formula's own float32 math then cast
                torch.testing.assert_close(a.double(), c, rtol=2.0**-8, atol=2.0**-8)
    assert module.apply_rotary_pos_emb_vision is original


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_batched_vision_function_with_partial_rotary_is_patched(device: str, dtype: torch.dtype) -> None:
    # MiniMax-M3-VL's apply_rotary_pos_emb_vision: (B, S, H, D) patches, (S, R) tables rotating the
    # first R features (the rest passes through): the op's rotary_dim on (B, S, H, D), one call,
    # forward and backward within one rounding of the function's float64 result.
    from transformers.models.minimax_m3_vl import modeling_minimax_m3_vl as module

    original = module.apply_rotary_pos_emb_vision
    batch, seq, heads, head_dim, rotated = 2, 10, 4, 32, 16
    qkv = torch.randn(batch, seq, 3, heads, head_dim).to(device, dtype)
    q, k = (t.requires_grad_() for t in qkv[:, :, :2].unbind(2))
    half = torch.rand(seq, rotated // 2) * 6
    cos, sin = (torch.cat([f(half), f(half)], -1).to(device, dtype) for f in (torch.cos, torch.sin))
    with rope_kernels.patch_transformers(module) as handle:
        vision = [status for status in handle.report if status.function == "apply_rotary_pos_emb_vision"]
        assert len(vision) == 1 and vision[0].patched and "(B, S, H, D) patches" in vision[0].reason, vision
        counter = OpCounter()
        with counter:
            got = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
        assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
    assert module.apply_rotary_pos_emb_vision is original
    q64, k64 = (x.detach().cpu().double().requires_grad_() for x in (q, k))
    want = original(q64, k64, cos.cpu().double(), sin.cpu().double())
    for a, b, x in zip(got, want, (q, k)):
        assert a.dtype == dtype and a.shape == x.shape
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), **tolerance(dtype))
    weights = [torch.randn_like(t) for t in got]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), (q, k))
    expected = torch.autograd.grad(sum((t * w.cpu().double()).sum() for t, w in zip(want, weights)), (q64, k64))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a.cpu().double(), b, **tolerance(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_clvps_function_rotating_v_too_is_patched(device: str, dtype: torch.dtype) -> None:
    # CLVP's apply_rotary_pos_emb(q, k, v, cos, sin, position_ids): q, k and v (its attention's
    # rotated slices of each head) by a (max_seq, D) table at position_ids: q and k by one op call,
    # v by a second, forward and backward within one rounding of the function's float64 result.
    from transformers.models.clvp import modeling_clvp as module

    original = module.apply_rotary_pos_emb
    batch, heads, seq, head_dim, rotated, rows = 2, 4, 6, 32, 16, 9
    qkv = torch.randn(batch, seq, 3, heads, head_dim).to(device, dtype).transpose(1, 3)  # (B, H, 3, S, D)
    q, k, v = (t[..., :rotated].requires_grad_() for t in qkv.unbind(2))  # CLVP's slices
    freqs = torch.rand(rows, rotated // 2) * 6
    cos, sin = (torch.cat([f(freqs), f(freqs)], -1).to(device, dtype) for f in (torch.cos, torch.sin))
    position_ids = torch.randint(0, rows, (batch, seq)).to(device)
    with rope_kernels.patch_transformers(module) as handle:
        assert handle.report[0].convention == "`fused_qk`, and `fused` for v"
        counter = OpCounter()
        with counter:
            got = module.apply_rotary_pos_emb(q, k, v, cos, sin, position_ids)
        assert counter.calls.count(torch.ops.rope.fused_qk.default) == 2  # (rope::fused is fused_qk over one tensor)
    assert module.apply_rotary_pos_emb is original
    q64, k64, v64 = (x.detach().cpu().double().requires_grad_() for x in (q, k, v))
    want = original(q64, k64, v64, cos.cpu().double(), sin.cpu().double(), position_ids.cpu())
    for a, b, x in zip(got, want, (q, k, v)):
        assert a.dtype == dtype and a.shape == x.shape
        torch.testing.assert_close(a.detach().cpu().double(), b.detach(), **tolerance(dtype))
    weights = [torch.randn_like(t) for t in got]
    grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), (q, k, v))
    expected = torch.autograd.grad(sum((t * w.cpu().double()).sum() for t, w in zip(want, weights)), (q64, k64, v64))
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a.cpu().double(), b, **tolerance(dtype))


def test_clvp_encoder_patched_gives_the_same_states_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tiny random CLVP text encoder (its RoPE rotates q, k and v): patched, the same hidden states
    # and parameter gradients (float32), the op run in every layer; and the check can fail: with
    # q, k and v left unrotated the states move.
    from transformers.models.clvp import configuration_clvp, modeling_clvp

    config = configuration_clvp.ClvpEncoderConfig(vocab_size=128, hidden_size=128, intermediate_size=128,
                                                  projection_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                                  bos_token_id=1, eos_token_id=2)  # head_dim 64, 32 of it rotated
    torch.manual_seed(0)
    encoder = modeling_clvp.ClvpEncoder(config).eval()
    ids = torch.randint(3, 128, (2, 9))
    weights = torch.randn(2, 9, 128)

    def step() -> Any:
        encoder.zero_grad(set_to_none=True)
        states = encoder(input_ids=ids).last_hidden_state
        (states * weights).sum().backward()
        return states.detach(), {n: p.grad.clone() for n, p in encoder.named_parameters() if p.grad is not None}

    states, grads = step()
    with rope_kernels.patch_transformers(encoder):
        counter = OpCounter()
        with counter:
            patched_states, patched_grads = step()
    assert sum(1 for op in counter.calls if op.namespace == "rope") == 2 * 2 * 2  # layers x (q+k, v) x (fwd, bwd)
    torch.testing.assert_close(patched_states, states)
    assert patched_grads.keys() == grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(patched_grads[name], grads[name], msg=name)
    monkeypatch.setattr(modeling_clvp, "apply_rotary_pos_emb", lambda q, k, v, *rest: (q, k, v))
    unrotated, _ = step()
    assert float((unrotated - states).abs().max()) > 0.01 * float(states.abs().max())


def _rotated_in_float64(x: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
    x = x.double()
    first, second = x.chunk(2, dim=-1)
    cos, sin = half.double().cos()[:, None], half.double().sin()[:, None]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)


def test_modules_imported_after_the_patch_are_patched_as_they_load() -> None:
    # In a fresh process: patch_transformers() imports no modeling module, patches those imported
    # later as they load, and undo() stops that and restores them.
    out = run_fresh_python(
        "import sys, rope_kernels\n"
        "handle = rope_kernels.patch_transformers()\n"
        "print(sorted(m for m in sys.modules if m.startswith('transformers.models.') and '.modeling_' in m))\n"
        "from transformers.models.qwen3 import modeling_qwen3\n"
        "from transformers.models.cohere import modeling_cohere\n"
        "from transformers.models.deepseek_v4 import modeling_deepseek_v4\n"
        "print(handle.modules)\n"
        "print([str(s) for s in handle.report if 'deepseek_v4' in s.module])\n"
        "handle.undo()\n"
        "from transformers.models.mistral import modeling_mistral\n"
        "print(rope_kernels.patched_modules(), modeling_qwen3.apply_rotary_pos_emb.__module__)\n")
    loaded_before, patched, deepseek_v4, after_undo = out.strip().splitlines()
    assert loaded_before == "[]"
    # Cohere's interleaved pairs with each angle at both features of its pair: a convention of
    # its own, found by the proof like Qwen3's.
    assert patched == "('transformers.models.cohere.modeling_cohere', 'transformers.models.qwen3.modeling_qwen3')"
    # DeepSeek-V4 rotates the last features of each head, which no op argument says: left alone,
    # with the reason.
    assert "modeling_deepseek_v4: left alone: no convention of the op gives its apply_rotary_pos_emb" in deepseek_v4
    assert after_undo == "() transformers.models.qwen3.modeling_qwen3"


def test_dry_run_reports_every_modeling_module_and_changes_nothing() -> None:
    handle = rope_kernels.patch_transformers(dry_run=True)
    modules = list(dict.fromkeys(status.module for status in handle.report))
    assert modules == rope_kernels.transformers_patch.all_modeling_modules()
    assert rope_kernels.patched_modules() == ()
    status = {s.module.split(".")[2]: s for s in handle.report if s.function == "apply_rotary_pos_emb"}
    # DeepSeek-V3's second function, which its MLA calls with rope_interleave=True (its checkpoints'
    # setting): interleaved pairs in, half-split out. LongCat-Flash defines it alone.
    interleave = {s.module.split(".")[2]: s for s in handle.report if s.function == "apply_rotary_pos_emb_interleave"}
    for family in ("deepseek_v3", "longcat_flash", "glm4_moe_lite", "mistral4"):
        assert interleave[family].patched, interleave[family]
        assert interleave[family].convention == "`fused_qk(..., interleaved=True, interleaved_out=False)`"
    assert "longcat_flash" not in status
    for family in FAMILIES:
        assert status[family].patched, status[family]
    # GLM pairs the features interleaved: patched with the op's interleaved=True. Cohere's pairs are
    # interleaved too, with each angle at both features of its pair: the op reads every second column.
    assert status["glm"].patched and status["glm"].convention == "`fused_qk(..., interleaved=True)`"
    assert status["cohere"].patched and status["cohere"].convention == "`fused_qk(..., interleaved=True)` (cos/sin[..., ::2])"
    # NanoChat turns each pair by the negated angle: the op's gradient computes it.
    assert status["nanochat"].patched and status["nanochat"].convention == "`fused_qk_backward` (the rotation by -angle)"
    # DeepSeek-V4 rotates the last features of each head ([nope | rope]), which no op argument says.
    assert not status["deepseek_v4"].patched and "no convention of the op gives" in status["deepseek_v4"].reason
    # GPT-J's (tensor, sin, cos): one (B, S, H, D) tensor a call, interleaved pairs, one angle per pair.
    assert status["gptj"].patched and status["gptj"].convention == \
        "`fused(..., interleaved=True)` (cos/sin of head_dim / 2), for q and k by their two calls"
    # GPT-OSS's tables hold one angle per pair (head_dim / 2 columns), as the op reads them.
    assert status["gpt_oss"].patched and status["gpt_oss"].convention == "`fused_qk` (cos/sin of head_dim / 2)"
    assert all(s.reason for s in handle.report)
    handle.undo()  # a dry run has nothing to undo
    assert rope_kernels.patched_modules() == ()


def _fake_modeling_module(name: str, function: Callable[..., Any]) -> types.ModuleType:
    module = types.ModuleType(f"transformers.models.{name}.modeling_{name}")
    module.apply_rotary_pos_emb = function
    sys.modules[module.__name__] = module
    return module


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def llama_copy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def interleaved_copy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     unsqueeze_dim: int = 1) -> Any:
    cos = cos[..., : cos.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
    sin = sin[..., : sin.shape[-1] // 2].repeat_interleave(2, dim=-1).unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_pairs(q) * sin, k * cos + _rotate_pairs(k) * sin


def one_tensor_copy(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
    # Gemma 3n's and Gemma 4's: one tensor per call (q and k by two calls).
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return x * cos + _rotate_half(x) * sin


def per_feature_tables_copy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            unsqueeze_dim: int = 1) -> Any:
    # Cohere's: interleaved pairs, each feature multiplied by its own column of the tables (which
    # Cohere's rotary embedding makes with each angle at both columns of its pair).
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_pairs(q) * sin, k * cos + _rotate_pairs(k) * sin


def reversed_copy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
    # NanoChat's: rotate_half as cat(x2, -x1), each pair turned by the negated angle.
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos - _rotate_half(q) * sin, k * cos - _rotate_half(k) * sin


def not_a_rotation(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
    # cos and sin swapped: no convention of the op computes it.
    return llama_copy(q, k, sin, cos, unsqueeze_dim)


def gptj_copy(tensor: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> Any:
    # GPT-J's: one (B, S, H, D) tensor a call, interleaved pairs, one angle per pair.
    sin = torch.repeat_interleave(sin[:, :, None, :], 2, 3)
    cos = torch.repeat_interleave(cos[:, :, None, :], 2, 3)
    return tensor * cos + _rotate_pairs(tensor) * sin


def other_signature(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mrope_section: Any,
                    unsqueeze_dim: int = 1) -> Any:
    return llama_copy(q, k, cos, sin, unsqueeze_dim)


def test_a_module_is_patched_by_what_its_function_computes() -> None:
    # Modules of made-up families: those with a copy of Llama's, GLM's, Cohere's or NanoChat's
    # function are patched under any name, each with its convention; one that computes something
    # else, or has another signature, is left alone with the reason.
    names = ["ropetest_llama_copy", "ropetest_interleaved", "ropetest_per_feature", "ropetest_reversed",
             "ropetest_not_a_rotation", "ropetest_signature"]
    try:
        copy_module = _fake_modeling_module(names[0], llama_copy)
        interleaved_module = _fake_modeling_module(names[1], interleaved_copy)
        per_feature_module = _fake_modeling_module(names[2], per_feature_tables_copy)
        reversed_module = _fake_modeling_module(names[3], reversed_copy)
        not_a_rotation_module = _fake_modeling_module(names[4], not_a_rotation)
        other_module = _fake_modeling_module(names[5], other_signature)
        q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
        angles = torch.rand(2, 6, 8) * 6
        twice = torch.cat([angles, angles], -1)  # transformers' tables
        pairwise = angles.repeat_interleave(2, dim=-1)  # Cohere's
        cases = ((copy_module, llama_copy, twice, "`fused_qk`", torch.ops.rope.fused_qk.default),
                 (interleaved_module, interleaved_copy, twice, "`fused_qk(..., interleaved=True)`",
                  torch.ops.rope.fused_qk.default),
                 (per_feature_module, per_feature_tables_copy, pairwise,
                  "`fused_qk(..., interleaved=True)` (cos/sin[..., ::2])", torch.ops.rope.fused_qk.default),
                 (reversed_module, reversed_copy, twice, "`fused_qk_backward` (the rotation by -angle)",
                  torch.ops.rope.fused_qk_backward.default))
        for module, function, table, convention, op in cases:
            cos, sin = table.cos(), table.sin()
            with rope_kernels.patch_transformers(module) as handle:
                assert handle.modules == (module.__name__,)
                assert handle.report[0].convention == convention
                assert module.apply_rotary_pos_emb is not function
                for x_q, x_k, unsqueeze_dim in ((q, k, 1), (q.transpose(1, 2), k.transpose(1, 2), 2)):
                    counter = OpCounter()
                    with counter:
                        got = module.apply_rotary_pos_emb(x_q, x_k, cos, sin, unsqueeze_dim=unsqueeze_dim)
                    assert counter.calls.count(op) == 1
                    for a, b in zip(got, function(x_q, x_k, cos, sin, unsqueeze_dim)):
                        torch.testing.assert_close(a, b)
            assert module.apply_rotary_pos_emb is function
        with pytest.raises(ValueError, match=r"left alone: no convention of the op gives its apply_rotary_pos_emb: "
                                             r"with half-split pairs, q off by up to .* on the per-token \(B, H, S, D\) "
                                             r"call; with interleaved pairs, q off by up to"):
            rope_kernels.patch_transformers(not_a_rotation_module)
        with pytest.raises(ValueError, match=r"does not have transformers' signature"):
            rope_kernels.patch_transformers(other_module)
        assert not_a_rotation_module.apply_rotary_pos_emb is not_a_rotation
        cos, sin = twice.cos(), twice.sin()
        one_tensor_module = _fake_modeling_module("ropetest_one_tensor", one_tensor_copy)
        names.append("ropetest_one_tensor")
        with rope_kernels.patch_transformers(one_tensor_module) as handle:
            assert handle.report[0].convention == "`fused`, for q and k by their two calls"
            for x, unsqueeze_dim in ((q, 1), (k.transpose(1, 2), 2)):  # (B, H, S, D), and (B, S, H, D)
                counter = OpCounter()
                with counter:
                    got = one_tensor_module.apply_rotary_pos_emb(x, cos, sin, unsqueeze_dim=unsqueeze_dim)
                # rope::fused is the pair kernel over x alone: one fused_qk launch per call.
                assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
                torch.testing.assert_close(got, one_tensor_copy(x, cos, sin, unsqueeze_dim))
        assert one_tensor_module.apply_rotary_pos_emb is one_tensor_copy
        gptj_module = _fake_modeling_module("ropetest_gptj", gptj_copy)
        names.append("ropetest_gptj")
        with rope_kernels.patch_transformers(gptj_module) as handle:
            assert handle.report[0].convention == ("`fused(..., interleaved=True)` (cos/sin of head_dim / 2), "
                                                   "for q and k by their two calls")
            assert list(inspect.signature(gptj_module.apply_rotary_pos_emb).parameters) == ["tensor", "sin", "cos"]
            x = q.transpose(1, 2)[..., :8]  # (B, S, H, D) as GPT-J holds it, its rotated slice
            counter = OpCounter()
            with counter:
                got = gptj_module.apply_rotary_pos_emb(x, angles.sin()[..., :4], angles.cos()[..., :4])
            assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
            torch.testing.assert_close(got, gptj_copy(x, angles.sin()[..., :4], angles.cos()[..., :4]))
        assert gptj_module.apply_rotary_pos_emb is gptj_copy
        # patch_transformers() patches every loaded module that it proves, and only those.
        handle = rope_kernels.patch_transformers()
        assert {m.__name__ for m, *_ in cases} <= set(handle.modules)
        assert not_a_rotation_module.__name__ not in handle.modules and other_module.__name__ not in handle.modules
        handle.undo()
    finally:
        for name in names:
            sys.modules.pop(f"transformers.models.{name}.modeling_{name}", None)


def patches_after_prefix_copy(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kwargs: Any) -> Any:
    # DINOv3's: (B, H, S, D) tensors, (P, D) tables for the last P tokens (the patches); the class
    # and register tokens before them pass through.
    prefix = q.shape[-2] - sin.shape[-2]
    rotated = []
    for x in (q, k):
        x_prefix, x_patches = x.split((prefix, sin.shape[-2]), dim=-2)
        rotated.append(torch.cat((x_prefix, x_patches * cos + _rotate_half(x_patches) * sin), dim=-2))
    return tuple(rotated)


def patches_before_suffix(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, **kwargs: Any) -> Any:
    # The same signature with the unrotated tokens after the patches: not DINOv3's call.
    patches = sin.shape[-2]
    rotated = []
    for x in (q, k):
        x_patches, x_rest = x.split((patches, x.shape[-2] - patches), dim=-2)
        rotated.append(torch.cat((x_patches * cos + _rotate_half(x_patches) * sin, x_rest), dim=-2))
    return tuple(rotated)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("device", DEVICES)
def test_class_and_register_tokens_pass_through_as_in_dinov3(device: str, dtype: torch.dtype) -> None:
    # DINOv3's function (q, k, cos, sin, **kwargs) leaves the tokens before the patches unrotated:
    # patched, the op does the same in one call (those tokens at a table row of angle 0), forward
    # and backward; a function that leaves the tokens after the patches unrotated is left alone.
    module = _fake_modeling_module("ropetest_dinov3", patches_after_prefix_copy)
    suffix_module = _fake_modeling_module("ropetest_suffix", patches_before_suffix)
    try:
        with rope_kernels.patch_transformers(module) as handle:
            assert handle.report[0].convention == "`fused_qk`, the class and register tokens at a table row of angle 0"
            for prefix in (0, 1, 5):  # no prefix, the class token, the class token and 4 registers
                patches, heads, head_dim = 12, 4, 16
                qkv = torch.randn(2, prefix + patches, 3, heads, head_dim).to(device, dtype)
                q, k = (t.transpose(1, 2).requires_grad_() for t in qkv[:, :, :2].unbind(2))  # views of a qkv projection
                half = torch.rand(patches, head_dim // 2) * 6
                cos, sin = (torch.cat([f(half), f(half)], -1).to(device, dtype) for f in (torch.cos, torch.sin))
                counter = OpCounter()
                with counter:
                    got = module.apply_rotary_pos_emb(q, k, cos, sin)
                assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
                # The function's own formula in float64 on the same values: the truth, which the
                # op rounds once.
                q64, k64 = (x.detach().cpu().double().requires_grad_() for x in (q, k))
                want = patches_after_prefix_copy(q64, k64, cos.cpu().double(), sin.cpu().double())
                for a, b, x in zip(got, want, (q, k)):
                    assert a.dtype == dtype and a.shape == x.shape
                    assert torch.equal(a[:, :, :prefix], x[:, :, :prefix])  # exactly as they were
                    torch.testing.assert_close(a.detach().cpu().double(), b.detach(), **tolerance(dtype))
                weights = [torch.randn_like(t) for t in got]
                grads = torch.autograd.grad(sum((t * w).sum() for t, w in zip(got, weights)), (q, k))
                expected = torch.autograd.grad(sum((t * w.cpu().double()).sum() for t, w in zip(want, weights)),
                                               (q64, k64))
                for a, b in zip(grads, expected):
                    torch.testing.assert_close(a.cpu().double(), b, **tolerance(dtype))
        assert module.apply_rotary_pos_emb is patches_after_prefix_copy
        with pytest.raises(ValueError, match=r"left alone: no convention of the op gives its apply_rotary_pos_emb: "
                                             r"with half-split pairs, q off by up to .* on the prefix-tokens call"):
            rope_kernels.patch_transformers(suffix_module)
    finally:
        sys.modules.pop(module.__name__, None)
        sys.modules.pop(suffix_module.__name__, None)


def k_optional_copy(q: torch.Tensor, k: Any = None, cos: Any = None, sin: Any = None, unsqueeze_dim: int = 1) -> Any:
    # Qwen4-Exp's: without k, q alone rotated and returned.
    if k is None:
        return one_tensor_copy(q, cos, sin, unsqueeze_dim)
    return llama_copy(q, k, cos, sin, unsqueeze_dim)


def test_a_function_whose_k_may_be_left_out_is_patched_for_both_calls() -> None:
    # Qwen4-Exp's apply_rotary_pos_emb(q, k=None, cos=None, sin=None, unsqueeze_dim=1) rotates q
    # alone where its sparse-attention indexer leaves k out: proven and served in both calls (the
    # op once each); a default of k other than None is not a signature the patch takes.
    module = _fake_modeling_module("ropetest_k_optional", k_optional_copy)
    other = _fake_modeling_module("ropetest_k_default", lambda q, k=0, cos=None, sin=None, unsqueeze_dim=1: q)
    try:
        q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 2, 6, 16)
        angles = torch.rand(2, 6, 8) * 6
        cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
        with rope_kernels.patch_transformers(module):
            for call, expected in ((lambda f: f(q, cos=cos, sin=sin), k_optional_copy(q, cos=cos, sin=sin)),
                                   (lambda f: f(q.transpose(1, 2), cos=cos, sin=sin, unsqueeze_dim=2),
                                    k_optional_copy(q.transpose(1, 2), cos=cos, sin=sin, unsqueeze_dim=2)),
                                   (lambda f: f(q, k, cos, sin), k_optional_copy(q, k, cos, sin))):
                counter = OpCounter()
                with counter:
                    got = call(module.apply_rotary_pos_emb)
                assert counter.calls.count(torch.ops.rope.fused_qk.default) == 1
                for a, b in zip((got,) if isinstance(got, torch.Tensor) else got,
                                (expected,) if isinstance(expected, torch.Tensor) else expected):
                    torch.testing.assert_close(a, b)
        assert module.apply_rotary_pos_emb is k_optional_copy
        with pytest.raises(ValueError, match=r"does not have transformers' signature"):
            rope_kernels.patch_transformers(other)
    finally:
        sys.modules.pop(module.__name__, None)
        sys.modules.pop(other.__name__, None)


def test_inputs_the_op_does_not_serve_go_to_the_modules_own_function() -> None:
    # A patched module falls back to the function it replaced, not to a formula of its own.
    calls: List[str] = []

    def counted(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        calls.append("original")
        return llama_copy(q, k, cos, sin, unsqueeze_dim)

    module = _fake_modeling_module("ropetest_fallback", counted)
    try:
        with rope_kernels.patch_transformers(module):
            calls.clear()
            q, k = torch.randn(2, 4, 6, 16), torch.randn(2, 4, 6, 16)
            angles = torch.rand(6, 16)
            args = (q[:, :, :, None], k[:, :, :, None], angles.cos(), angles.sin())
            out = module.apply_rotary_pos_emb(*args)
            assert calls == ["original"]  # 5-D q: not the op's
            assert all(torch.equal(a, b) for a, b in zip(out, llama_copy(*args)))
    finally:
        sys.modules.pop(module.__name__, None)


def test_unsupported_targets_are_refused() -> None:
    with pytest.raises(ValueError, match=r"'gpt2' has no layer whose RoPE the op computes .*defines no apply_rotary_pos_emb"):
        rope_kernels.patch_transformers("gpt2")
    with pytest.raises(ValueError, match="Linear has no layer whose RoPE the op computes"):
        rope_kernels.patch_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="the installed transformers has no family 'nosuchfamily'"):
        rope_kernels.patch_transformers("nosuchfamily")
    with pytest.raises(TypeError, match="model_or_class must be"):
        rope_kernels.patch_transformers(3)
    assert rope_kernels.patched_modules() == ()


def _module_of(family: str) -> Any:
    return importlib.import_module(f"transformers.models.{family}.modeling_{family}")


@pytest.mark.parametrize("variant", ["llama", "phi3_partial", "cohere", "nanochat"])
def test_patched_model_compiles_in_one_graph(variant: str, fresh_dynamo: None) -> None:
    # Llama's half-split pairs, Phi-3's partial rotary, Cohere's interleaved pairs on tables of each
    # angle at both features of its pair (a strided view to the op), NanoChat's turn by -angle.
    model = tiny_model(variant, "cpu", torch.float32) if variant in VARIANTS else \
        tiny_family_model(variant, "cpu", torch.float32)
    ids, mask = padded_batch("cpu")
    position_ids = positions_from_mask(mask)
    logits, grads = training_step(model, ids, mask, position_ids)
    with rope_kernels.patch_transformers(model):
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        model.zero_grad(set_to_none=True)
        out = compiled(input_ids=ids, attention_mask=mask, position_ids=position_ids,
                       labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
    compiled_logits = out.logits.detach()
    compiled_grads = {name: p.grad for name, p in model.named_parameters()}
    assert not counters["graph_break"], dict(counters["graph_break"])
    torch.testing.assert_close(compiled_logits, logits, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(compiled_grads[name], grads[name], rtol=1e-5, atol=1e-6, msg=name)
