"""Where the tests run: device parameters, the CUDA skip, and running code in a fresh process.

CUDA tests skip only where no GPU exists; everywhere else they run.
"""
from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
requires_two_gpus = pytest.mark.skipif(not HAS_CUDA or torch.cuda.device_count() < 2,
                                       reason="needs two CUDA GPUs")

# Every test that applies to both backends takes `device` from this list.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

FLOAT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def device_dtype_params(names: tuple[str, ...] = ("fp16", "bf16", "fp32", "fp64")) -> list[Any]:
    """(device, dtype) pairs the op supports: fp64 exists on the CPU only."""
    params = []
    for device in DEVICES:
        device_name = device.values[0]
        for name in names:
            if name == "fp64" and device_name == "cuda":
                continue
            params.append(pytest.param(device_name, FLOAT_DTYPES[name], id=f"{device_name}-{name}",
                                       marks=device.marks))
    return params


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def run_fresh_python(code: str, *argv: str, timeout: float = 300.0, env: dict[str, str] | None = None) -> str:
    """Run `python -c code argv...` in a new interpreter and return its stdout; fail on exit != 0.

    The tests directory goes on PYTHONPATH so that the code can import the tests' helpers. A fresh
    process is the only way to test what happens on the first call of a process (module loading,
    context creation, settings read once) or with nothing but what a saved file holds. `env` adds
    to this process's environment.
    """
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (TESTS_DIR, env.get("PYTHONPATH", "")) if p)
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True,
                          env=env, timeout=timeout)
    assert proc.returncode == 0, (
        f"fresh process exited with {proc.returncode}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc.stdout

# The repository's tools (kernels/, bench/) beside the tests: true in a source checkout, false in
# a copy of tests/ run against an installed wheel. Where true, they are importable as packages.
REPO_ROOT = os.path.dirname(TESTS_DIR)
HAS_SOURCE_TREE = os.path.exists(os.path.join(REPO_ROOT, "kernels", "__init__.py")) and \
    os.path.exists(os.path.join(REPO_ROOT, "bench", "__init__.py"))
if HAS_SOURCE_TREE and REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)
