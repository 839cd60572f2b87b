"""One line to make Hugging Face transformers' attention use the fused op: ``patch_transformers()``.

The attention layers of Llama, Mistral, Qwen2, Qwen3, Gemma, Gemma2 and Phi-3 call the
``apply_rotary_pos_emb`` of their modeling module, looking the name up in the module each time
they run. Replacing that module attribute with ``rope_kernels.apply_rotary_pos_emb`` therefore
switches every model of the family, already built or built later, and putting the original back
undoes it exactly. Nothing else in transformers is touched, so weights, checkpoints, generation,
training and ``torch.compile`` work as before.

transformers 4.x and 5.x differ in what they pass, and both are handled:

- 4.3x passed a cos/sin table and ``position_ids``; 4.38 and later pass cos/sin already gathered
  per token, with ``position_ids`` deprecated and then, in 5.x, dropped from the signature (the
  fifth positional parameter is ``unsqueeze_dim`` there). The replacement installed in a module
  has the signature of the function it replaces.
- In 5.x the function may be a Kernel Hub hook (``use_kernel_forward_from_hub("rotary_pos_emb")``,
  an ``nn.Module`` when the ``kernels`` package is installed) that ``kernelize()`` can point to a
  hub kernel. A patched module calls the fused op whatever the hook was mapped to; undoing the
  patch puts the hook back.

Only those seven families are patched: other modeling files define functions of the same name with
other conventions (interleaved pairs, partial rotation by a config factor), which this op must not
silently replace.
"""
from __future__ import annotations

import importlib
import inspect
import sys
import types
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from .hf_compat import apply_rotary_pos_emb

SUPPORTED_FAMILIES: Tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3")

_FUNCTION = "apply_rotary_pos_emb"
_MODULE_PREFIX = "transformers.models."

# Modeling module name -> the object its apply_rotary_pos_emb held before it was patched.
_originals: Dict[str, Any] = {}


