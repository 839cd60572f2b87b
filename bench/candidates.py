"""The implementations measured side by side, each behind the same small interface.

- ours:    torch.ops.rope.fused_qk on the full-width table (with positions for decode rows)
- ours-rows: rope_kernels.apply_rotary_pos_emb (the Hugging Face drop-in) on the rows of each
           token, as the peers get them: no position -> table-row lookup inside the kernel
- ours-inplace: torch.ops.rope.fused_qk_, which rotates q and k where they lie, as Liger does
           (forward only: see OursInPlace)
- eager:   Hugging Face's apply_rotary_pos_emb (rotate_half) in eager PyTorch
- compile: the same function under torch.compile, compiled afresh for every workload
- liger:   Liger-Kernel's Triton RoPE (LigerRopeFunction), which rotates q and k in place

The Hugging Face-style candidates (all but ours) take the table rows of each token, (1 or B, S, D), as
the model's rotary embedding hands them over. Nothing is imported until load(), so that the
cold-start measurement sees each import on its own.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .library import import_rope_kernels
from .workloads import Inputs, Workload

Outputs = Tuple[torch.Tensor, torch.Tensor]
DIRECTIONS: Tuple[str, str] = ("forward", "backward")
BoundCall = Callable[[], Outputs]


class CandidateUnavailable(Exception):
    """The candidate cannot run here (not installed, needs CUDA, ...): reported, not fatal."""


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

    def prepare(self, workload: Workload) -> None:
        """Called once per workload before its first call."""

    def bind(self, inputs: Inputs) -> BoundCall:
        """A call of the candidate on these inputs, with everything bound up front so that
        the host time measured is the candidate's own."""
        raise NotImplementedError

    def details(self) -> Dict[str, Any]:
        """Facts about the last workload's run worth keeping in the results."""
        return {}


class Ours(Candidate):
    key = "ours"
    label = "rope_kernels"

    def __init__(self) -> None:
        self._module: Optional[ModuleType] = None

    def load(self, device: torch.device) -> None:
        self._module = import_rope_kernels()

    def version(self) -> Optional[str]:
        return None if self._module is None else str(getattr(self._module, "__version__", None))

    def bind(self, inputs: Inputs) -> BoundCall:
        op = torch.ops.rope.fused_qk
        q, k, cos, sin, positions = inputs.q, inputs.k, inputs.table_cos, inputs.table_sin, inputs.positions
        return lambda: op(q, k, cos, sin, positions)


class OursRows(Ours):
    """The library on the same inputs as the peers: per-token rows instead of table + positions.

    Decoding rows differ most: from a table the kernel reads the position, then the row (two
    dependent reads); here it reads the row directly, as Liger does.
    """

    key = "ours-rows"
    label = "rope_kernels (rows)"

    def bind(self, inputs: Inputs) -> BoundCall:
        assert self._module is not None, "load() first"
        apply = self._module.apply_rotary_pos_emb
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        return lambda: apply(q, k, cos, sin)


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
        q, k = inputs.q.detach(), inputs.k.detach()
        cos, sin, positions = inputs.table_cos, inputs.table_sin, inputs.positions
        return lambda: op(q, k, cos, sin, positions)


class Eager(Candidate):
    key = "eager"
    label = "eager"

    def version(self) -> Optional[str]:
        return torch.__version__

    def bind(self, inputs: Inputs) -> BoundCall:
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        return lambda: hf_apply_rotary_pos_emb(q, k, cos, sin)


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
        self._fn = torch.compile(hf_apply_rotary_pos_emb, fullgraph=True, dynamic=False)

    def details(self) -> Dict[str, Any]:
        from torch._dynamo.utils import counters

        # One graph with grad, one without (host and CUDA-graph figures); more would be recompiles.
        return {"dynamo_graphs": counters["stats"]["unique_graphs"]}

    def bind(self, inputs: Inputs) -> BoundCall:
        fn = self._fn
        if fn is None:
            raise RuntimeError("prepare() was not called")
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        return lambda: fn(q, k, cos, sin)


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
        module_spec = importlib.util.spec_from_file_location("bench_liger_rope", path)
        if module_spec is None or module_spec.loader is None:
            raise CandidateUnavailable("liger-kernel import failed ({}: {}) and {} is missing".format(
                type(package_error).__name__, package_error, path)) from None
        module = importlib.util.module_from_spec(module_spec)
        sys.modules["bench_liger_rope"] = module
        module_spec.loader.exec_module(module)
        return module.LigerRopeFunction, "{} (package import failed: {}: {})".format(
            path.name, type(package_error).__name__, package_error)


class Liger(Candidate):
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

    def bind(self, inputs: Inputs) -> BoundCall:
        apply = self._function.apply
        q, k, cos, sin = inputs.q, inputs.k, inputs.token_cos, inputs.token_sin
        # Older releases return (q, k, cos, sin), newer ones (q, k).
        return lambda: apply(q, k, cos, sin)[:2]


CANDIDATE_TYPES: Dict[str, Callable[[], Candidate]] = {
    "ours": Ours, "ours-rows": OursRows, "ours-inplace": OursInPlace, "eager": Eager, "compile": Compiled,
    "liger": Liger}
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
