"""`python -m rope_kernels.cubins [PATH]`: the GPU kernels a build really carries, read from its bytes.

The op library embeds its cubins as plain bytes in read-only data. Each cubin is itself an ELF
image (machine EM_CUDA) whose header names the GPU architecture it was compiled for. This module
finds those images by their ELF header and reads the architecture and the kernel names from them,
with nothing but the standard library: it works where only the installed package is present (no
CUDA toolkit, no cuobjdump, no Triton, no GPU), on an op library, or on a wheel file before it is
installed. It does not load the library, so it cannot be fooled by the library's own tables:
build_info() says what the launcher believes it holds, this says what the bytes are.

PATH: an op library (.so) or a wheel (.whl); default: the op library of the installed package.
"""
from __future__ import annotations

import argparse
import dataclasses
import struct
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ELF_MAGIC = b"\x7fELF"
EM_CUDA = 190
ELFCLASS64 = 2
ELFDATA2LSB = 1
ELF64_HEADER_SIZE = 64
ELF64_SECTION_HEADER_SIZE = 64
ELF64_SYMBOL_SIZE = 24
SHT_SYMTAB = 2
SHT_NOBITS = 8
STT_FUNC = 2
STB_GLOBAL = 1
EI_ABIVERSION = 8

# The ELF header fields read here (little-endian Elf64_Ehdr after e_ident).
_EHDR = struct.Struct("<HHIQQQIHHHHHH")
# Elf64_Shdr: name, type, flags, addr, offset, size, link, info, addralign, entsize.
_SHDR = struct.Struct("<IIQQQQIIQQ")
# Elf64_Sym: name, info, other, shndx, value, size.
_SYM = struct.Struct("<IBBHQQ")


@dataclasses.dataclass(frozen=True)
class Cubin:
    """One cubin image found inside a host binary."""

    offset: int  # where its ELF header starts in the host file
    size: int  # bytes up to the end of its last section or header table
    arch: int  # compute capability as 10 * major + minor (90 for sm_90)
    kernels: Tuple[str, ...]  # global functions it defines (the kernel entry points)


def arch_from_flags(abi_version: int, flags: int) -> Optional[int]:
    """The SM number in a cubin's e_flags, or None for an encoding this reader does not know.

    NVIDIA's ELF ABI version 7 (ptxas up to CUDA 12.x for sm_90 and older) keeps the SM in the
    low byte; ABI version 8 (sm_100 and newer, and every target of ptxas 13) moved it to the
    second byte. Checked against cuobjdump on cubins of ptxas 12.9 and 13.3.
    """
    if abi_version == 7:
        return flags & 0xFF
    if abi_version == 8:
        return (flags >> 8) & 0xFF
    return None


def _section_headers(image: memoryview, shoff: int, shnum: int) -> List[Tuple[int, ...]]:
    return [_SHDR.unpack_from(image, shoff + i * ELF64_SECTION_HEADER_SIZE) for i in range(shnum)]


def _c_string(image: memoryview, start: int) -> str:
    end = start
    while end < len(image) and image[end] != 0:
        end += 1
    return bytes(image[start:end]).decode("ascii", "replace")


def _global_functions(image: memoryview, sections: List[Tuple[int, ...]]) -> Tuple[str, ...]:
    """Names of the global functions in the cubin's symbol table: its kernels."""
    names: List[str] = []
    for _name, sh_type, _flags, _addr, offset, size, link, _info, _align, _entsize in sections:
        if sh_type != SHT_SYMTAB or link >= len(sections):
            continue
        strtab_offset = sections[link][4]
        for start in range(offset, offset + size - ELF64_SYMBOL_SIZE + 1, ELF64_SYMBOL_SIZE):
            st_name, st_info, _other, _shndx, _value, _size = _SYM.unpack_from(image, start)
            if st_info & 0xF == STT_FUNC and st_info >> 4 == STB_GLOBAL:
                names.append(_c_string(image, strtab_offset + st_name))
    return tuple(names)


