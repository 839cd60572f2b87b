"""torch.export and AOTInductor through the op: a model calling it exports as one graph holding the
op (static and dynamic sequence length), survives save and load, and the AOTInductor package of
it gives the eager results.

An AOTInductor compile costs seconds to tens of seconds on a small CPU machine, so there is one
per device: the dynamic-length export, run at several lengths.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import pytest
import torch
from torch.export import Dim

import rope_kernels  # noqa: F401  (registers the op)
from rope_env import DEVICES
from rope_models import RopeAttention

MAX_SEQ = 64
# Sequence lengths the dynamic tests run: the export example's, and others on both sides of it.
SEQ_LENGTHS = (9, 2, 31, MAX_SEQ)
# Tolerances against eager, everything in float32. An exported program runs the ops eager runs,
# at most regrouped (a matmul decomposed into the bmm it calls anyway). A compiled one runs the
# same rope kernel, but fuses the arithmetic around it (projections, softmax), which rounds
# differently; a rope result that is wrong anywhere is off by far more than either.
EXPORTED_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}
COMPILED_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}


def example_inputs(device: str, seq: int, with_positions: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    x = torch.randn(2, seq, 32).to(device)
    # Positions in any order and beyond the sequence length: packed samples, a KV cache.
    positions = torch.randint(0, MAX_SEQ, (2, seq)).to(device) if with_positions else None
    return x, positions


def sequence_dims(with_positions: bool) -> dict[str, Optional[dict[int, Dim]]]:
    # Without positions, token s reads table row s: the sequence cannot exceed the table.
    seq = Dim("seq", min=2, max=MAX_SEQ)
    return {"x": {1: seq}, "positions": {1: seq} if with_positions else None}


def rope_nodes(program: torch.export.ExportedProgram) -> list[torch.fx.Node]:
    return [node for node in program.graph.nodes
            if node.op == "call_function" and node.target == torch.ops.rope.fused_qk.default]


def check_one_rope_node(program: torch.export.ExportedProgram) -> None:
    """The op is one node of the exported graph (not decomposed, not a call back into Python)."""
    assert len(rope_nodes(program)) == 1, program.graph
    foreign = [node.target for node in program.graph.nodes if node.op == "call_function"
               and not isinstance(node.target, torch._ops.OpOverload) and node.target.__name__ != "getitem"]
    assert not foreign, f"calls that are not ops in the exported graph: {foreign}"


@pytest.mark.parametrize("strict", [False, True], ids=["nonstrict", "strict"])
@pytest.mark.parametrize("device", DEVICES)
def test_export_static(device: str, strict: bool) -> None:
    model = RopeAttention(max_seq=MAX_SEQ).to(device)
    inputs = example_inputs(device, 9, with_positions=True)
    program = torch.export.export(model, inputs, strict=strict)
    check_one_rope_node(program)
    torch.testing.assert_close(program.module()(*inputs), model(*inputs), **EXPORTED_TOLERANCE)


@pytest.mark.parametrize("with_positions", [True, False], ids=["positions", "no_positions"])
@pytest.mark.parametrize("device", DEVICES)
def test_export_dynamic_sequence(tmp_path: Path, device: str, with_positions: bool) -> None:
    model = RopeAttention(max_seq=MAX_SEQ).to(device)
    program = torch.export.export(model, example_inputs(device, SEQ_LENGTHS[0], with_positions),
                                  dynamic_shapes=sequence_dims(with_positions))
    check_one_rope_node(program)
    sizes = rope_nodes(program)[0].args[0].meta["val"].shape
    assert isinstance(sizes[2], torch.SymInt), f"the sequence length was specialized: {sizes}"

    # A saved and reloaded program still names the op, and still runs at any length.
    torch.export.save(program, tmp_path / "rope_attention.pt2")
    reloaded = torch.export.load(tmp_path / "rope_attention.pt2")
    for seq in SEQ_LENGTHS:
        inputs = example_inputs(device, seq, with_positions)
        expected = model(*inputs)
        torch.testing.assert_close(program.module()(*inputs), expected, **EXPORTED_TOLERANCE)
        torch.testing.assert_close(reloaded.module()(*inputs), expected, **EXPORTED_TOLERANCE)


@pytest.mark.parametrize("device", DEVICES)
def test_aoti_package_matches_eager(tmp_path: Path, device: str) -> None:
    model = RopeAttention(max_seq=MAX_SEQ).to(device)
    program = torch.export.export(model, example_inputs(device, SEQ_LENGTHS[0], with_positions=True),
                                  dynamic_shapes=sequence_dims(with_positions=True))
    package = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "rope_attention.pt2"))
    # The compiled model calls the op through the dispatcher (a custom op is an extern kernel).
    compiled = torch._inductor.aoti_load_package(package)
    for seq in SEQ_LENGTHS:
        inputs = example_inputs(device, seq, with_positions=True)
        got = compiled(*inputs)
        assert got.device == inputs[0].device
        torch.testing.assert_close(got, model(*inputs), **COMPILED_TOLERANCE)
