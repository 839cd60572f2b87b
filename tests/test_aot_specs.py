"""The AOT build's specialization table (kernels/aot_specs.py) against what the launcher asks of it.

The CUDA launcher picks a variant by plain arithmetic (plan_launch in csrc/cuda/launch_plan.cpp)
and raises "this build has no ... kernel" where the table left that slot unbuilt, so a slot
dropped by mistake would fail only on a GPU, and only for the inputs that need it. These checks
run anywhere, through the launcher's own plan (rope::_launch_plan): every input the launcher
accepts must map to a built slot, and every built slot must serve some input.
"""
from __future__ import annotations

import json
from typing import Dict, Iterator, Optional, Tuple

import pytest
import torch

from rope_env import HAS_SOURCE_TREE

if not HAS_SOURCE_TREE:
    # The tests also run from a copy of tests/ against an installed wheel, where the build's
    # sources are not beside them; the table is tested from the source tree only.
    pytest.skip("kernels/ is the build's source: not beside this copy of the tests", allow_module_level=True)

import rope_kernels  # noqa: E402,F401  (loads the op library)
from kernels import aot_specs as specs  # noqa: E402
from rope_kernels.launch_plan import launch_plan  # noqa: E402

CUDA_KERNELS: Optional[Dict[str, object]] = json.loads(torch.ops.rope.build_info())["cuda_kernels"]
requires_cuda_build = pytest.mark.skipif(CUDA_KERNELS is None, reason="a build without the CUDA path")

QK_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
POSITIONS = {"none": None, "int32": torch.int32, "int64": torch.int64}
# The smallest number of head vectors (tokens x heads) that takes the wide grid class.
WIDE_HEADS = 16384


def _heads(dtype: torch.dtype, heads: int, head_dim: int, aligned: bool) -> torch.Tensor:
    """(1, heads, 1, head_dim) q or k, as an expanded view (no memory per head): planned in place,
    nothing is allocated. Unaligned: one element past an aligned start."""
    base = torch.randn(head_dim + 1, dtype=dtype)
    start = 0 if aligned else 1
    return base[start:start + head_dim].view(1, 1, 1, head_dim).expand(1, heads, 1, head_dim)


def launches(arch: int) -> Iterator[Tuple[str, int]]:
    """(description, variant index) of every kind of launch the op accepts on CUDA."""
    for qk_name, qk in QK_DTYPES.items():
        # A float32 table for float32 q is the "same dtype" slot.
        tables = [qk] if qk == torch.float32 else [qk, torch.float32]
        for table_dtype in tables:
            for half_dim in range(1, CUDA_KERNELS["max_head_dim"] // 2 + 1):  # type: ignore[index,operator]
                head_dim = 2 * half_dim
                # Aligned launches need half_dim % 16 == 0 as well (alignment_hints_hold).
                for aligned in ((False, True) if half_dim % 16 == 0 else (False,)):
                    angles = torch.rand(4, half_dim, dtype=torch.float64)
                    cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
                    for pos_name, pos_dtype in POSITIONS.items():
                        positions = None if pos_dtype is None else torch.tensor([[2]], dtype=pos_dtype)
                        for narrow in (False, True):
                            heads_q = 1 if narrow else WIDE_HEADS - 1
                            q = _heads(qk, heads_q, head_dim, aligned)
                            k = _heads(qk, 1, head_dim, aligned)
                            plan = launch_plan(q, k, cos, sin, positions, capability=arch, inplace=True)
                            assert (plan.aligned, plan.narrow) == (aligned, narrow)
                            yield (f"{qk_name} table {table_dtype} half_dim {half_dim} {pos_name} "
                                   f"aligned={aligned} narrow={narrow}"), plan.variant


@requires_cuda_build
def test_every_launch_has_a_built_kernel_and_every_built_kernel_a_launch() -> None:
    # plan_launch raises where a slot it chooses was not built; the other direction: a built slot
    # no launch reaches is compile time and wheel size for nothing (one cubin per architecture).
    for arch in CUDA_KERNELS["architectures"]:  # type: ignore[index,union-attr]
        reached = {variant for _, variant in launches(arch)}
        unreachable = [v.label() for v in specs.built_variants() if v.index not in reached]
        assert not unreachable, f"sm_{arch}: built but never launched: {unreachable[:5]}"
        assert reached <= {v.index for v in specs.built_variants()}


def test_indices_enumerate_the_table_in_order() -> None:
    # variant_index() in kernel_table.h uses the same mixed-radix formula; the generated table
    # static_asserts each slot against it, and this checks the Python side is dense and ordered.
    assert [v.index for v in specs.all_variants()] == list(range(specs.NUM_VARIANTS))


@pytest.mark.parametrize("aligned", [False, True])
def test_parameter_widths_follow_the_signature(aligned: bool) -> None:
    variant = specs.Variant(1, 0, 2, 1, aligned, aligned, False)
    signature = variant.signature()
    widths = {"i32": 32, "i64": 64}
    declared = [64 if signature[name].startswith("*") else widths[signature[name]] for name in specs.RUNTIME_PARAMS]
    assert declared == variant.param_bits()
    assert len(declared) == specs.NUM_RUNTIME_PARAMS
    assert [name for name, kind in signature.items() if kind == "constexpr"] == list(specs.CONSTEXPR_PARAMS)


def test_kernel_parameters_and_grid_orders_match_the_table() -> None:
    pytest.importorskip("triton")
    from kernels import rope_kernel as kernel_module
    kernel = getattr(kernel_module, specs.KERNEL_NAME)
    assert list(kernel.arg_names) == list(specs.RUNTIME_PARAMS + specs.CONSTEXPR_PARAMS)
    for value, name in enumerate(specs.GRID_ORDERS):
        constant = getattr(kernel_module, "GRID_" + name.upper())
        assert getattr(constant, "value", constant) == value, name
