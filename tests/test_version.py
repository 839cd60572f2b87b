"""One package version, from python/rope_kernels/VERSION, everywhere it is shown: the package,
the op library (compiled in by CMake), and the installed distribution's metadata."""
from __future__ import annotations

import importlib.metadata
import re
from pathlib import Path

import pytest

import rope_kernels

# PEP 440 release with optional pre/post/dev parts: what pip accepts as a version.
PEP440 = re.compile(r"^\d+(\.\d+)*((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?$")


def test_package_and_library_agree_with_the_version_file() -> None:
    version_file = (Path(rope_kernels.__file__).resolve().parent / "VERSION").read_text().strip()
    assert PEP440.match(version_file), f"VERSION holds {version_file!r}, not a PEP 440 version"
    assert rope_kernels.__version__ == version_file
    assert rope_kernels.build_info()["version"] == version_file


def installed_distribution() -> importlib.metadata.Distribution | None:
    """The distribution that installed the rope_kernels imported here, or None when it comes
    from a source tree on the path."""
    try:
        distribution = importlib.metadata.distribution("rope-kernels")
    except importlib.metadata.PackageNotFoundError:
        return None
    inits = [f for f in distribution.files or [] if f.name == "__init__.py" and f.parent.name == "rope_kernels"]
    if not inits:
        return distribution  # an editable install: its files are the source tree's
    installed = Path(str(distribution.locate_file(inits[0]))).resolve()
    return distribution if installed == Path(rope_kernels.__file__).resolve() else None


def test_installed_metadata_version() -> None:
    distribution = installed_distribution()
    if distribution is None:
        pytest.skip("rope_kernels is imported from a source tree, not from an installed distribution")
    assert distribution.version == rope_kernels.__version__ == rope_kernels.build_info()["version"]
