"""pytest setup shared by every test file of rope_kernels."""
from __future__ import annotations

import os
import sys
import zlib

from typing import Iterator

import pytest
import torch
from torch._dynamo.utils import counters

# The shared modules (rope_env, rope_models, ...) sit beside the tests; make them importable under
# any --import-mode, not only the default one that puts this directory on sys.path itself.
_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if _TESTS_DIR not in sys.path:
    sys.path.insert(0, _TESTS_DIR)


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist, each worker's torch gets its share of the cores for its CPU threads
    (unless OMP_NUM_THREADS says otherwise): N workers each with torch's default of a thread per
    core oversubscribe the machine N times, and the CPU tests of every worker then crawl."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


_share_the_cores_between_workers()


@pytest.fixture(autouse=True)
def _seed_per_test(request: pytest.FixtureRequest) -> None:
    """Seed the global RNG from the test's id: each test draws different inputs, and a failure
    reproduces when that test is run alone."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    """No cached graphs and nothing counted (graph breaks, compilations) before and after a case:
    what a torch.compile test asserts about counters is then about that case alone."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture
def unpatched_transformers() -> Iterator[None]:
    """transformers unpatched before and after a case, whatever the case patched."""
    import rope_kernels

    rope_kernels.unpatch_transformers()
    yield
    rope_kernels.unpatch_transformers()
