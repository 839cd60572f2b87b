"""One line to make Hugging Face transformers' attention use the fused op: ``patch_transformers()``.

transformers' attention layers call the ``apply_rotary_pos_emb`` of their modeling module (MLA
layers DeepSeek-V3's ``apply_rotary_pos_emb_interleave``, vision towers
``apply_rotary_pos_emb_vision``), looking the name up in the module each time they run. Each
function is proven and patched on its own. Replacing that module attribute therefore switches
every model of the family, already built or built later, and putting the original back undoes it
exactly. Nothing else in transformers is touched, so weights, checkpoints, generation, training
and ``torch.compile`` work as before.

Which modules are patched is found, not listed: a modeling module is patched when its
``apply_rotary_pos_emb`` has transformers' signature and, on small random inputs at patch time,
the op gives the function's own result, forward and backward, in every form the function is called
with (per-token and shared angles, (B, H, S, D) and (B, S, H, D) tensors, a rotated width below
head_dim, the result's dtype), in one of the pair conventions of transformers' functions: Llama's
half-split pairs, or GLM's interleaved pairs (``interleaved=True``; GLM, Helium, ERNIE 4.5,
Moonshine), each with transformers' tables (each angle twice) or with one angle per pair (GPT-OSS),
interleaved pairs on tables holding each angle at both features of its pair (Cohere), or half-split
pairs turned by the negated angle (NanoChat, served by the op's gradient ``fused_qk_backward``);
a one-tensor function, ``(x, cos, sin, unsqueeze_dim)`` (Gemma 3n, Gemma 4) or GPT-J's and
CodeGen's ``(tensor, sin, cos)``, is proven on q and k through two calls and served by
``rope::fused`` in the same conventions. The signatures of a few families' own are proven in the
forms they call them in (``_SIGNATURES``): the vision towers' ``(q, k, cos, sin)`` on (S, H, D)
patches or (B, S, H, D) batches, DINOv3's ``(q, k, cos, sin, **kwargs)`` with class and register
tokens left unrotated, CLVP's ``(q, k, v, cos, sin, position_ids, unsqueeze_dim)`` and
Qwen4-Exp's ``(q, k=None, cos=None, sin=None, unsqueeze_dim=1)``.
A module whose function computes something else (another convention, tables of another form) is
left alone, and the reason is reported (``TransformersPatch.report``,
``patch_transformers(dry_run=True)``).

``patch_transformers()`` patches the modeling modules already imported and, through an import
hook, each one imported later, as it is imported: importing every modeling module of transformers
up front would take long. The replacement installed in a module has the signature of the function
it replaces (transformers 4.x passed ``position_ids``; 5.x does not), and calls that function
itself for inputs the op does not serve. In 5.x the function may be a Kernel Hub hook (an
``nn.Module``); a patched module calls the fused op whatever the hook was mapped to, and undoing
the patch puts the hook back.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.abc
import importlib.machinery
import inspect
import math
import re
import sys
import types
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

from .hf_compat import fused_rotary_pos_emb, fused_rotary_pos_emb_one
from .hf_interleaved import fused_interleaved_pos_emb, fused_interleaved_pos_emb_one

_FUNCTION = "apply_rotary_pos_emb"
# Functions some modules define beside it, each proven and patched on its own: DeepSeek-V3's (and
# its descendants') interleaved-in, half-split-out function, which MLA models call with
# rope_interleave=True, their checkpoints' setting; the vision towers' function of Qwen2-VL and the
# vision-language models built from its code, on (S, H, D) patches with (S, D) tables.
_OTHER_FUNCTIONS = ("apply_rotary_pos_emb_interleave", "apply_rotary_pos_emb_vision")
_FUNCTIONS = (_FUNCTION,) + _OTHER_FUNCTIONS
_MODULE_PREFIX = "transformers.models."
_MODELING = re.compile(r"^transformers\.models\.(\w+)\.modeling_\w+$")
_REPLACED = "_rope_kernels_replaces"  # attribute of a replacement: the function it replaces

# (modeling module, function name) -> the object the function held before it was patched.
_originals: Dict[Tuple[str, str], Any] = {}


@dataclasses.dataclass(frozen=True)
class ModuleStatus:
    """What the patch found in one modeling module."""

    module: str
    patched: bool  # patched, or (dry run) would be
    reason: str
    keep_dtype: bool = False  # patched: the result in q's dtype, as the module's function returns it
    convention: str = ""  # patched: the op's arguments that compute the module's function
    function: str = _FUNCTION  # the function examined (apply_rotary_pos_emb, or one of _OTHER_FUNCTIONS)

    def __str__(self) -> str:
        name = self.module if self.function == _FUNCTION else f"{self.module}.{self.function}"
        return f"{name}: {'patched' if self.patched else 'left alone'}: {self.reason}"


@dataclasses.dataclass(frozen=True)
class _Examined:
    """What examining one function of a module found: the function, its status and, where the op
    computes it, the convention and the signature form its replacement is built for."""

    original: Any
    status: ModuleStatus
    convention: Optional["_Convention"] = None
    signature: Optional["_Signature"] = None


# (modeling module, function name) -> what examining it found.
_examined: Dict[Tuple[str, str], _Examined] = {}


class TransformersPatch:
    """What one ``patch_transformers`` call changed. ``undo()`` puts the originals back; used as a
    context manager, the patch lasts for the ``with`` block. ``report`` says, for every modeling
    module the call examined, whether it was patched and why (or why not)."""

    def __init__(self, report: Sequence[ModuleStatus], dry_run: bool = False, hooked: bool = False) -> None:
        self._report = list(report)
        self._dry_run = dry_run
        self._hooked = hooked  # patch_transformers() of everything: modules patched on import belong to it

    @property
    def report(self) -> Tuple[ModuleStatus, ...]:
        statuses = list(self._report)
        if self._hooked:
            seen = {status.module for status in statuses}
            statuses += [entry.status for key, entry in sorted(_examined.items())
                         if key[0] not in seen and key[0] in _hooked_modules]
        return tuple(statuses)

    @property
    def modules(self) -> Tuple[str, ...]:
        """The modeling modules this call patched (or found already patched; in a dry run, those it
        would patch)."""
        return tuple(dict.fromkeys(status.module for status in self.report if status.patched))

    def undo(self) -> None:
        """Restore the original RoPE functions of every module this call patched."""
        if self._dry_run:
            return
        patched = [status for status in self.report if status.patched]
        if self._hooked:
            _remove_import_hook()
        for status in patched:
            _restore((status.module, status.function))

    def __enter__(self) -> "TransformersPatch":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.undo()

    def __repr__(self) -> str:
        return f"TransformersPatch(modules={list(self.modules)!r})"


def patch_transformers(model_or_class: Any = None, *, dry_run: bool = False) -> TransformersPatch:
    """Make transformers' attention apply RoPE with ``torch.ops.rope.fused_qk``.

    ``model_or_class`` says which modeling modules to patch:

    - ``None`` (the default): every one whose RoPE the op computes, those already imported now and
      the others as they are imported;
    - a model (any ``nn.Module`` holding transformers attention layers, e.g. a ``PeftModel``), a
      model or layer class, or a modeling module: the modules it uses;
    - a family name (``"llama"``) or a list of names.

    A RoPE function (``apply_rotary_pos_emb``, ``apply_rotary_pos_emb_interleave``,
    ``apply_rotary_pos_emb_vision``) the op does not compute is left alone; a model, class,
    module or family of which none is patched raises ``ValueError`` with the reason. With
    ``dry_run``, nothing is changed and the handle's ``report`` says what would be patched, for the
    default target over every modeling module of the installed transformers (which imports them
    all: tens of seconds). The patch applies to the modeling module, so to every model of that
    family in the process. Returns a handle whose ``undo()`` restores the originals
    (``unpatch_transformers()`` restores everything); patching twice is harmless.
    """
    _import_transformers()
    if model_or_class is None:
        names = all_modeling_modules() if dry_run else _loaded_modeling_modules()
        report = [status for name in names for status in _examine_all(name)]
        if not dry_run:
            for status in report:
                if status.patched:
                    _install(status)
            _add_import_hook()
        return TransformersPatch(report, dry_run=dry_run, hooked=not dry_run)
    names, what = _modules_of_target(model_or_class)
    report = [status for name in names for status in _examine_all(name)]
    if not any(status.patched for status in report):
        reasons = "; ".join(str(status) for status in report) or "it holds no transformers modeling module"
        raise ValueError(f"rope_kernels.patch_transformers: {what} has no layer whose RoPE the op computes "
                         f"({reasons})")
    if not dry_run:
        for status in report:
            if status.patched:
                _install(status)
    return TransformersPatch(report, dry_run=dry_run)


def unpatch_transformers() -> None:
    """Restore every modeling module patched by ``patch_transformers`` and remove its import hook."""
    _remove_import_hook()
    for key in list(_originals):
        _restore(key)


def patched_modules() -> Tuple[str, ...]:
    """The modeling modules of which a RoPE function (``apply_rotary_pos_emb``,
    ``apply_rotary_pos_emb_interleave``, ``apply_rotary_pos_emb_vision``) is currently the fused op."""
    return tuple(sorted({module for module, _ in _originals}))


def all_modeling_modules() -> List[str]:
    """Every modeling module of the installed transformers that defines a RoPE function the patch
    examines (``apply_rotary_pos_emb``, ``apply_rotary_pos_emb_interleave``,
    ``apply_rotary_pos_emb_vision``), found in the sources, without importing anything."""
    _import_transformers()
    root = Path(sys.modules["transformers"].__file__).parent / "models"
    names = []
    for path in sorted(root.glob("*/modeling_*.py")):
        try:
            source = path.read_text(encoding="utf-8")
        except OSError:
            continue
        if re.search(rf"^def ({'|'.join(_FUNCTIONS)})\(", source, re.MULTILINE):
            names.append(f"{_MODULE_PREFIX}{path.parent.name}.{path.stem}")
    return names


# ----------------------------------------------------------------------------------------------
# Which modules


def _import_transformers() -> None:
    try:
        importlib.import_module("transformers")
    except ImportError as e:
        raise ImportError("rope_kernels.patch_transformers needs the transformers package "
                          "(pip install transformers)") from e


def _loaded_modeling_modules() -> List[str]:
    return sorted(name for name, module in list(sys.modules.items())
                  if module is not None and _MODELING.match(name) and _defines_a_function(module))


def _defines_a_function(module: types.ModuleType) -> bool:
    return any(hasattr(module, function) for function in _FUNCTIONS)


def _modules_of_target(target: Any) -> Tuple[List[str], str]:
    if isinstance(target, str):
        return [_module_for_family(target)], repr(target)
    if isinstance(target, torch.nn.Module):
        names: List[str] = []
        for layer in target.modules():
            name = type(layer).__module__
            if _MODELING.match(name) and name not in names:
                names.append(name)
        return names, type(target).__name__
    if isinstance(target, type):
        return [target.__module__], f"class {target.__qualname__}"
    if isinstance(target, types.ModuleType):
        return [target.__name__], f"module {target.__name__}"
    if isinstance(target, Iterable):
        names = []
        for item in target:
            for name in _modules_of_target(item)[0]:
                if name not in names:
                    names.append(name)
        return names, repr(target)
    raise TypeError("rope_kernels.patch_transformers: model_or_class must be None, a model, a class, a "
                    f"modeling module, a family name or a list of them; got {type(target).__name__}")


def _module_for_family(family: str) -> str:
    if family.startswith(_MODULE_PREFIX):
        return family
    name = family.lower()
    module = f"{_MODULE_PREFIX}{name}.modeling_{name}"
    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"rope_kernels.patch_transformers: the installed transformers has no family "
                         f"{family!r} (no {module})") from e
    return module


# ----------------------------------------------------------------------------------------------
# The proof: the op gives the module's own function's result


def _examine_all(module_name: str) -> List[ModuleStatus]:
    """The statuses of one module: of its apply_rotary_pos_emb, and of each of _OTHER_FUNCTIONS it
    defines and calls (none for a module that is not a transformers modeling module)."""
    status = _examine(module_name)
    if status is None:
        return []
    module = sys.modules.get(module_name)
    others = [_examine(module_name, function) for function in _OTHER_FUNCTIONS
              if module is not None and hasattr(module, function) and _calls_the_function(module, function)]
    found = [other for other in others if other is not None]
    if found and not hasattr(module, _FUNCTION):
        return found  # (LongCat-Flash, GLM-5: DeepSeek-V3's interleaved function alone)
    return [status] + found


def _examine(module_name: str, function: str = _FUNCTION) -> Optional[ModuleStatus]:
    """The status of one function of a module (None for a module that is not a transformers
    modeling module)."""
    if not _MODELING.match(module_name):
        return None
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # noqa: BLE001  (a modeling module whose dependencies are missing)
        return ModuleStatus(module_name, False, f"cannot be imported here ({type(error).__name__}: {error})")
    current = getattr(module, function, None)
    if current is None:
        return ModuleStatus(module_name, False, f"defines no {function}", function=function)
    if not _calls_the_function(module, function):
        return ModuleStatus(module_name, False, f"defines {function} but never calls it (its attention has no RoPE)",
                            function=function)
    original = getattr(current, _REPLACED, current)
    cached = _examined.get((module_name, function))
    if cached is not None and cached.original is original:
        return cached.status
    keep_dtype, convention, signature, reason = _prove(original, function)
    arguments = ""
    if convention is not None and signature is not None:
        arguments = (convention.arguments_one if signature.one_tensor else convention.arguments) + signature.arguments_note
    status = ModuleStatus(module_name, convention is not None, reason, bool(keep_dtype), arguments, function)
    _examined[(module_name, function)] = _Examined(original, status, convention, signature)
    return status


def _calls_the_function(module: types.ModuleType, function: str = _FUNCTION) -> bool:
    """Whether the module's source calls the function anywhere but in its definition (some
    modules keep a copy their layers never call). True where the source cannot be read."""
    try:
        source = inspect.getsource(module)
    except (OSError, TypeError):
        return True
    return re.search(rf"(?<!def ){function}\(", source) is not None


@dataclasses.dataclass(frozen=True)
class _Signature:
    one_tensor: bool  # (x, cos, sin, ...): q and k rotated by separate calls (Gemma 3n, Gemma 4)
    position_ids: bool  # position_ids before unsqueeze_dim (transformers 4.x)
    # GPT-J's and CodeGen's (tensor, sin, cos): one tensor, (B, S, H, D), sin before cos, and no
    # unsqueeze_dim (their tables broadcast at dim 2).
    sin_first: bool = False
    # The vision towers' (q, k, cos, sin): (S, H, D) tensors of one image or video, (S, D) tables;
    # with batch_of_sequences, (B, S, H, D) tensors and (S, D) tables for all of them (MiniMax-M3-VL).
    one_sequence: bool = False
    batch_of_sequences: bool = False
    # DINOv3's (q, k, cos, sin, **kwargs): (B, H, S, D) tensors whose last P tokens (the patches)
    # are rotated by (P, D) tables; the first S - P (class and register tokens) pass through.
    prefix_tokens: bool = False
    # CLVP's (q, k, v, cos, sin, position_ids, unsqueeze_dim): v rotated as k, by a (max_seq, D)
    # table at position_ids.
    value_too: bool = False
    # Qwen4-Exp's (q, k=None, cos=None, sin=None, unsqueeze_dim=1): without k, q alone rotated and
    # returned (its sparse-attention indexer's call).
    k_optional: bool = False

    @property
    def arguments_note(self) -> str:
        """What the families table adds to the op's arguments for functions of this signature."""
        if self.prefix_tokens:
            return ", the class and register tokens at a table row of angle 0"
        return ", and `fused` for v" if self.value_too else ""


