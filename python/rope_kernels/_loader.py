"""Loads the compiled op library once, after checking that it was built for this torch."""
from __future__ import annotations

import json
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent


def _series(version: str) -> str:
    """'2.11.0+cu130' -> '2.11': the C++ ABI of torch is stable only within a minor series."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _check_torch_series() -> None:
    record = _PACKAGE_DIR / "_built_with.json"
    if not record.exists():
        raise ImportError(
            "rope_kernels: the compiled op library is missing (no build record in "
            f"{_PACKAGE_DIR}); build it with `pip install --no-build-isolation .`"
        )
    built = json.loads(record.read_text())["torch"]
    if _series(built) != _series(torch.__version__):
        raise ImportError(
            f"rope_kernels: this build was compiled against torch {built}, but torch "
            f"{torch.__version__} is installed; install torch {_series(built)}.x, or rebuild "
            "rope_kernels against the installed torch with `pip install --no-build-isolation "
            "--force-reinstall --no-deps .` (or the wheel made for your torch)"
        )


def load_op_library() -> Path:
    _check_torch_series()
    libraries = sorted(_PACKAGE_DIR.glob("_ops*.so"))
    if not libraries:
        raise ImportError(f"rope_kernels: the compiled op library (_ops*.so) is missing in {_PACKAGE_DIR}")
    torch.ops.load_library(str(libraries[0]))
    return libraries[0]
