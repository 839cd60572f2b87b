"""The cubins inside the op library, read from its bytes by rope_kernels.cubins, are the ones
build_info() promises: every listed architecture, with one cubin per kernel variant."""
from __future__ import annotations

import pytest

import rope_kernels
from rope_kernels import cubins
from rope_kernels._loader import op_library_path


def library_cubins() -> list[cubins.Cubin]:
    return cubins.find_cubins(op_library_path().read_bytes())


def test_cubins_match_build_info() -> None:
    info = rope_kernels.build_info()
    by_arch = cubins.summarize(library_cubins())
    assert list(by_arch) == sorted(info["architectures"])
    for arch, group in by_arch.items():
        assert len(group) == info["variants_per_architecture"], f"sm_{arch}: {len(group)} cubins"
        # Triton compiles one kernel entry point per cubin.
        assert all(len(c.kernels) == 1 for c in group), [c.kernels for c in group]
    assert sum(len(group) for group in by_arch.values()) == info["kernels"]


@pytest.mark.parametrize("abi_version, flags, arch", [
    # e_flags of cubins made by Triton's ptxas (CUDA 12.9 and 13.3), as cuobjdump decodes them.
    (7, 0x500550, 80), (7, 0x560556, 86), (7, 0x590559, 89), (7, 0x5A0D5A, 90),
    (8, 0x6005A04, 90), (8, 0xA006402, 100), (8, 0xA007802, 120),
])
def test_architecture_from_elf_flags(abi_version: int, flags: int, arch: int) -> None:
    assert cubins.arch_from_flags(abi_version, flags) == arch


def test_unknown_elf_abi_is_not_guessed() -> None:
    assert cubins.arch_from_flags(9, 0x5A0D5A) is None


def test_cubin_found_among_bytes_that_only_look_like_one() -> None:
    found = library_cubins()
    if not found:
        pytest.skip("a CPU-only build carries no cubins")
    real = found[len(found) // 2]
    image = op_library_path().read_bytes()[real.offset:real.offset + real.size]
    # Decoys: the real header claiming another machine (x86-64, 62), a header cut short, and
    # a whole header whose section table would lie past the end of the data.
    other_machine = image[:18] + (62).to_bytes(2, "little") + image[20:64]
    data = other_machine + image[:40] + bytes(30) + image + image[:100]
    expected = cubins.Cubin(offset=64 + 40 + 30, size=real.size, arch=real.arch, kernels=real.kernels)
    assert cubins.find_cubins(data) == [expected]
