"""torch.compile beyond the default mode, with the op between other ops (tests/rope_models.py):
"max-autotune" and, on CUDA, "reduce-overhead" (CUDA graphs). Five sequence lengths run through
one compiled graph (dynamic shapes: no recompile), forward and backward, against eager.

Each test compiles once (forward and backward graphs); on a small CPU machine that costs tens of
seconds, so the CPU runs only max-autotune and the shapes stay small.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch
from torch._dynamo.utils import counters

import rope_kernels  # noqa: F401  (registers the op)
from rope_env import DEVICES, requires_cuda
from rope_models import RopeAttention

MAX_SEQ = 64
SEQ_LENGTHS = (5, 9, 17, 33, MAX_SEQ)
# Three passes over the lengths: CUDA graph trees warm up, record, then replay each shape.
ROUNDS = 3
# Compiled and eager run the same rope kernel; the arithmetic fused around it (projections,
# softmax and their gradients) rounds differently in float32. A wrong rope is off by far more.
COMPILED_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


# Every case here compiles: each starts from a reset Dynamo (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def forward_backward(run: Callable[..., torch.Tensor], model: torch.nn.Module, x: torch.Tensor,
                     positions: torch.Tensor, weight: torch.Tensor) -> list[torch.Tensor]:
    """Output and gradients (input, then every parameter) of sum(run(x, positions) * weight).

    Everything is copied out at once: under CUDA graphs the next replay reuses the memory of this
    one's outputs and gradients.
    """
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = run(x, positions)
    (out * weight).sum().backward()
    grads = [x.grad] + [p.grad for p in model.parameters()]
    assert all(g is not None for g in grads), "a gradient did not reach the input or a parameter"
    return [t.detach().clone() for t in [out, *grads]]


def check_lengths_against_eager(compiled: Callable[..., torch.Tensor], model: torch.nn.Module,
                                device: str) -> None:
    """Runs every length ROUNDS times on fresh inputs, compiled and eager, and compares.

    After the first call (which compiles), any recompilation raises: the lengths must share one
    graph with a symbolic sequence length.
    """
    first = True
    for _ in range(ROUNDS):
        for seq in SEQ_LENGTHS:
            x = torch.randn(2, seq, 32).to(device)
            positions = torch.randint(0, MAX_SEQ, (2, seq)).to(device)
            weight = torch.randn(2, seq, 32).to(device)
            torch.compiler.cudagraph_mark_step_begin()  # a new training step for CUDA graph trees
            if first:
                got = forward_backward(compiled, model, x, positions, weight)
                first = False
            else:
                with torch.compiler.set_stance("fail_on_recompile"):
                    got = forward_backward(compiled, model, x, positions, weight)
            want = forward_backward(model, model, x, positions, weight)
            names = ["output", "grad x"] + [f"grad {name}" for name, _ in model.named_parameters()]
            for name, g, w in zip(names, got, want):
                torch.testing.assert_close(g, w, **COMPILED_TOLERANCE, msg=lambda m: f"seq {seq}, {name}: {m}")


def assert_compiled_once() -> None:
    """One Dynamo graph (no graph break, no recompile) and one forward/backward compilation."""
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    assert counters["stats"]["unique_graphs"] == 1, f"{counters['stats']['unique_graphs']} graphs compiled"
    assert counters["aot_autograd"]["total"] == 1, f"{counters['aot_autograd']['total']} forward/backward compilations"


@pytest.mark.parametrize("device", DEVICES)
def test_max_autotune_dynamic_lengths(device: str) -> None:
    model = RopeAttention(max_seq=MAX_SEQ).to(device)
    compiled = torch.compile(model, mode="max-autotune", dynamic=True, fullgraph=True)
    check_lengths_against_eager(compiled, model, device)
    assert_compiled_once()


@requires_cuda
def test_reduce_overhead_cuda_graphs_dynamic_lengths() -> None:
    model = RopeAttention(max_seq=MAX_SEQ).to("cuda")
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=True, fullgraph=True)
    check_lengths_against_eager(compiled, model, "cuda")
    assert_compiled_once()
    # Inductor counts every graph it could not run as a CUDA graph (and says why in its log).
    assert counters["inductor"]["cudagraph_skips"] == 0, "the compiled graphs did not run as CUDA graphs"
