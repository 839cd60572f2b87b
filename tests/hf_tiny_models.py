"""Tiny, randomly initialised transformers models of every family the patch supports (built from a
config: no download), and the ways the tests run them.

The weights are drawn with a large initializer range so that attention is far from uniform: with
transformers' default (0.02) every query attends almost evenly to every key, the positions hardly
matter, and a broken rotation would go unnoticed (test_rope_matters checks that it would not).
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import inspect
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
import transformers
from transformers import CONFIG_MAPPING, AutoConfig, AutoModelForCausalLM
from transformers.models.auto import modeling_auto
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

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


# Sizes of every family's tiny model, by the names configs give them (each set where the family's
# config has it): the common ones above, those of mixtures of experts, multi-head latent attention
# (its rotated part as wide as head_dim) and state-space layers; and the choice of RoPE.
FAMILY_SIZES: Dict[str, Any] = dict(
    TINY, moe_intermediate_size=32, shared_expert_intermediate_size=32, moe_shared_expert_intermediate_size=32, expert_intermediate_size=32,
    num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
    first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16,
    v_head_dim=16, n_group=1, topk_group=1, num_kv_heads=2, ffn_hidden_size=128, sliding_window=64,
    attention_chunk_size=64, mamba_d_state=8, mamba_n_heads=8, mamba_d_head=16, mamba_headdim=16,
    mamba_d_conv=4, mamba_expand=2, mamba_n_groups=1,
    # BLT: the width its local encoder and decoder exchange with its global transformer.
    hidden_size_global=TINY["hidden_size"],
    # Vision towers' names of the common sizes (Qwen2-VL's), and the width they hand the text model.
    depth=TINY["num_hidden_layers"], embed_dim=TINY["hidden_size"], num_heads=TINY["num_attention_heads"],
    out_hidden_size=TINY["hidden_size"],
    # Audio encoders' names of the common sizes (Qwen2.5-Omni's), and the width they hand on.
    d_model=TINY["hidden_size"], encoder_layers=TINY["num_hidden_layers"],
    encoder_attention_heads=TINY["num_attention_heads"], encoder_ffn_dim=TINY["intermediate_size"],
    output_dim=TINY["hidden_size"],
    # GPT-J's and CodeGen's names of the common sizes.
    n_embd=TINY["hidden_size"], n_layer=TINY["num_hidden_layers"], n_head=TINY["num_attention_heads"],
    n_inner=TINY["intermediate_size"], n_positions=TINY["max_position_embeddings"],
    n_ctx=TINY["max_position_embeddings"],
    # Gemma 3n's and Gemma 4's per-layer input embeddings, 262,144 rows by default.
    vocab_size_per_layer_input=TINY["vocab_size"],
    # Rotary positions in Granite 4's attention (its default is none). DeepSeek-V3's MLA keeps its
    # default, rope_interleave=True, as its checkpoints have it: apply_rotary_pos_emb_interleave.
    position_embedding_type="rope")
# What a family needs beyond that, by model type.
FAMILY_OVERRIDES: Dict[str, Dict[str, Any]] = {
    "bamba": {"attn_layer_indices": [1]},
    "esm": {"position_embedding_type": "rotary"},
    # GPT-J and CodeGen rotate the first rotary_dim features of each head (64 of 256 in GPT-J 6B).
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    # BLT: its forward makes a DynamicCache(config) that reads num_hidden_layers, which BltConfig lacks
    # (transformers 5.17): run without a cache.
    "blt": {"use_cache": False, "encoder_hash_byte_group_vocab": 128},
    # Gemma 3n: its last layers reuse earlier layers' KV; with two layers none can.
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"], "num_hidden_layers": 2},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_hidden_layers": 2},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2, "expert_layer_offset": 1},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},
    "zaya": {"num_experts_per_tok": 1},
    # Qwen2.5-Omni's and Qwen3-Omni's thinkers: their configs set no vision_start_token_id, which
    # their mRoPE position ids read.
    "qwen2_5_omni_thinker": {"vision_start_token_id": 3},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 3},
    # ESMC: multi-head attention only (as many k heads as q heads).
    "esmc": {"num_key_value_heads": TINY["num_attention_heads"]},
    # Mistral 4's MLA: head_dim is its nope and rope parts together (16 + 16).
    "mistral4": {"head_dim": 32},
    # ERNIE 4.5 VL MoE: the widths of its text and its vision experts.
    "ernie4_5_vl_moe_text": {"moe_intermediate_size": [32, 32],
                             # its mRoPE sections of height and width stack: equal (3 + 3 + 2 pairs)
                             "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                                 "mrope_section": [3, 3, 2]}},
    # Zamba2: a Mamba layer and a hybrid one (with the shared attention block), by the setting's own
    # name (through its alias layer_types, hybrid_layer_ids stay the defaults'), and its attention's
    # RoPE on (use_mem_rope, off by default).
    "zamba2": {"layers_block_type": ["mamba", "hybrid"], "num_hidden_layers": 2, "use_mem_rope": True},
    # PaddleOCR-VL: mRoPE sections for its tiny head (its text config names none, its code defaults
    # to a full-size head's).
    "paddleocr_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0,
                                              "mrope_section": [2, 3, 3]}},
    # DeepSeek-OCR 2: its text model's MLP kind per layer (unset by default), one dense, one MoE.
    "deepseek_ocr2_text": {"mlp_layer_types": ["dense", "sparse"]},
    # Chameleon: its vocabulary map, the image token at the last id.
    "chameleon": {"vocabulary_map": {"<image>": TINY["vocab_size"] - 1}},
    # Cohere Compass: RoPE parameters per layer kind, mRoPE sections of height and width equal.
    "cohere_compass_text": {"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0,
                                                                   "mrope_section": [3, 3, 2]}}},
    # Qwen4-Exp: its sparse-attention token indexer (unset by default) on the full-attention layers.
    "qwen4_exp_text": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16, "indexer_budget": 8,
                       "indexer_compress_ratio": 4},
    # LongCat-Flash: its zero-computation experts and expert width.
    "longcat_flash": {"zero_expert_num": 2, "expert_ffn_hidden_size": 32, "moe_topk": 2, "num_layers": 2},
}


def _shrunk(config_class: Any, overrides: Dict[str, Any]) -> Any:
    defaults = config_class()
    values = defaults.to_dict()
    sizes = {key: value for key, value in FAMILY_SIZES.items() if key in values}
    if "kv_lora_rank" in values:  # multi-head latent attention: as many k heads as q heads
        sizes["num_key_value_heads"] = sizes.get("num_attention_heads", 4)
    if "mamba_d_ssm" in values:
        sizes["mamba_d_ssm"] = FAMILY_SIZES["mamba_n_heads"] * FAMILY_SIZES["mamba_d_head"]
    for key, value in vars(defaults).items():  # the text, vision, audio parts of a composite model
        if hasattr(value, "to_dict") and hasattr(type(value), "model_type"):
            sizes[key] = _shrunk(type(value), FAMILY_OVERRIDES.get(type(value).model_type, {}))
    sizes.update(overrides)
    if _mrope(config_class) and "rope_parameters" not in overrides:
        rope = dict(values.get("rope_parameters") or {})
        head_dim = sizes.get("head_dim", TINY["hidden_size"] // TINY["num_attention_heads"])
        sizes["rope_parameters"] = dict(rope, mrope_section=_mrope_sections(rope, head_dim))
    # One layer of each kind the family mixes (attention and linear attention, sliding and full).
    kinds = getattr(defaults, "layer_types", None)
    if isinstance(kinds, list) and kinds and "layer_types" not in overrides:
        kinds = list(dict.fromkeys(kinds))
        kinds = kinds if len(kinds) > 1 else kinds * 2
        try:
            return config_class(**dict(sizes, layer_types=kinds, num_hidden_layers=len(kinds)))
        except (TypeError, ValueError, AttributeError):
            pass  # a family whose layer kinds follow from other settings
    return config_class(**sizes)


def _mrope(config_class: Any) -> bool:
    """Whether the config is of a text model with mRoPE (angles from several position ids), whose
    sections, where the config sets none, default in the modeling code to a full-size head."""
    try:
        source = inspect.getsource(sys.modules[config_class.__module__])
    except (OSError, TypeError, KeyError):
        return False
    return "mrope_section" in source and "num_attention_heads" in config_class().to_dict()


def _mrope_sections(rope: Dict[str, Any], head_dim: int) -> List[int]:
    """mRoPE's sections (the pairs each position id drives: time, height, width) shrunk in
    proportion to a tiny head: they cover its rotated pairs, each section at least one pair.
    Without sections in the config, those of Qwen2-VL and GLM-4V (2:3:3)."""
    sections = list(rope.get("mrope_section") or [2, 3, 3])
    pairs = int(head_dim * rope.get("partial_rotary_factor", 1.0)) // 2
    shrunk = [max(1, section * pairs // sum(sections)) for section in sections]
    shrunk[0] += pairs - sum(shrunk)
    return shrunk


def tiny_config(model_type: str) -> Any:
    """The config of a tiny model of any family: the family's defaults with every size set small."""
    return _shrunk(CONFIG_MAPPING[model_type], FAMILY_OVERRIDES.get(model_type, {}))


