"""Finding this repository's package: installed, or built in place in python/ of this checkout."""
from __future__ import annotations

import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT: Path = Path(__file__).resolve().parent.parent
PYTHON_DIR: Path = REPO_ROOT / "python"


def import_rope_kernels() -> ModuleType:
    """`import rope_kernels`; where it is not installed, the in-place build of this checkout
    (`setup.py build_ext --inplace` leaves the op library in python/rope_kernels)."""
    try:
        import rope_kernels
    except ModuleNotFoundError as error:
        if error.name != "rope_kernels" or not (PYTHON_DIR / "rope_kernels").is_dir():
            raise
        sys.path.insert(0, str(PYTHON_DIR))
        import rope_kernels
    return rope_kernels
