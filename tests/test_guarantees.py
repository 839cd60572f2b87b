"""docs/guarantees.md holds: each row of its tables of refused inputs is a case of the error tests
(tests/test_errors.py, tests/test_conventions.py, tests/test_inplace.py), on the backends the row
names, and raises the message the row shows, word for word (its first line). A refusal added to
the tests without a row, or a message changed without the page, fails here.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import pytest
import torch

import test_conventions
import test_errors
import test_inplace
from rope_env import DEVICES, TESTS_DIR, requires_cuda
from rope_kernels.testing import RopeCase, make_args

PAGE = Path(TESTS_DIR).parent / "docs" / "guarantees.md"
if not PAGE.exists():
    # The tests also run from a copy of tests/ against an installed wheel, without docs/ beside them.
    pytest.skip("docs/ is not beside this copy of the tests", allow_module_level=True)
BACKENDS = {"CPU": "cpu", "Meta": "meta", "CUDA": "cuda"}
ROW = re.compile(r"^\| `(?P<case>\w+)` \| [^|]+ \| `(?P<message>[^`]+)` \| (?P<backends>[A-Za-z, ]+) \|$")


def page_rows() -> Dict[str, Tuple[str, Tuple[str, ...]]]:
    """case -> (message, backends) of every row of the page's refusal tables."""
    rows: Dict[str, Tuple[str, Tuple[str, ...]]] = {}
    for line in PAGE.read_text().splitlines():
        match = ROW.match(line)
        if match:
            assert match["case"] not in rows, f"two rows for {match['case']}"
            backends = tuple(BACKENDS[name.strip()] for name in match["backends"].split(","))
            rows[match["case"]] = (match["message"], backends)
    return rows


def _inplace_refusal(build: Callable[[str], object]) -> Callable[[str], str]:
    def run(device: str) -> str:
        with pytest.raises(RuntimeError) as info:
            test_inplace.INPLACE(*build(device))
        return str(info.value)
    return run


def refusals() -> Dict[str, Tuple[Callable[[str], str], Tuple[str, ...]]]:
    """case -> (device -> the message the op raises, the backends the test runs it on)."""
    cases: Dict[str, Tuple[Callable[[str], str], Tuple[str, ...]]] = {}
    for bad in test_errors.BAD_INPUTS:
        cases[bad.name] = ((lambda d, bad=bad: test_errors.refusal("fused_qk", bad.build(d))), bad.devices)
    for option in test_conventions.BAD_OPTIONS:
        cases[option.name] = ((lambda d, o=option: test_conventions.bad_option_refusal(o, d, "fused_qk")),
                              option.devices)
    for name, build, _ in test_inplace.REFUSALS:  # run on every device of rope_env.DEVICES
        cases[name] = (_inplace_refusal(build), ("cpu", "cuda"))
    return cases


ROWS = page_rows()
CASES = refusals()


def test_every_refusal_has_a_row_and_every_row_a_refusal() -> None:
    assert len(ROWS) >= 60, f"the page's tables did not parse: {len(ROWS)} rows"
    assert sorted(ROWS) == sorted(CASES), (f"without a row: {sorted(set(CASES) - set(ROWS))}; "
                                           f"rows of no test: {sorted(set(ROWS) - set(CASES))}")
    for name, (_, backends) in ROWS.items():
        assert set(backends) == set(CASES[name][1]), f"{name}: the page names {backends}, the test runs {CASES[name][1]}"


def _row_params() -> List[object]:
    params = []
    for name, (_, backends) in ROWS.items():
        for device in backends:
            marks = [requires_cuda] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{device}-{name}", marks=marks))
    return params


@pytest.mark.parametrize(("case", "device"), _row_params())
def test_row_gives_its_message(case: str, device: str) -> None:
    message, _ = ROWS[case]
    run, _ = CASES[case]
    assert run(device).splitlines()[0] == message


@pytest.mark.parametrize("device", DEVICES)
def test_the_same_inputs_give_the_same_bits(device: str) -> None:
    # The page's "deterministic": two calls on the same inputs agree bit for bit, forward and backward.
    case = RopeCase(dtype=torch.bfloat16, layout="bshd", positions="bs:int64", heads_q=8, heads_k=2, head_dim=96)
    args = make_args(case, device)
    for op in (torch.ops.rope.fused_qk, torch.ops.rope.fused_qk_backward):
        first, second = op(*args), op(*args)
        for a, b in zip(first, second):
            assert torch.equal(a.view(torch.int16), b.view(torch.int16))