def _apply_rotary_pos_emb_v5(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    unsqueeze_dim: int = 1,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The replacement for transformers 5.x modules, whose function has no position_ids."""
    return apply_rotary_pos_emb(q, k, cos, sin, None, unsqueeze_dim)


_REPLACEMENTS: Tuple[Callable[..., Any], ...] = (apply_rotary_pos_emb, _apply_rotary_pos_emb_v5)


class TransformersPatch:
    """What one ``patch_transformers`` call changed. ``undo()`` puts the originals back; used as a
    context manager, the patch lasts for the ``with`` block."""

    def __init__(self, module_names: List[str]) -> None:
        self._module_names = list(module_names)

    @property
    def modules(self) -> Tuple[str, ...]:
        """The modeling modules this call patched (or found already patched)."""
        return tuple(self._module_names)

    def undo(self) -> None:
        """Restore the original ``apply_rotary_pos_emb`` of every module this call patched."""
        for name in self._module_names:
            _restore(name)

    def __enter__(self) -> "TransformersPatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"TransformersPatch(modules={self._module_names!r})"


def patch_transformers(model_or_class: Any = None) -> TransformersPatch:
    """Make transformers' attention apply RoPE with ``torch.ops.rope.fused_qk``.

    ``model_or_class`` says which families to patch:

    - ``None`` (the default): every supported family present in the installed transformers;
    - a model (any ``nn.Module`` holding transformers attention layers, e.g. a ``PeftModel``), a
      model or layer class, or a modeling module: the families it uses;
    - a family name (``"llama"``) or a list of names.

    The patch applies to the family's modeling module, so to every model of that family in the
    process, as Liger-style patches do. Returns a handle whose ``undo()`` restores the originals
    (``unpatch_transformers()`` restores everything); patching twice is harmless.
    """
    names = _modules_to_patch(model_or_class)
    for name in names:
        _install(name)
    return TransformersPatch(names)


def unpatch_transformers() -> None:
    """Restore every modeling module patched by ``patch_transformers``."""
    for name in list(_originals):
        _restore(name)


def patched_modules() -> Tuple[str, ...]:
    """The modeling modules whose ``apply_rotary_pos_emb`` is currently the fused op."""
    return tuple(sorted(_originals))


def _family_module_name(family: str) -> str:
    return f"{_MODULE_PREFIX}{family}.modeling_{family}"


def _is_supported(module_name: str) -> bool:
    return any(module_name == _family_module_name(family) for family in SUPPORTED_FAMILIES)


def _import_transformers() -> None:
    try:
        importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError("rope_kernels.patch_transformers needs the transformers package "
                          "(pip install transformers)") from e


def _modules_to_patch(target: Any) -> List[str]:
    _import_transformers()
    if target is None:
        present: List[str] = []
        for family in SUPPORTED_FAMILIES:
            try:
                importlib.import_module(_family_module_name(family))
            except ImportError:
                continue  # a family this transformers release does not have (Qwen3 before 4.51)
            present.append(_family_module_name(family))
        return present
    if isinstance(target, str):
        return [_module_for_family(target)]
    if isinstance(target, torch.nn.Module):
        return _modules_of_model(target)
    if isinstance(target, type):
        return [_checked_module_name(target.__module__, f"class {target.__qualname__}")]
    if isinstance(target, types.ModuleType):
        return [_checked_module_name(target.__name__, f"module {target.__name__}")]
    if isinstance(target, Iterable):
        names: List[str] = []
        for item in target:
            for name in _modules_to_patch(item):
                if name not in names:
                    names.append(name)
        return names
    raise TypeError("rope_kernels.patch_transformers: model_or_class must be None, a model, a class, a "
                    f"modeling module, a family name or a list of them; got {type(target).__name__}")


def _module_for_family(family: str) -> str:
    name = family if family.startswith(_MODULE_PREFIX) else _family_module_name(family.lower())
    if not _is_supported(name):
        raise ValueError(f"rope_kernels.patch_transformers: {family!r} is not a supported family; "
                         f"supported: {', '.join(SUPPORTED_FAMILIES)}")
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ValueError(f"rope_kernels.patch_transformers: the installed transformers has no {name}") from e
    return name


def _checked_module_name(module_name: str, what: str) -> str:
    if not _is_supported(module_name):
        raise ValueError(f"rope_kernels.patch_transformers: {what} is not from a supported family "
                         f"({', '.join(SUPPORTED_FAMILIES)}); its module is {module_name}")
    return module_name


def _modules_of_model(model: torch.nn.Module) -> List[str]:
    names: List[str] = []
    for layer in model.modules():
        name = type(layer).__module__
        if _is_supported(name) and name not in names:
            names.append(name)
    if not names:
        raise ValueError(f"rope_kernels.patch_transformers: {type(model).__name__} has no layer from a supported "
                         f"transformers family ({', '.join(SUPPORTED_FAMILIES)})")
    return names


def _takes_position_ids(original: Any) -> bool:
    """Whether the function being replaced has transformers 4.x's position_ids parameter."""
    # A Kernel Hub hook is an nn.Module whose forward carries the function's signature.
    target = original.forward if isinstance(original, torch.nn.Module) else original
    try:
        return "position_ids" in inspect.signature(target).parameters
    except (TypeError, ValueError):
        major = int(sys.modules["transformers"].__version__.split(".")[0])
        return major < 5


def _install(module_name: str) -> None:
    module = importlib.import_module(module_name)
    current = getattr(module, _FUNCTION)
    if any(current is replacement for replacement in _REPLACEMENTS):
        return  # already patched
    replacement = apply_rotary_pos_emb if _takes_position_ids(current) else _apply_rotary_pos_emb_v5
    _originals[module_name] = current
    setattr(module, _FUNCTION, replacement)


def _restore(module_name: str) -> None:
    original: Optional[Any] = _originals.pop(module_name, None)
    if original is not None:
        setattr(sys.modules[module_name], _FUNCTION, original)
