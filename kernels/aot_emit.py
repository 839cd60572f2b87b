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

import dataclasses
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
SYMBOL_PREFIX = "rope_kernels_aot_"

# C++ spelling of each axis value, in the index order of aot_specs.
_CPP_QK = ("QkDtype::kFloat16", "QkDtype::kBFloat16", "QkDtype::kFloat32")
_CPP_TABLE = ("TableDtype::kSameAsQk", "TableDtype::kFloat32")
_CPP_POS = ("PosKind::kNone", "PosKind::kInt32", "PosKind::kInt64", "PosKind::kCuSeqlensInt32",
            "PosKind::kCuSeqlensInt64")

# KernelImage fields, in the order the aggregate initializers below fill them.
_KERNEL_IMAGE_FIELDS = ("image", "image_size", "function_name", "num_warps", "shared_bytes",
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


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """One arch's module images in the table: its cubins, or (ptx) the PTX texts of its variants
    for GPUs no cubin runs on. Each set is one blob, one symbol and one KernelImage array."""

    arch: int
    ptx: bool = False

    @property
    def kind(self) -> str:
        return "ptx" if self.ptx else "cubins"

    @property
    def blob_name(self) -> str:
        return f"{self.kind}_sm{self.arch}.bin"

    @property
    def symbol(self) -> str:
        return f"{SYMBOL_PREFIX}{self.kind}_sm{self.arch}"

    @property
    def table_name(self) -> str:
        return f"k{'Ptx' if self.ptx else ''}KernelsSm{self.arch}"

    def path_of(self, compiled: CompiledVariant) -> str:
        return compiled.ptx_path if self.ptx else compiled.cubin_path


def pack_blob(images: ImageSet, kernels: Mapping[int, CompiledVariant]) -> tuple[bytes, dict[int, int]]:
    """Concatenate one set's images in table order, each at an aligned offset."""
    blob = bytearray()
    offsets: dict[int, int] = {}
    for index in sorted(kernels):
        blob.extend(b"\0" * (-len(blob) % CUBIN_ALIGN))
        offsets[index] = len(blob)
        blob.extend(Path(images.path_of(kernels[index])).read_bytes())
    return bytes(blob), offsets


def _c_string(text: str) -> str:
    """A C string literal for `text` (ASCII), escaping what C needs."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _gas_string(text: str) -> str:
    """A GNU as string operand (for .incbin), escaping what the assembler needs."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _asm_block(images: ImageSet, blob: bytes) -> list[str]:
    """The asm() that embeds one set's blob, and the C++ declaration of its symbol."""
    symbol = images.symbol
    file_name = images.blob_name
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
    out = [f"// sm_{images.arch} {images.kind}: {file_name}, {len(blob)} bytes, sha256 {digest}", "asm("]
    out += [f"    {_c_string(line + chr(10))}" for line in lines]
    out[-1] += ");"
    out.append(f'extern "C" __attribute__((visibility("hidden"))) const unsigned char {symbol}[];')
    return out


def _entry(variant: Variant, images: ImageSet, compiled: CompiledVariant | None, offset: int, size: int) -> str:
    comment = f"/* {variant.index:3d} {variant.label()} */"
    if compiled is None:
        return f"    {comment} {{nullptr, 0, nullptr, 0, 0, 0, 0, 0}},"
    fields = (f"{images.symbol} + {offset}", str(size), _c_string(compiled.name),
              str(compiled.num_warps), str(compiled.shared), str(compiled.num_trailing_null_params),
              str(compiled.block_h), str(compiled.stride_bits))
    return f"    {comment} {{{', '.join(fields)}}},"


def _arch_table(images: ImageSet, kernels: Mapping[int, CompiledVariant], offsets: Mapping[int, int]) -> list[str]:
    out = [f"const KernelImage {images.table_name}[kNumVariants] = {{"]
    for v in aot_specs.all_variants():
        compiled = kernels.get(v.index)
        size = Path(images.path_of(compiled)).stat().st_size if compiled is not None else 0
        out.append(_entry(v, images, compiled, offsets.get(v.index, 0), size))
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


def image_sets(kernels: Mapping[int, Mapping[int, CompiledVariant]]) -> list[ImageSet]:
    """Each built arch's cubins, then the PTX of the PTX arch (aot_specs.ptx_arch), if built."""
    archs = sorted(kernels)
    sets = [ImageSet(arch) for arch in archs]
    ptx_arch = aot_specs.ptx_arch(archs)
    if ptx_arch is not None:
        missing = [i for i, c in kernels[ptx_arch].items() if not c.ptx_path]
        if missing:
            raise RuntimeError(f"sm_{ptx_arch} is the PTX arch but variants {missing[:5]} have no PTX")
        sets.append(ImageSet(ptx_arch, ptx=True))
    return sets


def render_table_cpp(triton_version: str, kernels: Mapping[int, Mapping[int, CompiledVariant]],
                     blobs: Mapping[ImageSet, bytes], offsets: Mapping[ImageSet, Mapping[int, int]],
                     skipped: Iterable[int] = ()) -> str:
    archs = sorted(kernels)
    sets = image_sets(kernels)
    ptx = [s for s in sets if s.ptx]
    lines = [
        "// Generated by kernels/build_aot.py: do not edit.",
        f"// Cubins of rope_qk_kernel compiled by Triton {triton_version} for sm_{', sm_'.join(map(str, archs))}"
        + (f"; PTX of sm_{ptx[0].arch}." if ptx else "; no PTX."),
        '#include "cuda/kernel_table.h"',
        "",
        "#include <cstddef>",
        "",
    ]
    for images in sets:
        lines += _asm_block(images, blobs[images]) + [""]
    lines += ["namespace rope_kernels::cuda {", "", "namespace {", ""]
    for images in sets:
        lines += _arch_table(images, kernels[images.arch], offsets[images]) + [""]
    lines += ["}  // namespace", "", "const ArchKernels kBuiltArchs[] = {"]
    lines += [f"    {{{s.arch}, {s.table_name}, false}}," for s in sets if not s.ptx]
    lines += [
        "};",
        "const int kNumBuiltArchs = static_cast<int>(sizeof(kBuiltArchs) / sizeof(kBuiltArchs[0]));",
        f"const ArchKernels kPtxKernels = {{{ptx[0].arch}, {ptx[0].table_name}, true}};" if ptx
        else "const ArchKernels kPtxKernels = {0, nullptr, true};",
        f"const char* const kTritonVersion = {_c_string(triton_version)};",
        f"const char* const kSkippedArchsJson = {_c_string(json.dumps(sorted(skipped)))};",
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
        "ptx_architecture": aot_specs.ptx_arch(archs),
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



def remove_stale_blobs(out_dir: Path, sets: Iterable[ImageSet]) -> None:
    """Drop blobs of image sets no longer built, so the output dir holds exactly this build."""
    keep = {s.blob_name for s in sets}
    for path in [*out_dir.glob("cubins_sm*.bin"), *out_dir.glob("ptx_sm*.bin")]:
        if path.name not in keep:
            path.unlink()


def write_outputs(out_dir: Path, triton_version: str, inputs_sha256: Mapping[str, str],
                  kernels: Mapping[int, Mapping[int, CompiledVariant]], skipped: Mapping[int, str]) -> list[Path]:
    """Write blobs, table and manifest; return the files whose content changed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    changed: list[Path] = []
    blobs: dict[ImageSet, bytes] = {}
    offsets: dict[ImageSet, dict[int, int]] = {}
    sets = image_sets(kernels)
    for images in sets:
        blobs[images], offsets[images] = pack_blob(images, kernels[images.arch])
        path = out_dir / images.blob_name
        if write_if_changed(path, blobs[images]):
            changed.append(path)
    texts = {
        TABLE_CPP: render_table_cpp(triton_version, kernels, blobs, offsets, skipped),
        MANIFEST_JSON: render_manifest(triton_version, inputs_sha256, sorted(kernels), skipped, kernels),
    }
    for name, text in texts.items():
        if write_if_changed(out_dir / name, text.encode()):
            changed.append(out_dir / name)
    remove_stale_blobs(out_dir, sets)
    return changed
