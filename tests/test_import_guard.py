"""A build next to a torch it was not made for fails at `import rope_kernels` with one message
that names both versions and says what to do, instead of an undefined-symbol error or a crash.

Each test imports a copy of the package (the same files, the op library linked in) whose build
record says something else, in a fresh interpreter that sees nothing but that copy.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

import rope_kernels


def copy_package(destination: Path, built_with: dict[str, str | None]) -> Path:
    """rope_kernels as installed, with this build record; returns the directory to import from."""
    source = Path(rope_kernels.__file__).resolve().parent
    package = destination / "rope_kernels"
    package.mkdir(parents=True)
    for path in source.iterdir():
        if path.name.startswith("_ops") and path.suffix == ".so":
            (package / path.name).symlink_to(path)  # the real library, not a copy of 30 MB
        elif path.is_file() and path.name != "_built_with.json":
            shutil.copy2(path, package / path.name)
    (package / "_built_with.json").write_text(json.dumps(built_with) + "\n")
    return destination


def import_in_fresh_process(search_path: Path, before_import: str = "") -> subprocess.CompletedProcess[str]:
    """`import rope_kernels` from search_path only (not the source tree, not the tests)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(search_path)
    code = f"{before_import}\nimport rope_kernels\nprint(rope_kernels.__file__)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=search_path, timeout=300)


def other_series() -> str:
    """A torch version of the next minor series, in the form torch itself reports."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return f"{major}.{int(minor) + 1}.0+cu999"


def series(version: str) -> str:
    return ".".join(version.split("+")[0].split(".")[:2])


def exception_lines(stderr: str) -> list[str]:
    """The "SomeError: message" lines of a traceback: one per exception raised."""
    return [line for line in stderr.splitlines() if re.match(r"[A-Za-z_][\w.]*(Error|Exception): ", line)]


def test_copy_with_a_matching_record_imports(tmp_path: Path) -> None:
    # The harness itself: the copy imports, and it is the copy that is imported.
    with open(Path(rope_kernels.__file__).resolve().parent / "_built_with.json") as record:
        built_with = json.load(record)
    proc = import_in_fresh_process(copy_package(tmp_path, built_with))
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).resolve().parent == (tmp_path / "rope_kernels").resolve()


def test_build_for_another_torch_series_is_refused_with_one_clear_message(tmp_path: Path) -> None:
    built_for = other_series()
    proc = import_in_fresh_process(copy_package(tmp_path, {"torch": built_for, "cuda": "99.9"}))
    assert proc.returncode != 0, f"the import succeeded:\n{proc.stdout}"
    errors = exception_lines(proc.stderr)
    # One exception, not a chain: the check runs before the library is loaded.
    assert len(errors) == 1, proc.stderr
    message = errors[0]
    assert message.startswith("ImportError: rope_kernels: "), message
    assert built_for in message and torch.__version__ in message, message
    # What to do: the torch that fits, or a rope_kernels build for the torch that is installed.
    assert f"torch=={series(built_for)}.*" in message, message
    assert f"built for torch {series(torch.__version__)}" in message, message
    assert "pip install --no-build-isolation" in message, message

