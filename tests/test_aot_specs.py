"""The AOT build's specialization table (kernels/aot_specs.py) against what the launcher asks of it.

The CUDA launcher (csrc/cuda/rope_launch.cpp) picks a variant by plain arithmetic and raises
"this build has no ... kernel" where the table left that slot unbuilt, so a slot dropped by
mistake would fail only on a GPU, and only for the inputs that need it. These checks run
anywhere: every input the launcher accepts must map to a built slot.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Iterator, Tuple

import pytest

KERNELS_DIR = Path(__file__).resolve().parent.parent / "kernels"
# The tests also run from a copy of tests/ against an installed wheel, where the build's sources
# are not beside them; the table is tested from the source tree only.
if not (KERNELS_DIR / "aot_specs.py").exists():
    pytest.skip("kernels/ is the build's source: not beside this copy of the tests", allow_module_level=True)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("rope_build_" + name, KERNELS_DIR / (name + ".py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


specs = _load("aot_specs")

# The launcher's limit: head_dim up to 256 on CUDA, so half_dim up to the largest BLOCK_D2.
HALF_DIMS = range(1, specs.BLOCK_D2_VALUES[-1] + 1)


def launches() -> Iterator[Tuple[str, object]]:
    """Every (description, variant) the launcher can ask for."""
    for qk, qk_name in enumerate(specs.QK_DTYPES):
        # A float32 table for float32 q is the "same dtype" slot (table_dtype_of in the launcher).
        tables = [0] if qk_name == "fp32" else list(range(len(specs.TABLE_DTYPES)))
        for table in tables:
            for half_dim in HALF_DIMS:
                # The aligned promise includes half_dim % 16 == 0 (alignment_hints_hold).
                for aligned in ((False, True) if half_dim % 16 == 0 else (False,)):
                    for pos in range(len(specs.POS_KINDS)):
                        for narrow in (False, True):
                            variant = specs.launcher_variant(qk, table, half_dim, pos, aligned, narrow)
                            yield f"{qk_name} table {specs.TABLE_DTYPES[table]} half_dim {half_dim} " \
                                  f"{specs.POS_KINDS[pos]} aligned={aligned} narrow={narrow}", variant


def test_every_launch_has_a_built_kernel() -> None:
    missing = [text for text, variant in launches() if not variant.is_built]
    assert not missing, f"{len(missing)} launches would find no kernel, e.g. {missing[:3]}"


def test_every_built_kernel_serves_some_launch() -> None:
    # The other direction: a built slot no launch can reach is compile time and wheel size for
    # nothing (each costs one cubin per architecture).
    reached = {variant.index for _, variant in launches()}
    unreachable = [v.label() for v in specs.built_variants() if v.index not in reached]
    assert not unreachable, f"built but never launched: {unreachable[:5]}"


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
    kernel_module = _load("rope_kernel")
    kernel = getattr(kernel_module, specs.KERNEL_NAME)
    assert list(kernel.arg_names) == list(specs.RUNTIME_PARAMS + specs.CONSTEXPR_PARAMS)
    for value, name in enumerate(specs.GRID_ORDERS):
        constant = getattr(kernel_module, "GRID_" + name.upper())
        assert getattr(constant, "value", constant) == value, name
