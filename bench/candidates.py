"""The implementations measured side by side, each behind the same small interface.

- ours:    torch.ops.rope.fused_qk on the full-width table (with positions for decode rows), given
           the workload's options (rotary_dim, interleaved, layout, cu_seqlens)
- ours-rows: rope_kernels.apply_rotary_pos_emb (the Hugging Face drop-in) on the rows of each
           token, as the peers get them: no position -> table-row lookup inside the kernel
- ours-inplace: torch.ops.rope.fused_qk_, which rotates q and k where they lie, as Liger does
           (forward only: see OursInPlace)
- eager:   Hugging Face's apply_rotary_pos_emb (rotate_half) in eager PyTorch, generalized to the
           options: partial rotary as slice + rotate + cat, interleaved pairs by the even/odd formula
- compile: the same function under torch.compile, compiled afresh for every workload
- liger:   Liger-Kernel's Triton RoPE (LigerRopeFunction), which rotates q and k in place
- flash-attn: flash-attn's Triton rotary (flash_attn/ops/triton/rotary.py, apply_rotary), forward
           only, one call for q and one for k

The Hugging Face-style candidates take the table rows of each token, (1 or B, S, R), as the model's
rotary embedding hands them over; packed rows give them per token too (each token's place in its
document, gathered once outside the calls). A candidate that lacks a workload's feature says so
(`unsupported`) and is reported n/a for that row. Nothing is imported until load(), so that the
cold-start measurement sees each import on its own.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch

from .library import REPO_ROOT, import_rope_kernels
from .formula import hf_apply_rotary_pos_emb, rope_formula, rotate_half  # noqa: F401
from .workloads import Inputs, Workload

Outputs = Tuple[torch.Tensor, torch.Tensor]
DIRECTIONS: Tuple[str, str] = ("forward", "backward")
BoundCall = Callable[[], Outputs]
# What a backward differentiates: (q, k) and the gradients fed in, (grad_q, grad_k), alike laid out.
GradTargets = Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class CandidateUnavailable(Exception):
    """The candidate cannot run here (not installed, needs CUDA, ...): reported, not fatal."""


def token_rows(inputs: Inputs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Each token's table rows as the formula takes them: the full-width (.., S, R) rows for
    half-split pairs, their first R/2 columns (one angle per pair) for interleaved pairs."""
    if not inputs.interleaved:
        return inputs.token_cos, inputs.token_sin
    half = inputs.rotary_dim // 2
    return inputs.token_cos[..., :half].contiguous(), inputs.token_sin[..., :half].contiguous()


def is_llama_convention(inputs: Inputs) -> bool:
    """Every feature rotated in half-split pairs: the rows that predate the op's options."""
    return not inputs.interleaved and inputs.rotary_dim == inputs.q.shape[-1]


