"""Write the AOT build's outputs: per-arch cubin blobs, rope_kernel_table.cpp, aot_manifest.json.

The .cpp defines what csrc/cuda/kernel_table.h declares. Cubin bytes are not spelled out as C
arrays (tens of MB of literals compile slowly); a top-level asm() block pulls each arch's blob
in with .incbin, so the assembler copies the bytes and the compiler never sees them. The blob is
named without a directory, found through the assembler's include path (aot_kernels.cmake), so a
kernel build can move and still compile.

Every file is written only when its content changes, so ninja/CMake rebuild nothing after a
no-op AOT run.
"""
from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from . import aot_specs
from .aot_compile import CompiledVariant
from .aot_specs import Variant

TABLE_CPP = "rope_kernel_table.cpp"
MANIFEST_JSON = "aot_manifest.json"

# Alignment of each blob and of each cubin inside it. cuModuleLoadData needs the ELF image
# 8-byte aligned; 64 keeps every cubin on its own cache line start as well.
CUBIN_ALIGN = 64

# Section of the blobs: allocated, not writable (read-only data), merged into .rodata by the
# default linker scripts. %progbits rather than @progbits: '@' starts a comment on some
# assemblers (32-bit ARM), while '%' is accepted on every ELF target.
BLOB_SECTION = '.rodata.rope_kernels_cubins,"a",%progbits'

# Symbol names carry the project prefix and are hidden: never exported from the shared library,
# so they cannot clash with another library's embedded blobs.
SYMBOL_PREFIX = "rope_kernels_aot_cubins_sm"

# C++ spelling of each axis value, in the index order of aot_specs.
_CPP_QK = ("QkDtype::kFloat16", "QkDtype::kBFloat16", "QkDtype::kFloat32")
_CPP_TABLE = ("TableDtype::kSameAsQk", "TableDtype::kFloat32")
_CPP_POS = ("PosKind::kNone", "PosKind::kInt32", "PosKind::kInt64", "PosKind::kCuSeqlensInt32",
            "PosKind::kCuSeqlensInt64")

# KernelImage fields, in the order the aggregate initializers below fill them.
_KERNEL_IMAGE_FIELDS = ("cubin", "cubin_size", "function_name", "num_warps", "shared_bytes",
                        "num_trailing_null_params", "block_h", "stride_bits")


def write_if_changed(path: Path, data: bytes) -> bool:
    """Write `data` unless the file already holds exactly that; True if written."""
    try:
        if path.read_bytes() == data:
            return False
    except OSError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def blob_name(arch: int) -> str:
    return f"cubins_sm{arch}.bin"


def pack_blob(kernels: Mapping[int, CompiledVariant]) -> tuple[bytes, dict[int, int]]:
    """Concatenate one arch's cubins in table order, each at an aligned offset."""
    blob = bytearray()
    offsets: dict[int, int] = {}
    for index in sorted(kernels):
        blob.extend(b"\0" * (-len(blob) % CUBIN_ALIGN))
        offsets[index] = len(blob)
        blob.extend(Path(kernels[index].cubin_path).read_bytes())
    return bytes(blob), offsets


def _c_string(text: str) -> str:
    """A C string literal for `text` (ASCII), escaping what C needs."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _gas_string(text: str) -> str:
    """A GNU as string operand (for .incbin), escaping what the assembler needs."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _asm_block(arch: int, file_name: str, blob: bytes) -> list[str]:
    """The asm() that embeds one arch's blob, and the C++ declaration of its symbol."""
    symbol = f"{SYMBOL_PREFIX}{arch}"
    lines = [
        f".pushsection {BLOB_SECTION}",
        f".balign {CUBIN_ALIGN}",
        f".globl {symbol}",
        f".hidden {symbol}",
        f".type {symbol}, %object",
        f"{symbol}:",
        f".incbin {_gas_string(file_name)}",
        f".size {symbol}, {len(blob)}",
        ".popsection",
    ]
    digest = hashlib.sha256(blob).hexdigest()
    # The digest makes this file's text change whenever a blob does: compilers do not list
    # .incbin inputs in their dependency files, so this is what triggers the rebuild.
    out = [f"// sm_{arch}: {file_name}, {len(blob)} bytes, sha256 {digest}", "asm("]
    out += [f"    {_c_string(line + chr(10))}" for line in lines]
    out[-1] += ");"
    out.append(f'extern "C" __attribute__((visibility("hidden"))) const unsigned char {symbol}[];')
    return out