# The parameters of a function -> the forms of call it may take, tried in turn by the proof.
_SIGNATURES = {("q", "k", "cos", "sin", "unsqueeze_dim"): (_Signature(False, False),),  # transformers 5.x
               ("q", "k", "cos", "sin", "position_ids", "unsqueeze_dim"): (_Signature(False, True),),  # 4.x
               ("x", "cos", "sin", "unsqueeze_dim"): (_Signature(True, False),),
               ("tensor", "sin", "cos"): (_Signature(True, False, sin_first=True),),
               ("q", "k", "cos", "sin"): (_Signature(False, False, one_sequence=True),
                                          _Signature(False, False, one_sequence=True, batch_of_sequences=True)),
               ("q", "k", "cos", "sin", "kwargs"): (_Signature(False, False, prefix_tokens=True),),
               ("q", "k", "v", "cos", "sin", "position_ids", "unsqueeze_dim"):
                   (_Signature(False, True, value_too=True),)}


def _signature_parameters(original: Any) -> Optional[Any]:
    # A Kernel Hub hook is an nn.Module whose forward carries the function's signature.
    target = original.forward if isinstance(original, torch.nn.Module) else original
    try:
        return inspect.signature(target).parameters
    except (TypeError, ValueError):
        return None


def _k_may_be_left_out(original: Any) -> bool:
    """Whether the function's k defaults to None (Qwen4-Exp's: q alone rotated without it)."""
    parameters = _signature_parameters(original)
    return parameters is not None and "k" in parameters and parameters["k"].default is None


