"""rope_kernels.build_info(): what the installed build says about itself."""
from __future__ import annotations

import torch

import rope_kernels

# The architectures every build must carry (sm_100 and sm_120 only where the Triton used can).
REQUIRED_ARCHITECTURES = {80, 86, 89, 90}

# (q dtype, table dtype) pairs: fp16 or bf16 q with a table of q's dtype or fp32, and fp32 with fp32 (5),
# x head-dim block (4) x positions none/int32/int64 (3) x aligned or not (2) x wide or narrow grid (2).
VARIANTS_PER_ARCHITECTURE = 5 * 4 * 3 * 2 * 2


def test_documented_keys_and_types() -> None:
    info = rope_kernels.build_info()
    assert isinstance(info, dict)
    expected_types = {"version": str, "torch": str, "triton": str, "cuda": str, "architectures": list,
                      "variants_per_architecture": int, "kernels": int}
    for key, kind in expected_types.items():
        assert key in info, f"build_info() lacks {key!r}: {sorted(info)}"
        assert isinstance(info[key], kind), f"build_info()[{key!r}] = {info[key]!r} is not a {kind.__name__}"
    assert all(isinstance(arch, int) for arch in info["architectures"]), info["architectures"]


def test_versions() -> None:
    info = rope_kernels.build_info()
    assert info["version"] == rope_kernels.__version__
    # The import refuses a library built for another torch series, so these must agree.
    assert info["torch"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]


def test_architectures_and_kernels() -> None:
    info = rope_kernels.build_info()
    architectures = info["architectures"]
    assert REQUIRED_ARCHITECTURES <= set(architectures), f"architectures {architectures}"
    assert len(set(architectures)) == len(architectures), f"an architecture is listed twice: {architectures}"
    assert info["variants_per_architecture"] == VARIANTS_PER_ARCHITECTURE
    assert info["kernels"] == len(architectures) * VARIANTS_PER_ARCHITECTURE