def _entry(variant: Variant, arch: int, compiled: CompiledVariant | None, offset: int) -> str:
    comment = f"/* {variant.index:3d} {variant.label()} */"
    if compiled is None:
        return f"    {comment} {{nullptr, 0, nullptr, 0, 0, 0, 0, 0}},"
    fields = (f"{SYMBOL_PREFIX}{arch} + {offset}", str(compiled.cubin_size), _c_string(compiled.name),
              str(compiled.num_warps), str(compiled.shared), str(compiled.num_trailing_null_params),
              str(compiled.block_h), str(compiled.stride_bits))
    return f"    {comment} {{{', '.join(fields)}}},"


def _arch_table(arch: int, kernels: Mapping[int, CompiledVariant], offsets: Mapping[int, int]) -> list[str]:
    out = [f"const KernelImage kKernelsSm{arch}[kNumVariants] = {{"]
    for v in aot_specs.all_variants():
        out.append(_entry(v, arch, kernels.get(v.index), offsets.get(v.index, 0)))
    out.append("};")
    return out


def _layout_asserts() -> list[str]:
    """The initializers are positional: fail the build if the header reorders the fields."""
    out = []
    for before, after in itertools.pairwise(_KERNEL_IMAGE_FIELDS):
        out.append(f"static_assert(offsetof(KernelImage, {before}) < offsetof(KernelImage, {after}), "
                   f'"KernelImage field order changed: update _KERNEL_IMAGE_FIELDS in kernels/aot_emit.py");')
    return out


def _order_asserts() -> list[str]:
    """One assert per slot: a change of order on either side fails the build, not the launch."""
    out = [f"static_assert(kNumVariants == {aot_specs.NUM_VARIANTS}, \"variant count mismatch\");"]
    out.append(f'static_assert(kMaxBlockH == {aot_specs.MAX_BLOCK_H}, "heads-per-program limit mismatch");')
    for i, name in enumerate(aot_specs.GRID_ORDERS):
        enumerator = "k" + "".join(word.capitalize() for word in name.split("_"))
        out.append(f'static_assert(static_cast<int>(GridOrder::{enumerator}) == {i}, "grid order mismatch");')
    for i, enumerator in enumerate(_CPP_POS):
        out.append(f'static_assert(static_cast<int>({enumerator}) == {i}, "positions kind mismatch");')
    out.append(f'static_assert(kNumPosKinds == {len(aot_specs.POS_KINDS)}, "positions kind count mismatch");')
    for i, value in enumerate(aot_specs.BLOCK_D2_VALUES):
        out.append(f'static_assert(kBlockD2Values[{i}] == {value}, "BLOCK_D2 values mismatch");')
    for v in aot_specs.all_variants():
        flags = (v.read_interleaved, v.write_interleaved, v.aligned, v.even_d, v.narrow)
        args = ", ".join((_CPP_QK[v.qk], _CPP_TABLE[v.table], str(v.block))
                         + tuple("true" if flag else "false" for flag in flags))
        out.append(f'static_assert(variant_index({args}) == {v.index}, "variant order mismatch");')
    return out


