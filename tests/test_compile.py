"""torch.compile(fullgraph=True) through the op: one graph, no graph break, no recompilation
across shapes under dynamic=True, and forward and backward results identical to eager.

Inductor compiles cost seconds each on a small CPU machine, so the matrix is kept small:
backend x dynamic, with a second shape only where dynamic shapes are under test.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import rope_kernels
from rope_env import DEVICES
from rope_kernels.testing import RopeArgs, RopeCase, make_args

# Two shapes that differ in every dimension a dynamic graph must not specialize on.
CASE = RopeCase(batch=2, heads_q=4, heads_k=2, seq=5, layout="bshd", positions="bs:int64")
OTHER_SHAPE = RopeCase(batch=3, heads_q=6, heads_k=3, seq=9, layout="bshd", positions="bs:int64")


# Every case here compiles: each starts from a reset Dynamo (the fixture is in conftest.py).
pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class RecordingBackend:
    """A torch.compile backend that keeps every graph Dynamo hands over, then compiles it with
    the named backend. One graph per compiled function means no graph break and no recompile."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.graphs.append(gm)
        return lookup_backend(self.backend)(gm, example_inputs)


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.ops.rope.fused_qk(q, k, cos, sin, positions)


def apply_rope_api(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return rope_kernels.fused_qk(q, k, cos, sin, positions=positions)


def forward_backward(fn: Callable[..., tuple[torch.Tensor, torch.Tensor]], args: RopeArgs,
                     weight_q: torch.Tensor, weight_k: torch.Tensor) -> list[torch.Tensor]:
    """Outputs and the gradients of sum(q_out * w_q) + sum(k_out * w_k), on leaves of their own
    that share the arguments' memory (so eager and compiled runs see identical inputs)."""
    q = args.q.detach().requires_grad_()
    k = args.k.detach().requires_grad_()
    q_out, k_out = fn(q, k, args.cos, args.sin, args.positions)
    ((q_out * weight_q).sum() + (k_out * weight_k).sum()).backward()
    return [q_out.detach(), k_out.detach(), q.grad, k.grad]


def check_against_eager(compiled: Callable[..., tuple[torch.Tensor, torch.Tensor]], case: RopeCase,
                        device: str) -> None:
    args = make_args(case, device)
    weight_q = torch.randn(args.q.shape).to(device)
    weight_k = torch.randn(args.k.shape).to(device)
    eager = forward_backward(torch.ops.rope.fused_qk, args, weight_q, weight_k)
    from_graph = forward_backward(compiled, args, weight_q, weight_k)
    for name, got, want in zip(["q_out", "k_out", "grad_q", "grad_k"], from_graph, eager):
        # The same kernel runs in both, on the same inputs: the results are identical.
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"{name} differs from eager")
    for got, want in zip(from_graph[:2], eager[:2]):
        assert got.stride() == want.stride(), "the compiled graph changed the output layout"


def assert_one_graph_calling_the_op(recorder: RecordingBackend) -> None:
    assert len(recorder.graphs) == 1, f"{len(recorder.graphs)} graphs: a graph break or a recompile"
    assert not counters["graph_break"], f"graph breaks: {dict(counters['graph_break'])}"
    targets = [node.target for node in recorder.graphs[0].graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.rope.fused_qk.default) + targets.count(torch.ops.rope.fused_qk) == 1, targets


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_forward_and_backward(device: str, backend: str, dynamic: bool) -> None:
    recorder = RecordingBackend(backend)
    compiled = torch.compile(apply_rope, backend=recorder, fullgraph=True, dynamic=dynamic)
    for case in [CASE, OTHER_SHAPE] if dynamic else [CASE]:
        check_against_eager(compiled, case, device)
    assert_one_graph_calling_the_op(recorder)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_python_api(device: str) -> None:
    # The typed Python entry point must trace as cleanly as the op (here without positions).
    recorder = RecordingBackend("aot_eager")
    compiled = torch.compile(apply_rope_api, backend=recorder, fullgraph=True)
    check_against_eager(compiled, RopeCase(layout="qkv"), device)
    assert_one_graph_calling_the_op(recorder)


@pytest.mark.parametrize("positions", ["none", "bs:int64"])
@pytest.mark.parametrize("device", DEVICES)
def test_compiled_per_sequence_tables(device: str, positions: str) -> None:
    # One (B, S_max, W) table per sequence, under dynamic shapes: the batch size is symbolic in the
    # fake kernel's table check, and a second batch size must not recompile.
    recorder = RecordingBackend("aot_eager")
    compiled = torch.compile(apply_rope, backend=recorder, fullgraph=True, dynamic=True)
    for case in (CASE, OTHER_SHAPE):
        check_against_eager(compiled, dataclasses.replace(case, positions=positions, per_sequence_tables=True),
                            device)
    assert_one_graph_calling_the_op(recorder)