class Candidate:
    key: str = ""
    label: str = ""
    # True when a call writes q and k (and the backward its incoming gradients) in place.
    writes_inputs: bool = False
    # What is checked and timed: forward and backward, or the forward alone.
    directions: Tuple[str, ...] = DIRECTIONS
    # Whether its cold start is measured (not where it would repeat another candidate's).
    measures_cold_start: bool = True

    def load(self, device: torch.device) -> None:
        """Import what the candidate needs; raise CandidateUnavailable when it cannot run."""

    def version(self) -> Optional[str]:
        return None

    def unsupported(self, workload: Workload) -> Optional[str]:
        """Why the candidate cannot compute this workload (a feature it lacks), or None when it
        can. Asked after load(); a row it cannot compute reports it n/a, never a figure."""
        return None

    def prepare(self, workload: Workload) -> None:
        """Called once per workload before its first call."""

    def bind(self, inputs: Inputs) -> BoundCall:
        """A call of the candidate on these inputs, with everything bound up front so that
        the host time measured is the candidate's own."""
        raise NotImplementedError

    def as_heads(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """An output of the call (or a gradient of its backward) as the (B, H, S, D) view that
        the check reads; the Hugging Face-style candidates return that view already."""
        return x

    def grad_targets(self, inputs: Inputs) -> GradTargets:
        """The tensors its backward differentiates, with the gradients fed in: those it was
        called on."""
        return inputs.q, inputs.k, inputs.grad_q, inputs.grad_k

    def details(self) -> Dict[str, Any]:
        """Facts about the last workload's run worth keeping in the results."""
        return {}


class Ours(Candidate):
    """The op on q and k as its `layout` option takes them, with the workload's options."""

    key = "ours"
    label = "rope_kernels"

    def __init__(self) -> None:
        self._module: Optional[ModuleType] = None
        self._device: Optional[torch.device] = None

    def load(self, device: torch.device) -> None:
        self._module = import_rope_kernels()
        self._device = device

    def version(self) -> Optional[str]:
        return None if self._module is None else str(getattr(self._module, "__version__", None))

    def bind(self, inputs: Inputs) -> BoundCall:
        op = torch.ops.rope.fused_qk
        q, k, cos, sin, positions = inputs.native_q, inputs.native_k, inputs.table_cos, inputs.table_sin, inputs.positions
        options = inputs.options
        if not options:  # the Llama rows: the call as it always was
            return lambda: op(q, k, cos, sin, positions)
        return lambda: op(q, k, cos, sin, positions, **options)

    def as_heads(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return inputs.as_heads(x)

    def grad_targets(self, inputs: Inputs) -> GradTargets:
        return inputs.native_q, inputs.native_k, inputs.native_grad_q, inputs.native_grad_k


class OursRows(Ours):
    """The library on the same inputs as the peers: per-token rows instead of table + positions.

    Decoding rows differ most: from a table the kernel reads the position, then the row (two
    dependent reads); here it reads the row directly, as Liger does. Like transformers' function
    it takes a rotary width from cos/sin (partial rotary) but has no interleaved pairs.
    """

    key = "ours-rows"
    label = "rope_kernels (rows)"

    def unsupported(self, workload: Workload) -> Optional[str]:
        if workload.interleaved:
            return "apply_rotary_pos_emb pairs features half-split only (no interleaved pairs)"
        if self._device is not None and self._device.type == "cuda":
            from rope_kernels import _limits

            if workload.rotary > _limits.CUDA_MAX_HEAD_DIM:
                return "apply_rotary_pos_emb computes by the formula above rotary width {} on CUDA".format(
                    _limits.CUDA_MAX_HEAD_DIM)
        return None

    def bind(self, inputs: Inputs) -> BoundCall:
        assert self._module is not None, "load() first"
        apply = self._module.apply_rotary_pos_emb
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        return lambda: apply(q, k, cos, sin)

    def as_heads(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return x

    def grad_targets(self, inputs: Inputs) -> GradTargets:
        return inputs.q, inputs.k, inputs.grad_q, inputs.grad_k


class OursInPlace(Ours):
    """The library's in-place op, fused_qk_, on the table (and positions) as `ours` gets them.

    Writing where it reads, as Liger does, spares the memory system what fresh outputs cost it
    (with the L2 flushed, and in a CUDA graph, whose captured calls each get their own outputs),
    so this is the like-for-like comparison with Liger. Forward only: like torch's own in-place
    ops it refuses to overwrite a tensor that autograd needs (q and k here are views of leaves
    that require grad), so it runs on detached q and k with nothing recorded; the gradient of a
    rotation made in place is the same kernel as `ours` backward.
    """

    key = "ours-inplace"
    label = "rope_kernels (in place)"
    writes_inputs = True
    directions = ("forward",)
    measures_cold_start = False  # the same import and kernels as `ours`

    def bind(self, inputs: Inputs) -> BoundCall:
        op = torch.ops.rope.fused_qk_
        q, k = inputs.native_q.detach(), inputs.native_k.detach()
        cos, sin, positions = inputs.table_cos, inputs.table_sin, inputs.positions
        options = inputs.options
        if not options:
            return lambda: op(q, k, cos, sin, positions)
        return lambda: op(q, k, cos, sin, positions, **options)


class Eager(Candidate):
    key = "eager"
    label = "eager"

    def version(self) -> Optional[str]:
        return torch.__version__

    def bind(self, inputs: Inputs) -> BoundCall:
        q, k = inputs.q, inputs.k
        cos, sin = token_rows(inputs)
        if is_llama_convention(inputs):
            return lambda: hf_apply_rotary_pos_emb(q, k, cos, sin)
        interleaved = inputs.interleaved
        return lambda: rope_formula(q, k, cos, sin, interleaved)


def _fail_instead_of_falling_back() -> None:
    """Make Dynamo raise where it would quietly run eager after too many recompiles, so a
    figure labelled torch.compile is always compiled code (the config's name varies by torch)."""
    config = torch._dynamo.config
    for name in ("fail_on_recompile_limit_hit", "fail_on_cache_limit_hit"):
        if hasattr(config, name):
            setattr(config, name, True)


class Compiled(Candidate):
    key = "compile"
    label = "torch.compile"

    def __init__(self) -> None:
        self._fn: Optional[Callable[..., Outputs]] = None

    def version(self) -> Optional[str]:
        return torch.__version__

    def load(self, device: torch.device) -> None:
        _fail_instead_of_falling_back()

    def prepare(self, workload: Workload) -> None:
        # A fresh compile for every workload: with Dynamo's caches emptied, no workload runs
        # code specialized for another or hits the recompile limit.
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        if not workload.interleaved and workload.rotary == workload.head_dim:
            self._fn = torch.compile(hf_apply_rotary_pos_emb, fullgraph=True, dynamic=False)
            return
        interleaved = workload.interleaved

        def formula(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Outputs:
            return rope_formula(q, k, cos, sin, interleaved)

        self._fn = torch.compile(formula, fullgraph=True, dynamic=False)

    def details(self) -> Dict[str, Any]:
        from torch._dynamo.utils import counters

        # One graph with grad, one without (host and CUDA-graph figures); more would be recompiles.
        return {"dynamo_graphs": counters["stats"]["unique_graphs"]}

    def bind(self, inputs: Inputs) -> BoundCall:
        fn = self._fn
        if fn is None:
            raise RuntimeError("prepare() was not called")
        q, k = inputs.q, inputs.k
        cos, sin = token_rows(inputs)
        return lambda: fn(q, k, cos, sin)


def _load_by_path(name: str, path: Path) -> ModuleType:
    """The Python file at path, imported as module `name` (its package's __init__ is not run)."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CandidateUnavailable("cannot import {}".format(path))
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def _load_liger_rope() -> Tuple[Any, str]:
    """LigerRopeFunction and where it came from."""
    try:
        from liger_kernel.ops.rope import LigerRopeFunction
        return LigerRopeFunction, "liger_kernel.ops.rope"
    except Exception as package_error:  # noqa: BLE001  (any failure of the package import)
        spec = importlib.util.find_spec("liger_kernel")
        if spec is None or spec.origin is None:
            raise CandidateUnavailable("liger-kernel is not installed (pip install liger-kernel)") from None
        # liger_kernel/__init__ imports every op of the package; where one of them fails with
        # the Triton installed, the RoPE module alone (it needs torch and triton only) still loads.
        path = Path(spec.origin).parent / "ops" / "rope.py"
        if not path.is_file():
            raise CandidateUnavailable("liger-kernel import failed ({}: {}) and {} is missing".format(
                type(package_error).__name__, package_error, path)) from None
        module = _load_by_path("bench_liger_rope", path)
        return module.LigerRopeFunction, "{} (package import failed: {}: {})".format(
            path.name, type(package_error).__name__, package_error)


class Liger(Candidate):
    """Liger's RoPE: half-split pairs; partial rotary where its release takes rotary_dim (0.8.5
    and later rotate the first W features, W the width of cos/sin); (B, H, S, D) views, so packed
    tokens as one sequence of per-token rows."""

    key = "liger"
    label = "Liger"
    writes_inputs = True

    def __init__(self) -> None:
        self._function: Any = None
        self.source = ""

    def load(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise CandidateUnavailable("Liger's RoPE is a Triton kernel: CUDA only")
        self._function, self.source = _load_liger_rope()

    def version(self) -> Optional[str]:
        try:
            from importlib.metadata import version
            return version("liger-kernel")
        except Exception:  # noqa: BLE001
            return None

    def unsupported(self, workload: Workload) -> Optional[str]:
        if workload.interleaved:
            return "Liger's RoPE pairs features half-split only (no interleaved pairs)"
        if workload.rotary < workload.head_dim and self._function is not None:
            if "rotary_dim" not in inspect.signature(self._function.forward).parameters:
                return "this Liger release rotates whole heads (no partial rotary)"
        return None

    def bind(self, inputs: Inputs) -> BoundCall:
        apply = self._function.apply
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        # Older releases return (q, k, cos, sin), newer ones (q, k).
        return lambda: apply(q, k, cos, sin)[:2]


# Where bench/fetch_peer_wheels.sh leaves flash-attn's Triton rotary, taken out of its sdist.
FLASH_ATTN_ROTARY: Path = REPO_ROOT / ".whl" / "flash_attn_rotary.py"
# The first line the fetch script writes into that file: "# flash-attn VERSION ...".
FLASH_ATTN_HEADER: str = "# flash-attn "
# apply_rotary asserts headdim <= 256.
FLASH_ATTN_MAX_HEAD_DIM: int = 256


def _load_flash_attn_rotary() -> Tuple[Callable[..., torch.Tensor], str, Optional[str]]:
    """flash-attn's apply_rotary, the file it came from and flash-attn's version: the file the
    fetch script extracted, or else that of an installed flash-attn (by path: the package's
    __init__ loads its CUDA extension, which the Triton rotary does not need)."""
    if FLASH_ATTN_ROTARY.is_file():
        first = FLASH_ATTN_ROTARY.read_text().splitlines()[:1]
        version = first[0][len(FLASH_ATTN_HEADER):].split()[0] if first and first[0].startswith(FLASH_ATTN_HEADER) else None
        module = _load_by_path("bench_flash_attn_rotary", FLASH_ATTN_ROTARY)
        return module.apply_rotary, ".whl/" + FLASH_ATTN_ROTARY.name, version
    spec = importlib.util.find_spec("flash_attn")
    if spec is None or spec.origin is None:
        raise CandidateUnavailable("flash-attn's Triton rotary not found: run bench/fetch_peer_wheels.sh "
                                   "(it leaves .whl/{}) or install flash-attn".format(FLASH_ATTN_ROTARY.name))
    path = Path(spec.origin).parent / "ops" / "triton" / "rotary.py"
    if not path.is_file():
        raise CandidateUnavailable("flash-attn is installed but {} is missing".format(path))
    try:
        from importlib.metadata import version as installed_version
        found: Optional[str] = installed_version("flash-attn")
    except Exception:  # noqa: BLE001
        found = None
    return _load_by_path("bench_flash_attn_rotary", path).apply_rotary, str(path), found


class FlashAttn(Candidate):
    """flash-attn's Triton rotary, apply_rotary(x, cos, sin, seqlen_offsets, cu_seqlens,
    max_seqlen, interleaved): one call for q and one for k, out of place, on (B, S, H, D) views
    (packed rows: the (T, H, D) tokens with cu_seqlens). It takes a half table (rows, R/2), so a
    partial rotation is R = 2 * its width (the rest copied by a separate kernel), and positions
    as one offset per sequence (seqlen_offsets): the decode rows' single tokens. Forward only:
    its autograd wrapper lives elsewhere in the package, and its backward is the same kernel
    with the sine negated."""

    key = "flash-attn"
    label = "flash-attn"
    directions = ("forward",)

    def __init__(self) -> None:
        self._apply: Optional[Callable[..., torch.Tensor]] = None
        self._version: Optional[str] = None
        self.source = ""

    def load(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise CandidateUnavailable("flash-attn's rotary is a Triton kernel: CUDA only")
        self._apply, self.source, self._version = _load_flash_attn_rotary()

    def version(self) -> Optional[str]:
        return self._version

    def unsupported(self, workload: Workload) -> Optional[str]:
        if workload.head_dim > FLASH_ATTN_MAX_HEAD_DIM:
            return "flash-attn's rotary takes head_dim <= {}".format(FLASH_ATTN_MAX_HEAD_DIM)
        if workload.decode and workload.seq != 1:
            return "flash-attn's rotary takes one position offset per sequence, not one per token"
        return None

    def bind(self, inputs: Inputs) -> BoundCall:
        apply = self._apply
        if apply is None:
            raise RuntimeError("load() first")
        if inputs.op_layout == "thd":
            q, k = inputs.native_q.detach(), inputs.native_k.detach()
        else:
            q, k = inputs.q.detach().transpose(1, 2), inputs.k.detach().transpose(1, 2)
        half = inputs.rotary_dim // 2
        cos = inputs.table_cos[:, :half].contiguous()
        sin = inputs.table_sin[:, :half].contiguous()
        offsets: Union[int, torch.Tensor] = 0
        if inputs.positions is not None:  # one token per sequence (unsupported() saw to that)
            offsets = inputs.positions[:, 0].to(torch.int32).contiguous()
        cu_seqlens = inputs.cu_seqlens
        max_seqlen = inputs.max_seqlen if cu_seqlens is not None else None
        interleaved = inputs.interleaved
        return lambda: (apply(q, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved),
                        apply(k, cos, sin, offsets, cu_seqlens, max_seqlen, interleaved))

    def as_heads(self, x: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        return inputs.as_heads(x) if inputs.op_layout == "thd" else x.transpose(1, 2)


CANDIDATE_TYPES: Dict[str, Callable[[], Candidate]] = {
    "ours": Ours, "ours-rows": OursRows, "ours-inplace": OursInPlace, "eager": Eager, "compile": Compiled,
    "liger": Liger, "flash-attn": FlashAttn}
CANDIDATE_KEYS: List[str] = list(CANDIDATE_TYPES)


def make_candidate(key: str) -> Candidate:
    if key not in CANDIDATE_TYPES:
        raise KeyError("unknown implementation {!r}; known: {}".format(key, ", ".join(CANDIDATE_KEYS)))
    return CANDIDATE_TYPES[key]()


def timed_load(candidate: Candidate, device: torch.device) -> Tuple[Optional[str], float]:
    """Load a candidate: (why it is unavailable or None, seconds the load took)."""
    start = time.perf_counter()
    try:
        candidate.load(device)
    except CandidateUnavailable as reason:
        return str(reason), time.perf_counter() - start
    except Exception as error:  # noqa: BLE001  (a broken install is a finding, not a crash)
        return "load failed: {}: {}".format(type(error).__name__, error), time.perf_counter() - start
    return None, time.perf_counter() - start