def render_table_cpp(triton_version: str, archs: list[int], kernels: Mapping[int, Mapping[int, CompiledVariant]],
                     blobs: Mapping[int, bytes], offsets: Mapping[int, Mapping[int, int]]) -> str:
    lines = [
        "// Generated by kernels/build_aot.py: do not edit.",
        f"// Cubins of rope_qk_kernel compiled by Triton {triton_version} for sm_{', sm_'.join(map(str, archs))}.",
        '#include "cuda/kernel_table.h"',
        "",
        "#include <cstddef>",
        "",
    ]
    for arch in archs:
        lines += _asm_block(arch, blob_name(arch), blobs[arch]) + [""]
    lines += ["namespace rope_kernels::cuda {", "", "namespace {", ""]
    for arch in archs:
        lines += _arch_table(arch, kernels[arch], offsets[arch]) + [""]
    lines += ["}  // namespace", "", "const ArchKernels kBuiltArchs[] = {"]
    lines += [f"    {{{arch}, kKernelsSm{arch}}}," for arch in archs]
    lines += [
        "};",
        "const int kNumBuiltArchs = static_cast<int>(sizeof(kBuiltArchs) / sizeof(kBuiltArchs[0]));",
        f"const char* const kTritonVersion = {_c_string(triton_version)};",
        "",
    ]
    lines += _layout_asserts() + _order_asserts()
    lines += ["", "}  // namespace rope_kernels::cuda", ""]
    return "\n".join(lines)


def render_manifest(triton_version: str, inputs_sha256: Mapping[str, str], archs: list[int], skipped: Mapping[int, str],
                    kernels: Mapping[int, Mapping[int, CompiledVariant]]) -> str:
    variants = {v.index: v for v in aot_specs.all_variants()}
    entries = []
    for arch in archs:
        for index, c in sorted(kernels[arch].items()):
            entries.append({
                "arch": arch, "index": index, "key": variants[index].key(), "name": c.name,
                "num_warps": c.num_warps, "shared": c.shared, "block_h": c.block_h,
                "stride_bits": c.stride_bits, "num_trailing_null_params": c.num_trailing_null_params,
                "cubin_size": c.cubin_size,
            })
    manifest = {
        "triton_version": triton_version,
        "kernel": aot_specs.KERNEL_NAME,
        # The sources this build came from: a build tree that uses it (ROPE_PREBUILT_KERNELS)
        # checks that its own files are the same.
        "inputs_sha256": dict(sorted(inputs_sha256.items())),
        "architectures": archs,
        "skipped_architectures": {str(a): reason for a, reason in sorted(skipped.items())},
        "num_variant_slots": aot_specs.NUM_VARIANTS,
        "variants_per_architecture": len(aot_specs.built_variants()),
        "kernels": len(entries),
    }
    return _json_one_variant_per_line(manifest, entries)


def _json_one_variant_per_line(manifest: dict[str, object], variants: list[dict[str, object]]) -> str:
    """Indented JSON with a final "variants" list of one line per variant: readable and diffable."""
    head = json.dumps(manifest, indent=1)
    rows = ",\n".join("  " + json.dumps(v) for v in variants)
    return f'{head[:-2]},\n "variants": [\n{rows}\n ]\n}}\n'



def remove_stale_blobs(out_dir: Path, archs: Iterable[int]) -> None:
    """Drop blobs of archs no longer built, so the output dir holds exactly this build."""
    keep = {blob_name(a) for a in archs}
    for path in out_dir.glob("cubins_sm*.bin"):
        if path.name not in keep:
            path.unlink()


def write_outputs(out_dir: Path, triton_version: str, inputs_sha256: Mapping[str, str],
                  kernels: Mapping[int, Mapping[int, CompiledVariant]], skipped: Mapping[int, str]) -> list[Path]:
    """Write blobs, table and manifest; return the files whose content changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    archs = sorted(kernels)
    changed: list[Path] = []
    blobs: dict[int, bytes] = {}
    offsets: dict[int, dict[int, int]] = {}
    for arch in archs:
        blobs[arch], offsets[arch] = pack_blob(kernels[arch])
        path = out_dir / blob_name(arch)
        if write_if_changed(path, blobs[arch]):
            changed.append(path)
    texts = {
        TABLE_CPP: render_table_cpp(triton_version, archs, kernels, blobs, offsets),
        MANIFEST_JSON: render_manifest(triton_version, inputs_sha256, archs, skipped, kernels),
    }
    for name, text in texts.items():
        if write_if_changed(out_dir / name, text.encode()):
            changed.append(out_dir / name)
    remove_stale_blobs(out_dir, archs)
    return changed
