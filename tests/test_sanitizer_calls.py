"""The calls of the compute-sanitizer script (tests/sanitizer_calls.py, run by .ci/gpu_sanitizer.sh):
that they reach every built kernel variant and every path of the launcher, by the launcher's own
plan (rope::_launch_plan, on the CPU anywhere), and that each gives the float64 reference's result
on every device, on its exact-size and misaligned buffers.
"""
from __future__ import annotations

import pytest

from rope_env import DEVICES, HAS_SOURCE_TREE

if not HAS_SOURCE_TREE:
    # The variants come from the build's own table, kernels/aot_specs.py, in the source tree.
    pytest.skip("kernels/ is the build's source: not beside this copy of the tests", allow_module_level=True)

import sanitizer_calls  # noqa: E402
from kernels import aot_specs  # noqa: E402

CALLS = sanitizer_calls.all_calls()
# The table's variant indices are the same on every architecture; only heads per program differ.
PLANNED_ARCH = 90


@pytest.fixture(scope="module")
def plans() -> list:
    return [sanitizer_calls.plan(c, PLANNED_ARCH) for c in CALLS]


def test_each_variant_call_is_served_by_its_variant(plans: list) -> None:
    for call, plan in zip(CALLS, plans):
        if call.variant is not None:
            assert plan.variant == call.variant, f"{call.name} plans variant {plan.variant}"


def test_the_calls_reach_every_built_variant(plans: list) -> None:
    reached = {plan.variant for plan in plans}
    missing = [v.label() for v in aot_specs.built_variants() if v.index not in reached]
    assert not missing, f"no call reaches {missing}"


def test_the_calls_reach_every_row_source_grid_order_and_op(plans: list) -> None:
    assert {plan.pos_kind for plan in plans} == set(range(len(aot_specs.POS_KINDS)))
    assert {plan.grid_order for plan in plans} == set(range(len(aot_specs.GRID_ORDERS)))
    assert {call.op for call in CALLS} == set(sanitizer_calls.OPS)
    for op in sanitizer_calls.OPS:
        assert {plan.grid_order for call, plan in zip(CALLS, plans) if call.op == op} == {0, 1, 2}, op


def test_the_calls_cover_misaligned_exact_and_empty_buffers() -> None:
    assert {call.memory for call in CALLS} == set(sanitizer_calls.MEMORY)
    assert {call.table for call in CALLS} == set(sanitizer_calls.TABLES)
    assert any(call.outside_rows and call.offsets for call in CALLS)
    assert any(call.batch == 0 for call in CALLS) and any(call.seq == 0 for call in CALLS)
    misaligned = next(c for c in CALLS if c.memory == "misaligned")
    inputs = misaligned.inputs("cpu")
    assert inputs.q.storage_offset() == 1 and inputs.guards
    for t in (inputs.q, inputs.cos, inputs.sin):  # each view ends at its buffer's last element
        assert t.storage_offset() + t.numel() == t.untyped_storage().nbytes() // t.element_size()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", range(len(CALLS)), ids=[c.name for c in CALLS])
def test_call_matches_the_reference(index: int, device: str) -> None:
    sanitizer_calls.check(CALLS[index], device, seed=index)