def read_cubin(data: memoryview, offset: int) -> Optional[Cubin]:
    """The cubin whose ELF header starts at offset, or None if what is there is not one.

    A match of the four magic bytes alone can be chance; the header must also say 64-bit,
    little-endian, EM_CUDA, with header tables of the standard sizes that lie inside the data.
    """
    if offset + ELF64_HEADER_SIZE > len(data):
        return None
    ident = bytes(data[offset:offset + 16])
    if ident[:4] != ELF_MAGIC or ident[4] != ELFCLASS64 or ident[5] != ELFDATA2LSB:
        return None
    (_type, machine, _version, _entry, phoff, shoff, flags, ehsize, phentsize, phnum,
     shentsize, shnum, _shstrndx) = _EHDR.unpack_from(data, offset + 16)
    if machine != EM_CUDA or ehsize != ELF64_HEADER_SIZE or shentsize != ELF64_SECTION_HEADER_SIZE:
        return None
    arch = arch_from_flags(ident[EI_ABIVERSION], flags)
    end = max(ELF64_HEADER_SIZE, shoff + shnum * shentsize, phoff + phnum * phentsize)
    if arch is None or offset + end > len(data):
        return None
    image = data[offset:]
    sections = _section_headers(image, shoff, shnum)
    for section in sections:
        sh_type, sh_offset, sh_size = section[1], section[4], section[5]
        if sh_type != SHT_NOBITS:
            end = max(end, sh_offset + sh_size)
    if offset + end > len(data):
        return None
    image = data[offset:offset + end]
    return Cubin(offset=offset, size=end, arch=arch, kernels=_global_functions(image, sections))


def find_cubins(data: bytes) -> List[Cubin]:
    """Every cubin image inside a host binary, in the order they lie in it."""
    view = memoryview(data)
    found: List[Cubin] = []
    position = data.find(ELF_MAGIC)
    while position != -1:
        cubin = read_cubin(view, position)
        # Skip past a cubin whole: its own sections may hold bytes that look like a header.
        position = data.find(ELF_MAGIC, position + (cubin.size if cubin is not None else 1))
        if cubin is not None:
            found.append(cubin)
    return found


def installed_op_library() -> Path:
    """The op library of the rope_kernels package next to this module (without loading it)."""
    libraries = sorted(Path(__file__).resolve().parent.glob("_ops*.so"))
    if not libraries:
        raise FileNotFoundError(f"no op library (_ops*.so) in {Path(__file__).resolve().parent}")
    return libraries[0]


def read_op_library(path: Path) -> Tuple[str, bytes]:
    """(name, bytes) of an op library, taken from inside a wheel when path is one."""
    if path.suffix != ".whl":
        return str(path), path.read_bytes()
    with zipfile.ZipFile(path) as wheel:
        members = [n for n in wheel.namelist() if n.startswith("rope_kernels/_ops") and n.endswith(".so")]
        if len(members) != 1:
            raise ValueError(f"{path}: expected one rope_kernels/_ops*.so, found {members}")
        return f"{path}!{members[0]}", wheel.read(members[0])


def summarize(cubins: List[Cubin]) -> Dict[int, List[Cubin]]:
    """The cubins grouped by architecture, architectures in ascending order."""
    by_arch: Dict[int, List[Cubin]] = OrderedDict()
    for cubin in sorted(cubins, key=lambda c: (c.arch, c.offset)):
        by_arch.setdefault(cubin.arch, []).append(cubin)
    return by_arch


def report_lines(name: str, cubins: List[Cubin], every_cubin: bool) -> List[str]:
    """Human-readable listing: one line per architecture, optionally one per cubin."""
    lines = [f"{name}: {len(cubins)} cubins"]
    for arch, group in summarize(cubins).items():
        kernels = sorted({k for c in group for k in c.kernels})
        size = sum(c.size for c in group)
        lines.append(f"  sm_{arch}: {len(group)} cubins, {size / 1e6:.2f} MB, kernels: {', '.join(kernels)}")
        if every_cubin:
            lines += [f"    at 0x{c.offset:08x}: {c.size} bytes" for c in group]
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rope_kernels.cubins", description=__doc__.splitlines()[0])
    parser.add_argument("path", nargs="?", type=Path, default=None,
                        help="op library (.so) or wheel (.whl); default: the installed op library")
    parser.add_argument("--every-cubin", action="store_true", help="also list each cubin's offset and size")
    args = parser.parse_args(argv)
    name, data = read_op_library(args.path if args.path is not None else installed_op_library())
    for line in report_lines(name, find_cubins(data), args.every_cubin):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
