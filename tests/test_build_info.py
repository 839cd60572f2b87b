"""rope_kernels.build_info(): what the installed build says about itself."""
from __future__ import annotations

import torch

import rope_kernels

# The architectures every build must carry (sm_100 and sm_120 only where the Triton used can).
REQUIRED_ARCHITECTURES = {80, 86, 89, 90}

# (q dtype, table dtype) pairs: fp16 or bf16 q with a table of q's dtype or fp32, and fp32 with fp32 (5),
# x pairs read and written half-split or interleaved (4) x the kernels per head-dim block (5 blocks:
# 23 in all): unaligned, wide or narrow grid (2 each); aligned narrow (1 each); aligned wide, masked
# along heads only where rotary_half == BLOCK_D2 ("even"), which alignment forces for BLOCK_D2 16
# and 32 (1 each), and for 64, 128 and 256 both even and masked along the features too (2 each).
VARIANTS_PER_ARCHITECTURE = 5 * 4 * (5 * 2 + 5 * 1 + (1 + 1 + 2 + 2 + 2))


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


# The architectures that may be skipped where the build's Triton cannot compile them.
OPTIONAL_ARCHITECTURES = {100, 120}


def test_architectures_and_kernels() -> None:
    info = rope_kernels.build_info()
    architectures, skipped = info["architectures"], info["skipped_architectures"]
    assert len(set(architectures)) == len(architectures), f"an architecture is listed twice: {architectures}"
    assert set(skipped) <= OPTIONAL_ARCHITECTURES and not set(skipped) & set(architectures), (architectures, skipped)
    requested = set(architectures) | set(skipped)
    # A build of every default architecture (not a development build of a few, ROPE_CUDA_ARCHS)
    # holds each required one.
    if requested >= REQUIRED_ARCHITECTURES | OPTIONAL_ARCHITECTURES:
        assert REQUIRED_ARCHITECTURES <= set(architectures), f"architectures {architectures}"
    assert info["variants_per_architecture"] == VARIANTS_PER_ARCHITECTURE
    assert info["kernels"] == len(architectures) * VARIANTS_PER_ARCHITECTURE


def test_cuda_limits_are_reported() -> None:
    # The largest head_dim follows from the kernel table's largest head-dim block (256 pairs);
    # tests/test_errors.py checks on a GPU that one pair more is refused with this number.
    info = rope_kernels.build_info()
    assert info["cuda_max_head_dim"] == 512
    assert info["cuda_dtypes"] == ["float16", "bfloat16", "float32"]
