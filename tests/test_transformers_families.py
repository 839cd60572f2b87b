"""Every family of the installed transformers whose RoPE the op computes, as patch_transformers()
finds them (not a list kept here: a new release's families are tested without an edit): a tiny
random causal LM of each, built from its config (no download), gives the unpatched model's logits
and every parameter's gradient, generates the same tokens from left-padded prompts, and runs the
fused op in its attention. A family without a causal LM (an encoder, an encoder-decoder, a
vision-language model) is run on token ids alone through its first model class that takes them
(hf_tiny_models.TEXT_MODEL_KINDS), and an image model (DINOv3, Sapiens 2, Pixtral's vision
encoder) on two random images: the same output and gradients, and the op run.

float32 on the CPU must match transformers to float32 rounding; bfloat16 on a GPU must be as close
to a float32 run of the same weights as transformers' bfloat16 model is with its RoPE rounded once
(hf_tiny_models.rope_rounded_once, assert_matches_unpatched).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import pytest
import torch

import rope_kernels
from hf_tiny_models import (ROPE_FUNCTIONS, OpCounter, assert_generates_the_same, assert_matches_unpatched, causal_lm_types,
                            float32_twin, image_batch, image_model_class, image_step, padded_batch, rope_rounded_once,
                            text_model_type, text_step, tiny_family_model, tiny_image_model, training_step)
from rope_env import requires_cuda

# Families whose tiny model the generic config (hf_tiny_models.tiny_config) cannot build yet, and
# why: each fails strictly (xfail(strict=True)), so a fix shows up as a failure to remove it here.
NO_TINY_MODEL_YET: Dict[str, str] = {
}


# Families without a causal LM whose tiny model of TEXT_MODEL_KINDS does not build or run on
# token ids alone yet, and why (strict, as above).
NO_TINY_TEXT_MODEL_YET: Dict[str, str] = {
    "clvp": "its model takes speech features beside the text (its text encoder: test_transformers_compat)",
    "csm": "its tiny codec's channel groups do not fit together",
    "dia": "its model takes audio codes beside the text",
    "diffusion_gemma": "its config has no text model class the auto classes know",
    "evolla": "its config has no model class the auto classes know",
    "granite4_vision": "its text model reads attention_multiplier, which the tiny Llama config lacks",
    "idefics": "it takes no forward without images",
    "kyutai_speech_to_text": "its audio token ids lie outside the tiny vocabulary",
    "pe_audio_video": "its video encoder needs timm",
    "voxtral_realtime": "it takes no forward without audio",
}


# Image models (patched modules with neither a causal LM nor a text model, whose model class takes
# images alone) that do not build or run yet, and why (strict, as above).
NO_TINY_IMAGE_MODEL_YET: Dict[str, str] = {
    "eomt_dinov3": "its loss needs scipy, and its tiny segmentation head's sizes do not fit together",
}


def _families() -> List[Any]:
    params = []
    for status in _patched():
        types = causal_lm_types(status.module)
        if not types:
            continue  # encoders, vision and audio models: TEXT_FAMILIES
        marks = [pytest.mark.xfail(strict=True, reason=NO_TINY_MODEL_YET[types[0]])] \
            if types[0] in NO_TINY_MODEL_YET else []
        params.append(pytest.param(types[0], id=types[0], marks=marks))
    return params


def _text_families() -> List[Any]:
    params = []
    for status in _patched():
        found = None if causal_lm_types(status.module) else text_model_type(status.module)
        if found is None:
            continue  # a causal LM (FAMILIES), or images, audio, time series alone
        marks = [pytest.mark.xfail(strict=True, reason=NO_TINY_TEXT_MODEL_YET[found[0]])] \
            if found[0] in NO_TINY_TEXT_MODEL_YET else []
        params.append(pytest.param(*found, id=found[0], marks=marks))
    return params


def _image_families() -> List[Any]:
    params = []
    for status in _patched():
        if causal_lm_types(status.module) or text_model_type(status.module):
            continue  # FAMILIES or TEXT_FAMILIES
        found = image_model_class(status.module)
        if found is None:
            continue  # audio, time series, keypoint matching: proven at patch time only
        marks = [pytest.mark.xfail(strict=True, reason=NO_TINY_IMAGE_MODEL_YET[found[0]])] \
            if found[0] in NO_TINY_IMAGE_MODEL_YET else []
        params.append(pytest.param(*found, id=found[0], marks=marks))
    return params


def _patched() -> List[Any]:
    # One status a module whose text attention the patch serves: the first of its patched
    # functions but the vision towers' (VISION_MODULES).
    statuses = {}
    for status in REPORT:
        if status.patched and status.function != "apply_rotary_pos_emb_vision":
            statuses.setdefault(status.module, status)
    return list(statuses.values())


REPORT = rope_kernels.patch_transformers(dry_run=True).report
# The modules whose vision towers' apply_rotary_pos_emb_vision is patched, and whether it takes
# (B, S, H, D) batches (MiniMax-M3-VL's) rather than (S, H, D) patches (the proof says which).
VISION_MODULES = [pytest.param(status.module, "(B, S, H, D) patches" in status.reason, id=status.module.split(".")[2])
                  for status in REPORT if status.patched and status.function == "apply_rotary_pos_emb_vision"]


FAMILIES = _families()
TEXT_FAMILIES = _text_families()
IMAGE_FAMILIES = _image_families()
DEVICES_OF_VISION = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]
DEVICE_DTYPES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=requires_cuda),
]


# Every test starts and ends with transformers unpatched, whatever it did.
pytestmark = pytest.mark.usefixtures("unpatched_transformers")


def _assert_step_matches(patched: Any, unpatched: Any, reference: Any, what: str, dtype: torch.dtype) -> None:
    """A step's (output, parameter gradients) with the model patched against those without and
    those of a float32 run (hf_tiny_models.assert_matches_unpatched)."""
    (patched_output, patched_grads), (output, grads), (reference_output, reference_grads) = patched, unpatched, reference
    assert_matches_unpatched(patched_output, output, reference_output, what, dtype)
    assert patched_grads.keys() == grads.keys() and len(grads) > 0
    for name in grads:
        assert_matches_unpatched(patched_grads[name], grads[name], reference_grads[name], f"grad of {name}", dtype)


def _assert_the_op_runs_when_patched(model: torch.nn.Module, step: Callable[[], Any]) -> None:
    """No rope:: call in a step of the model unpatched, one or more patched."""
    counts = []
    for patch in (False, True):
        counter = OpCounter()
        with rope_kernels.patch_transformers(model) if patch else contextlib.nullcontext(), counter:
            step()
        counts.append(sum(1 for op in counter.calls if op.namespace == "rope"))
    assert counts[0] == 0 and counts[1] >= 1, counts


def test_the_families_are_found() -> None:
    # The families the patch served by a hand list before it found them, among many more.
    found = {param.values[0] for param in FAMILIES}
    assert {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"} <= found
    assert len(found) >= 60


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_training_step_matches_transformers(model_type: str, device: str, dtype: torch.dtype) -> None:
    # float32: against transformers' model as it is. 16-bit: against it with its own RoPE formula
    # computed in float32 and rounded once, as the fused op does (hf_tiny_models.rope_rounded_once);
    # both judged by their distance from a float32 run of the same weights.
    model = tiny_family_model(model_type, device, dtype)
    ids, mask = padded_batch(device, side="right")
    baseline = contextlib.nullcontext() if dtype == torch.float32 else rope_rounded_once(type(model).__module__)
    with baseline:
        logits, grads = training_step(model, ids, mask, None)
    with rope_kernels.patch_transformers(model):
        patched_logits, patched_grads = training_step(model, ids, mask, None)
    reference_logits, reference_grads = (training_step(float32_twin(model, model_type), ids, mask, None)
                                         if dtype != torch.float32 else (logits, grads))
    real = mask.bool()
    _assert_step_matches((patched_logits[real], patched_grads), (logits[real], grads),
                         (reference_logits[real], reference_grads), "logits", dtype)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_generate_with_left_padding_gives_the_same_tokens(model_type: str) -> None:
    assert_generates_the_same(tiny_family_model(model_type, "cpu", torch.float32), new_tokens=6)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_patched_attention_runs_the_fused_op(model_type: str) -> None:
    model = tiny_family_model(model_type, "cpu", torch.float32)
    ids, mask = padded_batch("cpu")
    with torch.no_grad():
        _assert_the_op_runs_when_patched(model, lambda: model(input_ids=ids, attention_mask=mask))


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize(("model_type", "kind"), TEXT_FAMILIES)
def test_text_model_matches_transformers(model_type: str, kind: str, device: str, dtype: torch.dtype) -> None:
    # As test_training_step_matches_transformers, for a family without a causal LM: its model of
    # `kind` on token ids alone, its first output and every parameter's gradient.
    model = tiny_family_model(model_type, device, dtype, kind)
    ids, mask = padded_batch(device, side="right")
    baseline = contextlib.nullcontext() if dtype == torch.float32 else rope_rounded_once(type(model).__module__)
    with baseline:
        unpatched = text_step(model, ids, mask)
    with rope_kernels.patch_transformers(model):
        patched = text_step(model, ids, mask)
    reference = text_step(float32_twin(model, model_type, kind), ids, mask) if dtype != torch.float32 else unpatched
    _assert_step_matches(patched, unpatched, reference, "output", dtype)


@pytest.mark.parametrize(("model_type", "kind"), TEXT_FAMILIES)
def test_patched_text_model_runs_the_fused_op(model_type: str, kind: str) -> None:
    model = tiny_family_model(model_type, "cpu", torch.float32, kind)
    ids, mask = padded_batch("cpu", side="right")
    _assert_the_op_runs_when_patched(model, lambda: text_step(model, ids, mask))


@contextlib.contextmanager
def _without_rope(model: torch.nn.Module) -> Iterator[None]:
    """The RoPE functions of every modeling module the model's layers come from (those
    patch_transformers(model) patches) replaced by ones that return q and k unrotated."""
    modules = {importlib.import_module(type(layer).__module__) for layer in model.modules()
               if type(layer).__module__.startswith("transformers.models.")}
    originals = [(module, name, getattr(module, name)) for module in modules for name in ROPE_FUNCTIONS
                 if hasattr(module, name)]

    def unrotated_for(original: Any) -> Any:
        one_tensor = next(iter(inspect.signature(original).parameters)) in ("x", "tensor")

        def unrotated(*args: Any, **kwargs: Any) -> Any:
            k = None if one_tensor else args[1] if len(args) > 1 else kwargs.get("k")
            return args[0] if k is None else (args[0], k)  # (q alone: Qwen4-Exp's indexer)
        return unrotated

    for module, name, original in originals:
        setattr(module, name, unrotated_for(original))
    try:
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)


def _moved(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) > 0.01 * float(b.abs().max())


@pytest.mark.parametrize("model_type", FAMILIES)
def test_the_family_test_sees_a_wrong_rotation(model_type: str) -> None:
    # The tests above can fail: with q and k left unrotated, the tiny model's logits or gradients
    # move by far more than their tolerance (its weights make attention depend on position; where a
    # family starts its attention output at zero, the output projection's gradient still does).
    model = tiny_family_model(model_type, "cpu", torch.float32)
    ids, mask = padded_batch("cpu", side="right")
    logits, grads = training_step(model, ids, mask, None)
    with _without_rope(model):
        unrotated, unrotated_grads = training_step(model, ids, mask, None)
    real = mask.bool()
    assert _moved(unrotated[real], logits[real]) or any(_moved(unrotated_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize(("model_type", "kind"), TEXT_FAMILIES)
def test_the_text_model_test_sees_a_wrong_rotation(model_type: str, kind: str) -> None:
    model = tiny_family_model(model_type, "cpu", torch.float32, kind)
    ids, mask = padded_batch("cpu", side="right")
    output, grads = text_step(model, ids, mask)
    with _without_rope(model):
        unrotated, unrotated_grads = text_step(model, ids, mask)
    assert _moved(unrotated, output) or any(_moved(unrotated_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize(("device", "dtype"), DEVICE_DTYPES)
@pytest.mark.parametrize(("model_type", "class_name"), IMAGE_FAMILIES)
def test_image_model_matches_transformers(model_type: str, class_name: str, device: str, dtype: torch.dtype) -> None:
    # As test_text_model_matches_transformers, for an image model (DINOv3, Sapiens 2, Pixtral's
    # vision encoder): its first output for two images and every parameter's gradient.
    model = tiny_image_model(model_type, class_name, device, dtype)
    pixels = image_batch(model)
    baseline = contextlib.nullcontext() if dtype == torch.float32 else rope_rounded_once(type(model).__module__)
    with baseline:
        unpatched = image_step(model, pixels)
    with rope_kernels.patch_transformers(model):
        patched = image_step(model, pixels)
    reference = unpatched
    if dtype != torch.float32:
        twin = tiny_image_model(model_type, class_name, device, torch.float32)
        twin.load_state_dict(model.state_dict())
        reference = image_step(twin, pixels.float())
    _assert_step_matches(patched, unpatched, reference, "output", dtype)


@pytest.mark.parametrize(("model_type", "class_name"), IMAGE_FAMILIES)
def test_patched_image_model_runs_the_fused_op(model_type: str, class_name: str) -> None:
    model = tiny_image_model(model_type, class_name, "cpu", torch.float32)
    pixels = image_batch(model)
    _assert_the_op_runs_when_patched(model, lambda: image_step(model, pixels))


@pytest.mark.parametrize(("model_type", "class_name"), IMAGE_FAMILIES)
def test_the_image_model_test_sees_a_wrong_rotation(model_type: str, class_name: str) -> None:
    model = tiny_image_model(model_type, class_name, "cpu", torch.float32)
    pixels = image_batch(model)
    output, grads = image_step(model, pixels)
    with _without_rope(model):
        unrotated, unrotated_grads = image_step(model, pixels)
    assert _moved(unrotated, output) or any(_moved(unrotated_grads[n], grads[n]) for n in grads)


@pytest.mark.parametrize("device", DEVICES_OF_VISION)
@pytest.mark.parametrize(("module_name", "batches"), VISION_MODULES)
def test_patched_vision_function_matches_transformers(module_name: str, batches: bool, device: str) -> None:
    # A vision tower's attention hands its function (S, H, D) patches unbound from one qkv
    # projection (strided views), or (B, S, H, D) views of one, and (S, D) float32 tables: the
    # patched function gives the original's result (float32), and the op runs.
    module = importlib.import_module(module_name)
    original = module.apply_rotary_pos_emb_vision
    generator = torch.Generator().manual_seed(5)
    seq, heads, head_dim = 10, 4, 16
    qkv = torch.randn(2, seq, 3, heads, head_dim, generator=generator).to(device)
    q, k, _ = (qkv if batches else qkv[0]).unbind(-3)
    half = torch.rand(seq, head_dim // 2, generator=generator).to(device) * 6
    cos, sin = torch.cat([half, half], -1).cos(), torch.cat([half, half], -1).sin()
    with rope_kernels.patch_transformers(module):
        counter = OpCounter()
        with counter:
            got = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    assert sum(1 for op in counter.calls if op.namespace == "rope") == 1
    for a, b in zip(got, original(q, k, cos, sin)):
        torch.testing.assert_close(a, b)


def test_the_families_page_is_the_installed_transformers_table() -> None:
    # docs/transformers-families.md is the command's output for the transformers CI installs.
    import transformers

    from rope_env import TESTS_DIR
    from rope_kernels.transformers_families import families_table

    path = Path(TESTS_DIR).parent / "docs" / "transformers-families.md"
    if not path.exists():
        pytest.skip("docs/ is not beside this copy of the tests (a wheel's test run)")
    page = path.read_text()
    if f"transformers {transformers.__version__} " not in page:
        pytest.skip(f"the page is for another transformers release than {transformers.__version__}")
    assert page == families_table(), "regenerate it: python -m rope_kernels.transformers_families"