def causal_lm_types(module_name: str) -> List[str]:
    """The model types whose causal-LM class is defined in a modeling module, a text-only one
    first (the smallest model of the family)."""
    module = importlib.import_module(module_name)
    types = [model_type for model_type, class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()
             if getattr(getattr(module, class_name, None), "__module__", None) == module_name]
    return sorted(types, key=lambda t: (not t.endswith("_text"), t))


def tiny_family_model(model_type: str, device: str, dtype: torch.dtype, kind: str = "CAUSAL_LM") -> torch.nn.Module:
    """A tiny random model of the family (seeded: the same weights every time), in eval mode: its
    causal LM, or its model of another kind of TEXT_MODEL_KINDS."""
    torch.manual_seed(1234)
    auto_class = AutoModelForCausalLM if kind == "CAUSAL_LM" else getattr(transformers, TEXT_MODEL_KINDS[kind])
    model = auto_class.from_config(tiny_config(model_type), attn_implementation="eager")
    return model.to(device=device, dtype=dtype).eval()


def float32_twin(model: torch.nn.Module, model_type: str, kind: str = "CAUSAL_LM") -> torch.nn.Module:
    """A float32 model of the family with the same (rounded) weights as `model`."""
    twin = tiny_family_model(model_type, str(next(model.parameters()).device), torch.float32, kind)
    twin.load_state_dict(model.state_dict())
    return twin


