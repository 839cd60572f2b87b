"""Loads the compiled op library once, after checking that it was built for this torch."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent

# How to get a matching build, said the same way by every message below.
_HOW_TO_FIX = (
    "install torch {series}.x (pip install 'torch=={series}.*'), or install the rope_kernels wheel "
    "built for torch {installed_series}, or build rope_kernels from source against the installed "
    "torch (pip install --no-build-isolation --no-deps <rope_kernels source directory>)"
)


def _series(version: str) -> str:
    """'2.11.0+cu130' -> '2.11': the C++ ABI of torch is stable only within a minor series."""
    return ".".join(version.split("+")[0].split(".")[:2])


def _built_with() -> Dict[str, Optional[str]]:
    """What setup.py recorded next to the library: the torch and CUDA versions it was built with."""
    record = _PACKAGE_DIR / "_built_with.json"
    if not record.exists():
        raise ImportError(
            "rope_kernels: the compiled op library is missing (no build record in "
            f"{_PACKAGE_DIR}); build it with `pip install --no-build-isolation .`"
        )
    return json.loads(record.read_text())


def _check_torch_series(built_torch: str) -> None:
    # Checked before the library is loaded: a library built for another torch series fails to
    # load with an undefined C++ symbol, or loads and crashes later; neither says what to do.
    if _series(built_torch) != _series(torch.__version__):
        raise ImportError(
            f"rope_kernels: this build was compiled against torch {built_torch}, but torch "
            f"{torch.__version__} is installed; "
            + _HOW_TO_FIX.format(series=_series(built_torch), installed_series=_series(torch.__version__))
        )


def op_library_path() -> Path:
    """The op library shipped in this package (an editable install keeps it in the source tree)."""
    libraries = sorted(_PACKAGE_DIR.glob("_ops*.so"))
    if not libraries:
        raise ImportError(f"rope_kernels: the compiled op library (_ops*.so) is missing in {_PACKAGE_DIR}")
    return libraries[0]


def load_op_library() -> Path:
    built = _built_with()
    _check_torch_series(str(built["torch"]))
    library = op_library_path()
    torch.ops.load_library(str(library))
    return library