def _parameters(original: Any) -> Optional[Tuple[str, ...]]:
    parameters = _signature_parameters(original)
    if parameters is None:
        return None
    names = tuple(parameters)
    if names not in _SIGNATURES:
        return None
    # Defaults beyond unsqueeze_dim and position_ids: only k, cos and sin of None, and only in
    # transformers' 5.x form (Qwen4-Exp's: k may be left out).
    defaults = {name: p.default for name, p in parameters.items()
                if p.default is not inspect.Parameter.empty and name not in ("unsqueeze_dim", "position_ids")}
    if defaults and (names != ("q", "k", "cos", "sin", "unsqueeze_dim") or any(v is not None for v in defaults.values())
                     or "k" not in defaults):
        return None
    if "unsqueeze_dim" in parameters and parameters["unsqueeze_dim"].default != 1:
        return None
    # (position_ids=None in transformers 4.x; CLVP's has no default: the proof passes it always.)
    if "position_ids" in parameters and parameters["position_ids"].default not in (None, inspect.Parameter.empty):
        return None
    return names


def _as_cos_first(sin_first: Callable[..., Any]) -> Callable[..., Any]:
    """GPT-J's (tensor, sin, cos) as the one-tensor form (x, cos, sin, unsqueeze_dim) the proof
    calls: (B, S, H, D) tensors as they are, (B, H, S, D) ones as their (B, S, H, D) view."""
    def cos_first(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        if unsqueeze_dim not in (1, 2):
            raise ValueError("takes (B, H, S, D) and (B, S, H, D) tensors only")
        if unsqueeze_dim == 2:
            return sin_first(x, sin, cos)
        return sin_first(x.transpose(1, 2), sin, cos).transpose(1, 2)
    return cos_first


def _as_batched(one_sequence: Callable[..., Any], batch_of_sequences: bool) -> Callable[..., Any]:
    """A vision tower's (q, k, cos, sin) as transformers' form the proof calls, (q, k, cos, sin,
    unsqueeze_dim) on batches: each sequence of the batch by one call, as (S, H, D) tensors or,
    for a function that takes batches, a batch of one (1, S, H, D); its (S, D) rows of the tables."""
    def batched(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        if unsqueeze_dim not in (1, 2):
            raise ValueError("takes (B, H, S, D) and (B, S, H, D) tensors only")
        heads_first = unsqueeze_dim == 1
        if heads_first:
            q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = cos.expand(q.size(0), -1, -1), sin.expand(q.size(0), -1, -1)
        if batch_of_sequences:
            outs = [one_sequence(q[b:b + 1], k[b:b + 1], cos[b], sin[b]) for b in range(q.size(0))]
            q_out, k_out = torch.cat([out[0] for out in outs]), torch.cat([out[1] for out in outs])
        else:
            outs = [one_sequence(q[b], k[b], cos[b], sin[b]) for b in range(q.size(0))]
            q_out, k_out = torch.stack([out[0] for out in outs]), torch.stack([out[1] for out in outs])
        return (q_out.transpose(1, 2), k_out.transpose(1, 2)) if heads_first else (q_out, k_out)
    return batched


def _as_per_image(prefixed: Callable[..., Any]) -> Callable[..., Any]:
    """DINOv3's (q, k, cos, sin, **kwargs) as the form the proof calls, (q, k, cos, sin,
    unsqueeze_dim) on (B, H, S, D) tensors: each image by one call with its own (S', D) rows of
    the tables, S' = S rotating every token, S' < S the last S' (the first S - S' pass through)."""
    def per_image(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        if unsqueeze_dim != 1:
            raise ValueError("takes (B, H, S, D) tensors only")
        rows = [b if cos.size(0) > 1 else 0 for b in range(q.size(0))]
        outs = [prefixed(q[b:b + 1], k[b:b + 1], cos[row], sin[row]) for b, row in enumerate(rows)]
        return torch.cat([out[0] for out in outs]), torch.cat([out[1] for out in outs])
    return per_image


def _fused_after_prefix_tokens(fused_pos_emb: Callable[..., Optional[Tuple[torch.Tensor, torch.Tensor]]],
                               q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                               keep_dtype: bool) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """DINOv3's call in one op call, or None where the op does not serve it: (B, H, S, D) q and k,
    (P, W) tables for the last P tokens. Each of the first S - P tokens reads a row of angle 0 put
    before the tables (cos 1, sin 0: the rotation is exactly the identity), token s >= S - P row
    s - (S - P) + 1: the tables grow by a row, q and k are read and written once."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 2 or sin.dim() != 2 or k.size(2) != q.size(2):
        return None
    prefix = q.size(2) - cos.size(0)
    if prefix < 0 or cos.shape != sin.shape:
        return None
    if prefix == 0:
        return fused_pos_emb(q, k, cos, sin, None, 1, keep_dtype)
    cos = torch.cat([torch.ones_like(cos[:1]), cos])
    sin = torch.cat([torch.zeros_like(sin[:1]), sin])
    positions = (torch.arange(q.size(2), device=q.device) - (prefix - 1)).clamp(min=0)
    return fused_pos_emb(q, k, cos, sin, positions, 1, keep_dtype)


def _with_k_as_v(rotates_v: Callable[..., Any]) -> Callable[..., Any]:
    """CLVP's (q, k, v, cos, sin, position_ids, unsqueeze_dim) as the form the proof calls: k
    given as v too, and the rotated v added to the rotated k, so that the results and gradients
    compared hold v's rotation as well as k's."""
    def pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, position_ids: Any,
             unsqueeze_dim: int = 1) -> Any:
        q_out, k_out, v_out = rotates_v(q, k, k, cos, sin, position_ids, unsqueeze_dim)
        return q_out, k_out + v_out
    return pair


def _with_q_alone(k_optional: Callable[..., Any]) -> Callable[..., Any]:
    """Qwen4-Exp's (q, k=None, cos=None, sin=None, unsqueeze_dim=1) as the form the proof calls:
    q rotated by a call without k, k by a call with both, so that the results and gradients
    compared hold both forms of call."""
    def pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1) -> Any:
        return k_optional(q, cos=cos, sin=sin, unsqueeze_dim=unsqueeze_dim), k_optional(q, k, cos, sin, unsqueeze_dim)[1]
    return pair


def _same_tables(table: torch.Tensor) -> torch.Tensor:
    return table


def _one_angle_per_pair(table: torch.Tensor) -> torch.Tensor:
    # transformers' tables hold each angle twice (cat(freqs, freqs)): the first half, once each.
    return table[..., : table.shape[-1] // 2]


def _angle_per_pair_feature(table: torch.Tensor) -> torch.Tensor:
    # Cohere's tables: each angle at both columns of its pair (repeat_interleave(freqs, 2)).
    return table[..., : table.shape[-1] // 2].repeat_interleave(2, dim=-1)


@dataclasses.dataclass(frozen=True)
class _Convention:
    """One way transformers' functions pair the features and shape the tables their rotary
    embeddings pass, and the op call that computes it: `fused` takes the function's arguments and
    keep_dtype, and returns None where the op does not serve them; `tables` turns the proof's
    transformers-form tables (each angle twice) into the form this convention's models pass."""

    name: str  # in reasons: "half-split pairs"
    arguments: str  # the op's arguments, for the families table
    fused: Callable[..., Optional[Tuple[torch.Tensor, torch.Tensor]]]
    # The one-tensor form (x, cos, sin, unsqueeze_dim, keep_dtype) -> Optional[Tensor], and its
    # op's arguments.
    fused_one: Callable[..., Optional[torch.Tensor]]
    arguments_one: str
    tables: Callable[[torch.Tensor], torch.Tensor] = _same_tables


_ONE_TENSOR = ", for q and k by their two calls"

_CONVENTIONS = (
    _Convention("half-split pairs", "`fused_qk`", fused_rotary_pos_emb,
                fused_rotary_pos_emb_one, "`fused`" + _ONE_TENSOR),
    _Convention("interleaved pairs", "`fused_qk(..., interleaved=True)`", fused_interleaved_pos_emb,
                fused_interleaved_pos_emb_one, "`fused(..., interleaved=True)`" + _ONE_TENSOR),
    # GPT-OSS and OpenAI's privacy filter (and GPT-J and CodeGen, one tensor a call): cos/sin of
    # head_dim / 2 columns, one angle per pair, which the op reads as they are.
    _Convention("half-split pairs and one angle per pair", "`fused_qk` (cos/sin of head_dim / 2)",
                functools.partial(fused_rotary_pos_emb, tables="once"),
                functools.partial(fused_rotary_pos_emb_one, tables="once"),
                "`fused` (cos/sin of head_dim / 2)" + _ONE_TENSOR, _one_angle_per_pair),
    _Convention("interleaved pairs and one angle per pair", "`fused_qk(..., interleaved=True)` (cos/sin of head_dim / 2)",
                functools.partial(fused_interleaved_pos_emb, tables="once"),
                functools.partial(fused_interleaved_pos_emb_one, tables="once"),
                "`fused(..., interleaved=True)` (cos/sin of head_dim / 2)" + _ONE_TENSOR, _one_angle_per_pair),
    # Cohere and the models built from its code: each angle at the columns of both features of its
    # pair; the op reads every second column.
    _Convention("interleaved pairs and each angle at both features of its pair",
                "`fused_qk(..., interleaved=True)` (cos/sin[..., ::2])",
                functools.partial(fused_interleaved_pos_emb, tables="pairwise"),
                functools.partial(fused_interleaved_pos_emb_one, tables="pairwise"),
                "`fused(..., interleaved=True)` (cos/sin[..., ::2])" + _ONE_TENSOR, _angle_per_pair_feature),
    # DeepSeek-V3's apply_rotary_pos_emb_interleave (and its descendants'): pairs read interleaved,
    # written half-split.
    _Convention("interleaved pairs in and half-split pairs out", "`fused_qk(..., interleaved=True, interleaved_out=False)`",
                functools.partial(fused_interleaved_pos_emb, interleaved_out=False),
                functools.partial(fused_interleaved_pos_emb_one, interleaved_out=False),
                "`fused(..., interleaved=True, interleaved_out=False)`" + _ONE_TENSOR),
    # NanoChat's rotate_half is cat(x2, -x1): each pair turned by the negated angle, which is the
    # op's gradient (itself differentiable).
    _Convention("half-split pairs turned by the negated angle", "`fused_qk_backward` (the rotation by -angle)",
                functools.partial(fused_rotary_pos_emb, reverse=True),
                functools.partial(fused_rotary_pos_emb_one, reverse=True),
                "`fused_backward` (the rotation by -angle)" + _ONE_TENSOR),
)


def _prove(original: Any, function: str = _FUNCTION
           ) -> Tuple[Optional[bool], Optional[_Convention], Optional[_Signature], str]:
    """(keep_dtype, convention, signature form, why) where the op computes the function, (None,
    None, None, why not) otherwise. The forms of call its parameters allow, and in each the
    conventions, are tried in turn; the first that gives the function's result in every form it is
    called with is taken. A one-tensor function is proven on q and k through two calls, as
    attention layers make them."""
    names = _parameters(original)
    if names is None:
        return None, None, None, (f"its {function} does not have transformers' signature "
                            "(q, k, cos, sin[, position_ids=None], unsqueeze_dim=1), a vision tower's "
                            "(q, k, cos, sin), DINOv3's (q, k, cos, sin, **kwargs), CLVP's (q, k, v, cos, "
                            "sin, position_ids, unsqueeze_dim=1), or a one-tensor one: (x, cos, sin, "
                            "unsqueeze_dim=1) or GPT-J's (tensor, sin, cos)")
    problems = []
    signatures = _SIGNATURES[names]
    if _k_may_be_left_out(original):
        signatures = tuple(dataclasses.replace(signature, k_optional=True) for signature in signatures)
    for signature in signatures:
        # (Where a vision function may take (S, H, D) or (B, S, H, D) patches, the reasons say which.)
        form = "" if not signature.one_sequence else " on (B, S, H, D) patches" if signature.batch_of_sequences \
            else " on (S, H, D) patches"
        for convention in _CONVENTIONS:
            cases = {name: case.with_tables(convention.tables)
                     for name, case in _proof_cases(signature).items()}
            keep_dtype, problem = _prove_convention(original, function, convention, signature, cases)
            if problem is None:
                return keep_dtype, convention, signature, (
                    f"the op computes its {function} with {convention.name}{form}, forward and backward"
                    + (" (result in q's dtype)" if keep_dtype else ""))
            problems.append(f"with {convention.name}{form}, {problem}")
    return None, None, None, f"no convention of the op gives its {function}: " + "; ".join(problems)


def _as_pair(one: Callable[..., Any]) -> Callable[..., Tuple[Any, Any]]:
    """A one-tensor function as the pair form the proof calls: q and k by two calls."""
    def pair(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *extra: Any) -> Tuple[Any, Any]:
        return one(q, cos, sin, *extra), one(k, cos, sin, *extra)
    return pair


def _as_called(function: Callable[..., Any], signature: _Signature) -> Callable[..., Any]:
    """A function of this signature (the module's own, or its replacement) as the proof calls it:
    (q, k, cos, sin, *extra), in the order of the cases' arguments."""
    if signature.sin_first:
        return _as_pair(_as_cos_first(function))
    if signature.one_sequence:
        return _as_batched(function, signature.batch_of_sequences)
    if signature.prefix_tokens:
        return _as_per_image(function)
    if signature.value_too:
        return _with_k_as_v(function)
    if signature.k_optional:
        return _with_q_alone(function)
    if signature.one_tensor:
        return _as_pair(function)
    return function


def _prove_convention(original: Any, function: str, convention: _Convention, signature: _Signature,
                      cases: Dict[str, "_Case"]) -> Tuple[bool, Optional[str]]:
    """(keep_dtype, None) where the op in this convention gives the function's result in every
    case the function takes, (False, what differs) otherwise."""
    as_called = _as_called(original, signature)
    try:
        out_dtype = as_called(*cases["bfloat16-q-and-float32-angles"].args())[0].dtype
    except Exception as error:  # noqa: BLE001
        return False, f"its {function} raised on a (B, H, S, D) call ({type(error).__name__}: {error})"
    if out_dtype not in (torch.bfloat16, torch.float32):
        return False, f"its {function} returns {out_dtype} for bfloat16 q and float32 cos/sin"
    keep_dtype = out_dtype == torch.bfloat16
    # The replacement with no function to fall back on: what is proven is the op's result.
    only_the_op = _as_called(_replacement(_not_served, convention, signature, keep_dtype, function), signature)
    for name, case in cases.items():
        try:
            expected = _forward_and_grads(as_called, case)
        except Exception as error:  # noqa: BLE001
            if case.optional:
                continue  # a form the function does not take: the model never passes it
            return False, f"its {function} raised on the {name} call ({type(error).__name__}: {error})"
        try:
            got = _forward_and_grads(only_the_op, case)
        except _NotServed:
            return False, f"the op does not serve its {name} call"
        problem = _difference(got, expected, case)
        if problem is not None:
            return False, f"{problem} on the {name} call"
    return keep_dtype, None


class _NotServed(Exception):
    """Raised in the proof where a replacement would hand the call to the function it replaces."""


def _not_served(*args: Any, **kwargs: Any) -> Any:
    raise _NotServed()


@dataclasses.dataclass
class _Case:
    q: torch.Tensor
    k: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    extra: Tuple[Any, ...]  # the arguments after sin, in the function's order
    optional: bool = False  # a form the function may refuse

    def args(self, q: Optional[torch.Tensor] = None, k: Optional[torch.Tensor] = None) -> Tuple[Any, ...]:
        return (self.q if q is None else q, self.k if k is None else k, self.cos, self.sin) + self.extra

    def with_tables(self, form: Callable[[torch.Tensor], torch.Tensor]) -> "_Case":
        return dataclasses.replace(self, cos=form(self.cos), sin=form(self.sin))


def _angles(rows: int, width: int, generator: torch.Generator, dtype: torch.dtype
            ) -> Tuple[torch.Tensor, torch.Tensor]:
    # transformers' full-width tables: the angles of width/2 pairs, twice.
    half = torch.rand(rows, width // 2, generator=generator, dtype=torch.float64) * 2 * math.pi
    angles = torch.cat([half, half], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


# The proof's calls: batch, q heads, k heads, tokens, head_dim.
_PROOF_SHAPE = (2, 3, 1, 5, 8)


def _normal(generator: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64).to(dtype)


def _proof_cases(signature: _Signature) -> Dict[str, _Case]:
    """Small random calls in each form transformers' models make, float64 (exact) but one, and
    the forms of the signature's own."""
    takes_position_ids = signature.position_ids
    if signature.value_too:
        return _table_proof_cases()
    g = torch.Generator().manual_seed(0)
    batch, heads_q, heads_k, seq, head_dim = _PROOF_SHAPE
    normal = functools.partial(_normal, g)

    def per_token(rows: int, width: int, dtype: torch.dtype = torch.float64) -> Tuple[torch.Tensor, torch.Tensor]:
        cos, sin = _angles(rows * seq, width, g, dtype)
        return cos.view(rows, seq, width), sin.view(rows, seq, width)

    def extra(unsqueeze_dim: int = 1, position_ids: Optional[torch.Tensor] = None) -> Tuple[Any, ...]:
        return (position_ids, unsqueeze_dim) if takes_position_ids else (unsqueeze_dim,)

    cases: Dict[str, _Case] = {}
    cos, sin = per_token(batch, head_dim)
    cases["per-token (B, H, S, D)"] = _Case(normal(batch, heads_q, seq, head_dim), normal(batch, heads_k, seq, head_dim),
                                            cos, sin, extra())
    cos, sin = per_token(1, head_dim)
    cases["shared-angles"] = _Case(normal(batch, heads_q, seq, head_dim), normal(batch, heads_k, seq, head_dim),
                                   cos, sin, extra())
    cos, sin = per_token(batch, head_dim)
    cases["(B, S, H, D)"] = _Case(normal(batch, seq, heads_q, head_dim), normal(batch, seq, heads_k, head_dim),
                                  cos, sin, extra(2), optional=True)
    cos, sin = _angles(seq, head_dim, g, torch.float64)
    cases["(S, D)-table-at-dim-0"] = _Case(normal(batch, heads_q, seq, head_dim), normal(batch, heads_k, seq, head_dim),
                                           cos, sin, extra(0), optional=True)  # Pixtral's
    cos, sin = per_token(batch, head_dim // 2)
    cases["partial-rotary"] = _Case(normal(batch, heads_q, seq, head_dim), normal(batch, heads_k, seq, head_dim),
                                    cos, sin, extra(), optional=True)
    cos, sin = per_token(batch, head_dim, torch.float32)
    cases["bfloat16-q-and-float32-angles"] = _Case(normal(batch, heads_q, seq, head_dim, dtype=torch.bfloat16),
                                                   normal(batch, heads_k, seq, head_dim, dtype=torch.bfloat16),
                                                   cos, sin, extra())
    if takes_position_ids:
        cos, sin = _angles(seq + 3, head_dim, g, torch.float64)
        positions = torch.randint(0, seq + 3, (batch, seq), generator=g)
        cases["table-and-position_ids"] = _Case(normal(batch, heads_q, seq, head_dim),
                                                normal(batch, heads_k, seq, head_dim), cos, sin,
                                                extra(position_ids=positions), optional=True)
    if signature.prefix_tokens:
        cos, sin = per_token(1, head_dim)
        prefix = 2
        cases["prefix-tokens"] = _Case(normal(batch, heads_q, seq, head_dim), normal(batch, heads_k, seq, head_dim),
                                       cos[:, prefix:], sin[:, prefix:], extra())
    return cases


def _table_proof_cases() -> Dict[str, _Case]:
    """The cases of a function that always reads a (max_seq, D) table at position_ids (CLVP's):
    float64, bfloat16 q with a float32 table, (B, S, H, D) tensors, a rotated width below head_dim."""
    g = torch.Generator().manual_seed(0)
    batch, heads_q, heads_k, seq, head_dim = _PROOF_SHAPE
    rows = seq + 3
    normal = functools.partial(_normal, g)

    def table_case(width: int, dtype: torch.dtype, angles_dtype: torch.dtype, unsqueeze_dim: int,
                   optional: bool) -> _Case:
        cos, sin = _angles(rows, width, g, angles_dtype)
        positions = torch.randint(0, rows, (batch, seq), generator=g)
        shape_q = (batch, heads_q, seq, head_dim) if unsqueeze_dim == 1 else (batch, seq, heads_q, head_dim)
        shape_k = (batch, heads_k, seq, head_dim) if unsqueeze_dim == 1 else (batch, seq, heads_k, head_dim)
        return _Case(normal(*shape_q, dtype=dtype), normal(*shape_k, dtype=dtype), cos, sin,
                     (positions, unsqueeze_dim), optional)

    return {"table-and-position_ids": table_case(head_dim, torch.float64, torch.float64, 1, False),
            "bfloat16-q-and-float32-angles": table_case(head_dim, torch.bfloat16, torch.float32, 1, False),
            "(B, S, H, D)": table_case(head_dim, torch.float64, torch.float64, 2, True),
            "partial-rotary": table_case(head_dim // 2, torch.float64, torch.float64, 1, True)}


def _forward_and_grads(fn: Callable[..., Any], case: _Case) -> List[torch.Tensor]:
    q = case.q.detach().clone().requires_grad_()
    k = case.k.detach().clone().requires_grad_()
    q_out, k_out = fn(*case.args(q, k))
    g = torch.Generator().manual_seed(1)
    weights = [torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) for t in (q_out, k_out)]
    loss = (q_out * weights[0]).sum() + (k_out * weights[1]).sum()
    grad_q, grad_k = torch.autograd.grad(loss, (q, k))
    return [q_out.detach(), k_out.detach(), grad_q, grad_k]


def _difference(got: List[torch.Tensor], expected: List[torch.Tensor], case: _Case) -> Optional[str]:
    exact = case.q.dtype == torch.float64
    for what, a, b in zip(("q", "k", "q's gradient", "k's gradient"), got, expected):
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{what}: {a.dtype} {tuple(a.shape)} against {b.dtype} {tuple(b.shape)}"
        # float64 inputs: float32 rounding apart at most (some functions compute in float32; another
        # convention is off by the size of the values). Otherwise a few roundings of bfloat16 apart.
        rtol, atol = (1e-5, 1e-6) if exact else (2.0**-6, 2.0**-6)
        if not torch.allclose(a.double(), b.double(), rtol=rtol, atol=atol):
            return f"{what} off by up to {float((a.double() - b.double()).abs().max()):.3g}"
    return None


# ----------------------------------------------------------------------------------------------
# Installing and restoring


def _replacement(original: Any, convention: _Convention, signature: _Signature,
                 keep_dtype: bool, function: str = _FUNCTION) -> Callable[..., Any]:
    """The function installed in a module: the op where it serves the inputs, the original else."""
    fused_pos_emb = convention.fused
    fused_one = convention.fused_one
    if signature.sin_first:
        def replacement_sin_first(tensor: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
            # GPT-J's and CodeGen's tensors are (B, S, H, D): their tables broadcast at dim 2.
            fused = fused_one(tensor, cos, sin, 2, keep_dtype)
            return original(tensor, sin, cos) if fused is None else fused
        chosen: Callable[..., Any] = replacement_sin_first
    elif signature.batch_of_sequences:
        def replacement_batch_of_sequences(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                                           ) -> Tuple[torch.Tensor, torch.Tensor]:
            # (B, S, H, D) tensors, and (S, D) tables as every sequence's per-token angles.
            fused = None
            if q.dim() == 4 and k.dim() == 4 and cos.dim() == 2 and sin.dim() == 2:
                fused = fused_pos_emb(q, k, cos[None], sin[None], None, 2, keep_dtype)
            return original(q, k, cos, sin) if fused is None else fused
        chosen = replacement_batch_of_sequences
    elif signature.one_sequence:
        def replacement_one_sequence(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
            # (S, H, D) as a batch of one (1, S, H, D), and (S, D) tables as its per-token angles.
            fused = None
            if q.dim() == 3 and k.dim() == 3 and cos.dim() == 2 and sin.dim() == 2:
                fused = fused_pos_emb(q[None], k[None], cos[None], sin[None], None, 2, keep_dtype)
            return original(q, k, cos, sin) if fused is None else (fused[0][0], fused[1][0])
        chosen = replacement_one_sequence
    elif signature.prefix_tokens:
        def replacement_prefix_tokens(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                                      **kwargs: Any) -> Tuple[torch.Tensor, torch.Tensor]:
            fused = None if kwargs else _fused_after_prefix_tokens(fused_pos_emb, q, k, cos, sin, keep_dtype)
            return original(q, k, cos, sin, **kwargs) if fused is None else fused
        chosen = replacement_prefix_tokens
    elif signature.one_tensor:
        def replacement_one(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
                            ) -> torch.Tensor:
            fused = fused_one(x, cos, sin, unsqueeze_dim, keep_dtype)
            return original(x, cos, sin, unsqueeze_dim) if fused is None else fused
        chosen = replacement_one
    elif signature.value_too:
        def replacement_value_too(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor,
                                  sin: torch.Tensor, position_ids: Optional[torch.Tensor], unsqueeze_dim: int = 1
                                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            # q and k by one op call, v by a second; only the (max_seq, D) table CLVP passes (its
            # formula indexes any table at position_ids, the drop-in a per-token one not).
            fused = fused_v = None
            if cos.dim() == 2 and sin.dim() == 2 and position_ids is not None:
                fused = fused_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim, keep_dtype)
                if fused is not None:
                    fused_v = fused_one(v, cos, sin, unsqueeze_dim, keep_dtype, position_ids=position_ids)
            if fused is None or fused_v is None:
                return original(q, k, v, cos, sin, position_ids, unsqueeze_dim)
            return fused[0], fused[1], fused_v
        chosen = replacement_value_too
    elif signature.position_ids:
        def replacement_4x(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                           position_ids: Optional[torch.Tensor] = None, unsqueeze_dim: int = 1
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
            fused = fused_pos_emb(q, k, cos, sin, position_ids, unsqueeze_dim, keep_dtype)
            return original(q, k, cos, sin, position_ids, unsqueeze_dim) if fused is None else fused
        chosen = replacement_4x
    elif signature.k_optional:
        def replacement_k_optional(q: torch.Tensor, k: Optional[torch.Tensor] = None, cos: Optional[torch.Tensor] = None,
                                   sin: Optional[torch.Tensor] = None, unsqueeze_dim: int = 1) -> Any:
            fused: Any = None
            if cos is not None and sin is not None:
                fused = (fused_one(q, cos, sin, unsqueeze_dim, keep_dtype) if k is None
                         else fused_pos_emb(q, k, cos, sin, None, unsqueeze_dim, keep_dtype))
            return original(q, k, cos, sin, unsqueeze_dim) if fused is None else fused
        chosen = replacement_k_optional
    else:
        def replacement(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                        unsqueeze_dim: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
            fused = fused_pos_emb(q, k, cos, sin, None, unsqueeze_dim, keep_dtype)
            return original(q, k, cos, sin, unsqueeze_dim) if fused is None else fused
        chosen = replacement
    chosen.__name__ = function
    chosen.__doc__ = f"transformers' {function}, computed by torch.ops.rope (rope_kernels)."
    setattr(chosen, _REPLACED, original)
    return chosen


def _install(status: ModuleStatus) -> None:
    module = sys.modules[status.module]
    current = getattr(module, status.function)
    if hasattr(current, _REPLACED):
        return  # already patched
    examined = _examined[(status.module, status.function)]
    assert status.patched and examined.original is current
    assert examined.convention is not None and examined.signature is not None
    _originals[(status.module, status.function)] = current
    setattr(module, status.function, _replacement(current, examined.convention, examined.signature,
                                                  status.keep_dtype, status.function))


def _restore(key: Tuple[str, str]) -> None:
    original: Optional[Any] = _originals.pop(key, None)
    if original is not None:
        setattr(sys.modules[key[0]], key[1], original)


# ----------------------------------------------------------------------------------------------
# The import hook: modeling modules imported after patch_transformers() are patched as they load

_hooked_modules: List[str] = []  # the modules the hook examined (patched or left alone)


class _PatchingLoader(importlib.abc.Loader):
    """Runs a modeling module's own loader, then patches the module if the op computes its RoPE."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[types.ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self._loader.exec_module(module)
        if _hook in sys.meta_path and _defines_a_function(module):
            statuses = _examine_all(module.__name__)
            if statuses:
                _hooked_modules.append(module.__name__)
            for status in statuses:
                if status.patched:
                    _install(status)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, is_package, ...
        return getattr(self._loader, name)


class _ModelingImportHook(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if not _MODELING.match(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


_hook = _ModelingImportHook()


def _add_import_hook() -> None:
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def _remove_import_hook() -> None:
    while _hook in sys.meta_path:
        sys.meta_path.remove(_hook)
    _hooked_modules.clear()