# The model classes that take token ids alone, for the families without a causal LM (encoders,
# encoder-decoders, and vision-language models run on text), in the order they are tried: the
# name of transformers' mapping (MODEL_FOR_<kind>_MAPPING_NAMES; MODEL_MAPPING_NAMES for "MODEL")
# and its auto class. Last, a base model whose forward takes token ids (a text-only one first: a
# speech or video model's text part).
TEXT_MODEL_KINDS: Dict[str, str] = {
    "MASKED_LM": "AutoModelForMaskedLM",
    "TOKEN_CLASSIFICATION": "AutoModelForTokenClassification",
    "SEQUENCE_CLASSIFICATION": "AutoModelForSequenceClassification",
    "IMAGE_TEXT_TO_TEXT": "AutoModelForImageTextToText",
    "MULTIMODAL_LM": "AutoModelForMultimodalLM",
    "SEQ_TO_SEQ_CAUSAL_LM": "AutoModelForSeq2SeqLM",
    "MODEL": "AutoModel",
}


def text_model_type(module_name: str) -> Optional[Tuple[str, str]]:
    """(model type, kind) of the first class of TEXT_MODEL_KINDS that the modeling module
    defines and whose forward needs nothing but token ids, or None (a model of images, audio or
    time series alone)."""
    module = importlib.import_module(module_name)
    for kind in TEXT_MODEL_KINDS:
        mapping = getattr(modeling_auto, "MODEL_MAPPING_NAMES" if kind == "MODEL" else f"MODEL_FOR_{kind}_MAPPING_NAMES")
        found = []
        for model_type, names in mapping.items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                cls = getattr(module, name, None)
                if getattr(cls, "__module__", None) != module_name:
                    continue
                if _takes_token_ids_alone(cls):
                    found.append(model_type)
        if found:
            return sorted(found, key=lambda t: not t.endswith("_text"))[0] if kind == "MODEL" else found[0], kind
    return None


