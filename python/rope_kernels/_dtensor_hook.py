"""Registers the DTensor sharding rule of the rope ops when, and only when, DTensor is in use.

Importing torch.distributed.tensor takes over a second, far more than this package itself, and
most programs never use it. So `import rope_kernels` registers the rule at once only if DTensor
is already imported; otherwise it waits for the import of torch.distributed.tensor and registers
right after it. Any program that builds a DTensor has imported that module, so the rule is there
before the first DTensor reaches the op, whatever the order of the imports.
"""
from __future__ import annotations

import sys
import threading
import warnings
from types import ModuleType
from typing import Any, Optional, Sequence

import torch

_DTENSOR_MODULE = "torch.distributed.tensor"

_lock = threading.Lock()
_registered = False


def register_dtensor_sharding() -> None:
    """Let torch.ops.rope.fused_qk (and its backward) take DTensors sharded over batch, heads or
    sequence (with positions sharded like the sequence); cos/sin replicated.

    `import rope_kernels` does this by itself as soon as torch.distributed.tensor is imported;
    calling it again does nothing. Imports torch.distributed.tensor.
    """
    global _registered
    with _lock:
        if _registered:
            return
        from . import _dtensor_sharding

        _dtensor_sharding.register()
        _registered = True


def _register_or_warn() -> None:
    # Never break an import (of this package or of DTensor) over the rule: without it only
    # DTensor arguments fail, with DTensor's own error, and the warning says what to do.
    try:
        register_dtensor_sharding()
    except Exception as error:
        warnings.warn(
            f"rope_kernels: could not register the DTensor sharding rule of rope::fused_qk ({error!r}); "
            "call rope_kernels.register_dtensor_sharding() after importing torch.distributed.tensor",
            RuntimeWarning, stacklevel=3)


class _RegisteringLoader:
    """Runs the real loader of torch.distributed.tensor, then registers the sharding rule."""

    def __init__(self, loader: Any, finder: "_AfterDTensorImport") -> None:
        self._loader = loader
        self._finder = finder

    def create_module(self, spec: Any) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._finder.remove()
        _register_or_warn()

    def __getattr__(self, name: str) -> Any:  # anything else a loader offers (resources, ...)
        return getattr(self._loader, name)


class _AfterDTensorImport:
    """A sys.meta_path entry that hands torch.distributed.tensor a loader that registers the rule.

    It finds the module with the finders behind it and only wraps their loader, so the module is
    loaded exactly as it would be without this entry.
    """

    def find_spec(self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None) -> Any:
        if fullname != _DTENSOR_MODULE:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None

    def remove(self) -> None:
        # Done once the module ran: imports of other names no longer pass through here.
        if self in sys.meta_path:
            sys.meta_path.remove(self)


def install() -> None:
    """Register now if DTensor is already imported, else right after it is (see the module's doc)."""
    if not torch.distributed.is_available():
        return
    if _DTENSOR_MODULE in sys.modules:
        _register_or_warn()
        return
    if not any(isinstance(finder, _AfterDTensorImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterDTensorImport())
