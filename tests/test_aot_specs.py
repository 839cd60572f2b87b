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
# (interleaved, interleaved_out): every pair convention of what is read and of what is written.
PAIRS = ((False, None), (True, None), (True, False), (False, True))
# The smallest number of head vectors (tokens x heads) that takes the wide grid class.
WIDE_HEADS = 16384


def _heads(dtype: torch.dtype, heads: int, head_dim: int, aligned: bool) -> torch.Tensor:
    """(1, heads, 1, head_dim) q or k, as an expanded view (no memory per head; out of place, the
    plan allocates fresh outputs, untouched). Unaligned: one element past an aligned start."""
    base = torch.randn(head_dim + 1, dtype=dtype)
    start = 0 if aligned else 1
    return base[start:start + head_dim].view(1, 1, 1, head_dim).expand(1, heads, 1, head_dim)


def head_dims(rotary_half: int, max_head_dim: int) -> Iterator[Tuple[int, bool]]:
    """(head_dim, in place) of the launches that rotate rotary_half pairs: the whole head; and,
    where head_dim leaves room, partial rotations out of place with two features more (copy_end
    off a multiple of 16: unaligned), out of place with the largest head_dim (copy_end a multiple
    of 16: aligned where rotary_half allows), and in place with the largest head_dim (copy_end is
    2 * rotary_half: head_dim takes no part)."""
    yield 2 * rotary_half, True
    partial = {(2 * rotary_half + 2, False), (max_head_dim, False), (max_head_dim, True)}
    yield from sorted((head_dim, inplace) for head_dim, inplace in partial if head_dim > 2 * rotary_half)


def launches(arch: int) -> Iterator[Tuple[str, int]]:
    """(description, variant index) of every kind of launch the op accepts on CUDA. Where each
    token's table row comes from (positions, cu_seqlens) is a runtime argument of every variant
    (aot_specs.POS_KINDS), so it takes no part here; tests/test_launch_plan.py checks it leaves
    the variant as it is."""
    max_head_dim: int = CUDA_KERNELS["max_head_dim"]  # type: ignore[index,assignment]
    tensors: Dict[Tuple[torch.dtype, int, int, bool], torch.Tensor] = {}

    def heads(dtype: torch.dtype, count: int, head_dim: int, aligned: bool) -> torch.Tensor:
        key = (dtype, count, head_dim, aligned)
        if key not in tensors:
            tensors[key] = _heads(dtype, count, head_dim, aligned)
        return tensors[key]

    for qk_name, qk in QK_DTYPES.items():
        # A float32 table for float32 q is the "same dtype" slot.
        tables = [qk] if qk == torch.float32 else [qk, torch.float32]
        for table_dtype in tables:
            for rotary_half in range(1, max_head_dim // 2 + 1):
                angles = torch.rand(4, rotary_half, dtype=torch.float64)
                cos, sin = angles.cos().to(table_dtype), angles.sin().to(table_dtype)
                for head_dim, inplace in head_dims(rotary_half, max_head_dim):
                    copy_end = 2 * rotary_half if inplace else head_dim
                    # Aligned launches need rotary_half and copy_end multiples of 16 as well
                    # (alignment_hints_hold).
                    hints = rotary_half % 16 == 0 and copy_end % 16 == 0
                    for aligned in ((False, True) if hints else (False,)):
                        for narrow in (False, True):
                            q = heads(qk, 1 if narrow else WIDE_HEADS - 1, head_dim, aligned)
                            k = heads(qk, 1, head_dim, aligned)
                            for interleaved, interleaved_out in PAIRS:
                                plan = launch_plan(q, k, cos, sin, capability=arch, inplace=inplace,
                                                   interleaved=interleaved, interleaved_out=interleaved_out,
                                                   rotary_dim=2 * rotary_half)
                                write = interleaved if interleaved_out is None else interleaved_out
                                assert (plan.aligned, plan.narrow, plan.read_interleaved, plan.write_interleaved,
                                        plan.rotary_half, plan.copy_end) == (
                                            aligned, narrow, interleaved, write, rotary_half, copy_end)
                                yield (f"{qk_name} table {table_dtype} rotary_half {rotary_half} head_dim "
                                       f"{head_dim} inplace={inplace} interleaved={interleaved} "
                                       f"interleaved_out={interleaved_out} aligned={aligned} narrow={narrow}"
                                       ), plan.variant


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
    variant = specs.Variant(qk=1, table=0, block=2, read_interleaved=True, write_interleaved=False,
                            aligned=aligned, even_d=aligned, narrow=False)
    signature = variant.signature()
    widths = {"i32": 32, "i64": 64}
    declared = [64 if signature[name].startswith("*") else widths[signature[name]] for name in specs.RUNTIME_PARAMS]
    assert declared == variant.param_bits()
    assert len(declared) == specs.NUM_RUNTIME_PARAMS
    assert [name for name, kind in signature.items() if kind == "constexpr"] == list(specs.CONSTEXPR_PARAMS)


def test_kernel_parameters_grid_orders_and_position_kinds_match_the_table() -> None:
    pytest.importorskip("triton")
    from kernels import rope_kernel as kernel_module
    kernel = getattr(kernel_module, specs.KERNEL_NAME)
    assert list(kernel.arg_names) == list(specs.RUNTIME_PARAMS + specs.CONSTEXPR_PARAMS)
    for prefix, names in (("GRID_", specs.GRID_ORDERS), ("POS_", specs.POS_KINDS)):
        for value, name in enumerate(names):
            constant = getattr(kernel_module, prefix + name.upper())
            assert getattr(constant, "value", constant) == value, name