def _takes_token_ids_alone(cls: Any) -> bool:
    """Whether a model class's forward takes input_ids and needs nothing else."""
    parameters = inspect.signature(cls.forward).parameters
    required = [name for name, p in parameters.items() if name != "self" and p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return "input_ids" in parameters and required in ([], ["input_ids"])


def text_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A model's first output (logits, or hidden states) for token ids alone, and the gradient of
    every parameter after one backward of a fixed random weighting of it."""
    model.zero_grad(set_to_none=True)
    inputs: Dict[str, Any] = dict(input_ids=ids, attention_mask=mask)
    if getattr(model.config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids
    out = model(**inputs)
    first = out.logits if getattr(out, "logits", None) is not None else out[0]
    weights = torch.randn(first.shape, generator=torch.Generator().manual_seed(3)).to(first.device)
    (first.float() * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return first.detach(), grads


@contextlib.contextmanager
def rope_rounded_once(module_name: str) -> Iterator[None]:
    """The module's own RoPE functions (apply_rotary_pos_emb, and DeepSeek-V3's
    apply_rotary_pos_emb_interleave where it has it) computed in float32 and rounded once to the
    dtype they return: what a fused kernel computes, by the module's own formula. In 16-bit models
    it is the baseline of the patched model (the formula's three roundings move some results of a
    tiny model more than a fused kernel's one does, or less)."""
    module = importlib.import_module(module_name)
    originals = {name: getattr(module, name) for name in ROPE_FUNCTIONS if hasattr(module, name)}
    for name, original in originals.items():
        setattr(module, name, _rounded_once(original))
    try:
        yield
    finally:
        for name, original in originals.items():
            setattr(module, name, original)


ROPE_FUNCTIONS = ("apply_rotary_pos_emb", "apply_rotary_pos_emb_interleave")


def _rounded_once(original: Any) -> Any:
    # Pairs (q, k, cos, sin, ...) or one tensor: (x, cos, sin, ...) as Gemma 3n's and Gemma 4's,
    # (tensor, sin, cos) as GPT-J's, q alone as Qwen4-Exp's indexer calls its function. Every
    # floating-point argument (the tensors and their tables) is widened.
    def wide(a: Any) -> Any:
        return a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a

    def rounded_once(*args: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            out = original(*args, **kwargs)
        result = original(*(wide(a) for a in args), **{name: wide(a) for name, a in kwargs.items()})
        if isinstance(out, torch.Tensor):
            return result.to(out.dtype)
        return tuple(t.to(o.dtype) for t, o in zip(result, out))
    return rounded_once


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


def assert_matches_unpatched(patched: torch.Tensor, unpatched: torch.Tensor, reference: torch.Tensor,
                             what: str, model_dtype: Optional[torch.dtype] = None) -> None:
    """float32: patched equals unpatched to float32 rounding. 16-bit: patched is about as close to
    the float32 reference as unpatched is (within a factor 3, plus half a unit of the dtype).
    model_dtype: the dtype the model computes in, where it differs from the tensors' (a 16-bit
    model may return float32 logits)."""
    assert patched.shape == unpatched.shape and patched.dtype == unpatched.dtype, what
    assert torch.isfinite(patched).all(), f"{what}: non-finite values"
    scale = float(unpatched.abs().max())
    dtype = patched.dtype if model_dtype is None else model_dtype
    if dtype == torch.float32:
        torch.testing.assert_close(patched, unpatched, rtol=1e-5, atol=1e-5 * scale, msg=what)
        return
    # Distances as norms over the whole tensor: the largest element of bfloat16 noise varies too
    # much between two runs (a bias gradient summed over every token is mostly noise).
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    error_patched = float((patched.float() - reference.float()).norm())
    error_unpatched = float((unpatched.float() - reference.float()).norm())
    assert error_patched <= 3 * error_unpatched + unit / 2 * float(reference.float().norm()), (
        f"{what}: patched is {error_patched:.3g} from the float32 run, transformers' own {error_unpatched:.3g}")


class OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher below autograd."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: List[Any] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def assert_generates_the_same(model: torch.nn.Module, new_tokens: int) -> None:
    """transformers' own generate() loop (its cache, masks and position ids), greedy, from
    left-padded prompts: the same tokens and logits with the model patched as without."""
    import rope_kernels

    ids, mask = padded_batch(str(next(model.parameters()).device))
    settings: Dict[str, Any] = dict(attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0, eos_token_id=None, output_logits=True,
                                    return_dict_in_generate=True)
    expected = model.generate(ids, **settings)
    with rope_kernels.patch_transformers(model):
        got = model.generate(ids, **settings)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (ours, theirs) in enumerate(zip(got.logits, expected.logits)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5, msg=f"step {step}")


# The sizes of a tiny image model beyond FAMILY_SIZES': 32 x 32 RGB images of 8 x 8 patches, and
# DINOv3's 4 register tokens (its config's default is none) beside the class token.
IMAGE_SIZES: Dict[str, Any] = dict(image_size=32, patch_size=8, num_channels=3, num_register_tokens=4)


def image_model_class(module_name: str) -> Optional[Tuple[str, str]]:
    """(model type, class name) of the first model class the modeling module defines that takes
    images alone (`pixel_values`; its config has an image_size): the base model of transformers'
    MODEL_MAPPING_NAMES first, then its backbone, then the other heads in name order. None for a
    module without one."""
    module = importlib.import_module(module_name)
    mappings = sorted((name for name in dir(modeling_auto) if name.startswith("MODEL_") and name.endswith("_MAPPING_NAMES")),
                      key=lambda name: (name != "MODEL_MAPPING_NAMES", name != "MODEL_FOR_BACKBONE_MAPPING_NAMES", name))
    for mapping in mappings:
        for model_type, names in getattr(modeling_auto, mapping).items():
            for name in names if isinstance(names, (list, tuple)) else [names]:
                cls = getattr(module, name, None)
                if getattr(cls, "__module__", None) != module_name or model_type not in CONFIG_MAPPING:
                    continue
                if "pixel_values" in inspect.signature(cls.forward).parameters \
                        and "image_size" in CONFIG_MAPPING[model_type]().to_dict():
                    return model_type, name
    return None


def tiny_image_model(model_type: str, class_name: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """A tiny random image model of the family (seeded), in eval mode."""
    torch.manual_seed(1234)
    config_class = CONFIG_MAPPING[model_type]
    sizes = {key: value for key, value in IMAGE_SIZES.items() if key in config_class().to_dict()}
    config = _shrunk(config_class, dict(sizes, **FAMILY_OVERRIDES.get(model_type, {})))
    model = getattr(transformers, class_name)._from_config(config, attn_implementation="eager")
    return model.to(device=device, dtype=dtype).eval()


def image_batch(model: torch.nn.Module) -> torch.Tensor:
    """Two random images for a tiny image model, in its device and dtype."""
    parameter = next(model.parameters())
    config = model.config
    shape = (2, getattr(config, "num_channels", 3), config.image_size, config.image_size)
    pixels = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    return pixels.to(device=parameter.device, dtype=parameter.dtype)


def image_step(model: torch.nn.Module, pixels: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """A model's first output for images alone (hidden states, a backbone's first feature map) and
    the gradient of every parameter after one backward of a fixed random weighting of it."""
    model.zero_grad(set_to_none=True)
    out = model(pixel_values=pixels)
    first = out.feature_maps[0] if getattr(out, "feature_maps", None) is not None else out[0]
    weights = torch.randn(first.shape, generator=torch.Generator().manual_seed(3)).to(first.device)
    (first.float() * weights).sum().backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    return first.detach(), grads
